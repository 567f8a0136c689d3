"""A 30 second wait on a fresh InMemoryClient: the invocation suspends, the execution is PENDING.

Prints: PENDING
"""

from errands.durable import DurableExecutionConfig, Duration, InMemoryClient, with_durable_execution

client = InMemoryClient()


def handler(event, ctx):
    ctx.wait("cooldown", Duration(seconds=30))
    return "done"


wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
out = wrapped({
    "DurableExecutionArn": "arn:aws:lambda:us-east-1:123456789012:function:waiter:$LATEST/durable-execution/run-2/inv-1",
    "CheckpointToken": "token-2",
    "InitialExecutionState": {"Operations": [{
        "Id": "execution-root", "Type": "EXECUTION", "Status": "STARTED",
        "ExecutionDetails": {"InputPayload": "{}"},
    }]},
})
print(out.status)
