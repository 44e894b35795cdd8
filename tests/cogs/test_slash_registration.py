"""Where the slash commands are registered, and when they are synced (the sync itself stubbed).

tests/e2e/test_slash_commands.py syncs for real against the fake Discord.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands

from cogs.admin_ops import AdminOps
from core.chat.slash import SYNC_STATE_FILE
from core.settings import COMMANDS
from tests.support.chat import Harness, only_reply

GUILD_A, GUILD_B = 111111111111111111, 222222222222222222
MANAGE_GUILD = 1 << 5


def guild_commands(cog: AdminOps, guild_id: int) -> list[app_commands.Command[Any, ..., Any]]:
    return list(cog.bot.tree.get_commands(guild=discord.Object(guild_id)))  # type: ignore[arg-type]


class RecordingSync:
    """Stands in for ``CommandTree.sync`` and ``fetch_commands``: what Discord holds, per server.

    Records the servers synced, fails where told to.
    """

    def __init__(self, tree: app_commands.CommandTree[Any], refuse: set[int] | None = None) -> None:
        self.tree = tree
        self.guilds: list[int] = []
        self.refuse = refuse or set()
        #: The command names Discord holds per server: what the last sync there sent.
        self.registered: dict[int, list[str]] = {}

    async def __call__(self, *, guild: discord.abc.Snowflake | None = None) -> list[Any]:
        assert guild is not None, "never a global sync"
        self.guilds.append(guild.id)
        if guild.id in self.refuse:
            response = aiohttp.ClientResponse.__new__(aiohttp.ClientResponse)
            response.status, response.reason = 403, "Forbidden"  # type: ignore[misc]
            raise discord.Forbidden(response, {"message": "Missing Access", "code": 50001})
        self.registered[guild.id] = [c.name for c in self.tree.get_commands(guild=guild)]
        return []

    async def fetch(self, *, guild: discord.abc.Snowflake | None = None) -> list[Any]:
        assert guild is not None, "never the global commands"
        return [SimpleNamespace(name=name) for name in self.registered.get(guild.id, [])]


@pytest.fixture
def tree_sync(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> RecordingSync:
    recording = RecordingSync(harness.bot.tree)
    monkeypatch.setattr(harness.bot.tree, "sync", recording)
    monkeypatch.setattr(harness.bot.tree, "fetch_commands", recording.fetch)
    monkeypatch.setattr(harness.bot._connection, "application_id", 424242424242424242)
    return recording


async def test_without_guild_ids_the_commands_are_prefix_only(harness: Harness) -> None:
    cog = await harness.add_cog()

    assert harness.bot.tree.get_commands() == []
    assert sorted(c.name for c in cog.get_commands()) == sorted(COMMANDS)
    assert all(c.app_command is None for c in cog.get_commands())  # type: ignore[attr-defined]


async def test_every_command_is_a_guild_command_of_the_listed_servers_only(
    harness: Harness, tree_sync: RecordingSync
) -> None:
    cog = await harness.add_cog(harness.settings(OPS_GUILD_IDS=f"{GUILD_A},{GUILD_B}"))

    assert harness.bot.tree.get_commands() == []  # nothing global
    for guild_id in (GUILD_A, GUILD_B):
        registered = guild_commands(cog, guild_id)
        assert sorted(c.name for c in registered) == sorted(COMMANDS)
        for command in registered:
            payload = command.to_dict(harness.bot.tree)
            assert payload["default_member_permissions"] == MANAGE_GUILD, command.name
            assert len(payload["description"]) <= 100
    await harness.remove_cog()
    assert guild_commands(cog, GUILD_A) == []


async def test_a_server_is_synced_at_start_only_when_its_command_set_changed(
    harness: Harness, tree_sync: RecordingSync
) -> None:
    settings = harness.settings(OPS_GUILD_IDS=f"{GUILD_A},{GUILD_B}")
    cog = await harness.add_cog(settings)
    assert cog.command_sync.task is not None
    await cog.command_sync.task
    assert sorted(tree_sync.guilds) == [GUILD_A, GUILD_B]
    stored = json.loads((harness.state_dir / SYNC_STATE_FILE).read_text())
    assert set(stored) == {str(GUILD_A), str(GUILD_B)}

    # The next start, nothing changed: no sync (Discord rate-limits them hard).
    await harness.remove_cog()
    cog = await harness.add_cog(settings)
    assert cog.command_sync.task is not None
    await cog.command_sync.task
    assert sorted(tree_sync.guilds) == [GUILD_A, GUILD_B]

    # A command of the host bot's own in one server changes that server's set only.
    @app_commands.command(name="host_ping", description="The host bot's own")
    async def host_ping(interaction: discord.Interaction[Any]) -> None:
        """Not run."""

    harness.bot.tree.add_command(host_ping, guild=discord.Object(GUILD_B))
    await harness.remove_cog()
    cog = await harness.add_cog(settings)
    assert cog.command_sync.task is not None
    await cog.command_sync.task
    assert sorted(tree_sync.guilds) == [GUILD_A, GUILD_B, GUILD_B]

    # The hash matches, but Discord lost the commands of one server: that one is synced again.
    tree_sync.registered[GUILD_A] = []
    await harness.remove_cog()
    cog = await harness.add_cog(settings)
    assert cog.command_sync.task is not None
    await cog.command_sync.task
    assert sorted(tree_sync.guilds) == [GUILD_A, GUILD_A, GUILD_B, GUILD_B]


async def test_ops_sync_forces_a_sync_and_says_how_each_server_went(
    harness: Harness, tree_sync: RecordingSync, sent
) -> None:
    ours = harness.guild.id
    cog = await harness.add_cog(harness.settings(OPS_GUILD_IDS=f"{ours},{GUILD_B}"))
    assert cog.command_sync.task is not None
    await cog.command_sync.task
    tree_sync.refuse = {GUILD_B}
    message = await harness.say("!ops_sync")

    reply = only_reply(sent, message).content
    assert reply.startswith("❌ Sync failed in 1 of 2 servers\n```\n")
    assert f"✅ server {ours}: synced" in reply
    assert (
        f"❌ server {GUILD_B}: Missing Access (invite the bot with the applications.commands scope)"
    ) in reply
    assert sorted(tree_sync.guilds[-2:]) == sorted([ours, GUILD_B])
    again = await harness.say("!ops_sync")
    assert "cooling down" in only_reply(sent, again).content


async def test_ops_sync_without_guild_ids_is_not_configured(harness: Harness, sent) -> None:
    await harness.add_cog()
    message = await harness.say("!ops_sync")

    assert only_reply(sent, message).content == ("`!ops_sync` is not configured: set OPS_GUILD_IDS")
