"""admin-ops as deployed: the shipped unit, its user and sandbox, polkit, the real ``bot.py``.

``!bot_restart`` in a private systemd: the bot (``opsbot``, sandboxed) asks systemd for a restart
of its own unit, the shipped polkit rule lets it, systemd stops it with SIGTERM and starts the
next process, which answers the request with "back online". Discord is the fake.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import TypeVar

import pytest

from tests.deploy.deploy_support import BOT_UNIT, ShippedUnit
from tests.e2e.conftest import Deployment
from tests.support.fake_discord import FakeDiscord, pings_nobody
from tests.support.fake_discord_bot import ANSI, AUDIT_LINE

pytestmark = pytest.mark.systemd
T = TypeVar("T")


def bot_output(deployment: Deployment) -> str:
    """What the unit's processes wrote (the test's drop-in sends it to a file)."""
    log = deployment.tree.systemd.workdir / "admin-ops-bot.log"
    return log.read_text(errors="replace") if log.exists() else ""


async def _until(
    deployment: Deployment,
    fake: FakeDiscord,
    condition: Callable[[], T | None],
    what: str,
) -> T:
    """A wait on the fake that shows the manager's console (the bot logs there) on failure."""
    try:
        return await fake.wait_until(condition, timeout=30, what=what)
    except AssertionError as exc:
        console = await asyncio.to_thread(deployment.tree.systemd.console)
        raise AssertionError(
            f"{exc}\nconsole:\n{console[-3000:]}\nbot output:\n{bot_output(deployment)[-6000:]}"
        ) from None


async def test_bot_restart_restarts_the_unit_through_polkit_and_the_new_process_says_so(
    deployment: Deployment, deployed_bot: ShippedUnit, fake_discord: FakeDiscord
) -> None:
    systemd = deployment.tree.systemd
    await asyncio.to_thread(systemd.systemctl, "start", BOT_UNIT)
    first = await _until(
        deployment, fake_discord, lambda: fake_discord.gateway.current, "the unit's bot ready"
    )
    first_pid = await asyncio.to_thread(systemd.main_pid, BOT_UNIT)

    request = await fake_discord.post("!bot_restart", by=fake_discord.alice)
    request_id = int(request["id"])
    restarting = await _until(
        deployment,
        fake_discord,
        lambda: next(iter(fake_discord.replies_to(request_id)), None),
        "the restarting reply",
    )
    second = await _until(
        deployment,
        fake_discord,
        lambda: next(
            (s for s in fake_discord.gateway.sessions if s.number > first.number and s.ready),
            None,
        ),
        "the restarted bot ready",
    )
    notice = await _until(
        deployment,
        fake_discord,
        lambda: next((r for r in fake_discord.replies_to(request_id) if r is not restarting), None),
        "the back-online notice",
    )

    assert restarting.content == f"♻️ Restarting `{BOT_UNIT}` (requested by alice)…"
    assert notice.content is not None
    short = deployment.commit[:7]
    assert re.fullmatch(rf"✅ Back online after \d+ s — still at {short}", notice.content)
    assert pings_nobody(restarting.allowed_mentions)
    assert pings_nobody(notice.allowed_mentions)
    # The first process closed on systemd's SIGTERM after its reply, leaving the record to the
    # second one, which logged in with the token from the credential.
    assert first.closed
    assert restarting.seq <= (first.closed_after_requests or 0) < notice.seq
    state = await asyncio.to_thread(systemd.show, BOT_UNIT, "ActiveState", "MainPID", "User")
    assert state["ActiveState"] == "active"
    assert int(state["MainPID"]) not in (0, first_pid)
    assert state["User"] == "opsbot"
    assert {r.authorization for r in fake_discord.requests} == {f"Bot {fake_discord.token}"}
    assert fake_discord.unhandled() == []

    # `systemctl stop`: SIGTERM again, now closing the connection cleanly.
    await asyncio.to_thread(systemd.systemctl, "stop", BOT_UNIT)
    stopped = await asyncio.to_thread(systemd.show, BOT_UNIT, "ActiveState", "Result")
    assert stopped == {"ActiveState": "inactive", "Result": "success"}
    await _until(deployment, fake_discord, lambda: second.closed, "the connection closed")
    assert second.close_code == 1000
    output = bot_output(deployment)
    assert output.count("SIGTERM received: closing") == 2
    assert "Traceback" not in output
    # One record of the restart, by the process that came back.
    found = (AUDIT_LINE.search(ANSI.sub("", line)) for line in output.splitlines())
    records = [json.loads(match.group(1)) for match in found if match]
    assert [(r["command"], r["outcome"]) for r in records] == [("bot_restart", "ok")]
