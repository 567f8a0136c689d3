"""Durable workflows: 200 sequential workflows of three steps on SQLite, errands-durable beside DBOS.

Every workflow runs in the calling thread, start to finish, with each step's result checkpointed before
the next step runs:

- ``errands sync``: ``DurableRunner("sqlite:///...").run("three", i)`` with its default durability (WAL,
  ``synchronous=FULL``, one commit per step result, the steps' starts and the execution's start and end
  in their own commits);
- ``errands async (3 async steps)``: the same workflow as an ``async def`` function whose three steps are
  ``async def`` too, each awaited in turn (the same commits);
- ``DBOS defaults``: ``@DBOS.workflow`` / ``@DBOS.step`` on its SQLite system database as DBOS opens it
  (rollback journal, ``synchronous=FULL``);
- ``DBOS tuned``: the same on a system database engine opened in WAL mode, at errands' durability
  (``synchronous=FULL``: every commit survives power loss), passed as ``system_database_engine``, with
  DBOS's own connection settings: IMMEDIATE transactions, ``busy_timeout``, foreign keys.

And on AWS's local durable-execution runner (``start-server`` of ``aws-durable-execution-sdk-python-testing``,
in memory, ``--skip-time``), 100 sequential executions of the same three-step function through a local
Lambda Invoke endpoint in this process, each started with ``/start-durable-execution`` and polled with
``GetDurableExecution`` until it ends:

- ``errands on the AWS runner``: ``with_durable_execution(three, DurableExecutionConfig(client=
  AWSDurableExecutionClient(...)))``;
- ``AWS SDK on the AWS runner``: AWS's ``@durable_execution`` (``aws-durable-execution-sdk-python``) on
  the same function.

Queued workflows: ``--queued`` (1,000) of the same workflow started on a queue with concurrency 8 and run
to the end, timed from the first start to the last result:

- ``errands queued``: ``runner.add_queue("bench", concurrency=8)``, ``start(..., queue="bench")`` for each,
  then ``drain()`` on a runner with ``max_parallelism=8``;
- ``DBOS queued``: ``DBOS.register_queue("bench", global_concurrency=8)``, ``queue.enqueue`` for each, then
  every handle's ``get_result()``, on the tuned system database (WAL, ``synchronous=FULL``) and with the
  queue polled every 10 ms (``polling_interval_sec=0.01``; at its default of one second a queue of
  concurrency 8 admits at most 8 workflows a second).

Restate (``restate-server`` from the npm package ``@restatedev/restate-server``, run with ``npx``, at its
defaults; the service written with ``restate-sdk`` and served by hypercorn in a child process, registered
through the admin API): the same three-step workflow (each step a ``ctx.run_typed``), ``--workflows`` calls
through the ingress one after another, and again by 16 callers at once, beside errands sequentially
(``errands sync``) and with 16 in flight: 16 caller threads each calling ``runner.run(...)`` (as Restate's 16
callers each wait for their call: the goal line's row, the same shape on both sides), and all started from one
thread, then ``drain()`` with ``max_parallelism=16`` (its 200 starts are committed one after another, each
before the next, before the drain begins; its ratio is printed beside the goal line).
When the server cannot be started the bench says why and prints no Restate rows.

DBOS is a process-wide singleton, so each DBOS configuration runs in a child process of this script; the
timings exclude start-up and a warm-up of 10 workflows. Each figure is the best of ``--repeat`` rounds.

And one ``ctx.effect`` round trip per workflow (``--effects`` sequential workflows on SQLite): a workflow
whose one operation is ``ctx.effect`` to a no-op connector (submitted with the checkpoint, dispatched by
``Outbox.dispatch_once``, its end read from the journal by the runner's next ``work_once``, which wakes and
finishes the execution), beside the same workflow with a plain ``ctx.step``.

Run: ``hatch run bench:durable`` (options: ``--workflows``, ``--queued``, ``--effects``, ``--aws-runs``,
``--repeat``, ``--no-restate``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# ``python bench/durable.py`` puts bench/ first on sys.path, where sibling scripts (bench/http.py) would
# shadow standard-library modules that DBOS imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]  # after the stdlib

from _tables import print_table  # noqa: E402

WARMUP = 10


def run_errands(workdir: str, n: int, repeat: int) -> tuple[float, float]:
    """Best seconds of the sync and of the async workflow, their rounds interleaved (so that a noisy
    moment of the machine does not favour one of them)."""
    from errands.durable import AsyncDurableContext, DurableContext, DurableRunner

    def three(event: Any, ctx: DurableContext) -> int:
        a = ctx.step("one", lambda _: event + 1)
        b = ctx.step("two", lambda _: a * 2)
        return ctx.step("three", lambda _: b + 3)  # type: ignore[no-any-return]

    async def three_async(event: Any, ctx: AsyncDurableContext) -> int:
        async def one(_: Any) -> int:
            return event + 1  # type: ignore[no-any-return]

        a = await ctx.step("one", one)

        async def two(_: Any) -> int:
            return a * 2  # type: ignore[no-any-return]

        b = await ctx.step("two", two)

        async def three_step(_: Any) -> int:
            return b + 3  # type: ignore[no-any-return]

        return await ctx.step("three", three_step)  # type: ignore[no-any-return]

    def timed(fn: Any, path: str) -> float:
        runner = DurableRunner(f"sqlite:///{path}", functions={"three": fn})
        for i in range(WARMUP):
            runner.run("three", i)
        started = time.perf_counter()
        for i in range(n):
            info = runner.run("three", i)
            assert info.result == (i + 1) * 2 + 3, info
        seconds = time.perf_counter() - started
        runner.close()
        return seconds

    best_sync = best_async = float("inf")
    for r in range(repeat):
        best_sync = min(best_sync, timed(three, os.path.join(workdir, f"errands-{r}.db")))
        best_async = min(best_async, timed(three_async, os.path.join(workdir, f"errands-async-{r}.db")))
    return best_sync, best_async


def _three(event: Any, ctx: Any) -> int:
    a = ctx.step("one", lambda _: event + 1)
    b = ctx.step("two", lambda _: a * 2)
    return ctx.step("three", lambda _: b + 3)  # type: ignore[no-any-return]


def run_errands_many(workdir: str, n: int, repeat: int, *, in_flight: int, queue: int | None) -> float:
    """Best seconds for ``n`` workflows started (on a queue of concurrency ``queue``, if given) and then
    drained with ``max_parallelism=in_flight``."""
    from errands.durable import DurableRunner, ExecutionStatus

    best = float("inf")
    for r in range(repeat):
        runner = DurableRunner(f"sqlite:///{os.path.join(workdir, f'errands-many-{in_flight}-{queue}-{r}.db')}",
                               functions={"three": _three}, max_parallelism=in_flight)
        options: dict[str, Any] = {}
        if queue is not None:
            runner.add_queue("bench", concurrency=queue)
            options["queue"] = "bench"
        for i in range(WARMUP):
            runner.start("three", i, **options)
        runner.drain()
        started = time.perf_counter()
        for i in range(n):
            runner.start("three", i, **options)
        runner.drain()
        best = min(best, time.perf_counter() - started)
        done = runner.list(ExecutionStatus.SUCCEEDED, limit=n + WARMUP)
        assert len(done) == n + WARMUP and all(i.result == (i.input + 1) * 2 + 3 for i in done)
        runner.close()
    return best


def run_errands_callers(workdir: str, n: int, repeat: int, callers: int) -> float:
    """Best seconds for ``n`` workflows run by ``callers`` threads at once, each ``runner.run(...)`` (start
    and run to the end in the caller's thread), as a service's request handlers would."""
    from errands.durable import DurableRunner

    best = float("inf")
    for r in range(repeat):
        runner = DurableRunner(f"sqlite:///{os.path.join(workdir, f'errands-callers-{r}.db')}",
                               functions={"three": _three})
        for i in range(WARMUP):
            runner.run("three", i)

        def call(i: int) -> None:
            assert runner.run("three", i).result == (i + 1) * 2 + 3

        with ThreadPoolExecutor(callers) as pool:
            started = time.perf_counter()
            list(pool.map(call, range(n)))
            best = min(best, time.perf_counter() - started)
        runner.close()
    return best


def run_aws(n: int, repeat: int) -> tuple[float, float]:
    """Best seconds of errands and of AWS's SDK for ``n`` executions each on AWS's local runner, rounds
    interleaved."""
    from aws_durable_execution_sdk_python.execution import durable_execution

    from errands.durable import AWSDurableExecutionClient, DurableExecutionConfig, with_durable_execution
    from errands.durable.testing import AWSLocalRunner, LambdaEndpoint

    def three(event: Any, ctx: Any) -> int:
        a = ctx.step(lambda _: event + 1, name="one")
        b = ctx.step(lambda _: a * 2, name="two")
        return ctx.step(lambda _: b + 3, name="three")  # type: ignore[no-any-return]

    with LambdaEndpoint() as endpoint, AWSLocalRunner(endpoint.url) as runner:
        endpoint.register("errands-three", with_durable_execution(three, DurableExecutionConfig(
            client=AWSDurableExecutionClient(runner.lambda_client()))))
        endpoint.register("aws-three", durable_execution(three, boto3_client=runner.lambda_client()))

        def timed(function: str, count: int) -> float:
            started = time.perf_counter()
            for i in range(count):
                arn = runner.start(function, i)
                out = runner.wait(arn, 60, poll=0.001)
                assert out["Status"] == "SUCCEEDED" and json.loads(out["Result"]) == (i + 1) * 2 + 3, out
            return time.perf_counter() - started

        timed("errands-three", WARMUP)
        timed("aws-three", WARMUP)
        best_errands = best_aws = float("inf")
        for _ in range(repeat):
            best_errands = min(best_errands, timed("errands-three", n))
            best_aws = min(best_aws, timed("aws-three", n))
    return best_errands, best_aws


def run_dbos(workdir: str, n: int, repeat: int, tuned: bool, queued: bool = False) -> float:
    import logging

    import sqlalchemy as sa
    from dbos import DBOS, DBOSConfig, Queue

    logging.getLogger("dbos").setLevel(logging.WARNING)

    @DBOS.step()
    def one(x: int) -> int:
        return x + 1

    @DBOS.step()
    def two(x: int) -> int:
        return x * 2

    @DBOS.step()
    def three_step(x: int) -> int:
        return x + 3

    @DBOS.workflow()
    def three(x: int) -> int:
        return three_step(two(one(x)))

    queue: Queue | None = None

    def run_all(count: int) -> None:
        if queue is None:
            for i in range(count):
                assert three(i) == (i + 1) * 2 + 3
            return
        handles = [queue.enqueue(three, i) for i in range(count)]
        for i, handle in enumerate(handles):
            assert handle.get_result() == (i + 1) * 2 + 3

    best = float("inf")
    for r in range(repeat):
        kind = ("queued-" if queued else "") + ("tuned" if tuned else "default")
        url = f"sqlite:///{os.path.join(workdir, f'dbos-{kind}-{r}.sqlite')}"
        config: DBOSConfig = {"name": "bench-durable", "system_database_url": url, "log_level": "WARNING"}
        if tuned:
            engine = sa.create_engine(url)

            @sa.event.listens_for(engine, "connect")
            def _tune(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = "IMMEDIATE"
                dbapi_conn.execute("PRAGMA busy_timeout=30000")
                dbapi_conn.execute("PRAGMA foreign_keys=ON")
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA synchronous=FULL")

            config["system_database_engine"] = engine
        DBOS(config=config)
        DBOS.launch()
        if queued:
            queue = DBOS.register_queue("bench", global_concurrency=8, polling_interval_sec=0.01)
        run_all(WARMUP)
        started = time.perf_counter()
        run_all(n)
        best = min(best, time.perf_counter() - started)
        DBOS.destroy(destroy_registry=False)
    return best


def run_effects(workdir: str, n: int, repeat: int) -> tuple[float, float]:
    """Best seconds of ``n`` workflows of one ``ctx.effect`` (each driven to its end: run, dispatch, wake)
    and of ``n`` workflows of one step, their rounds interleaved."""
    from errands.core import DispatchOutcome, DispatchResult, Effect, Outbox
    from errands.durable import DurableContext, DurableRunner

    class NoOp:
        name = "noop"

        def dispatch(self, effect: Any) -> DispatchResult:
            return DispatchResult(outcome=DispatchOutcome.CONFIRMED)

    def with_effect(event: Any, ctx: DurableContext) -> Any:
        return ctx.effect("pay", Effect(key="-", connector="noop", payload=event)).status.value

    def with_step(event: Any, ctx: DurableContext) -> Any:
        return ctx.step("pay", lambda _: "CONFIRMED")

    def timed(fn: Any, path: str) -> float:
        runner = DurableRunner(f"sqlite:///{path}", functions={"one": fn})
        outbox = Outbox(runner.store, connectors={"noop": NoOp()})
        runner.use_outbox(outbox)

        def one(i: int) -> None:
            info = runner.run("one", i)
            if not info.status.terminal:
                outbox.dispatch_once()
                runner.work_once()
                info = runner.get(info.execution_id)
            assert info.result == "CONFIRMED", info

        started = 0.0
        for i in range(WARMUP + n):  # the first WARMUP workflows are not timed
            if i == WARMUP:
                started = time.perf_counter()
            one(i)
        try:
            return time.perf_counter() - started
        finally:
            outbox.close()
            runner.close()

    best = {"effect": float("inf"), "step": float("inf")}
    for r in range(repeat):  # rounds interleaved
        for label, fn in (("effect", with_effect), ("step", with_step)):
            best[label] = min(best[label], timed(fn, os.path.join(workdir, f"{label}-{r}.db")))
    return best["effect"], best["step"]


RESTATE_SERVER = ["npx", "--yes", "@restatedev/restate-server"]
RESTATE_IN_FLIGHT = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_restate_service(port: int) -> None:
    """The child process serving the three-step workflow as a Restate service (hypercorn, HTTP/2)."""
    import asyncio

    import restate
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    service = restate.Service("bench")

    def one(x: int) -> int:
        return x + 1

    def two(x: int) -> int:
        return x * 2

    def three_step(x: int) -> int:
        return x + 3

    async def three(ctx: Any, x: int) -> int:
        a = await ctx.run_typed("one", one, restate.RunOptions(), x)
        b = await ctx.run_typed("two", two, restate.RunOptions(), a)
        return await ctx.run_typed("three", three_step, restate.RunOptions(), b)  # type: ignore[no-any-return]

    # The SDK reads the handler's annotations as objects (this module's are strings, postponed).
    three.__annotations__ = {"ctx": restate.Context, "x": int, "return": int}
    service.handler()(three)

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.h2_max_concurrent_streams = 2**31 - 1
    config.keep_alive_max_requests = 2**31 - 1
    config.accesslog = None
    config.errorlog = None  # its start-up lines and the lifespan notice are not the table
    asyncio.run(serve(restate.app([service]), config, mode="asgi"))  # type: ignore[arg-type]


def _wait_until(ok: Any, seconds: float, what: str, procs: list[subprocess.Popen[Any]]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: the process {proc.args!r} exited with {proc.returncode}")
        try:
            if ok():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not up after {seconds:.0f}s")


def run_restate(workdir: str, n: int, repeat: int) -> tuple[float, float] | str:
    """Best seconds of ``n`` Restate calls one after another and with 16 in flight, or why Restate could
    not be run."""
    import httpx

    if shutil.which("npx") is None:
        return "npx is not installed (Node.js is needed for the npm package @restatedev/restate-server)"
    admin, ingress, fabric, service_port = (_free_port() for _ in range(4))
    env = {**os.environ, "RESTATE_ADMIN__BIND_ADDRESS": f"127.0.0.1:{admin}",
           "RESTATE_INGRESS__BIND_ADDRESS": f"127.0.0.1:{ingress}",
           "RESTATE_ADMIN__QUERY_ENGINE__PGSQL_BIND_ADDRESS": f"127.0.0.1:{_free_port()}"}
    log_path = os.path.join(workdir, "restate-server.log")
    procs: list[subprocess.Popen[Any]] = []
    try:
        with open(log_path, "wb") as log_file:
            procs.append(subprocess.Popen(
                [*RESTATE_SERVER, "--no-logo", "--listen-mode", "tcp", "--bind-port", str(fabric), "--base-dir",
                 os.path.join(workdir, "restate-data")], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True))  # npx runs node, which runs the server: stopped as one group
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", "restate-service", "--port",
                                       str(service_port)], start_new_session=True))
        client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=2 * RESTATE_IN_FLIGHT))
        with client:
            _wait_until(lambda: client.get(f"http://127.0.0.1:{admin}/health").status_code == 200, 180,
                        "restate-server", procs)
            _wait_until(lambda: socket.create_connection(("127.0.0.1", service_port), 1).close() is None, 60,
                        "the Restate service (hypercorn)", procs)
            reply = client.post(f"http://127.0.0.1:{admin}/deployments", json={"uri": f"http://127.0.0.1:{service_port}"})
            if reply.status_code >= 300:
                return f"registering the deployment failed: HTTP {reply.status_code} {reply.text[:200]}"
            url = f"http://127.0.0.1:{ingress}/bench/three"

            def call(i: int) -> None:
                got = client.post(url, json=i)
                assert got.status_code == 200 and got.json() == (i + 1) * 2 + 3, (got.status_code, got.text)

            _wait_until(lambda: client.post(url, json=0).status_code == 200, 60, "the Restate ingress", procs)
            for i in range(WARMUP):
                call(i)
            best_seq = best_flight = float("inf")
            with ThreadPoolExecutor(RESTATE_IN_FLIGHT) as pool:
                for _ in range(repeat):
                    started = time.perf_counter()
                    for i in range(n):
                        call(i)
                    best_seq = min(best_seq, time.perf_counter() - started)
                    started = time.perf_counter()
                    list(pool.map(call, range(n)))
                    best_flight = min(best_flight, time.perf_counter() - started)
        return best_seq, best_flight
    except (OSError, RuntimeError) as exc:
        tail = ""
        if os.path.exists(log_path):
            with open(log_path, "rb") as f:
                tail = f.read()[-400:].decode(errors="replace").strip()
        return f"{exc}" + (f" (server log ends: {tail})" if tail else "")
    finally:
        for proc in reversed(procs):
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    """Stop ``proc`` and every process it started (its own session's group): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader: a zombie still counts as one of the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            continue
        break
    proc.wait()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--aws-runs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--effects", type=int, default=200)
    parser.add_argument("--no-restate", action="store_true", help="skip the Restate rows")
    parser.add_argument("--child", choices=["dbos-default", "dbos-tuned", "dbos-queued", "restate-service"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "restate-service":
        serve_restate_service(args.port)
        return
    if args.child:
        seconds = run_dbos(args.workdir, args.workflows, args.repeat, tuned=args.child != "dbos-default",
                           queued=args.child == "dbos-queued")
        print(json.dumps({"seconds": seconds}))
        return
    n = args.workflows
    with tempfile.TemporaryDirectory(prefix="errands-bench-durable-") as tmp:
        results: list[tuple[str, str, float]] = []
        sync_s, async_s = run_errands(tmp, n, args.repeat)
        results.append(("errands sync", "WAL, synchronous=FULL (default)", sync_s))
        results.append(("errands async (3 async steps)", "WAL, synchronous=FULL (default)", async_s))
        def dbos(child: str, workflows: int) -> float:
            out = subprocess.run(
                [sys.executable, __file__, "--child", child, "--workdir", tmp, "--workflows", str(workflows),
                 "--repeat", str(args.repeat)], check=True, capture_output=True, text=True)
            return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])

        for child, label in (("dbos-default", "defaults (rollback journal, synchronous=FULL)"),
                             ("dbos-tuned", "WAL, synchronous=FULL")):
            results.append((f"DBOS {child.split('-')[1]}", label, dbos(child, n)))
        queued_n = args.queued
        errands_queued = run_errands_many(tmp, queued_n, args.repeat, in_flight=8, queue=8)
        dbos_queued = dbos("dbos-queued", queued_n)
        errands_flight = run_errands_callers(tmp, n, args.repeat, RESTATE_IN_FLIGHT)
        errands_drain = run_errands_many(tmp, n, args.repeat, in_flight=RESTATE_IN_FLIGHT, queue=None)
        restate = "skipped (--no-restate)" if args.no_restate else run_restate(tmp, n, args.repeat)
        effect_s, step_s = run_effects(tmp, args.effects, args.repeat)
    errands_s = results[0][2]
    aws_n = args.aws_runs
    errands_aws_s, sdk_aws_s = run_aws(aws_n, args.repeat)
    print(f"{n} sequential workflows of 3 steps on SQLite (best of {args.repeat})\n")
    header = ["engine", "SQLite durability", "total s", "ms / workflow", "workflows / s", "vs errands sync"]
    rows = [[name, label, f"{s:.3f}", f"{1000 * s / n:.2f}", f"{n / s:.0f}", f"{s / errands_s:.2f}x"]
            for name, label, s in results]
    print_table(header, rows)
    print(f"\n{queued_n} workflows of 3 steps on a queue of concurrency 8, SQLite (best of {args.repeat})\n")
    rows = [[name, label, f"{s:.3f}", f"{queued_n / s:.0f}", f"{s / errands_queued:.2f}x"]
            for name, label, s in (("errands queued", "WAL, synchronous=FULL (default), max_parallelism=8",
                                    errands_queued),
                                   ("DBOS queued", "WAL, synchronous=FULL, polling_interval_sec=0.01",
                                    dbos_queued))]
    print_table(["engine", "settings", "total s", "workflows / s", "vs errands queued"], rows)
    print(f"\n{n} workflows of 3 steps, errands (SQLite) beside Restate, each at its defaults "
          f"(best of {args.repeat})\n")
    if isinstance(restate, str):
        print(f"Restate rows skipped: {restate}\n")
        rows = [[name, f"{s:.3f}", f"{n / s:.0f}"] for name, s in (
            ("errands sequential", errands_s), ("errands 16 in flight (16 callers)", errands_flight),
            ("errands 16 in flight (drain, max_parallelism=16)", errands_drain))]
        print_table(["engine", "total s", "workflows / s"], rows)
    else:
        restate_seq, restate_flight = restate
        rows = [[name, f"{s:.3f}", f"{n / s:.0f}", f"{s / base:.2f}x"] for name, s, base in (
            ("errands sequential", errands_s, errands_s), ("Restate sequential", restate_seq, errands_s),
            ("errands 16 in flight (16 callers)", errands_flight, errands_flight),
            ("errands 16 in flight (drain, max_parallelism=16)", errands_drain, errands_flight),
            ("Restate 16 in flight (16 callers)", restate_flight, errands_flight))]
        print_table(["engine", "total s", "workflows / s", "vs errands alike"], rows)
    print(f"\n{aws_n} sequential executions of 3 steps on AWS's local durable-execution runner "
          f"(best of {args.repeat})\n")
    header = ["engine", "total s", "ms / execution", "executions / s", "vs errands"]
    rows = [[name, f"{s:.3f}", f"{1000 * s / aws_n:.2f}", f"{aws_n / s:.0f}", f"{s / errands_aws_s:.2f}x"]
            for name, s in (("errands on the AWS runner", errands_aws_s), ("AWS SDK on the AWS runner", sdk_aws_s))]
    print_table(header, rows)
    en = args.effects
    print(f"\n{en} sequential workflows of one operation on SQLite, each driven to its end (best of {args.repeat})\n")
    header = ["workflow", "total s", "ms / workflow", "workflows / s", "vs plain step"]
    rows = [[name, f"{s:.3f}", f"{1000 * s / en:.2f}", f"{en / s:.0f}", f"{s / step_s:.2f}x"]
            for name, s in (("ctx.effect round trip (no-op connector)", effect_s), ("plain ctx.step", step_s))]
    print_table(header, rows)
    print(f"\nctx.effect round trip vs plain step: {effect_s / step_s:.2f}x the time")
    ratio = results[3][2] / errands_s
    print()
    print(f"durable vs tuned DBOS: {ratio:.2f}x (goal >= 1.5)")
    print(f"durable queued vs DBOS queued: {dbos_queued / errands_queued:.2f} (goal >= 2)")
    if not isinstance(restate, str):
        print(f"durable vs Restate: {restate[0] / errands_s:.2f} (goal >= 5)")
        print("(16 in flight, errands' drain row, where one thread starts the 200 one after another, each start "
              f"committed before the next, then drains them: {restate[1] / errands_drain:.2f})")
        print(f"durable 16 in flight vs Restate 16 in flight: {restate[1] / errands_flight:.2f} (goal >= 5)")
    print(f"async durable vs sync durable: {sync_s / async_s:.2f} (goal >= 0.8)")
    print(f"errands on the AWS runner vs the AWS SDK on it: {sdk_aws_s / errands_aws_s:.2f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
