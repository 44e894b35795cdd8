"""Refusal floods: a member who may not run a command cannot make the bot spam.

Whoever is refused as a DM, from another server, for the role or for the channel gets at most
one reply per command per 30 s and at most one audit-channel line per minute; the log and the
audit stream still get every record. Who may run the command hears every answer. Time is a
fake clock handed to the cog: nothing sleeps.
"""

from __future__ import annotations

import logging
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
import redis.asyncio as aioredis

from core.chat.floods import FLOOD_CAPACITY
from tests.support.chat import (
    AUDIT_LOGGER,
    FakeClock,
    Harness,
    Sent,
    SystemctlStub,
    audit_records,
    replies_to,
    stranger_server,
)


def audit_lines(sent: list[Sent], harness: Harness) -> list[str]:
    """What the audit channel got (the harness's other channel; nothing else posts there)."""
    return [s.content or "" for s in sent if s.reference is None]


async def say_times(
    harness: Harness, n: int, content: str, member: discord.Member, channel: Any = None
) -> list[discord.Message]:
    return [await harness.say(content, member=member, channel=channel) for _ in range(n)]


async def test_a_member_without_the_role_gets_one_reply_per_command_per_30_s(
    harness: Harness,
    systemctl: SystemctlStub,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
):
    clock = FakeClock()
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id))
    await harness.add_cog(settings, redis=redis_client, key_prefix=key_prefix, clock=clock)
    mallory = harness.outsider
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        burst = await say_times(harness, 20, "!proxy_restart", mallory)
        assert [len(replies_to(sent, m)) for m in burst] == [1] + [0] * 19
        assert len(audit_lines(sent, harness)) == 1
        # Another command: its own refusal, but no second audit line within the minute.
        [pull] = await say_times(harness, 1, "!bot_pull", mallory)
        assert len(replies_to(sent, pull)) == 1
        assert len(audit_lines(sent, harness)) == 1
        # 30 s on: one more reply; the audit channel waits for the minute.
        clock.now += 30
        again = await say_times(harness, 3, "!proxy_restart", mallory)
        assert [len(replies_to(sent, m)) for m in again] == [1, 0, 0]
        assert len(audit_lines(sent, harness)) == 1
        clock.now += 30
        [late] = await say_times(harness, 1, "!proxy_restart", mallory)
        assert len(replies_to(sent, late)) == 1
        assert len(audit_lines(sent, harness)) == 2
    # The log and the stream have every one of them.
    assert len(audit_records(caplog)) == 25
    assert await redis_client.xlen(f"{key_prefix}:audit") == 25
    assert systemctl.calls() == []
    assert replies_to(sent, burst[0])[0].content == "You need an ops role to run `!proxy_restart`."


async def test_dm_other_server_and_channel_refusals_are_held_back_too(
    harness: Harness, systemctl: SystemctlStub, sent: list[Sent]
):
    stranger = await stranger_server(harness)
    clock = FakeClock()
    settings = harness.settings(
        OPS_GUILD_IDS=str(harness.guild.id),
        OPS_CHANNEL_IDS=str(harness.channel.id),
        OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id),
    )
    await harness.add_cog(settings, clock=clock)
    alice = harness.admins[0]
    dm = await harness.admins[1].create_dm()
    for member, channel in [
        (harness.admins[1], dm),
        (stranger.eve, stranger.channel),
        (alice, harness.other_channel),
    ]:
        burst = await say_times(harness, 5, "!ops_status", member, channel)
        assert [len(replies_to(sent, m)) for m in burst] == [1, 0, 0, 0, 0], member
    # One audit line per member: Bob (DM), Eve (stranger's server), Alice (wrong channel).
    assert len(audit_lines(sent, harness)) == 3
    assert systemctl.calls() == []


async def test_who_may_run_the_command_hears_every_cooldown_and_running_answer(
    harness: Harness, systemctl: SystemctlStub, sent: list[Sent]
):
    clock = FakeClock()
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id))
    await harness.add_cog(settings, clock=clock)
    first = await harness.say("!proxy_restart")
    assert replies_to(sent, first)[0].content.startswith("✅ Restarted")
    burst = await say_times(harness, 10, "!proxy_restart", harness.admins[1])
    for message in burst:
        [reply] = replies_to(sent, message)
        assert "is cooling down" in (reply.content or "")
    # Each of them is in the audit channel too.
    assert len(audit_lines(sent, harness)) == 11
    assert len(systemctl.calls()) == 1


async def test_many_members_cannot_grow_the_gate_past_its_cap(harness: Harness, sent: list[Sent]):
    clock = FakeClock()
    cog = await harness.add_cog(clock=clock)
    assert cog.floods.replies.capacity == cog.floods.posts.capacity == FLOOD_CAPACITY
    cog.floods.replies.capacity = cog.floods.posts.capacity = 3  # six raiders fill it twice
    bot, guild = harness.bot, harness.guild
    members = []
    for n in range(6):
        user = dpytest.backend.make_user(f"raider{n}", n + 1)
        members.append(dpytest.backend.make_member(user, guild))
    answered = [len(replies_to(sent, await harness.say("!ops_status", member=m))) for m in members]
    # The gate stays at its cap and goes quiet rather than grow; room comes back with time.
    assert answered == [1, 1, 1, 0, 0, 0]
    assert len(cog.floods.replies) == 3
    clock.now += 60
    assert len(replies_to(sent, await harness.say("!ops_status", member=members[5]))) == 1
    assert len(cog.floods.replies) == 1
    assert bot.get_cog("AdminOps") is cog
