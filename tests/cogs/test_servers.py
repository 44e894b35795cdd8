"""Who can steer a command: only the servers in ``OPS_GUILD_IDS``, with that server's roles.

The attacker adds the bot to a server of their own (public bots allow that by default) and
creates a role there: one called ``ops``, or (as far as the bot can tell) one with the ID of
the operator's ops role. The application owner is refused there too: a stranger's server is
no place to run ops commands, whoever types them.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.settings import COMMANDS
from tests.support.chat import (
    AUDIT_LOGGER,
    Harness,
    Sent,
    SystemctlStub,
    audit_records,
    only_reply,
    stranger_server,
)

SERVER_ONLY = "These commands only work in a server."
SECRET = "fleet-chat-secret-5e1d"


def listed(harness: Harness, **env: str) -> dict[str, str]:
    """Settings that list the harness's server and admit the ``ops`` role by ID and by name."""
    return {
        "OPS_GUILD_IDS": str(harness.guild.id),
        "OPS_ADMIN_ROLE_IDS": str(harness.ops_role.id),
        "OPS_ADMIN_ROLE_NAMES": "ops",
        **env,
    }


@pytest.mark.parametrize("attacker", ["eve", "trudy"])
async def test_every_command_from_another_server_is_refused_like_a_dm_and_runs_nothing(
    attacker: str,
    harness: Harness,
    systemctl: SystemctlStub,
    redis_client: aioredis.Redis,
    key_prefix: str,
    git_repos: Any,
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
):
    stranger = await stranger_server(harness)
    settings = harness.settings(**listed(harness, OPS_CONTROL_SECRET=SECRET))
    await harness.add_cog(settings, redis=redis_client, key_prefix=key_prefix)
    head = git_repos.head()
    git_repos.commit_upstream("would be pulled")
    # Eve holds a role called "ops"; Trudy one with the ID of the operator's ops role.
    member = getattr(stranger, attacker)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        for command in COMMANDS:
            message = await harness.say(
                f"!{command} bot.service", member=member, channel=stranger.channel
            )
            assert only_reply(sent, message).content == SERVER_ONLY, command
    assert systemctl.calls() == []
    assert git_repos.head() == head
    assert await redis_client.exists(f"{key_prefix}:commands") == 0
    records = audit_records(caplog)
    assert len(records) == len(COMMANDS)
    assert {r["outcome"] for r in records} == {"refused:guild"}
    assert {r["guild_id"] for r in records} == {stranger.guild.id}


async def test_the_owner_is_refused_in_a_stranger_server_and_served_at_home(
    harness: Harness, systemctl: SystemctlStub, sent: list[Sent]
):
    stranger = await stranger_server(harness)
    harness.bot.owner_id = harness.admins[0].id
    # Only the owner could run it at all: nobody's role is configured.
    await harness.add_cog(harness.settings(OPS_GUILD_IDS=str(harness.guild.id)))
    message = await harness.say("!proxy_restart", member=stranger.alice, channel=stranger.channel)
    assert only_reply(sent, message).content == SERVER_ONLY
    assert systemctl.calls() == []
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content.startswith("✅ Restarted `proxy.service`")


async def test_role_ids_count_only_in_the_server_the_command_came_from(
    harness: Harness, systemctl: SystemctlStub, sent: list[Sent]
):
    stranger = await stranger_server(harness)
    # Both servers are the operator's: Alice holds the ops role in one, and none in the other.
    both = f"{harness.guild.id},{stranger.guild.id}"
    await harness.add_cog(harness.settings(**listed(harness, OPS_GUILD_IDS=both)))
    message = await harness.say("!proxy_restart", member=stranger.alice, channel=stranger.channel)
    assert only_reply(sent, message).content == "You need an ops role to run `!proxy_restart`."
    assert systemctl.calls() == []
    # In a listed server, a role called ops counts (the operator vouches for that server).
    message = await harness.say("!ops_status", member=stranger.eve, channel=stranger.channel)
    assert only_reply(sent, message).content.startswith("📊 Ops status")


async def test_without_a_server_list_role_names_count_nowhere_and_role_ids_still_work(
    harness: Harness, systemctl: SystemctlStub, sent: list[Sent]
):
    stranger = await stranger_server(harness)
    # Role names need OPS_GUILD_IDS (a settings error without it); role IDs alone are allowed.
    await harness.add_cog()
    message = await harness.say("!ops_status", member=stranger.eve, channel=stranger.channel)
    assert only_reply(sent, message).content == "You need an ops role to run `!ops_status`."
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content.startswith("✅ Restarted")
