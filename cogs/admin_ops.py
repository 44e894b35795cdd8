"""Chat commands for a bot's admins: restart units, pull checkouts, show status.

The cog decides *who* may run a command and *when*; *how* lives in :mod:`core.ops_exec` (one
host) and :mod:`core.control_ops` (the ``!fleet_*`` commands, over Redis). Every
command goes through :meth:`AdminOps._invoke`, which runs the checks in a fixed order (server
only, role, channel, configured, already running, cooldown), runs the action, replies, and writes
one audit record. A new command needs a few lines: a ``@commands.command`` method that calls
``_invoke`` with an action returning an :class:`Outcome` (and, for a per-command role override
or cooldown setting, its name in ``core.settings.COMMANDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import math
import os
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import discord
import redis.asyncio as aioredis
from discord.ext import commands
from redis.exceptions import RedisError

from core.chat.fleet_board import FLEET_EDIT_INTERVAL, FleetBoard, LiveMessage
from core.control_ops import (
    ControlDaemon,
    FleetResult,
    HostResult,
    Published,
    default_identity,
    publish,
)
from core.ops_exec import (
    SYSTEMCTL_TIMED_OUT,
    Cooldown,
    atomic_write_json,
    deferred_systemctl_restart,
    git_head,
    git_upstream,
    read_json_file,
    redact,
    run_git_pull,
    systemctl_is_active,
    systemctl_restart,
    validate_unit_name,
)
from core.settings import DEFAULT_TARGET, PullTarget, Settings

__all__ = [
    "FLEET_EDIT_INTERVAL",
    "MESSAGE_LIMIT",
    "NO_MENTIONS",
    "RESTART_EXIT_STATUS",
    "AdminOps",
    "FleetBoard",
    "LiveMessage",
    "Outcome",
    "RestartMarkers",
    "format_duration",
    "format_reply",
    "neutralise_fences",
    "setup",
]

log = logging.getLogger(__name__)
audit_log = logging.getLogger(f"{__name__}.audit")

#: Every send and reply carries this: output quoting "@everyone" or a role pings nobody.
NO_MENTIONS = discord.AllowedMentions.none()
#: What a send or edit may raise besides Discord's refusal: discord.py re-raises connection
#: resets (aiohttp.ClientOSError) and timeouts as they are.
SEND_ERRORS = (discord.HTTPException, aiohttp.ClientError, OSError, asyncio.TimeoutError)
#: Discord's limit on a message's text.
MESSAGE_LIMIT = 2000
#: What a supervisor (systemd ``RestartForceExitStatus=26``, Docker, pm2) reads as "restart me".
RESTART_EXIT_STATUS = 26
#: A restart marker older than this is stale: the notice would only confuse.
MARKER_MAX_AGE = 600.0
#: How long Redis keeps a marker; longer than MARKER_MAX_AGE so a stale one is seen and logged.
MARKER_TTL = 3600
#: The audit stream keeps roughly this many entries.
AUDIT_MAXLEN = 10_000
REDIS_TIMEOUT = 2.0
#: A fleet command stays valid this long past ``OPS_FLEET_TIMEOUT``, for clock skew between hosts;
#: a host that was away longer than that never runs it later, behind the operator's back.
FLEET_TTL_SLACK = 30.0
# What a daemon accepts as a pull target name (core.control_ops checks the same).
_FLEET_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_MODULE_LOADED_AT = time.time()


# --------------------------------------------------------------------------------------------
# Pure formatting helpers
# --------------------------------------------------------------------------------------------


def format_duration(seconds: float, *, round_up: bool = False) -> str:
    """``7 s``, ``1m 42s``, ``2h 05m``: how long something took or is left."""
    whole = math.ceil(seconds) if round_up else round(seconds)
    whole = max(int(whole), 0)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, secs = divmod(whole, 60)
        return f"{minutes}m {secs:02d}s"
    hours, rest = divmod(whole, 3600)
    return f"{hours}h {rest // 60:02d}m"


def neutralise_fences(text: str) -> str:
    """Make sure ``text`` cannot close the code block it is shown in.

    Every pair of backticks gets a zero-width space between them, so no run of three remains.
    """
    return text.replace("``", "`\u200b`")


def inline_code(text: str, limit: int = 100) -> str:
    """``text`` as inline code; backticks inside are swapped for a look-alike."""
    shown = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"`{shown.replace('`', 'ˋ')}`"


def format_reply(
    headline: str, details: str | None = None, *, limit: int = MESSAGE_LIMIT
) -> tuple[str, str | None]:
    """The message text and, when it would not fit in ``limit``, the text to attach instead.

    The details go in a code block that they cannot break out of; an attachment holds the
    details verbatim (a file has no fences to break).
    """
    headline = headline.strip()
    if len(headline) > limit:
        headline = headline[: limit - 1] + "…"
    if details is None or not details.strip():
        return headline, None
    content = f"{headline}\n```\n{neutralise_fences(details.strip())}\n```"
    if len(content) <= limit:
        return content, None
    note = "\n📎 Full output attached."
    if len(headline) + len(note) <= limit:
        headline += note
    return headline, details.strip() + "\n"


def _display_name(user: discord.abc.User) -> str:
    return discord.utils.escape_markdown(user.display_name)


def _process_started_at() -> float:
    """When this process started (wall clock), from /proc; else when this module loaded."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _MODULE_LOADED_AT


def _exit_process(status: int) -> None:
    """Leave now with ``status``: the bot is closed and a supervisor restarts us."""
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


def make_redis(settings: Settings) -> aioredis.Redis | None:
    """A Redis client for ``REDIS_URL`` whose calls give up after about 2 s, or None."""
    if settings.redis_url is None:
        return None
    return aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
    )


# --------------------------------------------------------------------------------------------
# Results of one invocation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How an action ended, for the audit record and the cooldown.

    ``acted=False`` means nothing happened on the host (systemctl refused, git could not
    start), so the cooldown is released and the operator may retry at once. ``after`` runs
    once the audit record is written (the exit-mode restart closes the bot there).
    """

    status: str
    acted: bool = True
    detail: str = ""
    after: Callable[[], Awaitable[None]] | None = None


class _Refusal(NamedTuple):
    status: str
    message: str


class _Running(NamedTuple):
    user: str
    started: float


# --------------------------------------------------------------------------------------------
# The restart marker
# --------------------------------------------------------------------------------------------


class RestartMarkers:
    """Where ``!bot_restart`` leaves a note for the next process to say "back online".

    In Redis when a client is given (with the state file as a fallback when Redis fails), else
    in the state file.
    """

    def __init__(self, *, redis: aioredis.Redis | None, key: str, path: Path) -> None:
        """Keep the marker under ``key`` in Redis, or in ``path``."""
        self.redis = redis
        self.key = key
        self.path = path

    async def save(self, marker: dict[str, Any]) -> None:
        """Record ``marker``; a failure is logged, never raised (the restart goes ahead)."""
        if self.redis is not None:
            try:
                await asyncio.wait_for(
                    self.redis.set(self.key, json.dumps(marker), ex=MARKER_TTL), REDIS_TIMEOUT
                )
                return
            except Exception as exc:
                log.warning("restart marker: Redis unavailable (%s); using %s", exc, self.path)
        try:
            await asyncio.to_thread(atomic_write_json, self.path, marker)
        except OSError as exc:
            log.warning("restart marker: cannot write %s: %s", self.path, exc)

    async def take(self) -> dict[str, Any] | None:
        """Read and delete the marker, wherever it is; None when there is none."""
        found: list[dict[str, Any]] = []
        if self.redis is not None:
            try:
                raw = await asyncio.wait_for(self.redis.getdel(self.key), REDIS_TIMEOUT)
                if raw is not None:
                    found.append(json.loads(raw))
            except Exception as exc:
                log.warning("restart marker: cannot read it from Redis: %s", exc)
        data = await asyncio.to_thread(read_json_file, self.path)
        if data is not None:
            found.append(data)
            self._unlink()
        markers = [m for m in found if isinstance(m, dict)]
        return max(markers, key=lambda m: float(m.get("requested_at", 0))) if markers else None

    async def discard(self) -> None:
        """Delete the marker (the restart it announces did not happen)."""
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.delete(self.key), REDIS_TIMEOUT)
            except Exception as exc:
                log.warning("restart marker: cannot delete it from Redis: %s", exc)
        self._unlink()

    def _unlink(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("restart marker: cannot delete %s: %s", self.path, exc)


# --------------------------------------------------------------------------------------------
# The cog
# --------------------------------------------------------------------------------------------


class AdminOps(commands.Cog):
    """Restart the bot and its proxy, pull checkouts, and show status, for ops roles only."""

    def __init__(
        self,
        bot: commands.Bot,
        settings: Settings | None = None,
        redis: aioredis.Redis | None = None,
        *,
        exit_process: Callable[[int], None] | None = None,
        key_prefix: str | None = None,
        fleet_edit_interval: float = FLEET_EDIT_INTERVAL,
    ) -> None:
        """Use the given settings and Redis client, else build them from the environment.

        ``exit_process`` ends the process in ``OPS_RESTART_MODE=exit`` (tests pass a spy);
        ``key_prefix`` prefixes every Redis key this cog writes and the fleet's streams
        (default ``OPS_CONTROL_PREFIX``, i.e. ``sg:control``); ``fleet_edit_interval`` is the
        least time between two edits of a live fleet message.
        """
        self.bot = bot
        self.settings = settings if settings is not None else Settings.from_env()
        self._owns_redis = redis is None
        self.redis = redis if redis is not None else make_redis(self.settings)
        self._exit_process = exit_process or _exit_process
        self.key_prefix = key_prefix if key_prefix is not None else self.settings.control_prefix
        self.fleet_edit_interval = fleet_edit_interval
        self.audit_stream = f"{self.key_prefix}:audit"
        self.cooldowns: dict[str, Cooldown] = {
            command: Cooldown(
                seconds,
                redis=self.redis,
                state_file=self.settings.cooldown_file,
                prefix=f"{self.key_prefix}:cooldown",
            )
            for command, seconds in self.settings.cooldowns
            if seconds > 0
        }
        host = socket.gethostname()
        unit = self.settings.bot_service or "bot"
        self.instance_id = f"{host}:{unit}:{os.getpid()}"
        self.markers = RestartMarkers(
            redis=self.redis,
            key=f"{self.key_prefix}:restart-marker:{host}:{unit}",
            path=self.settings.marker_file,
        )
        self._admission: dict[str, asyncio.Lock] = {}
        self._running: dict[str, _Running] = {}
        self._announced = False
        #: The task posting the "back online" notice, once the bot is ready (tests await it).
        self.back_online_task: asyncio.Task[None] | None = None
        #: The fleet daemon this bot hosts with ``OPS_CONTROL_IN_PROCESS=1``, and its task.
        self.control_daemon: ControlDaemon | None = None
        self.control_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def cog_load(self) -> None:
        """Prepare the state dir; announce a restart now if the bot is already connected."""
        try:
            self.settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            log.warning("state dir %s is not usable: %s", self.settings.state_dir, exc)
        if self.bot.is_ready():
            self._schedule_back_online()
        if self.settings.control_in_process:
            self._start_control_daemon()

    async def cog_unload(self) -> None:
        """Stop a pending notice and the in-process daemon; close the Redis client we made."""
        task = self.back_online_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        control = self.control_task
        if control is not None:
            # A clean stop: the daemon deletes its heartbeat and acknowledges nothing unfinished.
            control.cancel()
            await asyncio.wait({control})
            self.control_task = None
        if self._owns_redis and self.redis is not None:
            await self.redis.aclose()

    def _start_control_daemon(self) -> None:
        """Join the fleet from this process: a control daemon as a task of the bot.

        It may pull the bot's own checkout (target ``bot``) and the ``OPS_PULL_TARGETS``, and
        restart the configured units; the bot's own unit is restarted deferred (answer first).
        """
        settings = self.settings
        if self.redis is None or settings.control_secret is None:
            log.warning(
                "OPS_CONTROL_IN_PROCESS needs REDIS_URL and OPS_CONTROL_SECRET: not started"
            )
            return
        service = settings.bot_service.removesuffix(".service") if settings.bot_service else "bot"
        units = [unit for unit in (settings.bot_service, settings.proxy_service) if unit]
        self.control_daemon = ControlDaemon(
            self.redis,
            identity=settings.control_identity or default_identity(service),
            secret=settings.control_secret,
            pull_targets={target.name: target.path for target in settings.pull_targets},
            restart_units=units,
            own_units=[settings.bot_service] if settings.bot_service else [],
            prefix=self.key_prefix,
            deferred_restart_delay=settings.restart_delay,
        )
        self.control_task = asyncio.create_task(
            self.control_daemon.run(), name=f"control daemon {self.control_daemon.identity}"
        )
        log.info("in-process control daemon %s started", self.control_daemon.identity)

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """Post the back-online notice after the restart that ``!bot_restart`` asked for."""
        self._schedule_back_online()

    def _schedule_back_online(self) -> None:
        if self._announced:
            return
        self._announced = True
        self.back_online_task = asyncio.create_task(
            self.announce_back_online(), name="admin-ops back-online notice"
        )

    async def announce_back_online(self) -> None:
        """Reply to the ``!bot_restart`` message that led to this start, if it is recent."""
        try:
            marker = await self.markers.take()
        except Exception:
            log.exception("restart marker: cannot read it")
            return
        if marker is None:
            return
        try:
            requested_at = float(marker["requested_at"])
            channel_id = int(marker["channel_id"])
            message_id = int(marker["message_id"])
        except (KeyError, TypeError, ValueError):
            log.warning("restart marker: malformed, discarded: %r", marker)
            return
        age = time.time() - requested_at
        if not 0 <= age <= MARKER_MAX_AGE:
            log.info(
                "restart marker from %s is %s old; discarded without a notice",
                marker.get("requester", "?"),
                format_duration(age),
            )
            return
        now_at = await git_head(self.settings.repo_dir)
        was = marker.get("commit")
        text = f"✅ Back online after {format_duration(age)}"
        if now_at and was and now_at != was:
            text += f" — now at {now_at} (was {was})"
        elif now_at:
            text += f" — still at {now_at}"
        channel = await self._find_channel(channel_id)
        if channel is None:
            log.warning(
                "back online, but channel %s of the restart request is gone: %s", channel_id, text
            )
            return
        original: discord.Message | None = None
        try:
            original = await channel.fetch_message(message_id)
        except discord.HTTPException:
            original = None  # deleted, or no permission to read history: post in the channel
        await self._post(channel, text, reference=original)

    async def _find_channel(self, channel_id: int) -> discord.abc.Messageable | None:
        channel: Any = self.bot.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.bot.fetch_channel(channel_id)
            except (discord.HTTPException, discord.InvalidData):
                return None
        return channel if isinstance(channel, discord.abc.Messageable) else None

    # ------------------------------------------------------------------ commands

    @commands.command(name="bot_pull")
    async def pull_command(self, ctx: commands.Context[Any], *, target: str = "") -> None:
        """Fast-forward a checkout: the bot's own by default, or a named target."""
        name = target.strip().lower() or DEFAULT_TARGET
        found = self.settings.target(name)
        problem = None
        if found is None:
            known = ", ".join(t.name for t in self.settings.pull_targets)
            problem = (
                f"Unknown target {inline_code(target.strip())} for "
                f"{self._shown(ctx, 'bot_pull')}. Configured targets: {known}."
            )
        await self._invoke(
            ctx,
            "bot_pull",
            lambda: self._pull(ctx, found),
            args=[target.strip()] if target.strip() else [],
            problem=problem,
        )

    @commands.command(name="bot_restart")
    async def restart_command(self, ctx: commands.Context[Any]) -> None:
        """Restart the bot (reply first; say "back online" when it returns)."""
        problem = None
        if self.settings.restart_mode == "systemd" and self.settings.bot_service is None:
            problem = self._not_configured(ctx, "bot_restart", "OPS_BOT_SERVICE")
        await self._invoke(ctx, "bot_restart", lambda: self._restart_bot(ctx), problem=problem)

    @commands.command(name="proxy_restart")
    async def proxy_restart_command(self, ctx: commands.Context[Any]) -> None:
        """Restart the proxy unit and report how it went."""
        problem = None
        if self.settings.proxy_service is None:
            problem = self._not_configured(ctx, "proxy_restart", "OPS_PROXY_SERVICE")
        await self._invoke(ctx, "proxy_restart", lambda: self._restart_proxy(ctx), problem=problem)

    @commands.command(name="ops_status")
    async def status_command(self, ctx: commands.Context[Any]) -> None:
        """Host, units, checkouts, uptime, cooldowns and Redis, at a glance."""
        await self._invoke(ctx, "ops_status", lambda: self._status(ctx))

    @commands.command(name="fleet_pull")
    async def fleet_pull_command(self, ctx: commands.Context[Any], *, target: str = "") -> None:
        """Fast-forward a checkout on every host that runs the control daemon."""
        name = target.strip()
        title = f"📡 Fleet pull of {inline_code(name or DEFAULT_TARGET)}"
        problem = self._fleet_problem(ctx, "fleet_pull")
        if problem is None and name and _FLEET_TARGET.fullmatch(name) is None:
            problem = (
                f"Invalid target {inline_code(name)} for {self._shown(ctx, 'fleet_pull')}: "
                "one name of letters, digits and . _ - (e.g. `bot`)."
            )
        await self._invoke(
            ctx,
            "fleet_pull",
            lambda: self._fleet(ctx, "pull", [name] if name else [], title),
            args=[name] if name else [],
            problem=problem,
        )

    @commands.command(name="fleet_restart")
    async def fleet_restart_command(self, ctx: commands.Context[Any], *, unit: str = "") -> None:
        """Restart a unit on every host whose control daemon allows it."""
        name = unit.strip()
        problem = self._fleet_problem(ctx, "fleet_restart")
        if problem is None and not name:
            usage = f"{ctx.clean_prefix}fleet_restart"
            problem = f"Usage: `{usage} <unit>`, e.g. `{usage} proxy.service`."
        elif problem is None:
            try:
                name = validate_unit_name(name)
            except ValueError as exc:
                problem = f"{self._shown(ctx, 'fleet_restart')} not sent: {exc}."
        await self._invoke(
            ctx,
            "fleet_restart",
            lambda: self._fleet(ctx, "restart", [name], f"📡 Fleet restart of {inline_code(name)}"),
            args=[unit.strip()] if unit.strip() else [],
            problem=problem,
        )

    @commands.command(name="fleet_status")
    async def fleet_status_command(self, ctx: commands.Context[Any]) -> None:
        """Each host's commits, unit states, version and uptime."""
        await self._invoke(
            ctx,
            "fleet_status",
            lambda: self._fleet(ctx, "status", [], "📡 Fleet status"),
            problem=self._fleet_problem(ctx, "fleet_status"),
        )

    def _fleet_problem(self, ctx: commands.Context[Any], command: str) -> str | None:
        """What a fleet command lacks: Redis (a client, or ``REDIS_URL``) and the secret."""
        missing = [
            variable
            for variable, present in (
                ("REDIS_URL", self.redis is not None),
                ("OPS_CONTROL_SECRET", self.settings.control_secret is not None),
            )
            if not present
        ]
        if not missing:
            return None
        return self._not_configured(ctx, command, " and ".join(missing))

    async def cog_command_error(self, ctx: commands.Context[Any], error: Exception) -> None:
        """Answer errors that escaped ``_invoke`` (argument parsing) in one sentence."""
        if isinstance(error, commands.UserInputError):
            await self._reply(ctx, f"❌ {error}")
            return
        original = getattr(error, "original", error)
        log.error("command %s failed", ctx.command, exc_info=original)
        await self._reply(ctx, "❌ That failed unexpectedly; the details are in the bot's log.")

    # ------------------------------------------------------------------ the machinery

    async def _invoke(
        self,
        ctx: commands.Context[Any],
        command: str,
        action: Callable[[], Awaitable[Outcome]],
        *,
        args: Sequence[str] = (),
        problem: str | None = None,
    ) -> None:
        """Check, run ``action`` at most once at a time, reply, and audit.

        ``problem`` is the answer when the command cannot run as configured (unset unit,
        unknown target); it is only revealed to someone who passed the role and channel checks.
        """
        started = time.monotonic()
        outcome = Outcome("error", detail="internal error")
        admitted = False
        try:
            try:
                refusal = await self._check(ctx, command, problem)
                if refusal is None:
                    refusal = await self._admit(ctx, command)
                admitted = refusal is None
                if refusal is not None:
                    outcome = Outcome(refusal.status, acted=False)
                    await self._reply(ctx, refusal.message)
                else:
                    outcome = await self._run(command, action)
            except Exception as exc:
                log.exception("%s failed unexpectedly", command)
                outcome = Outcome("error", detail=f"{type(exc).__name__}: {exc}")
                await self._reply(
                    ctx,
                    f"❌ {self._shown(ctx, command)} failed unexpectedly; "
                    "the details are in the bot's log.",
                )
            finally:
                await self._audit(ctx, command, args, outcome, time.monotonic() - started)
            if outcome.after is not None:
                await outcome.after()
        finally:
            if admitted:
                # Still "running" until its last step is done (a self-restart waits its delay
                # there); only the invocation that took the mark may clear it.
                self._running.pop(command, None)

    async def _check(
        self, ctx: commands.Context[Any], command: str, problem: str | None
    ) -> _Refusal | None:
        """The first failing check of: server only, role, channel, configured."""
        if ctx.guild is None or not isinstance(ctx.author, discord.Member):
            return _Refusal("refused:dm", "These commands only work in a server.")
        shown = self._shown(ctx, command)
        if not await self._may_run(ctx.author, command):
            return _Refusal("refused:role", f"You need an ops role to run {shown}.")
        allowed = self.settings.channel_ids
        parent_id = getattr(ctx.channel, "parent_id", None)
        if allowed and ctx.channel.id not in allowed and parent_id not in allowed:
            return _Refusal("refused:channel", f"{shown} can't be used in this channel.")
        if problem is not None:
            return _Refusal("refused:config", problem)
        return None

    async def _may_run(self, member: discord.Member, command: str) -> bool:
        """The application owner (or team) always; else a role from the settings."""
        try:
            if await self.bot.is_owner(member):
                return True
        except discord.HTTPException as exc:
            log.warning("cannot look up the application owner: %s", exc)
        role_ids = self.settings.role_ids_for(command)
        if any(role.id in role_ids for role in member.roles):
            return True
        names = self.settings.admin_role_names
        if names and not self.settings.has_role_override(command):
            return any(role.name in names for role in member.roles)
        return False

    async def _admit(self, ctx: commands.Context[Any], command: str) -> _Refusal | None:
        """Refuse when the command is running or cooling down; else mark it running."""
        lock = self._admission.setdefault(command, asyncio.Lock())
        async with lock:
            running = self._running.get(command)
            shown = self._shown(ctx, command)
            if running is not None:
                ago = format_duration(time.monotonic() - running.started)
                return _Refusal(
                    "refused:running",
                    f"{shown} is already running (started by {running.user} {ago} ago)",
                )
            cooldown = self.cooldowns.get(command)
            if cooldown is not None:
                remaining = await cooldown.try_acquire(command)
                if remaining > 0:
                    wait = format_duration(remaining, round_up=True)
                    return _Refusal(
                        "refused:cooldown", f"{shown} is cooling down — try again in {wait}."
                    )
            self._running[command] = _Running(_display_name(ctx.author), time.monotonic())
        return None

    async def _run(self, command: str, action: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Run ``action``; give the cooldown back if it did nothing; clear the running mark."""
        outcome: Outcome | None = None
        try:
            outcome = await action()
            return outcome
        finally:
            cooldown = self.cooldowns.get(command)
            if outcome is not None and not outcome.acted and cooldown is not None:
                try:
                    await cooldown.release(command)
                except Exception:
                    log.exception("cannot release the %s cooldown", command)

    # ------------------------------------------------------------------ output

    def _secrets(self) -> tuple[str, ...]:
        token = getattr(self.bot.http, "token", None)
        return (*self.settings.secrets, token) if isinstance(token, str) else self.settings.secrets

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets())

    @staticmethod
    def _shown(ctx: commands.Context[Any], command: str) -> str:
        return f"`{ctx.clean_prefix}{command}`"

    def _not_configured(self, ctx: commands.Context[Any], command: str, variable: str) -> str:
        return f"{self._shown(ctx, command)} is not configured: set {variable}"

    async def _reply(
        self, ctx: commands.Context[Any], headline: str, details: str | None = None
    ) -> discord.Message | None:
        name = ctx.command.name if ctx.command is not None else "output"
        return await self._post(
            ctx.channel, headline, details, reference=ctx.message, filename=f"{name}.txt"
        )

    async def _post(
        self,
        channel: discord.abc.Messageable,
        headline: str,
        details: str | None = None,
        *,
        reference: discord.Message | None = None,
        filename: str = "output.txt",
    ) -> discord.Message | None:
        """Send redacted text that pings nobody; long details go in a ``.txt`` attachment."""
        content, attachment = format_reply(
            self._redact(headline), self._redact(details) if details else None
        )
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

    @contextlib.asynccontextmanager
    async def _typing(self, ctx: commands.Context[Any]) -> AsyncIterator[None]:
        """Show "typing…" while the block runs; a failing indicator never fails the command."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(ctx.typing())
            except discord.HTTPException as exc:
                log.debug("no typing indicator: %s", exc)
            yield

    async def _audit(
        self,
        ctx: commands.Context[Any],
        command: str,
        args: Sequence[str],
        outcome: Outcome,
        duration: float,
    ) -> None:
        """One structured log line; the same in the audit channel and the Redis stream."""
        guild = ctx.guild
        record: dict[str, Any] = {
            "user_id": ctx.author.id,
            "user": str(ctx.author),
            "guild_id": guild.id if guild else None,
            "guild": guild.name if guild else None,
            "channel_id": ctx.channel.id,
            "channel": getattr(ctx.channel, "name", None) or "DM",
            "command": command,
            "args": [self._redact(a) for a in args],
            "outcome": outcome.status,
            "detail": self._redact(outcome.detail.strip())[:300],
            "duration_s": round(duration, 3),
        }
        audit_log.info("%s", json.dumps(record, ensure_ascii=False))
        if self.redis is not None:
            fields = {
                key: json.dumps(value) if isinstance(value, list) else str(value or "")
                for key, value in record.items()
            }
            fields["duration_s"] = str(record["duration_s"])
            try:
                await asyncio.wait_for(
                    self.redis.xadd(
                        self.audit_stream, fields, maxlen=AUDIT_MAXLEN, approximate=True
                    ),
                    REDIS_TIMEOUT,
                )
            except Exception as exc:
                log.warning("audit: cannot XADD to %s: %s", self.audit_stream, exc)
        channel_id = self.settings.audit_channel_id
        if channel_id is not None:
            channel = self.bot.get_channel(channel_id)
            if isinstance(channel, discord.abc.Messageable):
                shown = " ".join([f"{ctx.clean_prefix}{command}", *record["args"]])
                where = f"#{record['channel']}" if guild else "a DM"
                line = (
                    f"{inline_code(shown)} by {_display_name(ctx.author)} ({ctx.author.id}) "
                    f"in {where}: {outcome.status} ({format_duration(duration)})"
                )
                await self._post(channel, line)
            else:
                log.warning("audit channel %s not found", channel_id)

    # ------------------------------------------------------------------ the actions

    async def _pull(self, ctx: commands.Context[Any], target: PullTarget | None) -> Outcome:
        if target is None:
            raise RuntimeError("unreachable: _invoke refuses an unknown target")
        name = inline_code(target.name)
        before = await git_head(target.path)
        timeout = self.settings.pull_timeout
        async with self._typing(ctx):
            result = await run_git_pull(
                target.path,
                redis=self.redis,
                dedupe=True,
                lock_ttl=max(90.0, timeout + 30.0),
                instance_id=self.instance_id,
                timeout=timeout,
                secrets=self._secrets(),
            )
        if result.ran and result.ok:
            after = await git_head(target.path)
            updated = before != after if before and after else "Updated" in result.summary
            headline = f"✅ {name} updated" if updated else f"✅ {name} already up to date"
            outcome = Outcome("ok", detail="updated" if updated else "up to date")
        elif result.ok:
            headline = f"⏭️ {name} skipped: another service on this host is pulling it"
            outcome = Outcome("skipped", detail=result.summary)
        else:
            headline = f"❌ {name} pull failed"
            outcome = Outcome("failed", acted=result.ran, detail=result.summary)
        await self._reply(ctx, headline, result.summary)
        return outcome

    async def _restart_bot(self, ctx: commands.Context[Any]) -> Outcome:
        settings = self.settings
        unit = settings.bot_service
        what = inline_code(unit) if unit else "the bot"
        await self._reply(ctx, f"♻️ Restarting {what} (requested by {_display_name(ctx.author)})…")
        await self.markers.save(
            {
                "guild_id": ctx.guild.id if ctx.guild else None,
                "channel_id": ctx.channel.id,
                "message_id": ctx.message.id,
                "requester_id": ctx.author.id,
                "requester": str(ctx.author),
                "requested_at": time.time(),
                "commit": await git_head(settings.repo_dir),
                "unit": unit,
                "mode": settings.restart_mode,
            }
        )
        if settings.restart_mode == "exit":
            return Outcome("ok", detail=f"exit {RESTART_EXIT_STATUS}", after=self._close_and_exit)
        if unit is None:
            raise RuntimeError("unreachable: _invoke refuses systemd mode without a unit")
        # Once systemd runs the job it stops this process, so nothing after the request can be
        # relied on: the audit record is written first, and the request runs as ``after``.
        return Outcome(
            "restart requested",
            detail=f"restart of {unit} requested",
            after=functools.partial(self._request_own_restart, ctx, unit),
        )

    async def _request_own_restart(self, ctx: commands.Context[Any], unit: str) -> None:
        started = time.monotonic()
        ok, summary = await deferred_systemctl_restart(
            unit, delay=self.settings.restart_delay, secrets=self._secrets()
        )
        if ok:
            return
        acted = SYSTEMCTL_TIMED_OUT in summary
        if not acted:
            # Nothing happened: forget the marker and give the cooldown back. After a timeout
            # the restart may still come, so both stay (the marker makes it announce itself).
            await self.markers.discard()
            cooldown = self.cooldowns.get("bot_restart")
            if cooldown is not None:
                await cooldown.release("bot_restart")
        await self._reply(ctx, f"❌ Could not restart {inline_code(unit)}", summary)
        failed = Outcome("failed", acted=acted, detail=summary)
        await self._audit(ctx, "bot_restart", (), failed, time.monotonic() - started)

    async def _close_and_exit(self) -> None:
        try:
            await self.bot.close()
        finally:
            self._exit_process(RESTART_EXIT_STATUS)

    async def _restart_proxy(self, ctx: commands.Context[Any]) -> Outcome:
        unit = self.settings.proxy_service
        if unit is None:
            raise RuntimeError("unreachable: _invoke refuses an unset unit")
        async with self._typing(ctx):
            ok, summary = await systemctl_restart(unit, secrets=self._secrets())
        if ok:
            await self._reply(ctx, f"✅ Restarted {inline_code(unit)}", summary)
            return Outcome("ok", detail=summary)
        await self._reply(ctx, f"❌ Could not restart {inline_code(unit)}", summary)
        # A timed-out restart may still complete, so it keeps its cooldown.
        return Outcome("failed", acted=SYSTEMCTL_TIMED_OUT in summary, detail=summary)

    async def _status(self, ctx: commands.Context[Any]) -> Outcome:
        settings = self.settings
        host = socket.gethostname()
        async with self._typing(ctx):
            units = [
                (label, unit)
                for label, unit in (
                    ("bot unit", settings.bot_service),
                    ("proxy", settings.proxy_service),
                )
                if unit is not None
            ]
            states = await asyncio.gather(*(systemctl_is_active(unit) for _, unit in units))
            heads = await asyncio.gather(*(git_head(t.path) for t in settings.pull_targets))
            upstreams = await asyncio.gather(*(git_upstream(t.path) for t in settings.pull_targets))
            cooling = []
            for command, cooldown in self.cooldowns.items():
                left = await cooldown.remaining(command)
                if left > 0:
                    cooling.append(f"{command} {format_duration(left, round_up=True)}")
            redis_line = await self._redis_status()
        uptime = format_duration(time.time() - _process_started_at())
        lines = [
            f"host       {host} (pid {os.getpid()}), up {uptime}",
            f"restart    mode {settings.restart_mode}",
        ]
        lines += [
            f"{label:<10} {unit}: {state}"
            for (label, unit), state in zip(units, states, strict=True)
        ]
        if settings.proxy_service is None:
            lines.append("proxy      not configured")
        width = max(len(t.name) for t in settings.pull_targets)
        for target, head, upstream in zip(settings.pull_targets, heads, upstreams, strict=True):
            where = f"{head} ← {upstream}" if head and upstream else head or "not a git checkout"
            if head and not upstream:
                where += " (no upstream)"
            lines.append(f"target     {target.name:<{width}}  {where}  {target.path}")
        lines.append(f"cooldowns  {', '.join(cooling) if cooling else 'none'}")
        running = [f"{c} (by {r.user})" for c, r in self._running.items() if c != "ops_status"]
        lines.append(f"running    {', '.join(running) if running else 'nothing'}")
        lines.append(f"redis      {redis_line}")
        if self.control_daemon is not None:
            state = "serving" if self.control_daemon.serving.is_set() else "not connected"
            lines.append(f"fleet      in-process daemon {self.control_daemon.identity}: {state}")
        await self._reply(ctx, f"📊 Ops status for {inline_code(host)}", "\n".join(lines))
        return Outcome("ok")

    async def _fleet(
        self, ctx: commands.Context[Any], op: str, args: list[str], title: str
    ) -> Outcome:
        """Publish ``op`` to the fleet; one message shows each host's answer as it arrives.

        The message is sent once the command is out (listing the hosts expected to answer),
        edited at most every ``fleet_edit_interval`` seconds while answers arrive, and edited a
        last time with the outcome. When the table does not fit in one message, a follow-up
        carries every host's full answer as a ``.txt`` attachment.
        """
        redis, secret = self.redis, self.settings.control_secret
        if redis is None or secret is None:
            raise RuntimeError("unreachable: _invoke refuses an unconfigured fleet command")
        command = ctx.command.name if ctx.command is not None else f"fleet_{op}"
        board = FleetBoard(title=self._redact(title), clean=self._redact)
        live: LiveMessage | None = None
        sent_out = False

        async def on_published(published: Published) -> None:
            nonlocal live, sent_out
            sent_out = True
            board.published(published)
            if not published.expected:
                return  # publish returns at once: the final state is the only message
            content, _ = board.render()
            message = await self._send_live(ctx, content)
            if message is not None:
                live = LiveMessage(
                    lambda: board.render()[0],
                    functools.partial(self._edit_live, message),
                    shown=content,
                    interval=self.fleet_edit_interval,
                )

        def on_result(result: HostResult) -> None:
            board.add(result)
            if live is not None:
                live.changed()

        timeout = self.settings.fleet_timeout
        fleet: FleetResult | None = None
        try:
            fleet = await publish(
                redis,
                op,
                args,
                requested_by=f"{ctx.author.name} ({ctx.author.id}) via {socket.gethostname()}",
                secret=secret,
                timeout=timeout,
                ttl=timeout + FLEET_TTL_SLACK,
                on_result=on_result,
                on_published=on_published,
                prefix=self.key_prefix,
            )
        except (RedisError, OSError) as exc:
            reason = self._redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            log.warning("fleet %s: Redis failed: %s", op, reason)
            when = "while collecting answers" if sent_out else "before publishing; nothing ran"
            board.fail(f"Redis failed {when}: {reason}")
        except BaseException:
            if live is not None:
                await live.cancel()
            raise
        else:
            board.finish(fleet)

        content, complete = board.render()
        try:
            shown = await live.finish() if live is not None else False
        except Exception:
            log.exception("live message edit loop failed")
            shown = False
        if not shown:
            # No live message (no host was expected, or the first send failed), or the last
            # edit failed (the message was deleted): the final state goes out as a new message.
            await self._send_live(ctx, content)
        if not complete:
            await self._post(
                ctx.channel,
                f"📎 Every host's full answer to {self._shown(ctx, command)}",
                board.full_text(),
                reference=ctx.message,
                filename=f"{command}.txt",
            )
        if fleet is None:
            return Outcome("failed", acted=sent_out, detail=board.footer())
        acted = any(result.ran for result in fleet.results.values())
        return Outcome("ok" if fleet.ok else "failed", acted=acted, detail=board.footer())

    async def _send_live(self, ctx: commands.Context[Any], content: str) -> discord.Message | None:
        """Send a rendered fleet message (already redacted and within the limit) as a reply."""
        try:
            return await ctx.channel.send(
                content,
                allowed_mentions=NO_MENTIONS,
                reference=ctx.message.to_reference(fail_if_not_exists=False),
                mention_author=False,
            )
        except SEND_ERRORS as exc:
            log.warning("cannot send to %s: %s", ctx.channel.id, exc)
            return None

    async def _edit_live(self, message: discord.Message, content: str) -> bool:
        """Edit a live fleet message; False (logged) when Discord refuses."""
        try:
            await message.edit(content=content, allowed_mentions=NO_MENTIONS)
        except SEND_ERRORS as exc:
            log.warning("cannot edit message %s: %s", message.id, exc)
            return False
        return True

    async def _redis_status(self) -> str:
        if self.redis is None:
            return f"not configured (state in {self.settings.state_dir})"
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.redis.ping(), REDIS_TIMEOUT)
        except Exception as exc:
            return f"unreachable ({type(exc).__name__})"
        return f"reachable ({(time.monotonic() - started) * 1000:.1f} ms)"


async def setup(bot: commands.Bot) -> None:
    """Add the cog with settings and a Redis client from the environment."""
    await bot.add_cog(AdminOps(bot))
