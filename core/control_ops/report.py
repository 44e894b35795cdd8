"""How a fleet command stands, for anyone who shows it: one rule for the terminal and the chat.

Pure: what each host's status is, how many hosts are ok, skipped, failed or silent, and which
ones, in natural order (web-2 before web-10). The command line's table and the chat's board
(``core.chat.fleet_board``) only choose words and icons for what this computes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from core.control_ops.wire import FleetResult, HostResult
from core.text import natural_key

__all__ = ["UNREPLICATED", "FleetTally", "HostStatus", "host_status", "in_order", "ok_sentence"]

#: What a report adds when no replica confirmed the command (see ``Published.replicated``).
UNREPLICATED = "no replica confirmed the command: a failover could lose it"


class HostStatus(enum.Enum):
    """What one host's row says."""

    #: It ran the op and it went well.
    OK = "ok"
    #: It answered ok without running (another service on the host was already pulling).
    SKIPPED = "skipped"
    #: It refused, or the op failed.
    FAILED = "failed"
    #: Expected, no answer yet.
    WAITING = "waiting"
    #: Expected, and no answer came before the publisher stopped waiting.
    SILENT = "silent"


def host_status(result: HostResult | None, *, finished: bool) -> HostStatus:
    """A host's status from its answer (None: none yet); ``finished``: nobody waits any more."""
    if result is None:
        return HostStatus.SILENT if finished else HostStatus.WAITING
    if not result.ok:
        return HostStatus.FAILED
    return HostStatus.OK if result.ran else HostStatus.SKIPPED


def in_order(hosts: Iterable[str]) -> list[str]:
    """Host names in natural order: web-2 before web-10."""
    return sorted(hosts, key=natural_key)


@dataclass(frozen=True)
class FleetTally:
    """The counts and the lists every presentation of one command shows."""

    #: Every host expected or answering, in natural order.
    hosts: tuple[str, ...]
    #: Hosts that ran the op and succeeded.
    ran_ok: int
    #: Hosts that answered ok without running.
    skipped: int
    #: Hosts that refused or failed, in natural order.
    failed: tuple[str, ...]
    #: Expected hosts without an answer (waiting, or silent once finished), in natural order.
    unanswered: tuple[str, ...]
    #: Whether a replica confirmed it holds the command (None: the master had no replica).
    replicated: bool | None = None

    @classmethod
    def of(
        cls,
        expected: Iterable[str],
        results: Mapping[str, HostResult],
        silent: Iterable[str] | None = None,
    ) -> FleetTally:
        """The tally of ``results`` against ``expected``; ``silent`` overrides the unanswered."""
        wanted = frozenset(expected)
        unanswered = wanted - results.keys() if silent is None else frozenset(silent)
        return cls(
            hosts=tuple(in_order(wanted | results.keys())),
            ran_ok=sum(1 for r in results.values() if r.ok and r.ran),
            skipped=sum(1 for r in results.values() if r.ok and not r.ran),
            failed=tuple(in_order(h for h, r in results.items() if not r.ok)),
            unanswered=tuple(in_order(unanswered)),
        )

    @classmethod
    def of_fleet(cls, fleet: FleetResult) -> FleetTally:
        """The final tally of a command ``publish`` returned."""
        tally = cls.of(fleet.expected, fleet.results, fleet.silent)
        return dataclasses.replace(tally, replicated=fleet.replicated)

    @property
    def ok(self) -> int:
        """Hosts that answered ok (ran or skipped); shown apart, see :func:`ok_sentence`."""
        return self.ran_ok + self.skipped

    @property
    def ran_nowhere(self) -> bool:
        """Hosts skipped it and none ran it: however ok the answers, nothing happened."""
        return self.skipped > 0 and self.ran_ok == 0

    def counts(self, *, finished: bool) -> list[tuple[HostStatus, int]]:
        """How many hosts have each status, in the order they are shown; zeros left out."""
        pending = HostStatus.SILENT if finished else HostStatus.WAITING
        counts = [
            (HostStatus.OK, self.ran_ok),
            (HostStatus.SKIPPED, self.skipped),
            (HostStatus.FAILED, len(self.failed)),
            (pending, len(self.unanswered)),
        ]
        return [(status, count) for status, count in counts if count]


def ok_sentence(tally: FleetTally, elapsed: float) -> str:
    """The one line every presentation ends with: ``9/12 hosts ok in 30.0 s``.

    A skipped host (it answered ok without running: another service was already pulling) is
    never counted as plainly ok: ``11 ok, 1 skipped of 12 hosts in 30.0 s``; when no host ran it
    at all, the sentence says so first: ``0/2 hosts ran it: skipped on 2 in 1.2 s``. When the
    master had replicas and none confirmed it holds the command, the sentence says so: a
    failover may have lost the command, which is what a silent host would then mean.
    """
    if tally.ran_nowhere:
        counted = f"0/{len(tally.hosts)} hosts ran it: skipped on {tally.skipped}"
        sentence = f"{counted} in {elapsed:.1f} s"
    elif tally.skipped:
        counted = f"{tally.ran_ok} ok, {tally.skipped} skipped of {len(tally.hosts)} hosts"
        sentence = f"{counted} in {elapsed:.1f} s"
    else:
        sentence = f"{tally.ran_ok}/{len(tally.hosts)} hosts ok in {elapsed:.1f} s"
    if tally.replicated is False:
        sentence += f" ({UNREPLICATED})"
    return sentence
