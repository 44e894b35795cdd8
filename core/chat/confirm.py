"""Are you sure? The Confirm and Cancel buttons in front of the commands in ``OPS_CONFIRM``.

The pipeline asks (:meth:`ButtonConfirmer.ask`) once every check up to "already running" has
passed: the question goes out visibly in the channel with two buttons, and the command stays
"running" while it waits, so a second invocation is told so. Only the member who asked may
press them (anyone else is told privately "Only alice can confirm this."). Confirm runs the
command (the pipeline then takes its cooldown); Cancel, or no answer within
``OPS_CONFIRM_TIMEOUT`` seconds, edits the question to say so and disables the buttons. Every
message goes through :class:`~core.chat.replies.Replies`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, NamedTuple, Protocol

import discord

from core.chat.invocation import Invocation
from core.chat.replies import Replies, display_name
from core.text import format_duration

__all__ = ["Answer", "ButtonConfirmer", "Confirmation", "Confirmer", "StillAllowed"]

log = logging.getLogger("cogs.admin_ops.confirm")

#: How a confirmation ended, as the audit record says it.
Answer = Literal["confirmed", "cancelled", "timed out"]
#: The prefix of the buttons' custom IDs (the invocation's ID follows).
CUSTOM_ID_PREFIX: Final = "admin-ops"
#: Why open questions end when the cog is unloaded (a reload, or the bot shutting down).
STOPPED: Final = "admin-ops stopped (a reload or a shutdown) before an answer"
#: Seconds the edit of a question that ended unanswered may take (the cog may be stopping).
CLOSE_EDIT_TIMEOUT: Final = 3.0


class Confirmation(NamedTuple):
    """The answer to a prompt, and a few words on it for the record."""

    answer: Answer
    detail: str

    @property
    def confirmed(self) -> bool:
        """Whether the command may run."""
        return self.answer == "confirmed"


#: Whether the member pressing Confirm may still run the command (roles change while a
#: question waits): the pipeline's own role checks, run again on the member as Discord sent it.
StillAllowed = Callable[[discord.Member], Awaitable[bool]]


class Confirmer(Protocol):
    """Asks the invoker of a command whether it should run (tests script the answer)."""

    async def ask(
        self, inv: Invocation, question: str, still_allowed: StillAllowed | None = None
    ) -> Confirmation:
        """Ask ``question`` about ``inv``; return once answered or timed out."""


class ButtonConfirmer:
    """Ask with a message carrying Confirm and Cancel buttons."""

    def __init__(self, replies: Replies, timeout: float) -> None:
        """Wait ``timeout`` seconds for an answer."""
        self.replies = replies
        self.timeout = timeout
        self._open: set[_Prompt] = set()

    async def ask(
        self, inv: Invocation, question: str, still_allowed: StillAllowed | None = None
    ) -> Confirmation:
        """Send the prompt, wait for a press or the timeout, say how it ended on the prompt."""
        view = _Prompt(inv, question, self.replies, self.timeout, still_allowed)
        self._open.add(view)
        try:
            message = await self.replies.prompt(inv.ctx, question, view)
            if message is None:
                view.stop()
                return Confirmation("cancelled", "the question could not be sent")
            view.message = message
            if view.closed_with is not None:  # closed while the question was on its way
                await view.show_closed()
            return await asyncio.shield(view.answered)
        except asyncio.CancelledError:
            await view.close(STOPPED)  # nobody may confirm a command that is gone
            raise
        finally:
            self._open.discard(view)

    async def close(self, reason: str = STOPPED) -> None:
        """Cancel every open question, saying ``reason`` on it (the cog is being unloaded).

        Left open, a question of an unloaded cog would keep buttons that look alive, and a
        reloaded cog would not know the command is still "running".
        """
        await asyncio.gather(*(view.close(reason) for view in tuple(self._open)))


class _Prompt(discord.ui.View):
    """The two buttons under one question; only the invoker's presses count."""

    def __init__(
        self,
        inv: Invocation,
        question: str,
        replies: Replies,
        timeout: float,
        still_allowed: StillAllowed | None,
    ) -> None:
        super().__init__(timeout=timeout)
        self.still_allowed = still_allowed
        self.shown = inv.shown
        self.question = question
        self.replies = replies
        self.invoker_id = inv.ctx.author.id
        self.invoker = display_name(inv.ctx.author)
        self.waited = format_duration(timeout)
        self.message: discord.Message | None = None
        #: Why the question ended unanswered (timed out, or the cog unloaded), once it did.
        self.closed_with: str | None = None
        self._settled = False
        self.answered: asyncio.Future[Confirmation] = asyncio.get_running_loop().create_future()
        ident = inv.draft.invocation
        for label, style, answer in (
            ("Confirm", discord.ButtonStyle.danger, self._confirm),
            ("Cancel", discord.ButtonStyle.secondary, self._cancel),
        ):
            button: discord.ui.Button[Any] = discord.ui.Button(
                label=label, style=style, custom_id=f"{CUSTOM_ID_PREFIX}:{label.lower()}:{ident}"
            )
            button.callback = answer  # type: ignore[method-assign]
            self.add_item(button)

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        """Only the invoker may answer; anyone else is told so, privately."""
        if interaction.user.id == self.invoker_id:
            return True
        await self.replies.answer_press(interaction, f"Only {self.invoker} can confirm this.")
        return False

    async def _confirm(self, interaction: discord.Interaction[Any]) -> None:
        if not self._settled and not await self._may_still_run(interaction):
            log.info(
                "%s pressed Confirm of %s without the role it needs now", self.invoker, self.shown
            )
            text = f"You no longer have a role that may run {self.shown}: nothing runs."
            await self.replies.answer_press(interaction, text)
            return
        text = f"{self.question}\n✅ Confirmed by {self.invoker}."
        await self._answer(interaction, text, Confirmation("confirmed", "confirmed"))

    async def _may_still_run(self, interaction: discord.Interaction[Any]) -> bool:
        """The role checks again, on the member as Discord sent them with the press."""
        if self.still_allowed is None:
            return True
        member = interaction.user
        return isinstance(member, discord.Member) and await self.still_allowed(member)

    async def _cancel(self, interaction: discord.Interaction[Any]) -> None:
        text = f"Cancelled by {self.invoker}."
        await self._answer(interaction, text, Confirmation("cancelled", "cancelled"))

    async def _answer(
        self, interaction: discord.Interaction[Any], text: str, answer: Confirmation
    ) -> None:
        if self._settled:  # a second press racing the first one, or the timeout
            await self.replies.answer_press(interaction, "This was already answered.")
            return
        self._settle()
        try:
            # The prompt says how it was answered before the command goes on (and replies).
            await self.replies.update_pressed(interaction, text, self)
        finally:
            self.answered.set_result(answer)

    async def on_timeout(self) -> None:
        """No answer in time: the prompt says so, its buttons disabled, and nothing runs."""
        waited = f"no answer in {self.waited}"
        await self._end(waited, Confirmation("timed out", waited))

    async def close(self, reason: str) -> None:
        """End the question now: it says ``reason``, its buttons disabled, and nothing runs."""
        await self._end(reason, Confirmation("cancelled", reason))

    async def _end(self, reason: str, answer: Confirmation) -> None:
        """Unanswered and over: "Cancelled: ``reason``" on the question, then ``answer``."""
        if self._settled:
            return
        self._settle()
        self.closed_with = reason
        try:
            await self.show_closed()
        finally:
            if not self.answered.done():
                self.answered.set_result(answer)

    async def show_closed(self) -> None:
        """Edit the question (once it is known) to say why it ended; bounded in time."""
        if self.message is None or self.closed_with is None:
            return
        edit = self.replies.edit_prompt(self.message, f"Cancelled: {self.closed_with}", self)
        try:
            await asyncio.wait_for(edit, CLOSE_EDIT_TIMEOUT)
        except TimeoutError:
            log.warning("cannot edit a question that ended unanswered: no answer in time")

    def _settle(self) -> None:
        """Answered once and for all: the buttons are disabled and the view stops listening."""
        self._settled = True
        for item in self.children:
            if isinstance(item, discord.ui.Button):
                item.disabled = True
        self.stop()
