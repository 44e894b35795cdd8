"""The sync hash says what this bot last sent; Discord may hold less since. A start notices."""

from __future__ import annotations

from tests.support.fake_discord import FakeDiscord
from tests.support.fake_discord_bot import StartBot

GUILD_PUT = "PUT /applications/{application_id}/guilds/{guild_id}/commands"


async def test_a_start_syncs_again_a_server_whose_commands_were_removed_elsewhere(
    start_bots: StartBot, fake_discord: FakeDiscord
) -> None:
    first = await start_bots()
    session = await first.wait_ready()
    await first.wait_synced()
    assert await first.stop() == 0
    # A host bot synced its own tree without them (or another process of the application did).
    fake_discord.commands[fake_discord.guild.id] = []

    second = await start_bots()  # the same state dir: its hash matches what it would send
    await second.wait_ready(after=session.number)
    assert "synced in server" in await second.wait_synced()

    assert "lacks" in second.output()
    assert len(fake_discord.sent(GUILD_PUT)) == 2
    assert {c["name"] for c in fake_discord.commands[fake_discord.guild.id]} >= {"ops_status"}
