from __future__ import annotations

import errands.lro as lro


def test_public_names_are_pinned() -> None:
    assert lro.__all__ == [
        "Config",
        "LroClient",
        "Operation",
        "OperationDoneError",
        "OperationRecord",
        "OperationStore",
        "ResumableHandler",
        "ResumeOutcome",
        "SQLOperationStore",
        "__version__",
        "must_unmarshal_metadata",
        "parse_filter",
        "unmarshal_metadata",
    ]
    assert lro.__all__ == sorted(lro.__all__)
    for name in lro.__all__:
        assert getattr(lro, name) is not None


def test_done_error_is_a_lease_lost_error() -> None:
    from errands.core import LeaseLostError

    assert issubclass(lro.OperationDoneError, LeaseLostError)


def test_importing_reads_no_environment() -> None:
    import subprocess
    import sys

    code = (
        "import os\n"
        "reads = []\n"
        "class Spy(type(os.environ)):\n"
        "    def __getitem__(self, key):\n"
        "        reads.append(key)\n"
        "        return super().__getitem__(key)\n"
        "os.environ.__class__ = Spy\n"
        "import errands.lro, errands.lro._grpc, errands.lro._http, errands.lro._cli\n"
        "print([k for k in reads if k.startswith('ALIS_')])\n"
    )
    env = {"ALIS_OS_PROJECT": "p", "ALIS_REGION": "r", "PATH": "/usr/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
