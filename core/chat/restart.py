"""``!bot_restart``, and what the process that comes back does about it.

Before asking for the restart the bot replies, then leaves a :class:`RestartMarker`. With
systemd (``OPS_RESTART_MODE=systemd``) the restart is requested without waiting, since systemd
stops this process as soon as it runs the job: the marker carries the invocation's audit draft,
and the process that comes back writes the one record (:meth:`SelfRestart.back_online`). If the
request fails, this process is still alive: it writes the record itself ("failed") and the
marker is discarded. With ``OPS_RESTART_MODE=exit`` the record is written, then the bot closes
and exits with status 26 for its supervisor to start it again.

The process that comes back replies "back online" to the ``!bot_restart`` message, unless the
marker is older than :data:`~core.chat.markers.MARKER_MAX_AGE` (then only the record is written).
The notice holds nothing taken as text from the marker (a marker is data read back from
storage): its age and the commits, shown only when they are hex, and it goes only to a channel
where the commands are allowed. A marker that fails its checks is logged and dropped, with its
audit draft.

After the crash-loop guard rolled the checkout back (:mod:`core.chat.rollback_notice`), the
notice says so instead, in reply to the ``!bot_restart`` whose marker is there and recent, else
in ``OPS_AUDIT_CHANNEL_ID``.

``!bot_restart`` refuses while the bot's unit (or, without systemd's answer, this process)
started less than ``OPS_RESTART_MIN_INTERVAL`` seconds ago (:mod:`core.chat.spacing`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import discord
from discord.ext import commands

from core.chat.audit import AuditDraft, AuditSink
from core.chat.invocation import Invocation, NotConfigured, Outcome, Plan, Reply
from core.chat.markers import MARKER_MAX_AGE, RestartMarker, RestartMarkers
from core.chat.process import RESTART_EXIT_STATUS
from core.chat.replies import SEND_ERRORS, Replies, display_name
from core.chat.rollback_notice import RollbackNotices
from core.chat.spacing import RestartSpacing
from core.ops_exec import (
    UnitResult,
    git_head,
    redact,
    run_exec,
    systemctl_argv,
    validate_unit_name,
)

# The systemctl environment and the wording of its failures have one home, in ops_exec, which
# does not yet say whether systemctl was ended by a signal (see request_own_restart).
from core.ops_exec import _service_env, _systemctl_failure  # isort: skip
from core.settings import Settings
from core.text import format_duration, inline_code

__all__ = ["RestartRequest", "SelfRestart", "request_own_restart"]

log = logging.getLogger("cogs.admin_ops.restart")

#: Seconds ``systemctl --no-block restart`` may take (it only queues the job).
REQUEST_TIMEOUT = 10.0


class RestartRequest(NamedTuple):
    """What asking systemd to restart this bot's own unit did."""

    result: UnitResult
    #: ``systemctl`` was ended by SIGTERM: systemd stopping the unit (and so the client it
    #: started) is what the request asked for, so the restart is under way.
    stopped_with_unit: bool = False


async def request_own_restart(unit: str, *, secrets: Iterable[str] = ()) -> RestartRequest:
    """``systemctl --no-block restart <unit>`` for this bot's own unit, now.

    :func:`core.ops_exec.request_restart` does the same, but its result does not say whether
    systemctl was ended by a signal; here the exit status says it (negative: the signal).
    """
    try:
        name = validate_unit_name(unit)
        program = systemctl_argv()
    except ValueError as exc:
        return RestartRequest(UnitResult(False, str(exc)))
    argv = [*program, "--no-block", "--no-ask-password", "restart", "--", name]
    result = await run_exec(argv, env=_service_env(), timeout=REQUEST_TIMEOUT)
    if result.ok:
        return RestartRequest(UnitResult(True, redact(f"restart of {name} requested")))
    summary = _systemctl_failure(name, "restart", result, REQUEST_TIMEOUT, tuple(secrets))
    stopped = result.returncode == -signal.SIGTERM and not result.timed_out
    return RestartRequest(UnitResult(False, summary, timed_out=result.timed_out), stopped)


class SelfRestart:
    """Restart this bot on request, and announce and record the restart once back."""

    def __init__(
        self,
        *,
        bot: commands.Bot,
        settings: Settings,
        markers: RestartMarkers,
        audit: AuditSink,
        replies: Replies,
        exit_process: Callable[[int], None],
        spacing: RestartSpacing | None = None,
        rollbacks: RollbackNotices | None = None,
    ) -> None:
        """``exit_process`` ends the process in exit mode (tests pass a spy).

        ``spacing`` keeps restarts apart (default: ``settings.restart_min_interval``);
        ``rollbacks`` tells of an automatic rollback (default: the state dir's).
        """
        self.bot = bot
        self.settings = settings
        self.markers = markers
        self.audit = audit
        self.replies = replies
        self.exit_process = exit_process
        self.spacing = spacing or RestartSpacing(
            settings.restart_min_interval, lock_dir=settings.lock_dir
        )
        self.rollbacks = rollbacks or RollbackNotices(settings)

    def configure(self, inv: Invocation) -> Plan | NotConfigured:
        """Exit for a supervisor, or ask systemd to restart ``OPS_BOT_SERVICE``."""
        unit = self.settings.bot_service
        guard = self.spacing.guard(unit, own=True)
        what = inline_code(unit) if unit else "the bot"
        prompt = f"Restart {what}? This takes the bot offline for a few seconds."
        if self.settings.restart_mode == "exit":
            return Plan(self.restart_by_exit, guard=guard, prompt=prompt)
        if unit is None:
            return NotConfigured.missing(inv, ["OPS_BOT_SERVICE"])
        # Checked again, reserved and requested under the host-wide lock on the unit.
        action = self.spacing.locked(unit, lambda i: self.restart_by_systemd(i, unit), own=True)
        return Plan(action, guard=guard, prompt=prompt)

    async def restart_by_systemd(self, inv: Invocation, unit: str) -> Outcome:
        """Reply, leave the marker with the audit draft, then ask systemd (without waiting).

        systemd stops this process as soon as it runs the job, possibly while ``systemctl``
        (stopped with it, by the same SIGTERM) has not even exited: once the request is out, a
        cancellation of this task or a ``systemctl`` ended by SIGTERM means the restart is
        under way. The marker then stays with its draft, and the next process writes the one
        record. A cancellation before the request (during ``OPS_RESTART_DELAY``) asked for
        nothing: the marker goes, and the pipeline records the interruption.
        """
        announced = await self._announce(inv, inline_code(unit))
        marker = await self._marker(inv, unit, inv.draft, announced)
        await self.markers.save(marker.to_json())
        sent = False
        try:
            # The reply is out before systemd stops this process.
            await asyncio.sleep(self.settings.restart_delay)
            sent = True
            requested = await request_own_restart(unit, secrets=self.replies.secrets)
        except asyncio.CancelledError:
            if sent:
                log.info("restart of %s under way: the next process records it", unit)
                inv.record_in_next_process()
            else:
                await self.markers.discard()
            raise
        except BaseException:
            # A bug: the pipeline records this invocation, so the marker must not carry it too.
            await self.markers.discard()
            raise
        result = requested.result
        if result.ok or requested.stopped_with_unit:
            # systemd stops this process once it runs the job: the next one writes the record.
            detail = result.summary if result.ok else "restart under way"
            return Outcome("ok", detail=detail, recorded_by_next_process=True)
        if result.timed_out:
            # The restart may still come, so the marker stays to announce it; the record is
            # written here and now, so the next process must not write a second one.
            await self.markers.save(dataclasses.replace(marker, audit=None).to_json())
        else:
            await self.markers.discard()
        reply = Reply(f"❌ Could not restart {inline_code(unit)}", result.summary)
        return Outcome("failed", acted=result.acted, detail=result.summary, reply=reply)

    async def restart_by_exit(self, inv: Invocation) -> Outcome:
        """Reply, leave the marker; once the record is written, close the bot and exit."""
        unit = self.settings.bot_service
        announced = await self._announce(inv, inline_code(unit) if unit else "the bot")
        marker = await self._marker(inv, unit, None, announced)
        await self.markers.save(marker.to_json())
        return Outcome("ok", detail=f"exit {RESTART_EXIT_STATUS}", after=self._close_and_exit)

    async def _announce(self, inv: Invocation, what: str) -> discord.Message | None:
        requester = display_name(inv.ctx.author)
        return await self.replies.reply(inv.ctx, f"♻️ Restarting {what} (requested by {requester})…")

    async def _marker(
        self,
        inv: Invocation,
        unit: str | None,
        audit: AuditDraft | None,
        announced: discord.Message | None,
    ) -> RestartMarker:
        ctx = inv.ctx
        # The notice replies to the command's message; a slash command has none in the
        # channel (and its interaction expires): it replies to the "Restarting…" answer.
        answered = ctx.message.id if ctx.interaction is None or announced is None else announced.id
        return RestartMarker(
            guild_id=ctx.guild.id if ctx.guild else None,
            channel_id=ctx.channel.id,
            message_id=answered,
            requester_id=ctx.author.id,
            requester=str(ctx.author),
            requested_at=time.time(),
            commit=await git_head(self.settings.repo_dir),
            unit=unit,
            mode=self.settings.restart_mode,
            audit=audit,
        )

    async def _close_and_exit(self) -> None:
        try:
            await self.bot.close()
        finally:
            self.exit_process(RESTART_EXIT_STATUS)

    # ------------------------------------------------------------------ the next process

    async def back_online(self) -> None:
        """Record the restart that led to this start, and reply to its request if recent.

        After an automatic rollback, the notice says so (and goes to the audit channel when
        there is no recent request to answer).
        """
        rolled_back = await self.rollbacks.take()
        if not await self._answer_marker(rolled_back) and rolled_back is not None:
            await self._post_in_audit_channel(rolled_back)

    async def _answer_marker(self, rolled_back: str | None) -> bool:
        """Take the restart marker: write its record, answer its request; False if not answered."""
        data = await self.markers.take()
        if data is None:
            return False
        now = time.time()
        marker = RestartMarker.from_json(data)
        if marker is None:
            # Its text is not logged: it may be whatever someone wanted in our log.
            log.warning("restart marker: malformed, dropped with its audit draft")
            return False
        age = now - marker.requested_at
        draft = marker.audit
        if draft is not None:
            detail = f"restart requested; back online after {format_duration(age)}"
            await self.audit.write(draft, "ok", detail, now - draft.started_at)
        if not 0 <= age <= MARKER_MAX_AGE:
            log.info(
                "restart marker from %r is %s old; discarded without a notice",
                marker.requester,
                format_duration(age),
            )
            return False
        if rolled_back is not None:
            return await self._notify(marker, rolled_back, commits=False)
        return await self._notify(marker, f"✅ Back online after {format_duration(age)}")

    async def _post_in_audit_channel(self, text: str) -> None:
        channel_id = self.settings.audit_channel_id
        channel = await self._find_channel(channel_id) if channel_id is not None else None
        if channel is None:
            log.warning("%s (no audit channel to say it in)", text)
            return
        await self.replies.post(channel, text)

    async def _notify(self, marker: RestartMarker, text: str, *, commits: bool = True) -> bool:
        """Reply ``text`` to the marker's request; False when its channel is not one to post in.

        ``commits``: add the commit it is at now, and the one it ran before.
        """
        if commits:
            text += await self._commits(marker)
        channel = await self._find_channel(marker.channel_id)
        if channel is None:
            log.warning(
                "back online, but channel %s of the restart request is gone: %s",
                marker.channel_id,
                text,
            )
            return False
        if not self._may_post_in(channel, marker):
            log.warning(
                "restart marker names channel %s, where the commands are not allowed: dropped",
                marker.channel_id,
            )
            return False
        original: discord.Message | None = None
        try:
            original = await channel.fetch_message(marker.message_id)
        # Whatever fetching the request does (deleted, no permission to read history, a reset
        # connection, a timeout, a bug in a library), the notice is already due: it goes to the
        # channel without the reference rather than being lost with the task.
        except Exception as exc:  # noqa: BLE001
            log.info("back online: cannot fetch the restart request: %r", exc)
        await self.replies.post(channel, text, reference=original)
        return True

    async def _commits(self, marker: RestartMarker) -> str:
        now_at = await git_head(self.settings.repo_dir)
        was = marker.commit  # hex, or None: checked when the marker was read
        if now_at and was and now_at != was:
            return f" — now at {now_at} (was {was})"
        if now_at and was:
            return f" — still at {now_at}"
        if now_at:
            return f" — now at {now_at}"  # what ran before is not known
        return ""

    def _may_post_in(self, channel: discord.abc.Messageable, marker: RestartMarker) -> bool:
        """Whether ``channel`` is one where the commands are allowed, and the marker's server."""
        guild = getattr(channel, "guild", None)
        if not isinstance(guild, discord.Guild):
            return False  # the commands only work in a server
        if marker.guild_id is not None and marker.guild_id != guild.id:
            return False
        if self.settings.guild_ids and guild.id not in self.settings.guild_ids:
            return False
        allowed = self.settings.channel_ids
        channel_id = getattr(channel, "id", None)
        return not allowed or channel_id in allowed or getattr(channel, "parent_id", 0) in allowed

    async def _find_channel(self, channel_id: int) -> discord.abc.Messageable | None:
        channel: Any = self.bot.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.bot.fetch_channel(channel_id)
            except (*SEND_ERRORS, discord.InvalidData) as exc:
                log.info("back online: cannot fetch channel %s: %r", channel_id, exc)
                return None
        return channel if isinstance(channel, discord.abc.Messageable) else None
