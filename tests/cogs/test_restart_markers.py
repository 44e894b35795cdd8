"""Forged restart markers, and what reaches chat from storage.

Anyone who can write to Redis knows where the marker lives (the key layout is public). Such a
marker must not make the bot post anything, anywhere, nor write an audit record. A marker the
bot did write (signed in Redis, or the host's own state file) is still checked: the notice it
leads to holds nothing taken as text from it, and goes only where the commands are allowed.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import aiohttp
import discord
import pytest
import redis.asyncio as aioredis

from tests.support.chat import (
    AUDIT_LOGGER,
    Harness,
    Sent,
    audit_records,
    only_reply,
    replies_to,
    stranger_server,
)

PHISHING = "# Security notice\n[Log in again](https://discord.example.evil/login) @everyone"


def forged(harness: Harness, message_id: int = 1, **changes: Any) -> dict[str, Any]:
    """A marker as an attacker would write it, with an audit draft naming Alice."""
    alice = harness.admins[0]
    marker: dict[str, Any] = {
        "guild_id": harness.guild.id,
        "channel_id": harness.channel.id,
        "message_id": message_id,
        "requester_id": alice.id,
        "requester": PHISHING,
        "requested_at": time.time() - 3,
        "commit": PHISHING,
        "unit": "bot.service",
        "mode": "systemd",
        "audit": {
            "invocation": "ab" * 16,
            "user_id": alice.id,
            "user": "alice",
            "user_shown": PHISHING,
            "guild_id": harness.guild.id,
            "guild": "Test Guild",
            "channel_id": harness.channel.id,
            "channel": "ops",
            "command": "bot_restart",
            "args": [],
            "prefix": "!",
            "started_at": time.time() - 3,
        },
    }
    marker.update(changes)
    return marker


def everything_sent(sent: list[Sent]) -> str:
    return "\n".join([s.content or "" for s in sent] + [f for s in sent for f in s.files.values()])


async def test_a_marker_written_to_redis_makes_the_bot_say_nothing_and_record_nothing(
    harness: Harness,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
):
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id))
    cog = await harness.add_cog(settings, redis=redis_client, key_prefix=key_prefix)
    request = await harness.say("hello")  # a message of Alice's for the notice to reply to
    for stored in [
        json.dumps(forged(harness, request.id)),  # as markers were stored before
        json.dumps({"payload": json.dumps(forged(harness, request.id)), "sig": "0" * 64}),
    ]:
        await redis_client.set(cog.markers.key, stored)
        with caplog.at_level(logging.INFO):
            cog = await harness.reload_and_get_ready(
                settings=settings, redis=redis_client, key_prefix=key_prefix
            )
        assert sent == []
        assert audit_records(caplog) == []
        assert "restart marker in Redis is unsigned or wrongly signed: dropped" in caplog.text
        # The attacker's text is not in the log either.
        assert "Log in again" not in caplog.text
        assert await redis_client.exists(cog.markers.key) == 0
        caplog.clear()


async def test_the_notice_shows_no_text_from_the_marker(
    harness: Harness, git_repos: Any, sent: list[Sent], caplog: pytest.LogCaptureFixture
):
    """Even the host's own state file: the commit is shown only when it is hex."""
    cog = await harness.add_cog()
    request = await harness.say("!bot_restart")
    marker = json.loads(cog.markers.path.read_text())
    marker.update(commit=PHISHING, requester=PHISHING)
    marker["audit"]["user_shown"] = PHISHING  # a draft that is not one: a record of ids only
    cog.markers.path.write_text(json.dumps(marker))
    count = len(sent)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        await harness.reload_and_get_ready()
    [notice] = sent[count:]
    assert notice.reference == request.id
    head = git_repos.head()[:7]
    assert (notice.content or "").startswith("✅ Back online after ")
    assert (notice.content or "").endswith(f" — now at {head}")
    assert "Log in again" not in everything_sent(sent)
    # The invocation still has its one record, made of the marker's checked ids alone.
    [record] = audit_records(caplog)
    assert "Log in again" not in json.dumps(record)
    assert record["user"] == f"user {harness.admins[0].id}"


@pytest.mark.parametrize("where", ["not listed channel", "stranger's server", "a DM"])
async def test_the_notice_goes_only_where_the_commands_are_allowed(
    where: str, harness: Harness, sent: list[Sent], caplog: pytest.LogCaptureFixture
):
    stranger = await stranger_server(harness)
    settings = harness.settings(
        OPS_GUILD_IDS=str(harness.guild.id), OPS_CHANNEL_IDS=str(harness.channel.id)
    )
    cog = await harness.add_cog(settings)
    dm = await harness.admins[0].create_dm()
    channel, guild_id = {
        "not listed channel": (harness.other_channel, harness.guild.id),
        "stranger's server": (stranger.channel, stranger.guild.id),
        "a DM": (dm, None),
    }[where]
    target = await harness.say("hello", channel=channel)
    marker = forged(harness, target.id, channel_id=channel.id, guild_id=guild_id, commit="abc1234")
    await cog.markers.save(marker)
    count = len(sent)
    with caplog.at_level(logging.WARNING, logger="cogs.admin_ops"):
        await harness.reload_and_get_ready(settings=settings)
    assert sent[count:] == []
    assert "where the commands are not allowed: dropped" in caplog.text


async def test_a_marker_naming_another_server_than_its_channels_is_dropped(
    harness: Harness, sent: list[Sent]
):
    stranger = await stranger_server(harness)
    cog = await harness.add_cog()
    target = await harness.say("hello")
    await cog.markers.save(forged(harness, target.id, guild_id=stranger.guild.id))
    count = len(sent)
    await harness.reload_and_get_ready()
    assert sent[count:] == []


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        TimeoutError(),
        RuntimeError("a library bug"),
    ],
    ids=["reset", "aiohttp-reset", "timeout", "anything"],
)
async def test_the_notice_still_goes_when_fetching_the_request_fails_any_way(
    error: BaseException,
    harness: Harness,
    monkeypatch: pytest.MonkeyPatch,
    sent: list[Sent],
):
    cog = await harness.add_cog()
    await harness.say("!bot_restart")

    async def failing_fetch(self: Any, message_id: int) -> discord.Message:
        raise error

    monkeypatch.setattr(discord.TextChannel, "fetch_message", failing_fetch)
    count = len(sent)
    await harness.reload_and_get_ready()
    [notice] = sent[count:]
    assert (notice.content or "").startswith("✅ Back online after ")
    assert notice.reference is None
    assert not cog.markers.path.exists()


async def test_a_captured_marker_put_back_is_not_announced_or_recorded_again(
    harness: Harness,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
):
    cog = await harness.add_cog(redis=redis_client, key_prefix=key_prefix)
    request = await harness.say("!bot_restart")
    captured = await redis_client.get(cog.markers.key)
    assert captured is not None
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        await harness.reload_and_get_ready(redis=redis_client, key_prefix=key_prefix)
        assert len(replies_to(sent, request)) == 2  # "Restarting…" and "Back online"
        await redis_client.set(cog.markers.key, captured)
        await harness.reload_and_get_ready(redis=redis_client, key_prefix=key_prefix)
    assert len(replies_to(sent, request)) == 2
    assert [r["outcome"] for r in audit_records(caplog)] == ["ok"]


async def test_without_any_key_markers_stay_in_the_state_file(
    harness: Harness, redis_client: aioredis.Redis, key_prefix: str, sent: list[Sent]
):
    settings = harness.settings(DISCORD_TOKEN="")  # no token, no fleet secret: nothing signs
    cog = await harness.add_cog(settings, redis=redis_client, key_prefix=key_prefix)
    request = await harness.say("!bot_restart")
    assert await redis_client.exists(cog.markers.key) == 0
    assert cog.markers.path.stat().st_mode & 0o777 == 0o600
    await harness.reload_and_get_ready(settings=settings, redis=redis_client, key_prefix=key_prefix)
    assert (replies_to(sent, request)[-1].content or "").startswith("✅ Back online after ")


# --------------------------------------------------------------------------------------------
# Escape sequences and control characters never reach chat
# --------------------------------------------------------------------------------------------


async def test_escape_sequences_and_controls_are_removed_from_everything_shown(
    harness: Harness, sent: list[Sent]
):
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id))
    await harness.add_cog(settings)
    osc52 = "\x1b]52;c;ZXZpbA==\x07"
    message = await harness.say(f"!bot_pull {osc52}x\x1b[2J\u202eevil\x85")
    assert only_reply(sent, message).content == (
        "Unknown target `xevil` for `!bot_pull`. Configured targets: bot."
    )
    shown = everything_sent(sent)
    for unsafe in ["\x1b", "\x07", "52;c;", "\u202e", "\x85"]:
        assert unsafe not in shown, repr(unsafe)


async def test_a_control_character_cannot_hide_a_secret_from_redaction(
    harness: Harness, sent: list[Sent]
):
    token = harness.base_env["DISCORD_TOKEN"]
    await harness.add_cog()
    split = f"{token[:6]}\x00{token[6:]}"
    message = await harness.say(f"!bot_pull {split}")
    content = only_reply(sent, message).content or ""
    assert token not in content
    assert "\x00" not in content
    assert "***" in content
