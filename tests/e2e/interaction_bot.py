"""A small discord.py bot with guild slash commands and a button, run against the fake Discord.

It checks the fake's interaction support with discord.py's own code (``CommandTree.sync``,
``InteractionResponse``, the follow-up webhook, a ``View``), independently of admin-ops. Run as
``python interaction_bot.py`` with the fake's variables (see :func:`bot_env`) and
``TEST_GUILD_ID``.
"""

from __future__ import annotations

import os

import discord
from discord import app_commands

GUILD = discord.Object(int(os.environ["TEST_GUILD_ID"]))


class Confirm(discord.ui.View):
    """One button that only the member who asked may press."""

    def __init__(self, invoker_id: int) -> None:
        super().__init__(timeout=60)
        self.invoker_id = invoker_id

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.danger, custom_id="confirm")
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        if interaction.user.id != self.invoker_id:
            await interaction.response.send_message("Only the invoker can confirm.", ephemeral=True)
            return
        button.disabled = True
        await interaction.response.edit_message(content="Confirmed.", view=self)


class InteractionBot(discord.Client):
    """Registers its commands in one guild at start-up, never globally."""

    def __init__(self) -> None:
        super().__init__(intents=discord.Intents.default())
        self.tree = app_commands.CommandTree(self)

        @self.tree.command(guild=GUILD, description="Answer privately")
        async def ping(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("pong", ephemeral=True)

        @self.tree.command(guild=GUILD, description="Think, then answer")
        async def slow(interaction: discord.Interaction) -> None:
            await interaction.response.defer(thinking=True)
            await interaction.followup.send("done")
            await interaction.edit_original_response(content="finished")

        @self.tree.command(guild=GUILD, description="Ask first")
        async def confirm(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("Sure?", view=Confirm(interaction.user.id))

        @self.tree.command(guild=GUILD, description="Post in the channel, then edit it")
        async def note(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("noted", ephemeral=True)
            assert interaction.channel is not None
            posted = await interaction.channel.send("draft")  # type: ignore[union-attr]
            await posted.edit(content="final")

        @self.tree.command(guild=GUILD, description="Pick a unit")
        @app_commands.describe(name="The unit")
        async def unit(interaction: discord.Interaction, name: str) -> None:
            await interaction.response.send_message(f"picked {name}", ephemeral=True)

        @unit.autocomplete("name")
        async def unit_names(
            interaction: discord.Interaction, typed: str
        ) -> list[app_commands.Choice[str]]:
            names = ("nginx.service", "bot.service", "worker.service")
            return [app_commands.Choice(name=n, value=n) for n in names if n.startswith(typed)]

    async def setup_hook(self) -> None:
        await self.tree.sync(guild=GUILD)


if __name__ == "__main__":
    InteractionBot().run(os.environ["DISCORD_TOKEN"], root_logger=True)
