"""The fleet board's text and the live message's edit rate: pure, no Discord and no Redis.

The rate limit runs on a fake clock: virtual time advances only when the test says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp

from core.chat.fleet_board import FleetBoard, LiveMessage
from core.control_ops import SUMMARY_LIMIT, FleetResult, HostResult, Published
from core.text import MESSAGE_LIMIT

# --------------------------------------------------------------------------------------------
# The board: pure formatting
# --------------------------------------------------------------------------------------------


def result(host: str, ok: bool = True, ran: bool = True, summary: str = "fine") -> HostResult:
    return HostResult(host, ok, ran, summary, 0.25)


def test_board_shows_waiting_hosts_then_the_outcome() -> None:
    board = FleetBoard(title="📡 Fleet pull of `bot`")
    board.published(Published("c1", "pull", (), frozenset({"web-1", "web-2", "db-1"})))
    content, complete = board.render()
    assert complete
    assert content == (
        "📡 Fleet pull of `bot`\n```\n"
        "⏳ db-1            waiting\n"
        "⏳ web-1           waiting\n"
        "⏳ web-2           waiting\n"
        "```\n⏳ 0/3 answered…"
    )
    board.add(result("web-1", summary="Updated 1a2b3c4 → 5d6e7f8 (1 commit)\n5d6e7f8 Add it"))
    board.add(result("web-2", ran=False, summary="Skipped: web-1 is already pulling"))
    board.add(result("db-1", ok=False, ran=False, summary="refused: not allowed on this host"))
    board.finish(FleetResult("c1", dict(board.results), frozenset(), board.expected, elapsed=1.23))
    content, _ = board.render()
    assert "\n✅ web-1    0.2 s  Updated 1a2b3c4 → 5d6e7f8 (1 commit) · 5d6e7f8 Add it\n" in content
    assert "\n⏭️ web-2    0.2 s  Skipped: web-1 is already pulling\n" in content
    assert "\n❌ db-1     0.2 s  refused: not allowed on this host\n" in content
    # The skipped host is not counted as plainly ok.
    assert content.endswith("\n❌ 1 failed: db-1 — 1 ok, 1 skipped of 3 hosts in 1.2 s")


def test_board_footer_lists_failures_and_silent_hosts() -> None:
    expected = frozenset({"a", "b", "c", "d"})
    results = {"a": result("a", ok=False), "b": result("b", ok=False), "d": result("d")}
    board = FleetBoard(title="t")
    board.finish(FleetResult("c", results, frozenset({"c"}), expected, elapsed=30.0))
    assert board.footer() == "❌ 2 failed: a, b · 1 silent: c — 1/4 hosts ok in 30.0 s"
    assert "\n⌛ c           no answer\n" in board.render()[0]

    ok = FleetBoard(title="t")
    everyone = {h: result(h) for h in expected}
    ok.finish(FleetResult("c", everyone, frozenset(), expected, elapsed=3.41))
    assert ok.footer() == "✅ 4/4 hosts ok in 3.4 s"

    nobody = FleetBoard(title="📡 Fleet status")
    nobody.finish(FleetResult("c", {}, frozenset(), frozenset(), elapsed=0.01))
    assert nobody.render() == (
        "📡 Fleet status\n"
        "❌ No hosts are alive: no control daemon has a heartbeat in Redis; nothing ran.",
        True,
    )


def test_board_cleans_and_fences_what_hosts_send_and_stays_within_the_limit() -> None:
    board = FleetBoard(title="t", clean=lambda text: text.replace("hunter2", "***"))
    hosts = frozenset(f"host-{n:02d}-" + "x" * 40 for n in range(60))
    board.published(Published("c", "status", (), hosts))
    for host in sorted(hosts)[:30]:
        board.add(result(host, summary="```\n@everyone hunter2 " + "y" * 500))
    content, complete = board.render()
    assert not complete
    assert len(content) <= MESSAGE_LIMIT
    assert content == "t\n✅ 30 · ⏳ 30\n⏳ 30/60 answered…"
    text = board.full_text()
    assert "hunter2" not in text
    assert text.count("@everyone ***") == 30

    few = FleetBoard(title="t", clean=lambda text: text.replace("hunter2", "***"))
    few.add(result("evil```host", summary="```\n**bold** hunter2"))
    content, complete = few.render()
    assert complete
    assert content.count("```") == 2
    assert "hunter2" not in content


OSC52 = "\x1b]52;c;cHduZWQ=\x07"  # "write this to the clipboard"
OSC52_C1 = "\x9d52;c;cHduZWQ=\x9c"


def test_board_shows_nothing_from_redis_raw_in_names_summaries_or_footer() -> None:
    # The board cleans on its own, whatever ``clean`` the caller passes.
    hosts = [f"{OSC52}web-1", f"web-2{OSC52_C1}", "web-3\x1b[2J", "web-4"]
    board = FleetBoard(title="t")
    board.published(Published("c", "status", (), frozenset(hosts)))
    board.add(result(hosts[0], ok=False, summary=f"{OSC52}bad \x1b]0;title\x07\x1b[31mred"))
    board.add(result(hosts[3], summary=f"fine{OSC52_C1}\x07\x00"))
    board.finish(
        FleetResult("c", dict(board.results), frozenset(hosts[1:3]), frozenset(hosts), elapsed=1)
    )
    texts = [board.render()[0], board.full_text(), board.footer(), board.render(limit=60)[0]]
    for text in texts:
        assert "\x1b" not in text
        assert not any("\x80" <= ch <= "\x9f" or (ch < " " and ch != "\n") for ch in text)
        assert "cHduZWQ=\x07" not in text
    assert "❌ web-1" in texts[0]
    assert "bad red" in texts[0]
    assert board.footer().startswith("❌ 1 failed: web-1 · 2 silent: ")


def test_board_cuts_before_it_cleans_or_redacts() -> None:
    seen: list[int] = []

    def clean(text: str) -> str:
        seen.append(len(text))
        return text

    board = FleetBoard(title="t", clean=clean)
    board.add(result("h" + "x" * 1_000_000, summary="a.a." * 250_000))
    board.render()
    assert seen
    assert max(seen) <= SUMMARY_LIMIT + len(" […]")


# --------------------------------------------------------------------------------------------
# The edit rate limit, with a fake clock
# --------------------------------------------------------------------------------------------


class FakeClock:
    """Virtual time: ``sleep`` waits until the test advances the clock past its deadline."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, future))
        await future

    async def advance(self, to: float) -> None:
        self.now = to
        for deadline, future in list(self._sleepers):
            if deadline <= to and not future.done():
                future.set_result(None)
        self._sleepers = [(d, f) for d, f in self._sleepers if not f.done()]
        for _ in range(20):  # let the edit loop run to its next wait (no real time passes)
            await asyncio.sleep(0)


async def live_with_fake_clock(
    blips: Sequence[Exception] = (),
) -> tuple[LiveMessage, FakeClock, list[tuple[float, str]], Any]:
    """A live message on a fake clock: ``shown`` records each edit with its time.

    The first edits raise ``blips`` (the last one first), as a failing connection would.
    """
    clock = FakeClock()
    state = {"n": 0}
    shown: list[tuple[float, str]] = []
    failures = list(blips)

    async def edit(content: str) -> bool:
        if failures:
            raise failures.pop()
        shown.append((clock.now, content))
        return True

    live = LiveMessage(
        lambda: f"state {state['n']}", edit, shown="state 0", clock=clock, sleep=clock.sleep
    )
    return live, clock, shown, state


async def test_a_burst_of_changes_costs_one_edit_and_the_final_state_is_never_lost() -> None:
    live, clock, shown, state = await live_with_fake_clock()
    await clock.advance(0.2)
    for n in range(1, 11):  # ten hosts answer at once
        state["n"] = n
        live.changed()
    await clock.advance(0.9)
    assert shown == []  # less than a second since the message was sent
    await clock.advance(1.0)
    assert shown == [(1.0, "state 10")]  # one coalesced edit with the latest state
    state["n"] = 11
    finishing = asyncio.create_task(live.finish())
    await clock.advance(1.5)
    assert not finishing.done()  # the final edit too waits for the interval
    await clock.advance(2.0)
    assert await finishing is True
    assert shown == [(1.0, "state 10"), (2.0, "state 11")]
    assert live.edits == 2


async def test_a_steady_stream_of_changes_is_edited_once_a_second() -> None:
    live, clock, shown, state = await live_with_fake_clock()
    for tick in range(1, 31):  # a change every 0.1 s for 3 s
        state["n"] = tick
        live.changed()
        await clock.advance(tick / 10)
    finishing = asyncio.create_task(live.finish())
    await clock.advance(4.0)
    assert await finishing is True
    # Once a second, each with the latest state; the final state was already shown at 3.0.
    assert shown == [(1.0, "state 10"), (2.0, "state 20"), (3.0, "state 30")]


async def test_finishing_unchanged_sends_no_edit() -> None:
    live, clock, shown, _state = await live_with_fake_clock()
    finishing = asyncio.create_task(live.finish())
    await clock.advance(1.0)
    assert await finishing is True
    assert shown == []
    assert live.edits == 0


async def test_a_connection_reset_on_an_edit_does_not_lose_the_final_state() -> None:
    # discord.py re-raises connection resets (aiohttp.ClientOSError) from an edit as they are.
    reset = aiohttp.ClientOSError(104, "Connection reset by peer")
    live, clock, shown, state = await live_with_fake_clock([reset])
    state["n"] = 1
    live.changed()
    await clock.advance(1.0)  # this edit hits the reset
    state["n"] = 2
    finishing = asyncio.create_task(live.finish())
    await clock.advance(2.0)
    assert await finishing is True
    assert shown == [(2.0, "state 2")]
