"""A map doubling [1, 2, 3] on a fresh InMemoryClient, each item a step in its own child context.

Prints: SUCCEEDED {"success":3,"total":3,"values":[2,4,6]}
"""

from errands.durable import DurableExecutionConfig, InMemoryClient, with_durable_execution

client = InMemoryClient()


def handler(event, ctx):
    def double(child, item, index, items):
        return child.step(f"double-{index}", lambda step: item * 2)

    result = ctx.map("double", event["items"], double)
    return {"values": result.results(), "total": result.total_count, "success": result.success_count}


wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
out = wrapped({
    "DurableExecutionArn": "arn:aws:lambda:us-east-1:123456789012:function:mapper:$LATEST/durable-execution/run-3/inv-1",
    "CheckpointToken": "token-3",
    "InitialExecutionState": {"Operations": [{
        "Id": "execution-root", "Type": "EXECUTION", "Status": "STARTED",
        "ExecutionDetails": {"InputPayload": '{"items": [1, 2, 3]}'},
    }]},
})
print(out.status, out.result)
