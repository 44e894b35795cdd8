"""What one fleet command's chat message shows, and keeping that message up to date.

:class:`FleetBoard` is pure state and formatting; :class:`LiveMessage` edits one message at a
bounded rate so a burst of answers costs one edit and the final state is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import discord

from core.chat.replies import SEND_ERRORS
from core.control_ops import FleetResult, HostResult, Published
from core.control_ops.report import FleetTally, HostStatus, host_status, ok_sentence
from core.control_ops.wire import cut_summary
from core.ops_exec import clean_text
from core.text import MESSAGE_LIMIT, cut, neutralise_fences, one_line

__all__ = ["FLEET_EDIT_INTERVAL", "FleetBoard", "LiveMessage"]

log = logging.getLogger(__name__)

#: A live fleet message is edited at most this often (Discord rate-limits edits per channel).
FLEET_EDIT_INTERVAL = 1.0
#: The longest one-line summary shown per host in the live table.
FLEET_SUMMARY_WIDTH = 110
#: Host names listed in a fleet footer before "… and N more".
FLEET_FOOTER_HOSTS = 10
# How much of a host name is looked at before it is cleaned and cut to 64 characters.
_NAME_SCAN: Final = 256


#: The board's icon for each host status (the command line has words for the same statuses).
ICONS: Final = {
    HostStatus.OK: "✅",
    HostStatus.SKIPPED: "⏭️",
    HostStatus.FAILED: "❌",
    HostStatus.WAITING: "⏳",
    HostStatus.SILENT: "⌛",
}


@dataclass
class FleetBoard:
    """What one fleet command's message shows: a row per host, then a footer.

    Pure state and formatting: the cog feeds it as hosts answer, :class:`LiveMessage` shows it.
    Host names and summaries come from other hosts: each is cut to its limit first, then has
    escape sequences and control characters removed, then goes through ``clean`` (the cog's
    redaction), once. Rows are in a code block, so they render as typed and cannot break out.
    """

    title: str
    clean: Callable[[str], str] = str
    expected: frozenset[str] = frozenset()
    results: dict[str, HostResult] = field(default_factory=dict)
    fleet: FleetResult | None = None
    error: str | None = None
    _names: dict[str, str] = field(default_factory=dict, repr=False)
    _summaries: dict[str, str] = field(default_factory=dict, repr=False)

    def published(self, published: Published) -> None:
        """The command is out: these hosts are expected to answer."""
        self.expected = frozenset(published.expected)

    def add(self, result: HostResult) -> None:
        """One host answered (the first answer per host counts, as in ``publish``)."""
        if result.host not in self.results:
            self.results[result.host] = result
            self._summaries[result.host] = self.clean(clean_text(cut_summary(result.summary)))

    def finish(self, fleet: FleetResult) -> None:
        """``publish`` returned: every expected host answered, or the timeout passed."""
        self.expected = frozenset(fleet.expected)
        for result in fleet.results.values():
            self.add(result)
        self.fleet = fleet

    def fail(self, error: str) -> None:
        """The command could not be published, or answers could not be collected."""
        self.error = error

    @property
    def finished(self) -> bool:
        """Whether nothing will change any more."""
        return self.fleet is not None or self.error is not None

    def render(self, limit: int = MESSAGE_LIMIT) -> tuple[str, bool]:
        """The message text (at most ``limit`` characters), and whether it shows the whole table.

        A row per host with a one-line summary if that fits; else a row per host without
        summaries; else only the counts. When it is not the whole table, the cog attaches
        :meth:`full_text` once the command is finished.
        """
        hosts = self._hosts()
        footer = self.footer()
        if not hosts:
            return cut(f"{self.title}\n{footer}", limit), True
        width = min(max(len(self._name(host)) for host in hosts), 40)
        if self.finished:
            attached = f"{footer}\n📎 Every host's full answer is in the next message."
        else:
            attached = footer
        for summary_width in (FLEET_SUMMARY_WIDTH, 0):
            rows = "\n".join(self._row(host, width, summary_width) for host in hosts)
            complete = summary_width == FLEET_SUMMARY_WIDTH
            content = (
                f"{self.title}\n```\n{neutralise_fences(rows)}\n```\n"
                f"{footer if complete else attached}"
            )
            if len(content) <= limit:
                return content, complete
        return cut(f"{self.title}\n{self._counts()}\n{attached}", limit), False

    def full_text(self) -> str:
        """Every host's whole answer, for the attachment when the table did not fit."""
        blocks = []
        for host in self._hosts():
            result = self.results.get(host)
            icon = ICONS[host_status(result, finished=self.finished)]
            if result is None:
                blocks.append(f"{icon} {self._name(host)}: no answer")
                continue
            head = f"{icon} {self._name(host)} ({result.duration:.1f} s)"
            body = [f"    {line}" for line in self._summaries[host].splitlines()]
            blocks.append("\n".join([head, *body]))
        return "\n".join([*blocks, "", self.footer()]) + "\n"

    def footer(self) -> str:
        """The last line: progress, then "3/3 hosts ok in 1.2 s" or what went wrong."""
        answered = len(self.expected & self.results.keys())
        if self.fleet is None:
            if self.error is not None:
                counts = f" ({answered}/{len(self.expected)} answered)" if self.expected else ""
                return f"❌ {self.error}{counts}"
            return f"⏳ {answered}/{len(self.expected)} answered…"
        fleet = self.fleet
        if not fleet.expected and not fleet.results:
            return "❌ No hosts are alive: no control daemon has a heartbeat in Redis; nothing ran."
        tally = FleetTally.of_fleet(fleet)
        sentence = ok_sentence(tally, fleet.elapsed)
        if fleet.ok:
            # Every answer was ok, but if each host skipped it, nothing happened anywhere.
            return f"{ICONS[HostStatus.SKIPPED] if tally.ran_nowhere else '✅'} {sentence}"
        parts = []
        if tally.failed:
            parts.append(f"{len(tally.failed)} failed: {self._listing(tally.failed)}")
        if tally.unanswered:
            parts.append(f"{len(tally.unanswered)} silent: {self._listing(tally.unanswered)}")
        if not fleet.expected:
            parts.append("no hosts were alive when it was published")
        return f"❌ {' · '.join(parts)} — {sentence}"

    # -- pieces

    def _tally(self) -> FleetTally:
        return FleetTally.of(self.expected, self.results)

    def _hosts(self) -> tuple[str, ...]:
        return self._tally().hosts

    def _name(self, host: str) -> str:
        name = self._names.get(host)
        if name is None:
            name = self._names[host] = one_line(self.clean(clean_text(host[:_NAME_SCAN])), 64)
        return name

    def _row(self, host: str, width: int, summary_width: int) -> str:
        name = self._name(host)
        if len(name) > width:
            name = name[: width - 1] + "…"
        result = self.results.get(host)
        icon = ICONS[host_status(result, finished=self.finished)]
        if result is None:
            took = ""
            summary = "no answer" if self.finished else "waiting"
        else:
            took = f"{result.duration:.1f} s"
            summary = one_line(self._summaries[host], summary_width)
        row = f"{icon} {name:<{width}}  {took:>7}"
        return f"{row}  {summary}" if summary_width else row.rstrip()

    def _counts(self) -> str:
        counts = self._tally().counts(finished=self.finished)
        return " · ".join(f"{ICONS[status]} {count}" for status, count in counts)

    def _listing(self, hosts: Sequence[str]) -> str:
        shown = [discord.utils.escape_markdown(self._name(h)) for h in hosts[:FLEET_FOOTER_HOSTS]]
        more = len(hosts) - len(shown)
        return ", ".join(shown) + (f" … and {more} more" if more else "")


class LiveMessage:
    """Keep one message showing the latest rendering, editing it at most once per ``interval``.

    ``changed()`` only marks the message stale; one edit loop sends the latest rendering once
    ``interval`` has passed since the previous send or edit, so a burst of changes costs one
    edit. ``finish()`` makes the loop send the final rendering (after the interval, like any
    edit) and stop; it returns whether that last edit went through. The loop starts at once, so
    build it inside a running event loop. ``clock`` and ``sleep`` are for tests.
    """

    def __init__(
        self,
        render: Callable[[], str],
        edit: Callable[[str], Awaitable[bool]],
        *,
        shown: str,
        interval: float = FLEET_EDIT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        """``shown`` is what the message says now (it was just sent)."""
        self._render = render
        self._edit = edit
        self._shown = shown
        self._interval = interval
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._stale = asyncio.Event()
        self._final = False
        #: How many edits were sent (tests and logs).
        self.edits = 0
        self._task = asyncio.create_task(self._loop(), name="admin-ops live fleet message")

    def changed(self) -> None:
        """The rendering changed; the message is edited when the interval allows."""
        self._stale.set()

    async def finish(self) -> bool:
        """Show the final rendering and stop; False when the final edit failed."""
        self._final = True
        self._stale.set()
        return await self._task

    async def cancel(self) -> None:
        """Stop without a final edit (the command itself failed or was cancelled)."""
        self._task.cancel()
        # wait() rather than awaiting the task: its own error must not replace the caller's.
        await asyncio.wait({self._task})
        if not self._task.cancelled() and self._task.exception() is not None:
            log.warning("live message edit loop failed: %r", self._task.exception())

    async def _loop(self) -> bool:
        while True:
            await self._stale.wait()
            delay = self._last + self._interval - self._clock()
            if delay > 0:
                await self._sleep(delay)  # the rate limit: changes meanwhile are coalesced
            self._stale.clear()
            final = self._final  # read before rendering, so the final render is the last one
            content = self._render()
            ok = True
            if content != self._shown:
                try:
                    ok = await self._edit(content)
                # A failed edit must not end the loop: the final one matters.
                except SEND_ERRORS as exc:
                    log.warning("live message edit failed: %r", exc)
                    ok = False
                self._last = self._clock()
                self.edits += 1
                if ok:
                    self._shown = content
            if final:
                return ok
