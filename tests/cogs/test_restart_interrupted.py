"""``!bot_restart`` interrupted: by the restart it asked for, or before it asked for anything.

systemd stops the bot's whole unit as soon as it runs the restart job: the bot (its task is
cancelled when the process closes) and the ``systemctl`` it started (ended by SIGTERM), in
either order. Once the request is out, either means the restart is under way: the marker stays
with its audit draft and only the process that comes back writes the record. Cancelled during
``OPS_RESTART_DELAY``, nothing was asked: the marker goes and this process records it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import discord.ext.test as dpytest
import pytest

import core.chat.restart as chat_restart
from core.chat.restart import RestartRequest
from tests.support.chat import AUDIT_LOGGER, Harness, audit_records, only_reply, replies_to
from tests.support.processes import write_script

#: A systemctl stopped with the unit: SIGTERM to itself while asking for the restart.
STOPPED_SYSTEMCTL = """
import os, signal, sys
if "restart" in sys.argv:
    os.kill(os.getpid(), signal.SIGTERM)
print("active")
"""


async def back_online(harness: Harness, **kwargs: Any) -> None:
    """The process that comes back: loaded again, then ready; its notice is sent."""
    await harness.remove_cog()
    cog = await harness.add_cog(**kwargs)
    harness.bot._ready.set()
    harness.bot.dispatch("ready")
    await dpytest.run_all_events()
    assert cog.back_online_task is not None
    await cog.back_online_task


async def test_systemctl_ended_by_sigterm_means_the_restart_is_under_way(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path, sent, caplog
) -> None:
    stub = write_script(
        tmp_path / "stopped-systemctl", STOPPED_SYSTEMCTL, interpreter=sys.executable
    )
    monkeypatch.setenv("OPS_SYSTEMCTL", str(stub))
    cog = await harness.add_cog()

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!bot_restart")
        # No "could not restart": systemd stopping systemctl is the restart itself.
        assert only_reply(sent, message).content.startswith("♻️ Restarting `bot.service`")
        assert cog.markers.path.exists()
        assert audit_records(caplog) == []
        count = len(sent)
        await back_online(harness)

    [record] = audit_records(caplog)
    assert (record["command"], record["outcome"]) == ("bot_restart", "ok")
    [notice] = sent[count:]
    assert notice.content.startswith("✅ Back online after ")
    assert notice.reference == message.id


async def test_a_restart_cancelled_after_its_request_is_recorded_by_the_next_process(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent, caplog
) -> None:
    """The bot closes while systemctl still runs: the task is cancelled, the marker stays."""
    requested = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    async def stopped_while_asking(unit: str, **_: object) -> RestartRequest:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        requested.set()
        await asyncio.Event().wait()  # systemd stops the unit before systemctl answers
        raise AssertionError("never reached")

    monkeypatch.setattr(chat_restart, "request_own_restart", stopped_while_asking)
    cog = await harness.add_cog()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = dpytest.backend.make_message("!bot_restart", harness.admins[0], harness.channel)
        await asyncio.wait_for(requested.wait(), 5)
        [task] = tasks
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        assert task.done()
        await dpytest.run_all_events()
        assert audit_records(caplog) == []  # not "error: interrupted"
        assert "bot_restart" not in cog.admission.running
        assert cog.markers.path.exists()
        count = len(sent)
        await back_online(harness)

    [record] = audit_records(caplog)
    assert (record["command"], record["outcome"]) == ("bot_restart", "ok")
    assert record["user_id"] == harness.admins[0].id
    [notice] = sent[count:]
    assert notice.content.startswith("✅ Back online after ")
    assert notice.reference == message.id


async def test_a_restart_cancelled_during_its_delay_asked_for_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent, caplog
) -> None:
    """The cog unloads within OPS_RESTART_DELAY: no request, no marker, recorded here."""
    calls: list[str] = []

    async def never(unit: str, **_: object) -> RestartRequest:
        calls.append(unit)
        raise AssertionError("asked systemd although cancelled during the delay")

    monkeypatch.setattr(chat_restart, "request_own_restart", never)
    cog = await harness.add_cog(harness.settings(OPS_RESTART_DELAY="60"))
    saved = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    real_save = cog.markers.save

    async def save(marker: Any) -> None:
        await real_save(marker)
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        saved.set()

    monkeypatch.setattr(cog.markers, "save", save)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = dpytest.backend.make_message("!bot_restart", harness.admins[0], harness.channel)
        await asyncio.wait_for(saved.wait(), 5)
        [task] = tasks
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        await dpytest.run_all_events()

    assert calls == []
    assert not cog.markers.path.exists()
    [record] = audit_records(caplog)
    assert (record["command"], record["outcome"], record["detail"]) == (
        "bot_restart",
        "error",
        "interrupted",
    )
    assert [r.content[:2] for r in replies_to(sent, message)] == ["♻️"]
