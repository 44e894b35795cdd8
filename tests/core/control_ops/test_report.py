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


def footers(fleet: FleetResult) -> tuple[str, str, str]:
    """The terminal's whole footer, its last line, and the chat board's footer."""
    out = io.StringIO()
    LiveTable(out).footer(fleet)
    board = FleetBoard(title="t")
    board.finish(fleet)
    return out.getvalue(), out.getvalue().splitlines()[-1], board.footer()


COUNTED = re.compile(r"(?:\d+/\d+ hosts ok|\d+ ok, \d+ skipped of \d+ hosts) in \d+\.\d s")


def test_the_command_line_and_the_chat_agree_on_every_count_and_list() -> None:
    # A host that was not expected never reaches a FleetResult: publish drops its answer.
    expected = frozenset({"web-10", "web-2", "web-1", "db-1", "db-2"})
    results = {
        "web-10": answer("web-10", ok=False),
        "web-1": answer("web-1", ran=False),
        "db-1": answer("db-1"),
        "db-2": answer("db-2"),
    }
    fleet = FleetResult("c", results, frozenset({"web-2"}), expected, elapsed=30.04)
    whole, terminal, chat = footers(fleet)

    # A skipped host is never counted as plainly ok, here nor there.
    assert terminal == "2 ok, 1 skipped of 5 hosts in 30.0 s; failed: web-10; silent: web-2"
    assert chat == "❌ 1 failed: web-10 · 1 silent: web-2 — 2 ok, 1 skipped of 5 hosts in 30.0 s"
    assert COUNTED.findall(terminal) == COUNTED.findall(chat) != []
    assert "web-2  " in whole.splitlines()[0]  # the silent row, before the footer


def test_a_skipped_pull_is_never_counted_as_plain_ok() -> None:
    hosts = [f"web-{n}" for n in range(1, 13)]
    results = {host: answer(host) for host in hosts[:11]}
    results["web-12"] = answer("web-12", ran=False)  # another service was already pulling
    fleet = FleetResult("c", results, frozenset(), frozenset(hosts), elapsed=2.0)
    assert fleet.ok  # nothing failed: the exit status and the audit record say ok
    _whole, terminal, chat = footers(fleet)
    assert terminal == "11 ok, 1 skipped of 12 hosts in 2.0 s"
    assert chat == "✅ 11 ok, 1 skipped of 12 hosts in 2.0 s"
    assert "12/12" not in terminal + chat

    everyone = {host: answer(host) for host in hosts}
    _whole, terminal, chat = footers(FleetResult("c", everyone, frozenset(), frozenset(hosts)))
    assert (terminal, chat) == ("12/12 hosts ok in 0.0 s", "✅ 12/12 hosts ok in 0.0 s")


def test_a_command_every_host_skipped_says_nothing_ran() -> None:
    hosts = frozenset({"web-1", "web-2"})
    results = {host: answer(host, ran=False) for host in hosts}
    fleet = FleetResult("c", results, frozenset(), hosts, elapsed=1.2)
    assert fleet.ok  # nothing failed: every host answered ok
    assert FleetTally.of_fleet(fleet).ran_nowhere
    _whole, terminal, chat = footers(fleet)
    assert terminal == "0/2 hosts ran it: skipped on 2 in 1.2 s"
    assert chat == "⏭️ 0/2 hosts ran it: skipped on 2 in 1.2 s"

    results["web-1"] = answer("web-1", ok=False)
    failed = FleetResult("c", results, frozenset(), hosts, elapsed=1.2)
    _whole, terminal, chat = footers(failed)
    assert terminal == "0/2 hosts ran it: skipped on 1 in 1.2 s; failed: web-1"
    assert chat == "❌ 1 failed: web-1 — 0/2 hosts ran it: skipped on 1 in 1.2 s"
