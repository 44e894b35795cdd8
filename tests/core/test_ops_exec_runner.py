"""``run_exec``: real child processes, process groups, caps, timeouts and cancellation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.ops_exec import ExecResult, run_exec, sanitize_output
from tests.support.processes import pid_is_dead, read_numbers

PY = sys.executable


async def test_echo_captures_stdout_and_exit_code() -> None:
    result = await run_exec([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert result.returncode == 0
    assert result.ok
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert not result.timed_out
    assert not result.truncated
    assert result.duration > 0
    assert result.argv == (PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)")


async def test_nonzero_exit_is_a_result_not_an_exception() -> None:
    result = await run_exec([PY, "-c", "raise SystemExit(3)"])
    assert result.returncode == 3
    assert not result.ok


async def test_str_argv_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="no shell"):
        await run_exec("echo hi")  # type: ignore[arg-type]


async def test_non_str_items_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        await run_exec(["echo", 3])  # type: ignore[list-item]


async def test_missing_program_is_a_result() -> None:
    result = await run_exec(["/nonexistent/definitely-not-here", "x"])
    assert result.returncode is None
    assert "program not found" in result.stderr
    assert not result.ok


async def test_non_executable_program_is_a_result(tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho hi\n")
    result = await run_exec([str(script)])
    assert result.returncode is None
    assert "permission denied" in result.stderr


async def test_missing_working_directory_is_a_result(tmp_path: Path) -> None:
    result = await run_exec(["true"], cwd=tmp_path / "gone")
    assert result.returncode is None
    assert "working directory" in result.stderr


async def test_stdin_is_empty() -> None:
    result = await run_exec([PY, "-c", "import sys; print(repr(sys.stdin.read()))"], timeout=5)
    assert result.stdout == "''\n"


async def test_child_runs_in_its_own_session() -> None:
    code = "import os; print(os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid())"
    result = await run_exec([PY, "-c", code])
    assert result.stdout == "True True\n"


async def test_env_is_exactly_what_was_given() -> None:
    # /usr/bin/env, not Python: Python's start-up adds LC_CTYPE to its own environment.
    result = await run_exec(["env"], env={"ONLY": "this", "PATH": os.environ["PATH"]})
    assert sorted(result.stdout.split()) == sorted(["ONLY=this", f"PATH={os.environ['PATH']}"])


async def test_invalid_utf8_and_escapes_are_sanitised() -> None:
    payload = (
        b"ok \xff\xfe bytes\n"
        b"\x1b[31mred\x1b[0m \x1b]0;title\x07 bell\x07 nul\x00 cr\r\n"
        b"tab\tkeep\n" + "bidi \u202egnp.exe\u202c \u2066x\u2069\n".encode()
    )
    code = f"import sys; sys.stdout.buffer.write({payload!r})"
    result = await run_exec([PY, "-c", code])
    assert result.stdout == "ok \ufffd\ufffd bytes\nred  bell nul cr\ntab\tkeep\nbidi gnp.exe x\n"


def test_sanitize_output_drops_c1_and_del() -> None:
    assert sanitize_output("a\x7fb\u009bc".encode()) == "abc"


async def test_output_is_capped_per_stream_with_a_marker() -> None:
    code = "import sys, os\nos.write(1, b'a' * 300000)\nos.write(2, b'b' * 5000)\n"
    result = await run_exec([PY, "-c", code], max_output=1000)
    assert result.truncated
    assert result.stdout.startswith("a" * 1000)
    assert result.stdout.endswith("\n[… 299000 bytes truncated]")
    assert result.stderr == "b" * 1000 + "\n[… 4000 bytes truncated]"


async def test_output_under_the_cap_is_not_marked() -> None:
    result = await run_exec([PY, "-c", "print('x' * 999, end='')"], max_output=999)
    assert result.stdout == "x" * 999
    assert not result.truncated


HUGE_OUTPUT_HARNESS = r"""
import asyncio, resource, sys
sys.path.insert(0, sys.argv[1])
from core.ops_exec import run_exec

def rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

async def main():
    # Warm up the machinery so its one-time allocations are part of the baseline.
    await run_exec(["head", "-c", "10M", "/dev/zero"], max_output=65536)
    before = rss_kib()
    result = await run_exec(
        ["sh", "-c", "yes | head -c 1G & yes | head -c 1G >&2; wait"],
        max_output=65536, timeout=120,
    )
    grown = rss_kib() - before
    print(result.returncode, result.truncated, len(result.stdout), len(result.stderr), grown)

asyncio.run(main())
"""


def test_one_gib_on_each_stream_keeps_memory_flat() -> None:
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [PY, "-c", HUGE_OUTPUT_HARNESS, root],
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    returncode, truncated, out_len, err_len, grown_kib = out.stdout.split()
    assert returncode == "0"
    assert truncated == "True"
    marker = len("\n[… 1073676288 bytes truncated]")
    assert int(out_len) == 65536 + marker
    assert int(err_len) == 65536 + marker
    assert int(grown_kib) < 64 * 1024, f"peak RSS grew by {grown_kib} KiB"


TRAPPING_TREE = """
trap '' TERM
( trap '' TERM; echo $BASHPID >> "$1"; while :; do sleep 0.05; done ) &
echo $$ >> "$1"
while :; do sleep 0.05; done
"""


async def test_timeout_kills_a_sigterm_ignoring_tree(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    timeout, grace = 1.0, 0.5
    started = time.monotonic()
    result = await run_exec(
        ["bash", "-c", TRAPPING_TREE, "tree", str(pids)], timeout=timeout, kill_grace=grace
    )
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert not result.ok
    assert elapsed < timeout + grace + 1
    recorded = read_numbers(pids)
    assert len(recorded) == 2
    assert all(pid_is_dead(pid) for pid in recorded), recorded


async def test_timeout_sends_sigterm_before_sigkill(tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    code = (
        "import signal, sys, time, pathlib\n"
        "def on_term(*_):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('term')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    result = await run_exec([PY, "-c", code], timeout=1, kill_grace=5)
    assert result.timed_out
    assert marker.read_text() == "term"
    assert result.returncode == 0
    assert result.duration < 1 + 5  # it exited on SIGTERM; SIGKILL was never needed


async def test_escaped_grandchild_holding_stdout_does_not_delay_the_timeout(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "escaped"
    # The grandchild leaves the group (setsid) and keeps our stdout open for 30 s.
    script = f"setsid sh -c 'echo $$ > \"{pidfile}\"; sleep 30' & sleep 30"
    started = time.monotonic()
    try:
        result = await run_exec(["sh", "-c", script], timeout=1, kill_grace=0.5)
        assert result.timed_out
        assert time.monotonic() - started < 1 + 0.5 + 1
    finally:
        for pid in read_numbers(pidfile):
            # Ours: the test started it, and it escaped the group on purpose.
            os.kill(pid, 9)


async def test_exit_with_a_grandchild_holding_the_pipe_returns_promptly(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f'( echo $BASHPID >> "{pids}"; sleep 30 ) & echo parent-done'
    started = time.monotonic()
    result = await run_exec(["bash", "-c", script], timeout=20)
    assert time.monotonic() - started < 5
    assert result.returncode == 0
    assert not result.timed_out
    assert result.stdout == "parent-done\n"
    assert all(pid_is_dead(pid) for pid in read_numbers(pids))


async def test_cancellation_kills_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    task = asyncio.create_task(
        run_exec(["bash", "-c", TRAPPING_TREE, "tree", str(pids)], timeout=60, kill_grace=0.3)
    )
    # Wait until both processes have announced themselves, so cancellation hits a live tree.
    deadline = time.monotonic() + 10
    while len(read_numbers(pids)) < 2:
        assert time.monotonic() < deadline, "the tree never started"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    recorded = read_numbers(pids)
    assert all(pid_is_dead(pid) for pid in recorded), recorded


async def test_result_is_a_named_tuple_with_the_contract_fields() -> None:
    assert ExecResult._fields == (
        "argv",
        "returncode",
        "stdout",
        "stderr",
        "timed_out",
        "truncated",
        "duration",
    )


STDIN_HARNESS = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from core.ops_exec import run_exec
code = "import sys; print(len(sys.stdin.read()))"
print(asyncio.run(run_exec([sys.executable, "-c", code], timeout=10)).stdout.strip())
"""


def test_child_stdin_is_empty_even_when_ours_is_not() -> None:
    # pytest's own stdin is already /dev/null, so the harness runs with a stdin full of data.
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [PY, "-c", STDIN_HARNESS, root], input="x" * 10000, capture_output=True, text=True,
        timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "0"


async def test_nul_byte_in_argv_is_a_result() -> None:
    result = await run_exec(["echo", "a\x00b"])
    assert result.returncode is None
    assert "null byte" in result.stderr


def test_unterminated_escape_sequences_do_not_hide_what_follows() -> None:
    text = sanitize_output(b"Updating a..b\n\x1b]\nfatal: remote hook rejected\n")
    assert "fatal: remote hook rejected" in text
    text = sanitize_output(b"x \x1bPlease see below\nERROR: disk full\n")
    assert "ERROR: disk full" in text
    assert "\x1b" not in text
