"""A step on a fresh InMemoryClient, invoked with a hand-built durable invocation input.

Prints: SUCCEEDED "hello alice"
"""

import json

from errands.durable import DurableExecutionConfig, InMemoryClient, with_durable_execution

client = InMemoryClient()


def handler(event, ctx):
    return ctx.step("greet", lambda step: f"hello {event['name']}")


wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
out = wrapped({
    "DurableExecutionArn": "arn:aws:lambda:us-east-1:123456789012:function:greet:$LATEST/durable-execution/run-1/inv-1",
    "CheckpointToken": "token-1",
    "InitialExecutionState": {"Operations": [{
        "Id": "execution-root", "Type": "EXECUTION", "Status": "STARTED",
        "ExecutionDetails": {"InputPayload": json.dumps({"name": "alice"})},
    }]},
})
print(out.status, out.result)
