"""A host bot as the popular discord.py templates build one: tests/e2e/test_drop_in.py copies it.

Every ``*.py`` in its ``cogs/`` is loaded as an extension (a failure logged, the others loaded
anyway), the message content intent is left off (slash commands first), and it syncs its own
command tree for its server, its global commands copied there first (discord.py's own example).
It knows nothing of admin-ops: the README's drop-in steps add it.
"""

from __future__ import annotations

import logging
import os

import discord
from discord.ext import commands

log = logging.getLogger("host")
GUILD = discord.Object(int(os.environ["HOST_GUILD_ID"]))


class HostBot(commands.Bot):
    """Slash-first: no message content intent, a mention as its prefix."""

    def __init__(self) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned_or("?"), intents=discord.Intents.default()
        )

    async def setup_hook(self) -> None:
        cogs = os.path.join(os.path.realpath(os.path.dirname(__file__)), "cogs")
        for file in sorted(os.listdir(cogs)):
            if file.endswith(".py"):
                extension = file[:-3]
                try:
                    await self.load_extension(f"cogs.{extension}")
                    log.info("Loaded extension '%s'", extension)
                except Exception as e:  # noqa: BLE001 - as the templates do: log and go on
                    log.error("Failed to load extension %s: %s: %s", extension, type(e).__name__, e)
        self.tree.copy_global_to(guild=GUILD)
        synced = await self.tree.sync(guild=GUILD)
        log.info("Synced %d commands to the guild: %s", len(synced), sorted(c.name for c in synced))


if __name__ == "__main__":
    HostBot().run(os.environ["TOKEN"], root_logger=True)
