"""``core/ops_exec.py`` loads with the standard library alone, with discord and redis blocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OPS_EXEC = Path(__file__).resolve().parents[2] / "core" / "ops_exec.py"

PROBE = r"""
import importlib.util, sys
sys.modules["discord"] = None
sys.modules["redis"] = None
before = set(sys.modules)
spec = importlib.util.spec_from_file_location("ops_exec_isolated", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
pulled = sorted(set(sys.modules) - before - {"ops_exec_isolated"})
foreign = [name for name in pulled if name.split(".")[0] not in sys.stdlib_module_names]
print("FOREIGN:" + ",".join(foreign))
print("API:" + ",".join(sorted(module.__all__)))
"""


def test_loads_by_path_with_stdlib_only() -> None:
    out = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, str(OPS_EXEC)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["FOREIGN"] == ""
    for name in ("run_exec", "git_env", "redact", "validate_unit_name", "systemctl_restart",
                 "deferred_systemctl_restart", "PullResult", "pull_lock_key", "run_git_pull",
                 "Cooldown", "ExecResult"):  # fmt: skip
        assert name in lines["API"].split(",")


def test_probe_would_notice_a_foreign_import(tmp_path: Path) -> None:
    # The same probe on a module that imports redis must fail: the test can catch a regression.
    bad = tmp_path / "bad.py"
    bad.write_text("import redis\n__all__ = []\n")
    result = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, str(bad)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr
