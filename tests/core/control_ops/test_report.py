"""One rendering rule: the terminal's table and the chat's board count and list hosts alike."""

from __future__ import annotations

import io
import re

from core.chat.fleet_board import FleetBoard
from core.control_ops import FleetResult, FleetTally, HostResult, HostStatus, host_status
from core.control_ops.cli import LiveTable


def answer(host: str, *, ok: bool = True, ran: bool = True) -> HostResult:
    return HostResult(host, ok, ran, "fine" if ok else "refused: not allowed on this host", 0.5)


def test_a_hosts_status_comes_from_its_answer() -> None:
    assert host_status(answer("a"), finished=False) is HostStatus.OK
    assert host_status(answer("a", ran=False), finished=False) is HostStatus.SKIPPED
    assert host_status(answer("a", ok=False), finished=True) is HostStatus.FAILED
    assert host_status(answer("a", ok=False, ran=False), finished=True) is HostStatus.FAILED
    assert host_status(None, finished=False) is HostStatus.WAITING
    assert host_status(None, finished=True) is HostStatus.SILENT


def test_the_tally_counts_and_lists_in_natural_order() -> None:
    expected = {"web-10", "web-2", "web-1", "db-1", "web-3"}
    results = {
        "web-10": answer("web-10", ok=False),
        "web-2": answer("web-2", ok=False),
        "web-1": answer("web-1", ran=False),
        "db-1": answer("db-1"),
        "late-1": answer("late-1"),  # came up after publishing, and answered
    }
    tally = FleetTally.of(expected, results)
    assert tally.hosts == ("db-1", "late-1", "web-1", "web-2", "web-3", "web-10")
    assert tally.failed == ("web-2", "web-10")
    assert tally.unanswered == ("web-3",)
    assert (tally.ran_ok, tally.skipped, tally.ok) == (2, 1, 3)
    assert tally.counts(finished=False) == [
        (HostStatus.OK, 2),
        (HostStatus.SKIPPED, 1),
        (HostStatus.FAILED, 2),
        (HostStatus.WAITING, 1),
    ]
    assert tally.counts(finished=True)[-1] == (HostStatus.SILENT, 1)
    assert FleetTally.of((), {}).counts(finished=True) == []


def test_the_command_line_and_the_chat_agree_on_every_count_and_list() -> None:
    expected = frozenset({"web-10", "web-2", "web-1", "db-1"})
    results = {
        "web-10": answer("web-10", ok=False),
        "web-1": answer("web-1", ran=False),
        "db-1": answer("db-1"),
        "late-1": answer("late-1", ok=False),  # not expected: it still counts as a failure
    }
    fleet = FleetResult("c", results, frozenset({"web-2"}), expected, elapsed=30.04)

    out = io.StringIO()
    LiveTable(out).footer(fleet)
    terminal = out.getvalue().splitlines()[-1]
    board = FleetBoard(title="t")
    board.finish(fleet)
    chat = board.footer()

    assert terminal == "2/5 hosts ok in 30.0 s; failed: late-1, web-10; silent: web-2"
    assert chat == "❌ 2 failed: late-1, web-10 · 1 silent: web-2 — 2/5 hosts ok in 30.0 s"
    counted = re.compile(r"\d+/\d+ hosts ok in \d+\.\d s")
    assert counted.findall(terminal) == counted.findall(chat)
    assert "web-2  " in out.getvalue().splitlines()[0]  # the silent row, before the footer
