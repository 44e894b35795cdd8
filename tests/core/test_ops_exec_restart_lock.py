"""The host-wide lock on restarting a unit, between real processes.

Another process (a control daemon, or the bot) takes the lock and reserves a restart; while it
holds the lock nobody else gets it, and once it is gone (even killed) the next holder sees its
reservation. Synchronisation is by files the child writes, with bounded waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.ops_exec import UnsafeLockError, unit_restart_lock
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


# --- a lock dir shared by two users of one group (OPS_LOCK_DIR, deployed as /run/admin-ops) ---

#: A group the shared dir hands down when the tests run as root (else the user's own group).
OTHER_GID = 61_999


def shared_dir(path: Path) -> Path:
    """A lock dir as deploy/tmpfiles.d makes it: setgid, group-writable, nothing for others."""
    path.mkdir()
    if os.geteuid() == 0:
        os.chown(path, -1, OTHER_GID)  # a group of its own, handed down by the setgid bit
    path.chmod(0o2770)
    return path


@pytest.fixture
def tight_umask() -> Iterator[None]:
    """A umask that would take the group's bits: what is shared must be set explicitly."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("tight_umask")
async def test_in_a_shared_dir_the_group_may_use_the_lock(tmp_path: Path) -> None:
    lock_dir = shared_dir(tmp_path / "run-admin-ops")
    async with unit_restart_lock(lock_dir, "proxy") as lock:
        lock.reserve()
    locks, file = lock_dir / "locks", lock_dir / "locks" / "restart-proxy.service.lock"
    # Sticky: neither user can remove (or replace) a lock file the other one created.
    assert stat.S_IMODE(locks.stat().st_mode) == 0o3770
    assert stat.S_IMODE(file.stat().st_mode) == 0o660
    assert file.stat().st_gid == locks.stat().st_gid == lock_dir.stat().st_gid


@pytest.mark.usefixtures("tight_umask")
async def test_a_private_dir_keeps_the_lock_private(tmp_path: Path) -> None:
    tmp_path.chmod(0o770)  # group-writable but not setgid: not shared
    async with unit_restart_lock(tmp_path, "proxy"):
        pass
    assert stat.S_IMODE((tmp_path / "locks").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "locks" / "restart-proxy.service.lock").stat().st_mode) == 0o600


def plant_symlink(locks: Path, target: Path) -> None:
    locks.mkdir(mode=0o2770, exist_ok=True)
    (locks / "restart-proxy.service.lock").symlink_to(target)


def plant_fifo(locks: Path, _target: Path) -> None:
    locks.mkdir(mode=0o2770, exist_ok=True)
    os.mkfifo(locks / "restart-proxy.service.lock")


def plant_hard_link(locks: Path, target: Path) -> None:
    locks.mkdir(mode=0o2770, exist_ok=True)
    os.link(target, locks / "restart-proxy.service.lock")


def plant_world_writable(locks: Path, _target: Path) -> None:
    locks.mkdir(mode=0o2770, exist_ok=True)
    file = locks / "restart-proxy.service.lock"
    file.write_text("")
    file.chmod(0o666)


def plant_directory(locks: Path, _target: Path) -> None:
    (locks / "restart-proxy.service.lock").mkdir(parents=True)


def plant_socket(locks: Path, _target: Path) -> None:
    locks.mkdir(mode=0o2770, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(locks / "restart-proxy.service.lock"))


def plant_locks_symlink(locks: Path, target: Path) -> None:
    locks.symlink_to(target.parent)  # the "locks" directory itself points elsewhere


def plant_world_writable_locks(locks: Path, _target: Path) -> None:
    locks.mkdir()
    locks.chmod(0o777)


@pytest.mark.parametrize(
    ("plant", "why"),
    [
        (plant_symlink, "a symbolic link"),
        (plant_fifo, "not a regular file"),
        (plant_hard_link, "not a regular file with a single link"),
        (plant_directory, r"not a regular file \(a directory\)"),
        (plant_socket, r"not a regular file \(a socket or a device\)"),
        (plant_world_writable, "writable by others"),
        (plant_locks_symlink, "a symbolic link"),
        (plant_world_writable_locks, "writable by others"),
    ],
)
async def test_an_unsafe_lock_path_is_refused_and_nothing_is_written(
    tmp_path: Path, plant: Callable[[Path, Path], None], why: str
) -> None:
    """What another member of the group (or anyone, once o+w) could have planted is not used."""
    lock_dir = shared_dir(tmp_path / "shared")
    victim = tmp_path / "elsewhere" / "restart-proxy.service.lock"
    victim.parent.mkdir()
    victim.write_text("precious")
    plant(lock_dir / "locks", victim)

    with pytest.raises(UnsafeLockError, match=why) as raised:
        async with unit_restart_lock(lock_dir, "proxy", timeout=0.05) as lock:
            lock.reserve()

    assert raised.value.filename is not None
    assert str(lock_dir) in raised.value.filename
    assert victim.read_text() == "precious"


async def test_a_lock_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    """OPS_LOCK_DIR=/tmp, say: anyone could have made ``locks`` theirs first."""
    lock_dir = tmp_path / "tmp"
    lock_dir.mkdir()
    lock_dir.chmod(0o1777)
    with pytest.raises(UnsafeLockError, match="writable by others"):
        async with unit_restart_lock(lock_dir, "proxy", timeout=0.05):
            pass
    assert not (lock_dir / "locks").exists()


@pytest.mark.parametrize(
    "content",
    [b"1e9", b"inf", b"-5", b"0x10", b"1" * 65, b"999999.5 junk", b"\xff\xfe", b"1_000.0"],
)
async def test_a_reservation_that_is_not_a_time_is_ignored(tmp_path: Path, content: bytes) -> None:
    """Another user writes the file: only a bounded, plain decimal time is believed."""
    async with unit_restart_lock(tmp_path, "proxy"):
        pass
    (tmp_path / "locks" / "restart-proxy.service.lock").write_bytes(content)
    async with unit_restart_lock(tmp_path, "proxy", clock=lambda: 1_000_000.0) as lock:
        assert lock.reserved_ago() is None
        lock.withdraw()  # nothing valid was found: withdrawing leaves no reservation
    assert (tmp_path / "locks" / "restart-proxy.service.lock").read_bytes() == b""
    (tmp_path / "locks" / "restart-proxy.service.lock").write_bytes(b" 999990.25\n")
    async with unit_restart_lock(tmp_path, "proxy", clock=lambda: 1_000_000.0) as lock:
        assert lock.reserved_ago() == 9.75


async def test_every_valid_unit_name_is_locked_long_ones_under_a_bounded_name(
    tmp_path: Path,
) -> None:
    """Up to 255 characters is a unit name; ``restart-<unit>.lock`` would pass NAME_MAX (255)."""
    longest = "a" * 247 + ".service"
    twin = "a" * 246 + "b.service"  # the same first 200 characters: a lock of its own
    for unit in (longest, twin):
        async with unit_restart_lock(tmp_path, unit, clock=lambda: 1_000_000.0) as lock:
            lock.reserve()
    async with unit_restart_lock(tmp_path, longest, clock=lambda: 1_000_010.0) as lock:
        assert lock.reserved_ago() == 10.0  # the same file for the same name
    names = sorted(p.name for p in (tmp_path / "locks").iterdir())
    assert len(names) == 2
    assert all(len(name) <= 255 and "+" in name for name in names)
    # A name that fits keeps its plain file name (what older processes lock too).
    async with unit_restart_lock(tmp_path, "b" * 234 + ".service"):
        pass
    assert (tmp_path / "locks" / f"restart-{'b' * 234}.service.lock").is_file()


def lock_fds(path: Path) -> int:
    """How many descriptors of this process have ``path`` open (removed or not)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(path))
    return count


async def test_a_lock_file_removed_while_held_is_not_what_the_next_holder_locks(
    tmp_path: Path,
) -> None:
    """Removed while held (a group member may), the file a waiter opened locks nothing.

    The waiter takes the lock once the holder lets go, finds the name gone, and locks the file
    now under the name, where the next process looks: so its reservation is seen.
    """
    file = tmp_path / "locks" / "restart-proxy.service.lock"
    async with contextlib.AsyncExitStack() as holder:
        await holder.enter_async_context(unit_restart_lock(tmp_path, "proxy"))

        async def waiter() -> None:
            async with unit_restart_lock(tmp_path, "proxy", timeout=DEADLINE) as lock:
                lock.reserve()

        task = asyncio.create_task(waiter())
        end = time.monotonic() + DEADLINE
        while lock_fds(file) < 2:  # until the waiter has the held file open too
            assert not task.done(), task
            assert time.monotonic() < end, "the waiter never opened the lock file"
            await asyncio.sleep(0.01)  # a poll interval, not a guess at how long it takes
        file.unlink()
    await asyncio.wait_for(task, DEADLINE)
    async with unit_restart_lock(tmp_path, "proxy", timeout=0.05) as lock:
        assert lock.reserved_ago() is not None
