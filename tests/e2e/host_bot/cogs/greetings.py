"""The host bot's own cog, with its own (global) slash command."""

from __future__ import annotations

from typing import Any

from discord.ext import commands


class Greetings(commands.Cog):
    """Says hello."""

    @commands.hybrid_command(name="hello", description="Say hello")
    async def hello(self, ctx: commands.Context[Any]) -> None:
        await ctx.send(f"Hello, {ctx.author.name}!")


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Greetings())
