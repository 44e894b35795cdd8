"""This process: when it started, and how it leaves so that a supervisor restarts it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Final

__all__ = ["RESTART_EXIT_STATUS", "exit_process", "process_started_at"]

#: What a supervisor (systemd ``RestartForceExitStatus=26``, Docker, pm2) reads as "restart me".
RESTART_EXIT_STATUS: Final = 26

_MODULE_LOADED_AT: Final = time.time()


def process_started_at() -> float:
    """When this process started (wall clock), from /proc; else when this module loaded."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # The command name may contain spaces and parentheses: fields start after the last ")".
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _MODULE_LOADED_AT


def exit_process(status: int) -> None:
    """Leave now with ``status``: the bot is closed and a supervisor restarts us.

    ``os._exit`` because the event loop is still running this coroutine; logs and standard
    streams are flushed first so the last lines are not lost.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)
