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
from typing import Any, Final, NamedTuple

import aiohttp
import discord
from discord.ext import commands

from core.ops_exec import clean_text, redact
from core.settings import Settings
from core.text import MESSAGE_LIMIT, cut, format_reply

__all__ = ["DEFER_AFTER", "NO_MENTIONS", "SEND_ERRORS", "Replies", "display_name", "shown"]

# Under the cog's logger, so configuring "cogs.admin_ops" covers everything it does.
log = logging.getLogger("cogs.admin_ops.replies")

#: Every send and edit carries this: output quoting "@everyone" or a role pings nobody.
NO_MENTIONS: Final = discord.AllowedMentions.none()
#: What a send or edit may raise besides Discord's refusal: discord.py re-raises connection
#: resets (aiohttp.ClientOSError) and timeouts as they are.
SEND_ERRORS: Final = (discord.HTTPException, aiohttp.ClientError, OSError, asyncio.TimeoutError)
#: Seconds after which a slash command nobody has answered yet is deferred ("thinking…"):
#: Discord forgets an interaction not answered within 3 s of its creation, and the checks
#: before an answer may wait on Redis, Discord or systemctl.
DEFER_AFTER: Final = 2.0


def display_name(user: discord.abc.User) -> str:
    """How a person is named in chat text, with Markdown in their name made inert."""
    return discord.utils.escape_markdown(user.display_name)


def shown(ctx: commands.Context[Any], command: str) -> str:
    """``command`` as the invoker would type it, as inline code: `` `!bot_pull` ``."""
    return f"`{ctx.clean_prefix}{command}`"


def _defer_delay(interaction: discord.Interaction[Any]) -> float:
    """Seconds until :data:`DEFER_AFTER` after Discord created ``interaction`` (clock skew aside).

    Discord counts its 3 s from the interaction's creation, so the time it spent reaching the
    bot is already gone; a clock behind Discord's cannot stretch the wait past DEFER_AFTER.
    """
    age = (discord.utils.utcnow() - interaction.created_at).total_seconds()
    return min(DEFER_AFTER, max(0.0, DEFER_AFTER - age))


class Replies:
    """Send, reply, edit and show "typing…" for the cog, with redaction always applied."""

    def __init__(self, bot: commands.Bot, settings: Settings) -> None:
        """Redact ``settings.secrets`` and the token of ``bot``'s connection."""
        self.bot = bot
        self.settings = settings
        # One lock per interaction still unanswered: its first answer is either a deferral or
        # the answer itself, never both at once (Discord refuses the second).
        self._first_answers: dict[int, asyncio.Lock] = {}

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

    def _render(self, headline: str, details: str | None, attach: bool) -> tuple[str, str | None]:
        """The message text and the attachment's text (None: no attachment), redacted."""
        shown = self.redact(details) if details else None
        if attach and shown and shown.strip():
            return cut(self.redact(headline), MESSAGE_LIMIT), shown.strip() + "\n"
        return format_reply(self.redact(headline), shown)

    async def reply(
        self,
        ctx: commands.Context[Any],
        headline: str,
        details: str | None = None,
        attach: bool = False,
        *,
        private: bool = False,
    ) -> discord.Message | None:
        """Answer the command's message; an attachment is named after the command.

        ``attach``: the details go in the attachment even when they would fit in the message.
        A slash command is answered through its interaction, visible to the invoker only when
        ``private`` (a refusal); a prefix command by a reply in the channel, whatever
        ``private`` says.
        """
        name = ctx.command.name if ctx.command is not None else "output"
        if ctx.interaction is None:
            return await self.post(
                ctx.channel,
                headline,
                details,
                reference=ctx.message,
                filename=f"{name}.txt",
                attach=attach,
            )
        content, attachment = self._render(headline, details, attach)
        return await self._answer(
            ctx, content, _Attachment(attachment, f"{name}.txt"), private=private
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
        content, attachment = self._render(headline, details, attach)
        return await self._send(channel, content, _Attachment(attachment, filename), reference)

    async def _send(
        self,
        channel: discord.abc.Messageable,
        content: str,
        attachment: _Attachment | None = None,
        reference: discord.Message | None = None,
        view: discord.ui.View | None = None,
    ) -> discord.Message | None:
        kwargs: dict[str, Any] = {"allowed_mentions": NO_MENTIONS}
        if attachment is not None and attachment.text is not None:
            kwargs["file"] = attachment.file()
        if view is not None:
            kwargs["view"] = view
        if reference is not None:
            # A reply that still goes through if the original message was deleted meanwhile.
            kwargs["reference"] = reference.to_reference(fail_if_not_exists=False)
            kwargs["mention_author"] = False
        try:
            return await channel.send(content, **kwargs)
        except SEND_ERRORS as exc:
            log.warning("cannot send to %s: %s", getattr(channel, "id", channel), exc)
            return None

    async def _answer(
        self,
        ctx: commands.Context[Any],
        content: str,
        attachment: _Attachment | None = None,
        *,
        private: bool = False,
        view: discord.ui.View | None = None,
    ) -> discord.Message | None:
        """Answer a slash command: its response if none was given yet, else a follow-up.

        After a deferral the first follow-up takes the place of Discord's "thinking…" message.
        An interaction Discord no longer knows (answered too late, or expired after 15
        minutes) cannot be answered: a public answer goes to the channel instead, a private
        one is only logged (the channel is not the place for someone's refusal).
        """
        interaction = ctx.interaction
        if interaction is None:
            return await self._send(ctx.channel, content, attachment, ctx.message, view)
        kwargs: dict[str, Any] = {"allowed_mentions": NO_MENTIONS, "ephemeral": private}
        if attachment is not None and attachment.text is not None:
            kwargs["file"] = attachment.file()
        if view is not None:
            kwargs["view"] = view
        try:
            if interaction.is_expired():
                raise _Expired
            async with self._first_answer(interaction):
                if not interaction.response.is_done():
                    response = await interaction.response.send_message(content, **kwargs)
                    message = response.resource
                    return message if isinstance(message, discord.Message) else None
                if private:
                    await self._clear_thinking(interaction)
            return await interaction.followup.send(content, wait=True, **kwargs)
        except (_Expired, discord.NotFound) as exc:
            if isinstance(exc, discord.NotFound) and exc.code not in _GONE:
                log.warning("cannot answer interaction %s: %s", interaction.id, exc)
                return None
            if private:
                log.info("interaction %s expired: its private answer is not shown", interaction.id)
                return None
            return await self._send(ctx.channel, content, attachment, view=view)
        except (*SEND_ERRORS, discord.InteractionResponded) as exc:
            log.warning("cannot answer interaction %s: %s", interaction.id, exc)
            return None

    async def _clear_thinking(self, interaction: discord.Interaction[Any]) -> None:
        """Delete a deferral's visible "thinking…" so a private answer can follow it.

        The first follow-up after a deferral takes the deferral's place, and its visibility;
        once that message is gone, a follow-up is a message of its own and can be private.
        """
        deferred = discord.InteractionResponseType.deferred_channel_message
        if interaction.response.type is not deferred:
            return
        try:
            await interaction.delete_original_response()
        except SEND_ERRORS as exc:
            log.info("cannot clear the deferral of interaction %s: %s", interaction.id, exc)

    async def acknowledge(self, ctx: commands.Context[Any]) -> None:
        """Tell Discord a slash command is being worked on ("thinking…"), within its 3 s.

        Nothing for a prefix command, or a slash command already answered.
        """
        interaction = ctx.interaction
        if interaction is None or interaction.is_expired():
            return
        async with self._first_answer(interaction):
            if interaction.response.is_done():
                return
            try:
                await interaction.response.defer(thinking=True)
            except (*SEND_ERRORS, discord.InteractionResponded) as exc:
                log.info("cannot defer interaction %s: %s", interaction.id, exc)

    @contextlib.asynccontextmanager
    async def _first_answer(self, interaction: discord.Interaction[Any]) -> AsyncIterator[None]:
        lock = self._first_answers.setdefault(interaction.id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if interaction.response.is_done() or not lock.locked():
                self._first_answers.pop(interaction.id, None)

    @contextlib.asynccontextmanager
    async def deferred_when_slow(self, ctx: commands.Context[Any]) -> AsyncIterator[None]:
        """Defer a slash command still unanswered :data:`DEFER_AFTER` s into the block.

        A refusal that comes later than that is then shown in place of "thinking…", visibly
        (Discord decides at the deferral whether the answer will be private).
        """
        if ctx.interaction is None:
            yield
            return
        interaction = ctx.interaction
        watchdog = asyncio.create_task(
            self._defer_later(ctx, _defer_delay(interaction)), name="admin-ops: 3 s watchdog"
        )
        try:
            yield
        finally:
            watchdog.cancel()

    async def _defer_later(self, ctx: commands.Context[Any], delay: float) -> None:
        await asyncio.sleep(delay)  # Discord's deadline, not a synchronisation
        # Shielded: a deferral cut off mid-request may have reached Discord while discord.py
        # never learnt it, and the answer would then be refused as a second response.
        await asyncio.shield(self.acknowledge(ctx))

    async def send_live(self, ctx: commands.Context[Any], content: str) -> discord.Message | None:
        """Reply with text rendered for a live message (already within the limit).

        Redacted here too, so no caller can forget it.
        """
        if ctx.interaction is not None:
            return await self._answer(ctx, self.redact(content))
        return await self._send(ctx.channel, self.redact(content), reference=ctx.message)

    async def edit_live(self, message: discord.Message, content: str) -> bool:
        """Edit a live message; False (logged) when Discord refuses."""
        try:
            await message.edit(content=self.redact(content), allowed_mentions=NO_MENTIONS)
        except SEND_ERRORS as exc:
            log.warning("cannot edit message %s: %s", message.id, exc)
            return False
        return True

    # ------------------------------------------------------------------ prompts and buttons

    async def prompt(
        self, ctx: commands.Context[Any], content: str, view: discord.ui.View
    ) -> discord.Message | None:
        """Ask, visibly in the channel, with ``view``'s buttons under the question."""
        if ctx.interaction is not None:
            return await self._answer(ctx, self.redact(content), view=view)
        return await self._send(ctx.channel, self.redact(content), reference=ctx.message, view=view)

    async def answer_press(self, interaction: discord.Interaction[Any], content: str) -> None:
        """Answer a button press privately (someone who may not press it)."""
        try:
            await interaction.response.send_message(
                self.redact(content), ephemeral=True, allowed_mentions=NO_MENTIONS
            )
        except (*SEND_ERRORS, discord.InteractionResponded) as exc:
            log.warning("cannot answer button press %s: %s", interaction.id, exc)

    async def update_pressed(
        self, interaction: discord.Interaction[Any], content: str, view: discord.ui.View
    ) -> bool:
        """Edit the message whose button was pressed, as the answer to the press."""
        try:
            await interaction.response.edit_message(
                content=self.redact(content), view=view, allowed_mentions=NO_MENTIONS
            )
        except (*SEND_ERRORS, discord.InteractionResponded) as exc:
            log.warning("cannot update message of button press %s: %s", interaction.id, exc)
            return False
        return True

    async def edit_prompt(
        self, message: discord.Message, content: str, view: discord.ui.View
    ) -> bool:
        """Edit a prompt nobody answered (its buttons disabled by ``view``)."""
        try:
            await message.edit(
                content=self.redact(content), view=view, allowed_mentions=NO_MENTIONS
            )
        except SEND_ERRORS as exc:
            log.warning("cannot edit prompt %s: %s", message.id, exc)
            return False
        return True

    @contextlib.asynccontextmanager
    async def typing(self, ctx: commands.Context[Any]) -> AsyncIterator[None]:
        """Show "typing…" while the block runs; a failing indicator never fails the command.

        A slash command shows Discord's "thinking…" instead, unless it was answered already.
        """
        if ctx.interaction is not None:
            await self.acknowledge(ctx)
            yield
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(ctx.typing())
            except SEND_ERRORS as exc:
                log.debug("no typing indicator: %s", exc)
            yield


class _Expired(Exception):
    """The interaction's 15 minutes are over: it can no longer be answered."""


#: Discord's codes for an interaction (or its webhook) it no longer knows.
_GONE: Final = (10062, 10015)


class _Attachment(NamedTuple):
    """The text of a ``.txt`` attachment (None: none) and its name; a fresh file per send."""

    text: str | None
    filename: str

    def file(self) -> discord.File:
        """The attachment, ready to send (a file can be sent only once)."""
        return discord.File(io.BytesIO((self.text or "").encode()), filename=self.filename)
