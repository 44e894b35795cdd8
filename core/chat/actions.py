"""What ``!bot_pull``, ``!proxy_restart``, ``!ops_logs`` and ``!ops_status`` do on this host.

Each command has a ``configure_*`` method, which the pipeline asks once the invoker passed the
role and channel checks: it resolves the settings and arguments (the target, the unit) into an
action that holds them, or says what is not configured. The actions run the primitives of
:mod:`core.ops_exec` and turn their typed results into an :class:`~core.chat.invocation.Outcome`:
what to answer, what to record, whether anything happened.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis

from core.chat.admission import Admission
from core.chat.in_process import InProcessDaemon
from core.chat.invocation import Action, Invocation, NotConfigured, Outcome, Plan, Reply
from core.chat.process import process_started_at
from core.chat.replies import Replies
from core.chat.spacing import RestartSpacing
from core.journal import DEFAULT_LINES, MAX_LINES, MAX_OUTPUT, read_journal
from core.names import DEFAULT_TARGET
from core.ops_exec import (
    PullOutcome,
    bounded,
    git_head,
    git_upstream,
    pull_checkout,
    pull_lock_ttl,
    redis_errors,
    restart_unit,
    unit_state,
    validate_unit_name,
)
from core.settings import PullTarget, Settings
from core.text import format_duration, inline_code

__all__ = ["AfterPull", "HostActions"]


def _line_count(typed: str) -> int | None:
    """``lines`` as typed: empty is the default, else a whole number from 1 to MAX_LINES."""
    if not typed:
        return DEFAULT_LINES
    if not typed.isascii() or not typed.isdigit() or len(typed) > 5:
        return None
    lines = int(typed)
    return lines if 1 <= lines <= MAX_LINES else None


#: What a pull that moved ``HEAD`` adds to its reply's details: what the update needs (see
#: :mod:`core.chat.update_actions`).
AfterPull = Callable[[Invocation, PullTarget, PullOutcome], Awaitable[str]]


class HostActions:
    """The commands that act on this host: pull a checkout, restart the proxy, show status."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis: aioredis.Redis | None,
        replies: Replies,
        admission: Admission,
        instance_id: str,
        in_process: InProcessDaemon | None = None,
        spacing: RestartSpacing | None = None,
        after_pull: AfterPull | None = None,
    ) -> None:
        """``instance_id`` names this bot as a pull lock's holder (host:unit:pid).

        ``spacing`` keeps restarts apart (default: ``settings.restart_min_interval``);
        ``after_pull`` says more about a pull that moved ``HEAD``.
        """
        self.settings = settings
        self.redis = redis
        self.replies = replies
        self.admission = admission
        self.instance_id = instance_id
        self.in_process = in_process
        self.spacing = spacing or RestartSpacing(
            settings.restart_min_interval, lock_dir=settings.lock_dir
        )
        self.after_pull = after_pull

    # ------------------------------------------------------------------ !bot_pull

    def configure_pull(self, inv: Invocation, typed: str) -> Action | NotConfigured:
        """Pull the target called ``typed`` (the bot's own checkout when empty)."""
        target = self.settings.target(typed or DEFAULT_TARGET)
        if target is None:
            known = ", ".join(t.name for t in self.settings.pull_targets)
            return NotConfigured(
                f"Unknown target {inline_code(typed)} for {inv.shown}. Configured targets: {known}."
            )
        return lambda inv: self.pull(inv, target)

    async def pull(self, inv: Invocation, target: PullTarget) -> Outcome:
        """Fast-forward ``target``; skipped while another service on this host pulls it."""
        name = inline_code(target.name)
        timeout = self.settings.pull_timeout
        async with self.replies.typing(inv.ctx):
            result = await pull_checkout(
                target.path,
                redis=self.redis,
                dedupe=True,
                lock_ttl=pull_lock_ttl(timeout),
                instance_id=self.instance_id,
                timeout=timeout,
                env_passthrough=self.settings.git_env_passthrough,
                secrets=self.replies.secrets,
            )
        if result.ran and result.ok:
            if result.updated:
                details = result.summary
                if self.after_pull is not None:
                    needs = await self.after_pull(inv, target, result)
                    details += f"\n\n{needs}" if needs else ""
                return Outcome("ok", detail="updated", reply=Reply(f"✅ {name} updated", details))
            return Outcome(
                "ok",
                detail="up to date",
                reply=Reply(f"✅ {name} already up to date", result.summary),
            )
        if result.ok:
            headline = f"⏭️ {name} skipped: another service on this host is pulling it"
            return Outcome("skipped", detail=result.summary, reply=Reply(headline, result.summary))
        return Outcome(
            "failed",
            acted=result.ran,
            detail=result.summary,
            reply=Reply(f"❌ {name} pull failed", result.summary),
        )

    # ------------------------------------------------------------------ !proxy_restart

    def configure_proxy_restart(self, inv: Invocation) -> Plan | NotConfigured:
        """Restart ``OPS_PROXY_SERVICE``, unless it started too recently."""
        unit = self.settings.proxy_service
        if unit is None:
            return NotConfigured.missing(inv, ["OPS_PROXY_SERVICE"])
        # Checked again, reserved and requested under the host-wide lock on the unit.
        action = self.spacing.locked(unit, lambda i: self.restart_proxy(i, unit), own=False)
        return Plan(action, guard=self.spacing.guard(unit, own=False))

    async def restart_proxy(self, inv: Invocation, unit: str) -> Outcome:
        """Restart ``unit`` and wait for systemd's job."""
        async with self.replies.typing(inv.ctx):
            result = await restart_unit(unit, secrets=self.replies.secrets)
        if result.ok:
            reply = Reply(f"✅ Restarted {inline_code(unit)}", result.summary)
            return Outcome("ok", detail=result.summary, reply=reply)
        # A timed-out restart may still complete (acted), so it keeps its cooldown.
        reply = Reply(f"❌ Could not restart {inline_code(unit)}", result.summary)
        return Outcome("failed", acted=result.acted, detail=result.summary, reply=reply)

    # ------------------------------------------------------------------ !ops_logs

    def configure_logs(
        self, inv: Invocation, typed_unit: str, typed_lines: str
    ) -> Action | NotConfigured:
        """Read the journal of ``typed_unit``, one of the units it may read; nothing else runs."""
        allowed = self.settings.readable_units
        if not allowed:
            return NotConfigured(
                f"{inv.shown} is not configured: set OPS_BOT_SERVICE, OPS_PROXY_SERVICE "
                "or OPS_LOG_UNITS"
            )
        listed = ", ".join(inline_code(unit) for unit in allowed)
        if not typed_unit:
            usage = f"{inv.ctx.clean_prefix}{inv.command}"
            return NotConfigured(
                f"Usage: `{usage} <unit> [lines]`, e.g. `{usage} {allowed[0]} 100`. "
                f"Units: {listed}."
            )
        try:
            unit: str | None = validate_unit_name(typed_unit)
        except ValueError:
            unit = None
        if unit is None or unit not in allowed:
            return NotConfigured(
                f"{inline_code(typed_unit)} is not a unit {inv.shown} may read. Units: {listed}."
            )
        lines = _line_count(typed_lines)
        if lines is None:
            return NotConfigured(
                f"Lines for {inv.shown} must be a whole number from 1 to {MAX_LINES}, "
                f"not {inline_code(typed_lines)}."
            )
        return lambda inv: self.logs(inv, unit, lines)

    async def logs(self, inv: Invocation, unit: str, lines: int) -> Outcome:
        """The last ``lines`` journal lines of ``unit``, in a code block or an attachment."""
        async with self.replies.typing(inv.ctx):
            tail = await read_journal(unit, lines)
        name = inline_code(unit)
        if not tail.ok:
            reply = Reply(f"❌ Could not read the journal of {name}: {tail.summary}", tail.text)
            return Outcome("failed", acted=False, detail=tail.summary, reply=reply)
        if tail.summary.startswith("no journal lines"):
            headline = f"📜 No journal lines for {name}"
        else:
            headline = f"📜 Last {tail.summary} of {name}"
        if tail.truncated:
            headline += f" (of {lines} asked for: the newest that fit in {MAX_OUTPUT >> 20} MiB)"
        return Outcome("ok", detail=tail.summary, reply=Reply(headline, tail.text or None))

    # ------------------------------------------------------------------ !ops_status

    def configure_status(self, inv: Invocation) -> Action:
        """Status needs nothing configured."""
        return self.status

    async def status(self, inv: Invocation) -> Outcome:
        """Host, units, checkouts, uptime, cooldowns, running commands, Redis and the fleet."""
        host = socket.gethostname()
        async with self.replies.typing(inv.ctx):
            units = await self._unit_lines()
            targets = await self._target_lines()
            cooldowns = await self._cooldown_line()
            redis_line = await self._redis_line()
        settings = self.settings
        uptime = format_duration(time.time() - process_started_at())
        lines = [
            f"host       {host} (pid {os.getpid()}), up {uptime}",
            f"restart    mode {settings.restart_mode}",
            *units,
            *targets,
            f"cooldowns  {cooldowns}",
            f"running    {self._running_line()}",
            f"redis      {redis_line}",
        ]
        if self.in_process is not None:
            lines.append(f"fleet      {self.in_process.status()}")
        reply = Reply(f"📊 Ops status for {inline_code(host)}", "\n".join(lines))
        return Outcome("ok", reply=reply)

    async def _unit_lines(self) -> list[str]:
        settings = self.settings
        units = [
            (label, unit)
            for label, unit in (
                ("bot unit", settings.bot_service),
                ("proxy", settings.proxy_service),
            )
            if unit is not None
        ]
        states = await asyncio.gather(*(unit_state(unit) for _, unit in units))
        lines = [
            f"{label:<10} {unit}: {state}"
            for (label, unit), state in zip(units, states, strict=True)
        ]
        if settings.proxy_service is None:
            lines.append("proxy      not configured")
        return lines

    async def _target_lines(self) -> list[str]:
        targets: Sequence[PullTarget] = self.settings.pull_targets
        heads = await asyncio.gather(*(git_head(t.path) for t in targets))
        upstreams = await asyncio.gather(*(git_upstream(t.path) for t in targets))
        width = max(len(t.name) for t in targets)
        lines = []
        for target, head, upstream in zip(targets, heads, upstreams, strict=True):
            where = f"{head} ← {upstream}" if head and upstream else head or "not a git checkout"
            if head and not upstream:
                where += " (no upstream)"
            lines.append(f"target     {target.name:<{width}}  {where}  {target.path}")
        return lines

    async def _cooldown_line(self) -> str:
        cooling = []
        for command, cooldown in self.admission.cooldowns.items():
            left = await cooldown.remaining(command)
            if left > 0:
                cooling.append(f"{command} {format_duration(left, round_up=True)}")
        return ", ".join(cooling) if cooling else "none"

    def _running_line(self) -> str:
        running = [
            f"{command} (by {run.user})"
            for command, run in self.admission.running.items()
            if command != "ops_status"
        ]
        return ", ".join(running) if running else "nothing"

    async def _redis_line(self) -> str:
        if self.redis is None:
            return f"not configured (state in {self.settings.state_dir})"
        started = time.monotonic()
        try:
            await bounded(self.redis.ping())
        except redis_errors() as exc:
            return f"unreachable ({type(exc).__name__})"
        return f"reachable ({(time.monotonic() - started) * 1000:.1f} ms)"
