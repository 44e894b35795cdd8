"""What a daemon must remember on its host's own disk: the commands it started, its restarts.

Redis is a shared notice board that anyone with write access can rewrite: a ran marker can be
deleted or rolled back, a command re-added under a new entry id, a consumer group re-created.
So what a host must never do twice is recorded here, in the daemon's state directory, durably
(written and fsynced before the op runs), and kept until the command can no longer run anyway.

Both records are small files: :class:`CommandLedger` an append-only log, compacted as entries
expire; :class:`RestartRecord` a JSON object rewritten atomically. Their methods do blocking
file I/O (and fsync): call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from core.control_ops.wire import MAX_CLOCK_SKEW
from core.names import COMMAND_ID
from core.ops_exec import atomic_write_json, read_json_file

__all__ = [
    "LEDGER_CAPACITY",
    "CommandLedger",
    "LedgerFull",
    "LedgerState",
    "RestartRecord",
    "host_state_dir",
]

log = logging.getLogger("admin_ops.control_ops")

#: The most command ids a daemon remembers at once. Commands stay valid for at most a day, so
#: this many side-effecting commands within a day is far beyond any real use; beyond it a new
#: command is refused rather than a remembered one forgotten.
LEDGER_CAPACITY: Final = 10_000
# Compact when the log holds this many more lines than live entries (or twice as many).
_COMPACT_SLACK: Final = 256
# A ledger line: "S|D <keep until> <command id>\n"; longer lines are not ours.
_MAX_LINE: Final = 128


class LedgerState(enum.Enum):
    """Where a command id stands in this host's ledger."""

    #: Recorded before the op ran; never answered (the daemon died or was stopped meanwhile).
    STARTED = "S"
    #: Answered.
    DONE = "D"


class LedgerFull(Exception):
    """The ledger holds LEDGER_CAPACITY live entries: nothing new may start."""


def host_state_dir(state_dir: Path, identity: str) -> Path:
    """Where the daemon called ``identity`` keeps its records inside ``state_dir``."""
    # Identities are 1-64 of A-Z a-z 0-9 . _ : @ - starting alphanumeric: a safe file name.
    return state_dir / "fleet" / identity


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CommandLedger:
    """The ids of the commands this daemon started, each kept until its ``keep_until``.

    An append-only log of ``S``/``D`` lines (started, done) in ``directory/commands.log``; every
    change is appended and fsynced before the method returns. A line cut short by a crash is
    ignored: it was never fsynced, so the op it announced never ran. Expired entries are
    dropped when the log is compacted (rewritten to a temporary file, fsynced, renamed). A
    lock file serialises processes that share the directory; a thread lock, threads.
    """

    def __init__(
        self,
        directory: Path,
        *,
        capacity: int = LEDGER_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Nothing is read or written until the first call."""
        self.path = directory / "commands.log"
        self._lock_path = directory / "commands.lock"
        self._capacity = capacity
        self._clock = clock
        self._entries: dict[str, tuple[LedgerState, float]] = {}
        self._lines = 0
        self._seen: tuple[int, int] | None = None  # (inode, bytes read) of the log
        self._mutex = threading.Lock()

    def state(self, command_id: str) -> LedgerState | None:
        """The recorded state of ``command_id`` (None: never started here, or expired)."""
        with self._locked():
            entry = self._entries.get(command_id)
            return entry[0] if entry else None

    def start(self, command_id: str, keep_until: float) -> LedgerState | None:
        """Record ``command_id`` as started, durably; or its earlier state, recording nothing.

        Returns None when this call recorded it (the op may run). Raises LedgerFull, or
        OSError when the record cannot be written (then the op must not run).
        """
        with self._locked():
            known = self._entries.get(command_id)
            if known is not None:
                return known[0]
            if len(self._entries) >= self._capacity:
                raise LedgerFull(f"{len(self._entries)} commands recorded in their validity")
            self._append(LedgerState.STARTED, command_id, keep_until)
            return None

    def finish(self, command_id: str, keep_until: float) -> None:
        """Record that ``command_id`` was answered (a later copy is "already handled")."""
        with self._locked():
            entry = self._entries.get(command_id)
            if entry is not None and entry[0] is LedgerState.DONE:
                return
            self._append(LedgerState.DONE, command_id, keep_until)

    def __len__(self) -> int:
        """How many live entries the ledger holds."""
        with self._locked():
            return len(self._entries)

    # -- the file -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                self._refresh()
                yield
            finally:
                os.close(lock_fd)  # releases the flock

    def _refresh(self) -> None:
        """Catch up with the log: what another process appended, or a compacted rewrite."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._entries, self._lines, self._seen = {}, 0, None
            return
        if self._seen is None or self._seen[0] != stat.st_ino or self._seen[1] > stat.st_size:
            self._entries, self._lines, offset = {}, 0, 0
        else:
            offset = self._seen[1]
        with open(self.path, "rb") as log_file:
            log_file.seek(offset)
            data = log_file.read()
        complete = data[: data.rfind(b"\n") + 1]  # a torn last line was never fsynced: skip it
        self._read_lines(complete)
        self._seen = (stat.st_ino, offset + len(complete))
        self._drop_expired()

    def _read_lines(self, data: bytes) -> None:
        for raw in data.splitlines():
            self._lines += 1
            parts = raw.decode("ascii", "replace").split(" ")
            if len(raw) > _MAX_LINE or len(parts) != 3 or not COMMAND_ID.fullmatch(parts[2]):
                continue
            try:
                state, keep_until = LedgerState(parts[0]), float(parts[1])
            except ValueError:
                continue
            if math.isfinite(keep_until):
                self._entries[parts[2]] = (state, keep_until)

    def _drop_expired(self) -> None:
        now = self._clock()
        self._entries = {k: v for k, v in self._entries.items() if v[1] >= now}

    def _append(self, state: LedgerState, command_id: str, keep_until: float) -> None:
        if self._lines > 2 * len(self._entries) + _COMPACT_SLACK:
            self._compact()
        line = f"{state.value} {keep_until:.3f} {command_id}\n".encode("ascii")
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
            size = os.fstat(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)
        self._entries[command_id] = (state, keep_until)
        self._lines += 1
        self._seen = (size.st_ino, size.st_size)

    def _compact(self) -> None:
        """Rewrite the log with the live entries only (atomically: readers see old or new)."""
        text = "".join(
            f"{state.value} {keep:.3f} {command_id}\n"
            for command_id, (state, keep) in self._entries.items()
        )
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._lines = len(self._entries)
        stat = os.stat(self.path)
        self._seen = (stat.st_ino, stat.st_size)
        log.info("command ledger %s compacted to %d entries", self.path, self._lines)


class RestartRecord:
    """When this daemon last restarted each unit (wall clock), in ``directory/restarts.json``.

    Kept for the units a host may restart only, so it stays as small as the allow-list.
    """

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        """Nothing is read or written until the first call."""
        self.path = directory / "restarts.json"
        self._clock = clock

    def seconds_since(self, unit: str) -> float | None:
        """Seconds since this daemon last restarted ``unit``; None if never (or unreadable)."""
        data = read_json_file(self.path)
        when = data.get(unit) if isinstance(data, dict) else None
        if not isinstance(when, int | float) or not math.isfinite(when):
            return None
        ago = self._clock() - when
        if ago < -MAX_CLOCK_SKEW:
            # Recorded in the future: the clock was stepped back. Not a reason to refuse
            # restarts until it catches up; systemd's own timestamp still counts.
            log.warning("restart record of %s is %.0f s in the future; ignored", unit, -ago)
            return None
        return max(0.0, ago)

    def note(self, unit: str, keep: frozenset[str]) -> None:
        """Record a restart of ``unit`` now, durably; entries of units not in ``keep`` go."""
        data = read_json_file(self.path)
        times = {
            name: when
            for name, when in (data.items() if isinstance(data, dict) else ())
            if name in keep and isinstance(when, int | float)
        }
        times[unit] = self._clock()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(self.path, times)
        _fsync_dir(self.path.parent)  # the rename itself survives a crash too
