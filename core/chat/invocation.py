"""One chat command from message to reply: the checks in a fixed order, the action, the record.

:meth:`Pipeline.invoke` runs, for every command: server only (a listed one) → role → channel
(who and where, :class:`~core.chat.admission.Admission`) → configured (the command's own
``configure``, asked only now, so only someone allowed to run the command learns how it is
configured) → the role of every command the plan also does (``!fleet_restart`` of the bot's
unit is a ``!bot_restart`` too) → already running → cooldown (when) → for the commands in
``OPS_CONFIRM``, the invoker's confirmation (:mod:`core.chat.confirm`; the cooldown is taken
only once confirmed) → the plan's guard (the unit restarted too recently) → the action → the
reply → one audit record. A run that did not act gives its cooldown back here, so an operator
may retry at once.

The same path serves ``!bot_pull`` and ``/bot_pull``: a slash command's refusals are answered
privately (ephemeral), and once it is admitted Discord is told it is being worked on
("thinking…", within its 3 s) before the action runs.

``configure`` turns the settings and arguments into an :data:`Action` (or a :class:`Plan` when
the action needs more than the command's own checks) that holds everything it needs, already
resolved (the target, the unit, the fleet's client and secret), or :class:`NotConfigured`. An
action returns an :class:`Outcome`, which says what to reply and what to record; it never
decides about cooldowns or audit records itself.

The refusals of someone who may not run the command at all are answered and posted to the
audit channel at a bounded rate (:class:`~core.chat.floods.RefusalFloodGate`); they are
still logged and streamed every time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import discord
from discord.ext import commands

from core.chat.admission import Admission, Refusal, RefusalStatus
from core.chat.audit import AuditDraft, AuditSink
from core.chat.floods import RefusalFloodGate
from core.chat.replies import Replies, shown
from core.text import inline_code

if TYPE_CHECKING:
    from core.chat.confirm import Confirmer, StillAllowed

__all__ = [
    "Action",
    "Configure",
    "Guard",
    "Invocation",
    "NotConfigured",
    "Outcome",
    "Pipeline",
    "Plan",
    "Reply",
    "Status",
]

log = logging.getLogger("cogs.admin_ops.invocation")

# Tasks of :meth:`Pipeline.after_idle`, kept alive until done (the event loop keeps only weak
# references to tasks).
_LINGERING: set[asyncio.Task[None]] = set()

#: How an invocation ended, as its audit record says it.
Status = Literal["ok", "skipped", "failed", "error", "cancelled"] | RefusalStatus


class Reply(NamedTuple):
    """The answer to the command's message: a headline and, optionally, details in a block.

    ``attach``: the details go in a ``.txt`` attachment even when they would fit (a program's
    full output).
    """

    headline: str
    details: str | None = None
    attach: bool = False


@dataclass(frozen=True)
class Outcome:
    """How an action ended, for the reply, the audit record and the cooldown.

    ``acted=False`` means nothing happened on the host (systemctl refused, git could not
    start), so the cooldown is given back. ``after`` runs once the record is written (the
    exit-mode restart closes the bot there). ``recorded_by_next_process``: the process that
    comes back after a restart writes this invocation's record, so this one writes none.
    """

    status: Status
    acted: bool = True
    detail: str = ""
    reply: Reply | None = None
    after: Callable[[], Awaitable[None]] | None = None
    recorded_by_next_process: bool = False


@dataclass(frozen=True)
class NotConfigured:
    """A command that cannot run as configured or as invoked: the answer says what to fix."""

    message: str

    @classmethod
    def missing(cls, inv: Invocation, variables: Sequence[str]) -> NotConfigured:
        """The answer when ``variables`` must be set before ``inv``'s command can run."""
        return cls(f"{inv.shown} is not configured: set {' and '.join(variables)}")


class _Handover:
    """Whether the process that comes back writes an invocation's record (mutable, shared)."""

    def __init__(self) -> None:
        self.next_process = False


@dataclass(frozen=True)
class Invocation:
    """One command as invoked: its context, name and audit draft."""

    ctx: commands.Context[Any]
    command: str
    draft: AuditDraft
    _handover: _Handover = field(default_factory=_Handover, compare=False, repr=False)

    @property
    def shown(self) -> str:
        """The command as the invoker typed it, as inline code."""
        return shown(self.ctx, self.command)

    @property
    def recorded_by_next_process(self) -> bool:
        """Whether :meth:`record_in_next_process` was called: this process writes no record."""
        return self._handover.next_process

    def record_in_next_process(self) -> None:
        """The process that comes back writes this invocation's record, whatever happens here.

        For an action interrupted by the very restart it asked for: the cancellation that
        follows is not an error, and the record travels with the restart marker.
        """
        self._handover.next_process = True


#: What a command does, with everything it needs already resolved.
Action = Callable[[Invocation], Awaitable[Outcome]]
#: A last check, once the command is marked running and its cooldown taken: a refusal gives
#: both back and runs nothing.
Guard = Callable[[Invocation], Awaitable[Refusal | None]]


@dataclass(frozen=True)
class Plan:
    """An action that needs more than its command's own checks."""

    action: Action
    #: Commands whose role check the invoker must pass too: the action does what they do.
    also_as: tuple[str, ...] = ()
    guard: Guard | None = None
    #: The question asked first when the command is in ``OPS_CONFIRM`` (default: "Run …?").
    prompt: str | None = None


#: Resolves a command's configuration and arguments; asked only after the role and channel.
Configure = Callable[[Invocation], Action | Plan | NotConfigured]


@dataclass
class _Run:
    """One invocation on its way through the pipeline (the invocation gains its answer)."""

    inv: Invocation
    #: Marked running (admitted): done() when it ends.
    admitted: bool = False
    #: Its cooldown was taken: given back if the run did not act.
    cooldown_taken: bool = False


class Pipeline:
    """Run every command the same way: check, run at most once at a time, reply, record."""

    def __init__(
        self,
        admission: Admission,
        audit: AuditSink,
        replies: Replies,
        floods: RefusalFloodGate | None = None,
        confirmer: Confirmer | None = None,
    ) -> None:
        """Check with ``admission``, record in ``audit``, answer through ``replies``.

        ``floods`` holds back repeated refusals of people who may not run a command;
        ``confirmer`` asks before the commands in ``OPS_CONFIRM`` run (none asked without).
        """
        self.admission = admission
        self.audit = audit
        self.replies = replies
        self.floods = floods if floods is not None else RefusalFloodGate()
        self.confirmer = confirmer
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def busy(self) -> bool:
        """Whether an invocation is under way (it may still reply and write its record)."""
        return self._in_flight > 0

    def after_idle(
        self, then: Callable[[], Awaitable[None]], *, timeout: float
    ) -> asyncio.Task[None]:
        """Run ``then`` once no invocation is under way, or after ``timeout`` seconds at most.

        For what must outlive the invocation that asked for it: a cog reloaded by its own
        command closes its Redis client only once that command has replied and recorded.
        """

        async def wait_then() -> None:
            try:
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("invocations still under way after %g s: going on", timeout)
            await then()

        task = asyncio.create_task(wait_then(), name="admin-ops: after the last invocation")
        _LINGERING.add(task)
        task.add_done_callback(_LINGERING.discard)
        return task

    async def invoke(
        self,
        ctx: commands.Context[Any],
        command: str,
        configure: Configure,
        *,
        args: Sequence[str] = (),
    ) -> None:
        """Run ``command`` as invoked in ``ctx``; ``args`` are recorded as typed."""
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._invoke(ctx, command, configure, args)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _invoke(
        self, ctx: commands.Context[Any], command: str, configure: Configure, args: Sequence[str]
    ) -> None:
        started = time.monotonic()
        run = _Run(Invocation(ctx, command, AuditDraft.of(ctx, command, args, self.replies.redact)))
        # What is recorded if the task is cancelled before an outcome is known.
        outcome = Outcome("error", detail="interrupted")
        try:
            try:
                async with self.replies.deferred_when_slow(ctx):
                    outcome = await self._run(run, configure)
            # The last line of defence for a bug in an action: whatever it raised, the operator
            # gets an answer, the invocation its record, and the command is free again.
            except Exception as exc:
                log.exception("%s failed unexpectedly", command)
                outcome = Outcome(
                    "error",
                    detail=f"{type(exc).__name__}: {exc}",
                    reply=Reply(
                        f"❌ {run.inv.shown} failed unexpectedly; the details are in the bot's log."
                    ),
                )
            finally:
                await self._conclude(run, outcome, time.monotonic() - started)
            if outcome.after is not None:
                await outcome.after()
        finally:
            if run.admitted:
                # Still "running" until its last step is done (an exit-mode restart closes the
                # bot there); only the invocation that took the mark may clear it.
                self.admission.done(command)

    async def _run(self, run: _Run, configure: Configure) -> Outcome:
        """Admit, ask, guard, then act: the outcome of the whole invocation."""
        decided = await self._admit(run, configure)
        if isinstance(decided, Refusal):
            return _refused(decided)
        if self.asks(run.inv.command):
            stopped = await self._ask(run, decided)
            if stopped is not None:
                return stopped
        if decided.guard is not None:
            refusal = await decided.guard(run.inv)
            if refusal is not None:
                return _refused(refusal)
        # A slash command must hear back within 3 s: "thinking…" until the action answers.
        await self.replies.acknowledge(run.inv.ctx)
        return await decided.action(run.inv)

    def asks(self, command: str) -> bool:
        """Whether ``command`` asks for a confirmation before it runs."""
        return self.confirmer is not None and command in self.admission.settings.confirm

    def _still_allowed(self, inv: Invocation, plan: Plan) -> StillAllowed:
        """The role checks of ``inv`` and of what it would also do, for a later press."""

        async def check(member: discord.Member) -> bool:
            guild = inv.ctx.guild
            if guild is None:
                return False
            for command in (inv.command, *plan.also_as):
                if not await self.admission.may_run_in(guild, member, command):
                    return False
            return True

        return check

    async def _admit(self, run: _Run, configure: Configure) -> Plan | Refusal:
        """The plan to run, or why not: who and where, then configured, then when."""
        inv = run.inv
        ctx, command = inv.ctx, inv.command
        refusal = await self.admission.check(ctx, command)
        if refusal is not None:
            return refusal
        planned = configure(inv)
        if isinstance(planned, NotConfigured):
            return Refusal("refused:config", planned.message)
        plan = planned if isinstance(planned, Plan) else Plan(planned)
        for other in plan.also_as:
            if not await self.admission.may_run(ctx, other):
                message = (
                    f"You need an ops role to run {shown(ctx, other)}: "
                    f"{inv.shown} would do the same here."
                )
                return Refusal("refused:role", message)
        # Asked first: the cooldown is taken only once the answer is yes.
        taking = not self.asks(command)
        refusal = await self.admission.admit(ctx, command, take_cooldown=taking)
        if refusal is not None:
            return refusal
        run.admitted, run.cooldown_taken = True, taking
        return plan

    async def _ask(self, run: _Run, plan: Plan) -> Outcome | None:
        """Ask the invoker first; an outcome when the command must not run after all."""
        inv, confirmer = run.inv, self.confirmer
        if confirmer is None:
            return None
        question = plan.prompt or f"Run {_typed(inv)}?"
        answer = await confirmer.ask(inv, question, self._still_allowed(inv, plan))
        draft = dataclasses.replace(inv.draft, confirmation=answer.answer)
        run.inv = inv = dataclasses.replace(inv, draft=draft)
        if not answer.confirmed:
            return Outcome("cancelled", acted=False, detail=answer.detail)
        refusal = await self.admission.take_cooldown(inv.ctx, inv.command)
        if refusal is not None:
            return _refused(refusal)
        run.cooldown_taken = True
        return None

    async def _conclude(self, run: _Run, outcome: Outcome, duration: float) -> None:
        """Reply, give the cooldown back to a run that did nothing, write the record.

        A slash command's refusal is only ever seen by its invoker, so it is always answered
        (an unanswered interaction shows the invoker an error); a prefix command's refusal of
        someone who may not run it is answered at a bounded rate.
        """
        inv = run.inv
        loud = self.floods.loudness(inv.draft.user_id, inv.command, outcome.status)
        slash = inv.ctx.interaction is not None
        if outcome.reply is not None and (loud.reply or slash):
            private = outcome.status.startswith("refused:")
            await self.replies.reply(inv.ctx, *outcome.reply, private=private)
        if run.cooldown_taken and not outcome.acted:
            await self.admission.give_back(inv.command)
        if not (outcome.recorded_by_next_process or inv.recorded_by_next_process):
            await self.audit.write(
                inv.draft, outcome.status, outcome.detail, duration, post=loud.post
            )


def _refused(refusal: Refusal) -> Outcome:
    """A refusal as an outcome: nothing acted, the refusal's sentence as the answer."""
    return Outcome(refusal.status, acted=False, reply=Reply(refusal.message))


def _typed(inv: Invocation) -> str:
    """The command as typed, arguments included, as inline code (for a generic question)."""
    return inline_code(" ".join([f"{inv.ctx.clean_prefix}{inv.command}", *inv.draft.args]))
