"""RestartSpacing against a real lock dir: no lock, no restart; nothing acted, nothing reserved.

The cog-level behaviour is in tests/cogs/test_restart_limits.py; here the action and the guard
are called directly, so the action's own lock (taken after the guard passed) is tested too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

import core.chat.spacing as chat_spacing
from core.chat.invocation import Invocation, Outcome, Reply
from core.chat.spacing import RestartSpacing
from core.ops_exec import unit_restart_lock


@dataclass
class Shown:
    """What the spacing reads of an invocation: the command as typed."""

    shown: str = "`!proxy_restart`"


INV = cast(Invocation, Shown())


@pytest.fixture(autouse=True)
def systemd_cannot_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    """No systemd here: only the lock's reservation counts."""

    async def never(unit: str, timeout: float = 5.0) -> float | None:
        return None

    monkeypatch.setattr(chat_spacing, "unit_started_ago", never)


class Action:
    """A restart action that records its calls and says whether it acted."""

    def __init__(self, acted: bool) -> None:
        self.acted = acted
        self.calls = 0

    async def __call__(self, inv: Invocation) -> Outcome:
        self.calls += 1
        return Outcome("ok" if self.acted else "failed", acted=self.acted, reply=Reply("done"))


async def test_a_lock_that_cannot_be_taken_refuses_in_the_guard_and_in_the_action(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only an unsafe lock: any error taking it (here OPS_LOCK_DIR is a file) refuses."""
    not_a_dir = tmp_path / "lock-dir"
    not_a_dir.write_text("")
    spacing = RestartSpacing(60.0, lock_dir=not_a_dir)
    action = Action(acted=True)
    sentence = (
        "`!proxy_restart` refused: the restart lock of `proxy.service` on this host cannot be "
        "taken (see the bot's log)."
    )
    with caplog.at_level(logging.ERROR, logger="cogs.admin_ops.spacing"):
        refusal = await spacing.check(INV, "proxy.service", own=False)
        outcome = await spacing.locked("proxy.service", action, own=False)(INV)
    assert refusal is not None
    assert (refusal.status, refusal.message) == ("refused:config", sentence)
    assert (outcome.status, outcome.acted) == ("refused:config", False)
    assert outcome.reply == Reply(sentence)
    assert action.calls == 0
    logged = f"refusing to restart proxy.service: File exists ({not_a_dir}, EEXIST)"
    assert caplog.messages == [logged, logged]


async def test_a_restart_that_did_not_act_gives_its_reservation_back(tmp_path: Path) -> None:
    """Refused by systemctl: the earlier reservation is what the next process sees."""
    async with unit_restart_lock(tmp_path, "proxy", clock=lambda: time.time() - 600) as lock:
        lock.reserve()  # a restart ten minutes ago: long enough
    spacing = RestartSpacing(60.0, lock_dir=tmp_path)

    refused = Action(acted=False)
    assert not (await spacing.locked("proxy.service", refused, own=False)(INV)).acted
    async with unit_restart_lock(tmp_path, "proxy") as lock:
        ago = lock.reserved_ago()
    assert ago is not None
    assert ago >= 600  # the old reservation, not one made just now

    acted = Action(acted=True)
    assert (await spacing.locked("proxy.service", acted, own=False)(INV)).acted
    again = Action(acted=True)
    outcome = await spacing.locked("proxy.service", again, own=False)(INV)
    assert (outcome.status, refused.calls, acted.calls, again.calls) == ("refused:recent", 1, 1, 0)
