"""The host-wide lock on restarting a unit, between real processes.

Another process (a control daemon, or the bot) takes the lock and reserves a restart; while it
holds the lock nobody else gets it, and once it is gone (even killed) the next holder sees its
reservation. Synchronisation is by files the child writes, with bounded waits.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.ops_exec import unit_restart_lock
from tests.support import ROOT

DEADLINE = 10.0

# Takes the lock on proxy.service, reserves a restart, says so, then holds on until killed.
HOLDER = """\
import asyncio, sys, time
from pathlib import Path
from core.ops_exec import unit_restart_lock

async def main() -> None:
    async with unit_restart_lock(sys.argv[1], "proxy") as lock:
        lock.reserve()
        Path(sys.argv[2]).write_text("held")
        await asyncio.sleep(60)  # held until the test kills this process

asyncio.run(main())
"""


async def wait_for_file(path: Path, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + DEADLINE
    while not path.exists():
        assert proc.poll() is None, "the holder exited"
        assert time.monotonic() < end, f"timed out waiting for {path}"
        await asyncio.sleep(0.01)  # a poll interval, not a guess at how long it takes


async def test_one_process_at_a_time_and_the_next_sees_the_reservation(tmp_path: Path) -> None:
    state, held = tmp_path / "state", tmp_path / "held"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state), str(held)], cwd=ROOT, stdin=subprocess.DEVNULL
    )
    try:
        await wait_for_file(held, proc)
        with pytest.raises(TimeoutError, match=r"restarting proxy\.service"):
            async with unit_restart_lock(state, "proxy.service", timeout=0.05):
                pass
        async with unit_restart_lock(state, "worker", timeout=0.05) as other:
            assert other.reserved_ago() is None  # another unit: its own lock, nothing reserved
        proc.kill()  # dies holding it: the lock goes with its descriptor
        proc.wait(timeout=DEADLINE)
        async with unit_restart_lock(state, "proxy", timeout=DEADLINE) as lock:
            ago = lock.reserved_ago()
            assert ago is not None
            assert ago < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=DEADLINE)
    assert (state / "locks" / "restart-proxy.service.lock").stat().st_mode & 0o077 == 0


async def test_a_reservation_from_the_future_or_junk_is_not_believed(tmp_path: Path) -> None:
    now = [1_000_000.0]
    async with unit_restart_lock(tmp_path, "proxy", clock=lambda: now[0]) as lock:
        assert lock.reserved_ago() is None
        lock.reserve()
        now[0] += 12.5
        assert lock.reserved_ago() == 12.5
        now[0] -= 3600  # the clock was stepped back an hour
        assert lock.reserved_ago() is None
    (tmp_path / "locks" / "restart-proxy.service.lock").write_text("nan")
    async with unit_restart_lock(tmp_path, "proxy") as lock:
        assert lock.reserved_ago() is None
    with pytest.raises(ValueError, match="unit"):
        async with unit_restart_lock(tmp_path, "../etc/passwd"):
            pass
