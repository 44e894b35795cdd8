"""Refusal floods: how often a refusal is still answered and posted, and what that costs."""

from __future__ import annotations

from core.chat.floods import (
    FLOOD_CAPACITY,
    POST_INTERVAL,
    QUIETED,
    REPLY_INTERVAL,
    Loudness,
    RefusalFloodGate,
    Window,
)
from tests.support.chat import FakeClock


def test_the_windows_are_the_issues_numbers() -> None:
    assert (REPLY_INTERVAL, POST_INTERVAL) == (30.0, 60.0)
    assert {"refused:dm", "refused:guild", "refused:role", "refused:channel"} == QUIETED


def test_one_reply_per_member_and_command_per_30_s_and_one_post_per_member_per_minute() -> None:
    clock = FakeClock()
    gate = RefusalFloodGate(clock=clock)
    assert gate.loudness(1, "bot_pull", "refused:role") == Loudness(reply=True, post=True)
    assert gate.loudness(1, "bot_pull", "refused:channel") == Loudness(reply=False, post=False)
    # Another command: its own reply, but the member's audit line for this minute is spent.
    assert gate.loudness(1, "ops_status", "refused:dm") == Loudness(reply=True, post=False)
    # Another member is not held back by the first one.
    assert gate.loudness(2, "bot_pull", "refused:guild") == Loudness(reply=True, post=True)
    clock.now += REPLY_INTERVAL - 0.001
    assert gate.loudness(1, "bot_pull", "refused:role") == Loudness(reply=False, post=False)
    clock.now += 0.001
    assert gate.loudness(1, "bot_pull", "refused:role") == Loudness(reply=True, post=False)
    clock.now += POST_INTERVAL - REPLY_INTERVAL
    assert gate.loudness(1, "bot_pull", "refused:role") == Loudness(reply=True, post=True)


def test_people_who_may_run_the_command_hear_every_answer() -> None:
    gate = RefusalFloodGate(clock=FakeClock())
    for status in ["refused:running", "refused:cooldown", "refused:recent", "refused:config"] * 5:
        assert gate.loudness(1, "bot_restart", status) == Loudness(reply=True, post=True)
    for status in ["ok", "failed", "error", "skipped"]:
        assert gate.loudness(1, "bot_restart", status) == Loudness(reply=True, post=True)
    # And none of that counts against a later refusal of the same member.
    assert gate.loudness(1, "bot_restart", "refused:role") == Loudness(reply=True, post=True)


def test_memory_stays_bounded_whatever_the_number_of_members() -> None:
    clock = FakeClock()
    window = Window(30.0, capacity=100, clock=clock)
    assert sum(window.first(member) for member in range(10_000)) == 100
    assert len(window) == 100
    assert window.overflowed == 9_900
    # Entries expire with their window, and the table makes room again.
    clock.now += 30.0
    assert window.first("late")
    assert len(window) == 1


def test_the_gates_windows_are_capped_and_expire() -> None:
    clock = FakeClock()
    gate = RefusalFloodGate(clock=clock)
    for member in range(3 * FLOOD_CAPACITY):
        gate.loudness(member, "bot_pull", "refused:role")
        clock.now += 0.001
    assert len(gate.replies) <= FLOOD_CAPACITY
    assert len(gate.posts) <= FLOOD_CAPACITY
    clock.now += POST_INTERVAL
    gate.loudness(-1, "bot_pull", "refused:role")
    assert (len(gate.replies), len(gate.posts)) == (1, 1)
