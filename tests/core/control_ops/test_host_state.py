"""The host's own records: the command ledger (durable, bounded, compacted) and restart times."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.control_ops import MAX_CLOCK_SKEW, host_state
from core.control_ops.host_state import (
    CommandLedger,
    LedgerFull,
    LedgerState,
    RestartRecord,
    host_state_dir,
)


class Clock:
    """Wall-clock time that moves only when the test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_started_then_done_and_read_back_by_the_next_process(tmp_path: Path) -> None:
    clock = Clock()
    ledger = CommandLedger(tmp_path, clock=clock)
    assert ledger.start("c1", clock.now + 100) is None  # recorded: the op may run
    assert ledger.start("c1", clock.now + 100) is LedgerState.STARTED
    ledger.finish("c1", clock.now + 100)
    assert ledger.start("c1", clock.now + 100) is LedgerState.DONE
    assert ledger.start("c2", clock.now + 100) is None
    # A new process (a restart) reads what the last one wrote.
    again = CommandLedger(tmp_path, clock=clock)
    assert again.state("c1") is LedgerState.DONE
    assert again.state("c2") is LedgerState.STARTED
    assert again.state("c3") is None
    assert oct((tmp_path / "commands.log").stat().st_mode & 0o777) == "0o600"


def test_every_record_is_fsynced_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(host_state.os, "fsync", fsync)
    ledger = CommandLedger(tmp_path)
    ledger.start("c1", 2e9)
    log = str(tmp_path / "commands.log")
    # The line, then (a new file) the directory entry.
    assert synced == [log, str(tmp_path)]
    ledger.finish("c1", 2e9)
    assert synced[-1] == log


def test_entries_are_kept_until_their_time_then_compacted_away(tmp_path: Path) -> None:
    clock = Clock()
    ledger = CommandLedger(tmp_path, clock=clock)
    for n in range(400):
        ledger.start(f"old-{n}", clock.now + 10)
    ledger.start("live", clock.now + 1000)
    log = tmp_path / "commands.log"
    assert len(log.read_text().splitlines()) == 401
    clock.now += 11  # the old ones have expired: they can no longer run anyway
    assert ledger.state("old-1") is None
    assert ledger.start("new", clock.now + 1000) is None  # this write compacts first
    assert log.read_text().splitlines() == [
        f"S {clock.now - 11 + 1000:.3f} live",
        f"S {clock.now + 1000:.3f} new",
    ]
    assert len(ledger) == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_ledger_refuses_instead_of_forgetting(tmp_path: Path) -> None:
    clock = Clock()
    ledger = CommandLedger(tmp_path, capacity=3, clock=clock)
    for n in range(3):
        ledger.start(f"c{n}", clock.now + 10)
    with pytest.raises(LedgerFull):
        ledger.start("c3", clock.now + 10)
    assert ledger.start("c0", clock.now + 10) is LedgerState.STARTED  # still remembered
    clock.now += 11
    assert ledger.start("c3", clock.now + 10) is None  # room again once they expired


def test_a_torn_or_foreign_line_is_ignored(tmp_path: Path) -> None:
    log = tmp_path / "commands.log"
    log.write_text(
        "S 2000000000.000 good\n"
        "garbage\n"
        "X 2000000000.000 bad-state\n"
        "S soon bad-time\n"
        "S nan bad-nan\n"
        f"S 2000000000.000 {'x' * 200}\n"
        "S 2000000000.000 torn"  # no newline: its write was never fsynced, its op never ran
    )
    ledger = CommandLedger(tmp_path, clock=Clock())
    assert ledger.state("good") is LedgerState.STARTED
    for name in ("bad-state", "bad-time", "bad-nan", "torn"):
        assert ledger.state(name) is None
    assert len(ledger) == 1


def test_two_processes_sharing_the_directory_see_each_other(tmp_path: Path) -> None:
    clock = Clock()
    first, second = CommandLedger(tmp_path, clock=clock), CommandLedger(tmp_path, clock=clock)
    assert first.start("c1", clock.now + 10) is None
    assert second.start("c1", clock.now + 10) is LedgerState.STARTED  # appended meanwhile
    for n in range(300):
        second.start(f"n{n}", clock.now + 10)
    clock.now += 11
    second.start("after", clock.now + 10)  # compacts: a new file replaces the log
    assert first.state("after") is LedgerState.STARTED
    assert first.start("after", clock.now + 10) is LedgerState.STARTED
    assert len(first) == 1


def test_keep_until_covers_the_validity_and_the_skew() -> None:
    from core.control_ops.claims import keep_until
    from core.control_ops.wire import SignedCommand

    command = SignedCommand("c", "pull", (), "ops", 100.0, 220.0)
    assert keep_until(command) == 220.0 + MAX_CLOCK_SKEW


def test_the_restart_record(tmp_path: Path) -> None:
    clock = Clock()
    record = RestartRecord(tmp_path / "h", clock=clock)
    assert record.seconds_since("proxy.service") is None
    record.note("proxy.service", frozenset({"proxy.service", "bot.service"}))
    clock.now += 12.5
    assert record.seconds_since("proxy.service") == 12.5
    record.note("bot.service", frozenset({"bot.service"}))  # proxy left the allow-list
    assert record.seconds_since("proxy.service") is None
    assert record.seconds_since("bot.service") == 0.0
    clock.now -= 3600  # the clock stepped back: not a reason to refuse restarts for an hour
    assert record.seconds_since("bot.service") is None
    (tmp_path / "h" / "restarts.json").write_text("[not, json")
    assert record.seconds_since("bot.service") is None


def test_host_state_dir_is_per_identity(tmp_path: Path) -> None:
    assert host_state_dir(tmp_path, "web-1:bot") == tmp_path / "fleet" / "web-1:bot"
