"""Google Cloud emulators as processes on free ports (no pytest needed; ``testing`` wraps them in fixtures)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from errands.core.testing import free_port, wait_for_port

__all__ = [
    "TASKS_EMULATOR_VERSION",
    "EmulatorProcess",
    "start_pubsub_emulator",
    "start_spanner_emulator",
    "start_tasks_emulator",
    "tasks_emulator_python",
]

PUBSUB_EMULATOR = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
SPANNER_EMULATOR = "/usr/lib/google-cloud-sdk/bin/cloud_spanner_emulator/emulator_main"
TASKS_EMULATOR_VERSION = "0.6.2"
TEST_PROJECT = "errands-test"
SPANNER_INSTANCE = "errands-test"


@dataclass
class EmulatorProcess:
    """A running emulator: ``address`` is ``127.0.0.1:<port>``; ``stop()`` ends its process group."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


def _start(name: str, argv: list[str], port: int, timeout: float = 60.0) -> EmulatorProcess:
    fd, log_path = tempfile.mkstemp(prefix=f"errands-{name}-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    emulator = EmulatorProcess(name=name, port=port, process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the {name} emulator exited with {process.returncode}: {emulator.log_tail()}")
            try:
                wait_for_port(port, timeout=0.5)
                return emulator
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {name} emulator did not listen on {port}: {emulator.log_tail()}")
    except BaseException:
        emulator.stop()
        raise


def _binary(env: str, default: str) -> str | None:
    path = os.environ.get(env) or default
    return path if os.path.exists(path) else shutil.which(os.path.basename(path))


def start_pubsub_emulator() -> EmulatorProcess:
    """Start the Pub/Sub emulator on a free port.

    Raises:
        FileNotFoundError: the emulator (or Java) is not installed.
    """
    binary = _binary("ERRANDS_PUBSUB_EMULATOR", PUBSUB_EMULATOR)
    if binary is None or shutil.which("java") is None:
        raise FileNotFoundError(
            "the Pub/Sub emulator needs the Google Cloud SDK pubsub-emulator component and Java; "
            "set ERRANDS_PUBSUB_EMULATOR to its cloud-pubsub-emulator script"
        )
    port = free_port()
    return _start("pubsub", [binary, "--host=127.0.0.1", f"--port={port}"], port)


def start_spanner_emulator() -> EmulatorProcess:
    """Start the Spanner emulator on a free port.

    Raises:
        FileNotFoundError: ``emulator_main`` is not installed.
    """
    binary = _binary("ERRANDS_SPANNER_EMULATOR", SPANNER_EMULATOR)
    if binary is None:
        raise FileNotFoundError(
            "the Spanner emulator (cloud_spanner_emulator/emulator_main of the Google Cloud SDK) is not "
            "installed; set ERRANDS_SPANNER_EMULATOR to its path"
        )
    port = free_port()
    return _start("spanner", [binary, "--host_port", f"127.0.0.1:{port}"], port)


# Runs inside the emulator's own virtualenv. It adds what real Cloud Tasks does and 0.6.2 lacks: a task
# name seen before is refused with ALREADY_EXISTS (Cloud Tasks keeps names for hours after the task ran),
# GetTask returns a queued task or NOT_FOUND, DeleteTask removes one.
_LAUNCHER = '''
import threading
import sys

from google.api_core.exceptions import AlreadyExists, NotFound
from gcloud_tasks_emulator import server
from gcloud_tasks_emulator.__main__ import main

_lock = threading.Lock()
_seen = set()
_create = server.QueueState.create_task


def create_task(self, queue, task):
    with _lock:
        if task.name and task.name in _seen:
            raise AlreadyExists(f"Requested entity already exists: {task.name}")
        created = _create(self, queue, task)
        _seen.add(created.name)
        return created


def _find(state, name):
    queue = name.rsplit("/", 2)[0]
    for task in state._queue_tasks.get(queue, []):
        if task.name == name:
            return task
    raise NotFound(f"Requested entity was not found: {name}")


def get_task(self, request, context):
    try:
        return _find(self._state, request.name)
    except NotFound as err:
        context.abort(err.grpc_status_code, err.message)


def delete_task(self, request, context):
    from google.protobuf import empty_pb2

    try:
        task = _find(self._state, request.name)
        self._state._queue_tasks[request.name.rsplit("/", 2)[0]].remove(task)
        return empty_pb2.Empty()
    except (NotFound, ValueError) as err:
        context.abort(NotFound.grpc_status_code, str(err))


server.QueueState.create_task = create_task
server.Greeter.GetTask = get_task
server.Greeter.DeleteTask = delete_task
sys.argv[0] = "gcloud-tasks-emulator"
main()
'''


def _cache_dir() -> str:
    root = os.environ.get("ERRANDS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "errands"
    )
    os.makedirs(root, exist_ok=True)
    return root


def tasks_emulator_python() -> str:
    """The Python of the cached virtualenv holding ``gcloud-tasks-emulator``, built on first use.

    The emulator pins ``protobuf<5``, so it never shares an environment with the code under test.

    Raises:
        RuntimeError: the virtualenv could not be built (no network, no ``uv`` or ``venv``).
    """
    import fcntl

    root = _cache_dir()
    venv = os.path.join(root, f"gcloud-tasks-emulator-{TASKS_EMULATOR_VERSION}")
    python = os.path.join(venv, "bin", "python")
    ready = os.path.join(venv, ".errands-ready")
    with open(os.path.join(root, ".tasks-emulator.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(ready):
            return python
        shutil.rmtree(venv, ignore_errors=True)
        requirement = f"gcloud-tasks-emulator=={TASKS_EMULATOR_VERSION}"
        uv = shutil.which("uv")
        if uv:
            steps = [
                [uv, "venv", "-q", venv, "--python", sys.executable],
                [uv, "pip", "install", "-q", "--python", python, requirement],
            ]
        else:
            steps = [
                [sys.executable, "-m", "venv", venv],
                [python, "-m", "pip", "install", "-q", requirement],
            ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                raise RuntimeError(f"building the Cloud Tasks emulator virtualenv failed: {done.stderr[-2000:]}")
        with open(ready, "w") as f:
            f.write(requirement)
    return python


def start_tasks_emulator() -> EmulatorProcess:
    """Start the Cloud Tasks emulator (from its own cached virtualenv) on a free port."""
    python = tasks_emulator_python()
    launcher = os.path.join(os.path.dirname(os.path.dirname(python)), "errands_launcher.py")
    with open(launcher, "w") as f:
        f.write(_LAUNCHER)
    port = free_port()
    return _start("cloudtasks", [python, launcher, "start", f"--port={port}", "--quiet"], port)


