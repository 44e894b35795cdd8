"""Single-host limits the fleet commands must not get around, and restarts kept apart.

``!fleet_restart`` of this bot's unit or its proxy's does what ``!bot_restart`` or
``!proxy_restart`` does, so it needs their role too. And ``!bot_restart`` / ``!proxy_restart``
refuse while their unit became active less than ``OPS_RESTART_MIN_INTERVAL`` seconds ago
(whoever started it), so no sequence of allowed commands drives a unit into systemd's start
limit.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import discord.ext.test as dpytest
import pytest
import redis.asyncio as aioredis

import core.chat.spacing as chat_spacing
from core.chat.floods import REPLY_INTERVAL
from core.control_ops import command_stream_key, host_ops
from core.control_ops.host_ops import HostOps, Refused
from core.ops_exec import unit_restart_lock
from core.text import format_duration
from tests.support import ROOT
from tests.support.chat import (
    AUDIT_LOGGER,
    FakeClock,
    Harness,
    Sent,
    SystemctlStub,
    audit_records,
    only_reply,
)

SECRET = "fleet-chat-secret-5e1d"


async def published(client: aioredis.Redis, prefix: str) -> list[str]:
    """The arguments of every fleet command published under ``prefix``."""
    entries = await client.xrange(command_stream_key(prefix))
    return [fields[b"args"].decode() for _id, fields in entries]


# --------------------------------------------------------------------------------------------
# !fleet_restart of this bot's unit or its proxy's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("own_command", "spellings"),
    [
        ("bot_restart", ["bot.service", "bot", " bot.service "]),
        ("proxy_restart", ["proxy.service", "proxy"]),
    ],
)
async def test_fleet_restart_of_the_bots_or_proxys_unit_needs_that_commands_role(
    own_command: str,
    spellings: list[str],
    harness: Harness,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
):
    # Only Bob is a deployer: only deployers may restart the bot (or the proxy) by name.
    bob = harness.admins[1]
    await dpytest.add_role(bob, harness.other_role)
    settings = harness.settings(
        OPS_CONTROL_SECRET=SECRET,
        **{f"OPS_ROLE_IDS_{own_command.upper()}": str(harness.other_role.id)},
    )
    clock = FakeClock()
    await harness.add_cog(settings, redis=redis_client, key_prefix=key_prefix, clock=clock)
    refusal = (
        f"You need an ops role to run `!{own_command}`: `!fleet_restart` would do the same here."
    )
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say(f"!{own_command}")
        assert only_reply(sent, message).content == f"You need an ops role to run `!{own_command}`."
        for spelt in spellings:
            # Alice may run !fleet_restart (an ops role), but not the command it amounts to.
            message = await harness.say(f"!fleet_restart {spelt}", member=harness.admins[0])
            assert only_reply(sent, message).content == refusal, spelt
            clock.now += REPLY_INTERVAL  # she hears the next refusal of it (a flood would not)
        assert await published(redis_client, key_prefix) == []
        # Bob holds both roles: the same command goes out.
        message = await harness.say(f"!fleet_restart {spellings[0]}", member=bob)
        assert only_reply(sent, message).content.startswith("📡 Fleet restart of ")
    unit = f"{spellings[0].removesuffix('.service')}.service"
    assert await published(redis_client, key_prefix) == [f'["{unit}"]']
    outcomes = [r["outcome"] for r in audit_records(caplog)]
    assert outcomes[: 1 + len(spellings)] == ["refused:role"] * (1 + len(spellings))


async def test_fleet_restart_of_other_units_needs_only_its_own_role(
    harness: Harness, redis_client: aioredis.Redis, key_prefix: str, sent: list[Sent]
):
    settings = harness.settings(
        OPS_CONTROL_SECRET=SECRET, OPS_ROLE_IDS_BOT_RESTART=str(harness.other_role.id)
    )
    await harness.add_cog(settings, redis=redis_client, key_prefix=key_prefix)
    # Units that only look like the bot's: systemd names are exact (and case-sensitive).
    for unit in ["worker", "bot2.service", "bot.socket", "Bot.service", "bot@1.service"]:
        message = await harness.say(f"!fleet_restart {unit}")
        assert only_reply(sent, message).content.startswith("📡 Fleet restart of "), unit
    assert len(await published(redis_client, key_prefix)) == 5


async def test_the_extra_role_check_comes_after_the_commands_own_checks(
    harness: Harness, redis_client: aioredis.Redis, key_prefix: str, sent: list[Sent]
):
    settings = harness.settings(
        OPS_CONTROL_SECRET=SECRET,
        OPS_ROLE_IDS_BOT_RESTART=str(harness.other_role.id),
        OPS_CHANNEL_IDS=str(harness.channel.id),
    )
    await harness.add_cog(settings, redis=redis_client, key_prefix=key_prefix)
    message = await harness.say("!fleet_restart bot", member=harness.outsider)
    assert only_reply(sent, message).content == "You need an ops role to run `!fleet_restart`."
    message = await harness.say("!fleet_restart bot", channel=harness.other_channel)
    assert only_reply(sent, message).content == "`!fleet_restart` can't be used in this channel."


# --------------------------------------------------------------------------------------------
# Restarts at least OPS_RESTART_MIN_INTERVAL apart
# --------------------------------------------------------------------------------------------


def started(monkeypatch: pytest.MonkeyPatch, ago: dict[str, float | None]) -> None:
    """Make systemd say each unit of ``ago`` became active that long ago (None: cannot tell)."""

    async def unit_started_ago(unit: str, timeout: float = 5.0) -> float | None:
        return ago[unit]

    monkeypatch.setattr(chat_spacing, "unit_started_ago", unit_started_ago)


@pytest.mark.parametrize(
    ("command", "unit"), [("bot_restart", "bot.service"), ("proxy_restart", "proxy.service")]
)
async def test_a_restart_soon_after_the_unit_started_is_refused_and_runs_nothing(
    command: str,
    unit: str,
    harness: Harness,
    systemctl: SystemctlStub,
    monkeypatch: pytest.MonkeyPatch,
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
):
    started(monkeypatch, {unit: 12.0})
    cog = await harness.add_cog()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say(f"!{command}")
    assert only_reply(sent, message).content == (
        f"`!{command}` refused: `{unit}` restarted 12 s ago; try again in 48 s."
    )
    assert systemctl.calls() == []
    assert not cog.markers.path.exists()
    [record] = audit_records(caplog)
    assert record["outcome"] == "refused:recent"
    # Nothing ran, so the cooldown was given back and the command is free again.
    assert cog.admission.running == {}
    started(monkeypatch, {unit: 60.0})
    message = await harness.say(f"!{command}")
    assert only_reply(sent, message).content.startswith(("♻️ Restarting", "✅ Restarted"))
    assert len(systemctl.calls()) == 1


async def test_back_to_back_proxy_restarts_without_cooldown_cannot_reach_the_start_limit(
    harness: Harness, systemctl: SystemctlStub, sent: list[Sent]
):
    """The real path: systemd (the stand-in) says when the unit started; no cooldown helps."""
    await harness.add_cog(harness.settings(OPS_COOLDOWN_PROXY_RESTART="0"))
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content.startswith("✅ Restarted `proxy.service`")
    for member in harness.admins * 3:
        message = await harness.say("!proxy_restart", member=member)
        content = only_reply(sent, message).content or ""
        match = re.fullmatch(
            r"`!proxy_restart` refused: `proxy.service` restarted (\d+) s ago; "
            r"try again in (.+)\.",
            content,
        )
        assert match, content
        assert match[2] == format_duration(60 - int(match[1]))
    assert len(systemctl.calls()) == 1


async def test_when_systemd_cannot_tell_the_bot_counts_from_its_process_and_the_proxy_runs(
    harness: Harness,
    systemctl: SystemctlStub,
    monkeypatch: pytest.MonkeyPatch,
    sent: list[Sent],
):
    started(monkeypatch, {"bot.service": None, "proxy.service": None})
    monkeypatch.setattr(chat_spacing, "process_started_at", lambda: time.time() - 5.2)
    await harness.add_cog()
    message = await harness.say("!bot_restart")
    assert only_reply(sent, message).content == (
        "`!bot_restart` refused: `bot.service` restarted 5 s ago; try again in 55 s."
    )
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content.startswith("✅ Restarted `proxy.service`")
    assert len(systemctl.calls()) == 1


async def test_exit_mode_counts_from_the_process_start(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent: list[Sent]
):
    monkeypatch.setattr(chat_spacing, "process_started_at", lambda: time.time() - 30.4)
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    monkeypatch.setattr(harness.bot, "close", close)
    await harness.add_cog(harness.settings(OPS_RESTART_MODE="exit", OPS_BOT_SERVICE=""))
    message = await harness.say("!bot_restart")
    assert only_reply(sent, message).content == (
        "`!bot_restart` refused: the bot restarted 30 s ago; try again in 30 s."
    )
    assert (harness.exits, closed) == ([], [])


# Another process on the host (a control daemon) restarting the proxy: under the host-wide lock.
RESERVE = """\
import asyncio, sys
from core.ops_exec import unit_restart_lock

async def main() -> None:
    async with unit_restart_lock(sys.argv[1], "proxy") as lock:
        lock.reserve()

asyncio.run(main())
"""


async def unit_started_never(unit: str, timeout: float = 5.0) -> float | None:
    """Systemd cannot tell when a unit started: only the host-wide lock's record counts."""
    return None


async def test_the_bot_and_a_daemon_on_the_host_count_each_others_restarts(
    harness: Harness, systemctl: SystemctlStub, monkeypatch: pytest.MonkeyPatch, sent: list[Sent]
):
    started(monkeypatch, {"proxy.service": None})  # systemd cannot tell: only the lock knows
    subprocess.run(
        [sys.executable, "-c", RESERVE, str(harness.state_dir)], cwd=ROOT, check=True, timeout=30
    )
    await harness.add_cog()
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content == (
        "`!proxy_restart` refused: `proxy.service` restarted 0 s ago; "
        f"try again in {format_duration(60, round_up=True)}."
    )
    assert systemctl.calls() == []

    # And the other way round: a restart by the bot counts for a daemon sharing the state dir.
    (harness.state_dir / "locks" / "restart-proxy.service.lock").unlink()
    message = await harness.say("!proxy_restart", member=harness.admins[1])
    assert only_reply(sent, message).content.startswith("✅ Restarted `proxy.service`")
    monkeypatch.setattr(host_ops, "unit_started_ago", unit_started_never)
    ops = HostOps(
        identity="h", redis=None, pull_targets={}, restart_units=["proxy"],
        lock_dir=harness.state_dir,
    )  # fmt: skip
    with pytest.raises(Refused, match=r"^refused: restarted 0 s ago$"):
        await ops.run("restart", ("proxy",))
    assert len(systemctl.calls()) == 1


async def test_the_bot_locks_in_ops_lock_dir_and_refuses_a_restart_under_an_unsafe_lock(
    harness: Harness,
    systemctl: SystemctlStub,
    monkeypatch: pytest.MonkeyPatch,
    sent: list[Sent],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    """OPS_LOCK_DIR: the lock the daemon's user shares (a setgid dir of their common group)."""
    started(monkeypatch, {"proxy.service": None})  # systemd cannot tell: only the lock knows
    shared = tmp_path / "run-admin-ops"
    shared.mkdir()
    shared.chmod(0o2770)
    async with unit_restart_lock(shared, "proxy") as lock:
        lock.reserve()  # as the daemon does before it restarts the proxy
    await harness.add_cog(harness.settings(OPS_LOCK_DIR=str(shared)))
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content == (
        "`!proxy_restart` refused: `proxy.service` restarted 0 s ago; "
        f"try again in {format_duration(60, round_up=True)}."
    )
    assert not (harness.state_dir / "locks").exists()

    # A symlink planted in the lock file's place: neither followed nor worked around.
    victim = tmp_path / "precious"
    victim.write_text("precious")
    lock_file = shared / "locks" / "restart-proxy.service.lock"
    lock_file.unlink()
    lock_file.symlink_to(victim)
    with caplog.at_level(logging.ERROR, logger="cogs.admin_ops.spacing"):
        message = await harness.say("!proxy_restart", member=harness.admins[1])
    assert only_reply(sent, message).content == (
        "`!proxy_restart` refused: the restart lock of `proxy.service` on this host is unsafe "
        "(see the bot's log)."
    )
    assert systemctl.calls() == []
    assert victim.read_text() == "precious"
    why = "unsafe restart lock path: a symbolic link or not a directory"
    assert f"refusing to restart proxy.service: {why} ({lock_file}, EPERM)" in caplog.messages


async def test_a_directory_planted_as_the_lock_file_refuses_the_restart(
    harness: Harness, systemctl: SystemctlStub, monkeypatch: pytest.MonkeyPatch, sent: list[Sent]
):
    """It cannot be opened as a file (EISDIR): refused as unsafe, never restarted unlocked."""
    started(monkeypatch, {"proxy.service": None})
    (harness.state_dir / "locks" / "restart-proxy.service.lock").mkdir(parents=True)
    await harness.add_cog()
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content == (
        "`!proxy_restart` refused: the restart lock of `proxy.service` on this host is unsafe "
        "(see the bot's log)."
    )
    assert systemctl.calls() == []


async def test_the_spacing_reveals_nothing_to_who_may_not_run_the_command(
    harness: Harness, systemctl: SystemctlStub, monkeypatch: pytest.MonkeyPatch, sent: list[Sent]
):
    started(monkeypatch, {"bot.service": 1.0, "proxy.service": 1.0})
    await harness.add_cog(harness.settings(OPS_CHANNEL_IDS=str(harness.channel.id)))
    message = await harness.say("!proxy_restart", member=harness.outsider)
    assert only_reply(sent, message).content == "You need an ops role to run `!proxy_restart`."
    message = await harness.say("!bot_restart", channel=harness.other_channel)
    assert only_reply(sent, message).content == "`!bot_restart` can't be used in this channel."


async def test_a_zero_interval_turns_the_spacing_off(
    harness: Harness, systemctl: SystemctlStub, monkeypatch: pytest.MonkeyPatch, sent: list[Sent]
):
    started(monkeypatch, {"proxy.service": 0.5})
    await harness.add_cog(harness.settings(OPS_RESTART_MIN_INTERVAL="0"))
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content.startswith("✅ Restarted")


async def test_the_in_process_daemon_gets_the_spacing_and_state_dir_from_the_settings(
    harness: Harness,
    redis_server: Any,
    redis_client: aioredis.Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
):
    from core.chat import in_process
    from core.control_ops import ControlDaemon

    built: list[Any] = []
    real = ControlDaemon.from_settings

    def spy(redis: aioredis.Redis, settings: Any) -> ControlDaemon:
        built.append(settings)
        return real(redis, settings)

    monkeypatch.setattr(in_process.ControlDaemon, "from_settings", spy)
    settings = harness.settings(
        REDIS_URL=redis_server.url,
        OPS_CONTROL_SECRET=SECRET,
        OPS_CONTROL_IN_PROCESS="1",
        OPS_RESTART_MIN_INTERVAL="42",
    )
    await harness.add_cog(settings, redis=redis_client, key_prefix=key_prefix)
    [daemon_settings] = built
    assert daemon_settings.restart_min_interval == 42.0
    assert daemon_settings.state_dir == harness.state_dir
    assert daemon_settings.prefix == key_prefix
