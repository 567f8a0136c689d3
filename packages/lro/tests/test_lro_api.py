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


def test_lro_reaches_core_only_through_its_public_modules_and_keeps_sql_in_its_table_module() -> None:
    import ast
    import pathlib
    import re

    public = {"errands.core", "errands.core.store", "errands.core.runtime", "errands.core.cli",
              "errands.core.errors", "errands.core.testing"}
    sql = re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM|CREATE TABLE)\b")
    src = pathlib.Path(lro.__file__).parent
    for path in sorted(src.glob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("errands.core"):
                assert node.module in public, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("errands.core"):
                        assert alias.name in public, f"{path.name} imports {alias.name}"
        if not path.name.endswith(("_table.py", "_schema.py")):
            assert not sql.search(text), f"{path.name} holds SQL"
