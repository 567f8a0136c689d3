"""AWS's local durable-execution runner as a process, and a local Lambda Invoke endpoint for it to call.

``AWSLocalRunner`` runs ``start-server`` of ``aws-durable-execution-sdk-python-testing`` on a free port of
127.0.0.1; ``LambdaEndpoint`` is the ``--lambda-endpoint`` it calls: an HTTP server implementing
``POST /2015-03-31/functions/{name}/invocations`` that runs the handler registered under ``name`` in this
process. Both are plain objects (no pytest needed).

Example:
    >>> with LambdaEndpoint() as endpoint, AWSLocalRunner(endpoint.url) as runner:   # doctest: +SKIP
    ...     endpoint.register("greet", with_durable_execution(greet, DurableExecutionConfig(
    ...         client=AWSDurableExecutionClient(runner.lambda_client()))))
    ...     arn = runner.start("greet", {"name": "ada"})
    ...     runner.wait(arn)["Status"]
    'SUCCEEDED'
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

from errands.core.testing import free_port, wait_for_port

__all__ = ["AWSLocalRunner", "LambdaEndpoint", "aws_runner_available", "normalise_history"]

RUNNER_MODULE = "aws_durable_execution_sdk_python_testing.cli"
REGION = "us-west-2"
ACCOUNT = "123456789012"
_TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "STOPPED")


def aws_runner_available() -> str | None:
    """Why the runner cannot run here (None when it can): the testing package or boto3 is missing."""
    import importlib.util

    missing = [name for name in ("aws_durable_execution_sdk_python_testing", "boto3")
               if importlib.util.find_spec(name) is None]
    if missing:
        return (f"AWS's local durable-execution runner is not installed (no {', '.join(missing)}); "
                "pip install aws-durable-execution-sdk-python-testing boto3")
    return None


class _LambdaContext:
    """What a Lambda handler's second argument offers (the parts durable handlers read)."""

    def __init__(self, function_name: str, request_id: str, deadline: float) -> None:
        self.function_name = function_name.split(":", 1)[0]
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{function_name}"
        self.aws_request_id = request_id
        self.memory_limit_in_mb = "128"
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name = request_id
        self.identity = None
        self.client_context = None
        self.tenant_id = None
        self._deadline = deadline

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class LambdaEndpoint:
    """A local Lambda Invoke endpoint: ``register(name, handler)``, then point the runner at ``url``.

    A handler returning an object with ``to_dict()`` (``InvocationOutput``) is answered with that dict, any
    other value as JSON. A handler that raises is answered as Lambda does (``X-Amz-Function-Error:
    Unhandled`` and ``errorMessage`` / ``errorType`` / ``stackTrace``). ``invocations`` counts the calls per
    function name.
    """

    def __init__(self, timeout: float = 900.0) -> None:
        self.handlers: dict[str, Callable[[Any, Any], Any]] = {}
        self.invocations: dict[str, int] = {}
        self.errors: list[str] = []
        self._timeout = timeout
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                endpoint._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="lambda-endpoint", daemon=True)
        self._thread.start()

    def register(self, name: str, handler: Callable[[Any, Any], Any]) -> None:
        """Serve ``handler(event, lambda_context)`` as the function ``name``."""
        self.handlers[name] = handler

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        parts = [unquote(p) for p in urlsplit(request.path).path.strip("/").split("/")]
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        if len(parts) != 4 or parts[0] != "2015-03-31" or parts[1] != "functions" or parts[3] != "invocations":
            self._reply(request, 404, {"Type": "User", "Message": f"unknown route {request.path}"},
                        {"X-Amzn-ErrorType": "ResourceNotFoundException"})
            return
        name = parts[2]
        handler = self.handlers.get(name) or self.handlers.get(name.split(":", 1)[0])
        if handler is None:
            self._reply(request, 404, {"Type": "User", "Message": f"Function not found: {name}"},
                        {"X-Amzn-ErrorType": "ResourceNotFoundException"})
            return
        with self._lock:
            self.invocations[name] = self.invocations.get(name, 0) + 1
        request_id = str(uuid.uuid4())
        headers = {"X-Amzn-RequestId": request_id, "X-Amz-Executed-Version": "$LATEST"}
        try:
            event = json.loads(body) if body.strip() else None
            out = handler(event, _LambdaContext(name, request_id, time.monotonic() + self._timeout))
            to_dict = getattr(out, "to_dict", None)
            payload = to_dict() if callable(to_dict) else out
            data = json.dumps(payload)
        except Exception as exc:
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            headers["X-Amz-Function-Error"] = "Unhandled"
            self._reply(request, 200, {"errorMessage": str(exc), "errorType": type(exc).__name__,
                                       "stackTrace": traceback.format_tb(exc.__traceback__)}, headers)
            return
        self._reply_raw(request, 200, data.encode(), headers)

    def _reply(self, request: BaseHTTPRequestHandler, status: int, body: Any, headers: Mapping[str, str]) -> None:
        self._reply_raw(request, status, json.dumps(body).encode(), headers)

    @staticmethod
    def _reply_raw(request: BaseHTTPRequestHandler, status: int, data: bytes, headers: Mapping[str, str]) -> None:
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            request.send_header(k, v)
        request.end_headers()
        request.wfile.write(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LambdaEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AWSLocalRunner:
    """AWS's local durable-execution runner (``start-server``) on a free port, calling ``lambda_endpoint``.

    Args:
        lambda_endpoint: the Lambda Invoke endpoint the runner sends handler invocations to.
        function_configs: the functions a durable function may invoke (chained invokes), in Lambda's shape:
            ``{"child": {"DurableConfig": {"ExecutionTimeout": 60}}, "plain": {}}``.
        skip_time: let durable timers fire at once (the history keeps the modelled durations).
        python: the interpreter that has the testing package (default: this one).
    """

    def __init__(self, lambda_endpoint: str, *, function_configs: Mapping[str, Any] | None = None,
                 skip_time: bool = True, python: str | None = None, timeout: float = 60.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [python or sys.executable, "-m", RUNNER_MODULE, "start-server", "--host", "127.0.0.1",
                "--port", str(self.port), "--lambda-endpoint", lambda_endpoint,
                "--local-runner-endpoint", self.url, "--local-runner-region", REGION,
                "--log-level", "WARNING", "--execution-timeout", "300"]
        argv.append("--skip-time" if skip_time else "--no-skip-time")
        if function_configs:
            argv += ["--function-configs", json.dumps(dict(function_configs))]
        fd, self.log_path = tempfile.mkstemp(prefix="errands-aws-runner-", suffix=".log")
        env = dict(os.environ, AWS_ACCESS_KEY_ID="local", AWS_SECRET_ACCESS_KEY="local", AWS_DEFAULT_REGION=REGION)
        env.pop("AWS_PROFILE", None)
        env.pop("AWS_SESSION_TOKEN", None)
        with os.fdopen(fd, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
        self._client: Any = None
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the AWS local runner exited with {self.process.returncode}: "
                                       f"{self.log_tail()}")
                try:
                    wait_for_port(self.port, timeout=0.5)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the AWS local runner did not listen on {self.port}: "
                                           f"{self.log_tail()}") from None
        except BaseException:
            self.stop()
            raise

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]
        return ""

    def lambda_client(self) -> Any:
        """A new boto3 Lambda client pointed at the runner, with dummy credentials."""
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]

        return boto3.client("lambda", endpoint_url=self.url, region_name=REGION, aws_access_key_id="local",
                            aws_secret_access_key="local",
                            config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=60))

    @property
    def client(self) -> Any:
        """A shared boto3 Lambda client for the test's own calls (history, callbacks)."""
        if self._client is None:
            self._client = self.lambda_client()
        return self._client

    def start(self, function_name: str, input: Any = None, *, name: str | None = None,
              execution_timeout: int = 120) -> str:
        """Start a durable execution of ``function_name`` with ``input`` (JSON) and return its ARN."""
        import urllib.request

        body = {"AccountId": ACCOUNT, "FunctionName": function_name, "FunctionQualifier": "$LATEST",
                "ExecutionName": name or f"{function_name}-{uuid.uuid4().hex[:12]}",
                "ExecutionTimeoutSeconds": execution_timeout, "ExecutionRetentionPeriodDays": 1,
                "InvocationId": str(uuid.uuid4()), "Input": json.dumps(input)}
        request = urllib.request.Request(f"{self.url}/start-durable-execution", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(json.loads(response.read())["ExecutionArn"])

    def describe(self, arn: str) -> dict[str, Any]:
        out = dict(self.client.get_durable_execution(DurableExecutionArn=arn))
        out.pop("ResponseMetadata", None)
        return out

    def wait(self, arn: str, timeout: float = 30.0, *, until: Callable[[dict[str, Any]], bool] | None = None,
             poll: float = 0.02) -> dict[str, Any]:
        """Poll ``GetDurableExecution`` until the execution ends (or ``until(description)``) and return it.

        Raises:
            TimeoutError: it did not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            d = self.describe(arn)
            if (until(d) if until is not None else d.get("Status") in _TERMINAL):
                return d
            if time.monotonic() > deadline:
                raise TimeoutError(f"execution {arn} is still {d.get('Status')} after {timeout}s; "
                                   f"runner log: {self.log_tail(1500)}")
            time.sleep(poll)

    def history(self, arn: str) -> list[dict[str, Any]]:
        """Every event of ``GetDurableExecutionHistory`` (with execution data), in order."""
        events: list[dict[str, Any]] = []
        marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {"DurableExecutionArn": arn, "IncludeExecutionData": True}
            if marker:
                kwargs["Marker"] = marker
            page = self.client.get_durable_execution_history(**kwargs)
            events.extend(page.get("Events") or [])
            marker = page.get("NextMarker")
            if not marker:
                return events

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)

    def __enter__(self) -> AWSLocalRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Keys whose values differ between two runs of the same scenario: ids, times, tokens, request ids.
_VOLATILE = {"EventId", "EventTimestamp", "CallbackId", "DurableExecutionArn", "StackTrace",
             "ScheduledEndTimestamp", "NextAttemptTimestamp", "RequestId", "StartTimestamp", "EndTimestamp"}


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def normalise_history(events: list[Mapping[str, Any]], *, keep_errors: bool = False,
                      decode: Callable[[str], Any] = _json_or_text) -> list[dict[str, Any]]:
    """The history with ids replaced by their order of appearance, times and tokens dropped, and
    ``InvocationCompleted`` events left out (how many invocations an execution takes is the engine's
    business), payloads parsed as JSON and the execution's own name dropped, so two engines' histories of one scenario compare equal when their operations do.

    ``ErrorType`` values are kept when ``keep_errors``; otherwise error objects become ``{"Error": ...}``
    with the message only (each SDK names its error types its own way). ``decode`` reads a payload
    (default: JSON, else the text).
    """
    ids: dict[str, str] = {}

    def ref(value: Any) -> str:
        key = str(value)
        if key not in ids:
            ids[key] = f"op{len(ids)}"
        return ids[key]

    def clean(value: Any, key: str = "") -> Any:
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for k, v in value.items():
                if k in ("Id", "ParentId"):
                    out[k] = ref(v)
                elif k in _VOLATILE:
                    continue
                elif k == "Name" and str(value.get("EventType", "")).startswith("Execution"):
                    continue  # the execution's own name: unique per run
                elif k == "Payload" and isinstance(v, str):
                    out[k] = decode(v)  # the same value, whatever JSON spacing each serdes uses
                elif k == "Error" and isinstance(v, Mapping) and not keep_errors:
                    inner = v.get("Payload", v) if isinstance(v.get("Payload", v), Mapping) else v
                    out[k] = {"ErrorMessage": inner.get("ErrorMessage")}
                else:
                    out[k] = clean(v, k)
            return out
        if isinstance(value, list):
            return [clean(v, key) for v in value]
        return value

    return [clean(e) for e in events if e.get("EventType") != "InvocationCompleted"]
