"""This process: its start time from /proc."""

from __future__ import annotations

import subprocess
import sys
import time

from core.chat.process import RESTART_EXIT_STATUS, process_started_at
from tests.support import ROOT


def test_the_process_start_time_is_before_now_and_after_boot() -> None:
    started = process_started_at()
    assert started <= time.time()
    # pytest has been running a while, but not for days.
    assert time.time() - started < 86_400


def test_a_child_started_now_says_so() -> None:
    code = (
        "import time; from core.chat.process import process_started_at as started; "
        "print(time.time() - started())"
    )
    before = time.time()
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    ).stdout
    assert 0 <= float(out) <= time.time() - before + 1.0


def test_exit_process_leaves_with_the_status() -> None:
    code = "from core.chat.process import exit_process as e; print('bye', flush=False); e(26)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == RESTART_EXIT_STATUS
    assert result.stdout == "bye\n"  # flushed before leaving
