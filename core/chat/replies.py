"""The one place that sends the cog's messages: redacted, pinging nobody, within Discord's limit.

Everything the cog shows goes through :class:`Replies`: escape sequences and control characters
are removed (much of what is shown came from Redis, git or another host), then the bot's token
and every configured secret, ``AllowedMentions.none()`` is set, details go in a code block they
cannot break out of, and details too long for a message become a ``.txt`` attachment. A send
that Discord refuses (or a dropped connection) is logged, never raised: a failed answer must not
turn a finished action into an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
import discord
from discord.ext import commands

from core.ops_exec import clean_text, redact
from core.settings import Settings
from core.text import MESSAGE_LIMIT, cut, format_reply

__all__ = ["NO_MENTIONS", "SEND_ERRORS", "Replies", "display_name", "shown"]

# Under the cog's logger, so configuring "cogs.admin_ops" covers everything it does.
log = logging.getLogger("cogs.admin_ops.replies")

#: Every send and edit carries this: output quoting "@everyone" or a role pings nobody.
NO_MENTIONS: Final = discord.AllowedMentions.none()
#: What a send or edit may raise besides Discord's refusal: discord.py re-raises connection
#: resets (aiohttp.ClientOSError) and timeouts as they are.
SEND_ERRORS: Final = (discord.HTTPException, aiohttp.ClientError, OSError, asyncio.TimeoutError)


def display_name(user: discord.abc.User) -> str:
    """How a person is named in chat text, with Markdown in their name made inert."""
    return discord.utils.escape_markdown(user.display_name)


def shown(ctx: commands.Context[Any], command: str) -> str:
    """``command`` as the invoker would type it, as inline code: `` `!bot_pull` ``."""
    return f"`{ctx.clean_prefix}{command}`"


class Replies:
    """Send, reply, edit and show "typing…" for the cog, with redaction always applied."""

    def __init__(self, bot: commands.Bot, settings: Settings) -> None:
        """Redact ``settings.secrets`` and the token of ``bot``'s connection."""
        self.bot = bot
        self.settings = settings

    @property
    def secrets(self) -> tuple[str, ...]:
        """What must never be shown: the settings' secrets and the connection's token.

        The token is read from the connection, so a bot that got it from elsewhere than
        ``DISCORD_TOKEN`` still has it redacted.
        """
        token = getattr(self.bot.http, "token", None)
        base = self.settings.secrets
        return (*base, token) if isinstance(token, str) and token else base

    def redact(self, text: str) -> str:
        """``text`` fit to show: no escape sequence, no control character, no secret.

        Cleaned first, so a control character planted inside a secret cannot hide it from
        redaction and then vanish.
        """
        return redact(clean_text(text), self.secrets)

    async def reply(
        self,
        ctx: commands.Context[Any],
        headline: str,
        details: str | None = None,
        attach: bool = False,
    ) -> discord.Message | None:
        """Answer the command's message; an attachment is named after the command.

        ``attach``: the details go in the attachment even when they would fit in the message.
        """
        name = ctx.command.name if ctx.command is not None else "output"
        return await self.post(
            ctx.channel,
            headline,
            details,
            reference=ctx.message,
            filename=f"{name}.txt",
            attach=attach,
        )

    async def post(
        self,
        channel: discord.abc.Messageable,
        headline: str,
        details: str | None = None,
        *,
        reference: discord.Message | None = None,
        filename: str = "output.txt",
        attach: bool = False,
    ) -> discord.Message | None:
        """Send redacted text that pings nobody; long details go in a ``.txt`` attachment.

        ``attach``: the details go in the attachment whatever their length.
        """
        shown = self.redact(details) if details else None
        attachment: str | None
        if attach and shown and shown.strip():
            content, attachment = cut(self.redact(headline), MESSAGE_LIMIT), shown.strip() + "\n"
        else:
            content, attachment = format_reply(self.redact(headline), shown)
        kwargs: dict[str, Any] = {"allowed_mentions": NO_MENTIONS}
        if attachment is not None:
            kwargs["file"] = discord.File(io.BytesIO(attachment.encode()), filename=filename)
        if reference is not None:
            # A reply that still goes through if the original message was deleted meanwhile.
            kwargs["reference"] = reference.to_reference(fail_if_not_exists=False)
            kwargs["mention_author"] = False
        try:
            return await channel.send(content, **kwargs)
        except SEND_ERRORS as exc:
            log.warning("cannot send to %s: %s", getattr(channel, "id", channel), exc)
            return None

    async def send_live(self, ctx: commands.Context[Any], content: str) -> discord.Message | None:
        """Reply with text rendered for a live message (already within the limit).

        Redacted here too, so no caller can forget it.
        """
        try:
            return await ctx.channel.send(
                self.redact(content),
                allowed_mentions=NO_MENTIONS,
                reference=ctx.message.to_reference(fail_if_not_exists=False),
                mention_author=False,
            )
        except SEND_ERRORS as exc:
            log.warning("cannot send to %s: %s", ctx.channel.id, exc)
            return None

    async def edit_live(self, message: discord.Message, content: str) -> bool:
        """Edit a live message; False (logged) when Discord refuses."""
        try:
            await message.edit(content=self.redact(content), allowed_mentions=NO_MENTIONS)
        except SEND_ERRORS as exc:
            log.warning("cannot edit message %s: %s", message.id, exc)
            return False
        return True

    @contextlib.asynccontextmanager
    async def typing(self, ctx: commands.Context[Any]) -> AsyncIterator[None]:
        """Show "typing…" while the block runs; a failing indicator never fails the command."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(ctx.typing())
            except SEND_ERRORS as exc:
                log.debug("no typing indicator: %s", exc)
            yield
