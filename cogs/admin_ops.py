"""Chat commands for a bot's admins: restart units, pull checkouts, show status, drive the fleet.

This file is the cog: its commands, the order of their checks, its lifecycle and ``setup()``.
What a command does lives in :mod:`core.chat` (kept out of ``cogs/`` because bots commonly load
every ``cogs/*.py`` as an extension):

- :mod:`core.chat.invocation`: the pipeline every command runs through, from message to reply
  and audit record; :mod:`core.chat.admission` holds its checks, :mod:`core.chat.audit` its
  records, :mod:`core.chat.replies` every message it sends;
- :mod:`core.chat.actions` (``!bot_pull``, ``!proxy_restart``, ``!ops_status``),
  :mod:`core.chat.update_actions` (``!bot_fetch``, ``!bot_deps``, ``!bot_rollback`` and what a
  pull needs), :mod:`core.chat.reload_action` (``!ops_reload``), :mod:`core.chat.restart`
  (``!bot_restart`` and "back online"), :mod:`core.chat.fleet_action` (``!fleet_*``),
  :mod:`core.chat.in_process` (a fleet daemon inside the bot);
- :class:`core.last_good.HealthWatch`: the last good commit, once the bot has been connected
  for ``OPS_HEALTHY_AFTER`` seconds (what the crash-loop guard rolls back to).

A new command is a ``@commands.command`` method that calls :meth:`Pipeline.invoke` with a
``configure`` function returning an action (and, for a per-command role override or cooldown
setting, its name in ``core.settings.COMMANDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import discord
import redis.asyncio as aioredis
from discord import app_commands
from discord.ext import commands

from core.chat import process
from core.chat.actions import HostActions
from core.chat.admission import Admission, make_cooldowns
from core.chat.audit import AuditSink
from core.chat.confirm import ButtonConfirmer
from core.chat.extensions import note_loaded
from core.chat.fleet_action import FleetCommands
from core.chat.fleet_board import FLEET_EDIT_INTERVAL, FleetBoard, LiveMessage
from core.chat.floods import RefusalFloodGate
from core.chat.in_process import InProcessDaemon
from core.chat.invocation import Outcome, Pipeline
from core.chat.markers import MARKER_MAX_AGE, RestartMarkers, marker_key
from core.chat.process import RESTART_EXIT_STATUS
from core.chat.reload_action import ExtensionReloads
from core.chat.replies import NO_MENTIONS, Replies
from core.chat.restart import SelfRestart
from core.chat.slash import CommandSync, LineCount, choices, ops_command, register_in_guilds
from core.chat.update_actions import UpdateActions
from core.control_ops import ControlDaemon
from core.hardening import make_undumpable
from core.last_good import HealthWatch
from core.names import Keys
from core.ops_exec import Cooldown
from core.redis_client import make_redis
from core.settings import Settings
from core.text import MESSAGE_LIMIT, format_duration, format_reply, neutralise_fences

__all__ = [
    "FLEET_EDIT_INTERVAL",
    "MARKER_MAX_AGE",
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

#: How long a cog being unloaded keeps its Redis client open for invocations still under way
#: (``!ops_reload cogs.admin_ops`` replies and records through the instance it replaces).
UNLOAD_GRACE = 30.0


def _typed(text: str) -> list[str]:
    """A command's free-text argument as recorded: stripped, and absent when empty."""
    return [text] if text else []


class AdminOps(commands.Cog):
    """Restart the bot and its proxy, update and roll back checkouts, reload, drive the fleet.

    Only for the application owner and members with an ops role, in the allowed servers and
    channels. Every command goes through one :class:`~core.chat.invocation.Pipeline`: server
    only, role, channel, configured, the roles of what the command also does, already running,
    cooldown, the unit's restart spacing, then the action, one reply and one audit record.
    """

    #: The task recording the last good commit once the bot is healthy.
    health_task: asyncio.Task[None] | None = None
    #: Closes the Redis client once the invocations under way at unload are over.
    closing_task: asyncio.Task[None] | None = None

    def __init__(
        self,
        bot: commands.Bot,
        settings: Settings | None = None,
        redis: aioredis.Redis | None = None,
        *,
        exit_process: Callable[[int], None] | None = None,
        key_prefix: str | None = None,
        fleet_edit_interval: float = FLEET_EDIT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        python: str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Use the given settings and Redis client, else build them from the environment.

        ``exit_process`` ends the process in ``OPS_RESTART_MODE=exit`` (tests pass a spy);
        ``key_prefix`` prefixes every Redis key this cog writes and the fleet's streams
        (default ``OPS_CONTROL_PREFIX``, i.e. ``sg:control``); ``fleet_edit_interval`` is the
        least time between two edits of a live fleet message; ``clock`` (monotonic seconds)
        times how often refusals are answered; ``python`` is the interpreter ``!bot_deps``
        installs with (default: this one); ``sleep`` waits ``OPS_HEALTHY_AFTER``.
        """
        self.bot = bot
        self.settings = settings = settings if settings is not None else Settings.from_env()
        self._owns_redis = redis is None
        if redis is None and settings.redis_url is not None:
            redis = make_redis(settings.redis_url)
        self.redis = redis
        self.key_prefix = key_prefix if key_prefix is not None else settings.control_prefix
        self.fleet_edit_interval = fleet_edit_interval
        keys = Keys(self.key_prefix)
        host, unit = socket.gethostname(), settings.bot_service or "bot"
        #: Names this bot as the holder of a pull lock.
        self.instance_id = f"{host}:{unit}:{os.getpid()}"
        self.cooldowns: dict[str, Cooldown] = make_cooldowns(settings, redis, keys.cooldowns)
        self.replies = Replies(bot, settings)
        self.admission = Admission(bot, settings, self.cooldowns)
        self.audit = AuditSink(
            bot, self.replies, redis=redis, stream=keys.audit, channel_id=settings.audit_channel_id
        )
        self.floods = RefusalFloodGate(clock=clock)
        self._add_pipeline()
        self.markers = RestartMarkers(
            redis=redis,
            key=keys.restart_marker(host, unit),
            path=settings.marker_file,
            signing_key=self._marker_key,
            seen_path=settings.state_dir / "restart-marker-seen.json",
        )
        self.in_process = self._in_process_daemon()
        self._add_actions(exit_process or process.exit_process, python)
        self._announced = False
        #: The task posting the "back online" notice, once the bot is ready (tests await it).
        self.back_online_task: asyncio.Task[None] | None = None
        self.health = HealthWatch(
            state_dir=settings.state_dir,
            repo_dir=settings.repo_dir,
            healthy_after=settings.healthy_after,
            sleep=sleep,
        )

    def _add_pipeline(self) -> None:
        """The one path of every command (with its confirmations), and the slash commands."""
        settings = self.settings
        self.confirmer = ButtonConfirmer(self.replies, settings.confirm_timeout)
        self.pipeline = Pipeline(
            self.admission, self.audit, self.replies, self.floods, self.confirmer
        )
        # Slash commands only in the operator's servers, and none without OPS_GUILD_IDS.
        register_in_guilds(self, settings.guild_ids)
        self.command_sync = CommandSync(
            self.bot, settings.guild_ids, settings.state_dir, self.replies
        )

    def _add_actions(self, exit_process: Callable[[int], None], python: str | None) -> None:
        """What the commands do: on this host, to this bot, and across the fleet."""
        self.updates = UpdateActions(
            bot=self.bot,
            settings=self.settings,
            replies=self.replies,
            instance_id=self.instance_id,
            python=python,
        )
        self.reloads = ExtensionReloads(self.bot, own_extension=type(self).__module__)
        self.host_actions = HostActions(
            settings=self.settings,
            redis=self.redis,
            replies=self.replies,
            admission=self.admission,
            instance_id=self.instance_id,
            in_process=self.in_process,
            after_pull=self.updates.after_pull,
        )
        self.self_restart = SelfRestart(
            bot=self.bot,
            settings=self.settings,
            markers=self.markers,
            audit=self.audit,
            replies=self.replies,
            exit_process=exit_process,
        )
        self.fleet = FleetCommands(
            settings=self.settings,
            redis=self.redis,
            replies=self.replies,
            prefix=self.key_prefix,
            edit_interval=self.fleet_edit_interval,
        )

    def _marker_key(self) -> bytes | None:
        """What signs restart markers in Redis: derived from the bot's token, else the fleet's.

        Asked at each use: the connection knows the token once the bot has logged in.
        """
        token = getattr(self.bot.http, "token", None)
        for secret in (token, self.settings.discord_token, self.settings.control_secret):
            if isinstance(secret, str) and secret:
                return marker_key(secret)
        return None

    def _in_process_daemon(self) -> InProcessDaemon | None:
        """The fleet daemon to host with ``OPS_CONTROL_IN_PROCESS=1``, on the cog's client."""
        if not self.settings.control_in_process:
            return None
        daemon_settings = self.settings.daemon_settings()
        if self.redis is None or daemon_settings is None:
            log.warning(
                "OPS_CONTROL_IN_PROCESS needs REDIS_URL and OPS_CONTROL_SECRET: not started"
            )
            return None
        # The cog's key prefix (a test's, or OPS_CONTROL_PREFIX): the bot and its daemon agree.
        return InProcessDaemon(
            self.redis, dataclasses.replace(daemon_settings, prefix=self.key_prefix)
        )

    @property
    def control_daemon(self) -> ControlDaemon | None:
        """The fleet daemon this bot hosts with ``OPS_CONTROL_IN_PROCESS=1``."""
        return self.in_process.daemon if self.in_process is not None else None

    @property
    def control_task(self) -> asyncio.Task[None] | None:
        """The task serving the in-process daemon, while it runs."""
        return self.in_process.task if self.in_process is not None else None

    # ------------------------------------------------------------------ lifecycle

    async def cog_load(self) -> None:
        """Prepare the state dir; announce a restart now if the bot is already connected."""
        try:
            self.settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            log.warning("state dir %s is not usable: %s", self.settings.state_dir, exc)
        note_loaded([*self.bot.extensions, type(self).__module__])
        self.health_task = asyncio.create_task(
            self.health.run(before_record=self._back_online_done), name="admin-ops health watch"
        )
        if self.bot.is_ready():
            self._schedule_back_online()
            self.health.connected()
        # Logged in (loaded from setup_hook, or later): the commands can be synced already.
        self.command_sync.start()
        if self.in_process is not None:
            self.in_process.start()

    async def cog_unload(self) -> None:
        """Stop pending tasks and the in-process daemon; close the Redis client we made.

        An invocation under way (``!ops_reload`` of this very cog) still replies and writes
        its record through this instance: the client is closed once it is over.
        """
        await self.confirmer.close()
        for task in (self.back_online_task, self.health_task, self.command_sync.task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.in_process is not None:
            await self.in_process.stop()
        if self._owns_redis and self.redis is not None:
            if self.pipeline.busy:
                self.closing_task = self.pipeline.after_idle(
                    self.redis.aclose, timeout=UNLOAD_GRACE
                )
            else:
                await self.redis.aclose()

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """Record and announce the restart that ``!bot_restart`` asked for, once connected."""
        note_loaded(self.bot.extensions)
        self._schedule_back_online()
        self.health.connected()
        self.command_sync.start()

    @commands.Cog.listener()
    async def on_resumed(self) -> None:
        """Connected again: healthy time counts from now."""
        self.health.connected()

    @commands.Cog.listener()
    async def on_disconnect(self) -> None:
        """Not connected: healthy time starts again at the next connection."""
        self.health.disconnected()

    async def _back_online_done(self) -> None:
        """The "back online" notice (it says what a rollback did) goes out before it ends."""
        task = self.back_online_task
        if task is not None:
            await asyncio.wait({task})

    def _schedule_back_online(self) -> None:
        if self._announced:
            return
        self._announced = True
        self.back_online_task = asyncio.create_task(
            self.self_restart.back_online(), name="admin-ops back-online notice"
        )

    # ------------------------------------------------------------------ commands
    #
    # Hybrid (core.chat.slash.ops_command): ``!name`` and ``/name`` run the same method.

    @ops_command("bot_pull")
    @app_commands.describe(target="A configured checkout (default: the bot's own)")
    async def pull_command(self, ctx: commands.Context[Any], *, target: str = "") -> None:
        """Fast-forward a checkout: the bot's own by default, or a named target."""
        typed = target.strip()
        await self.pipeline.invoke(
            ctx,
            "bot_pull",
            lambda inv: self.host_actions.configure_pull(inv, typed),
            args=_typed(typed),
        )

    @ops_command("bot_restart")
    async def restart_command(self, ctx: commands.Context[Any]) -> None:
        """Restart the bot (reply first; say "back online" when it returns)."""
        await self.pipeline.invoke(ctx, "bot_restart", self.self_restart.configure)

    @ops_command("proxy_restart")
    async def proxy_restart_command(self, ctx: commands.Context[Any]) -> None:
        """Restart the proxy unit and report how it went."""
        await self.pipeline.invoke(ctx, "proxy_restart", self.host_actions.configure_proxy_restart)

    @ops_command("ops_status")
    async def status_command(self, ctx: commands.Context[Any]) -> None:
        """Host, units, checkouts, uptime, cooldowns and Redis, at a glance."""
        await self.pipeline.invoke(ctx, "ops_status", self.host_actions.configure_status)

    @ops_command("ops_logs")
    @app_commands.describe(unit="A unit whose journal may be read", lines="How many lines (50)")
    async def logs_command(
        self, ctx: commands.Context[Any], unit: str = "", lines: LineCount | None = None
    ) -> None:
        """The last lines of a unit's journal: the bot's, the proxy's or OPS_LOG_UNITS."""
        # LineCount gives text either way (the number of a slash option, or the word typed).
        typed_unit, typed_lines = unit.strip(), str(lines or "").strip()
        await self.pipeline.invoke(
            ctx,
            "ops_logs",
            lambda inv: self.host_actions.configure_logs(inv, typed_unit, typed_lines),
            args=[word for word in (typed_unit, typed_lines) if word],
        )

    @ops_command("ops_sync")
    async def sync_command(self, ctx: commands.Context[Any]) -> None:
        """Register the slash commands in the servers of OPS_GUILD_IDS again, now."""
        await self.pipeline.invoke(ctx, "ops_sync", self.command_sync.configure)

    @ops_command("fleet_pull")
    @app_commands.describe(target="The checkout's name on each host (default: bot)")
    async def fleet_pull_command(self, ctx: commands.Context[Any], *, target: str = "") -> None:
        """Fast-forward a checkout on every host that runs the control daemon."""
        typed = target.strip()
        await self.pipeline.invoke(
            ctx,
            "fleet_pull",
            lambda inv: self.fleet.configure_pull(inv, typed),
            args=_typed(typed),
        )

    @ops_command("fleet_restart")
    @app_commands.describe(unit="The unit to restart on each host that allows it")
    async def fleet_restart_command(self, ctx: commands.Context[Any], *, unit: str = "") -> None:
        """Restart a unit on every host whose control daemon allows it."""
        typed = unit.strip()
        await self.pipeline.invoke(
            ctx,
            "fleet_restart",
            lambda inv: self.fleet.configure_restart(inv, typed),
            args=_typed(typed),
        )

    @ops_command("fleet_status")
    async def fleet_status_command(self, ctx: commands.Context[Any]) -> None:
        """Each host's commits, unit states, version and uptime."""
        await self.pipeline.invoke(ctx, "fleet_status", self.fleet.configure_status)

    @ops_command("bot_fetch")
    @app_commands.describe(target="A configured checkout (default: the bot's own)")
    async def fetch_command(self, ctx: commands.Context[Any], *, target: str = "") -> None:
        """Fetch and show what a pull would bring and need; nothing in the checkout moves."""
        typed = target.strip()
        await self.pipeline.invoke(
            ctx,
            "bot_fetch",
            lambda inv: self.updates.configure_fetch(inv, typed),
            args=_typed(typed),
        )

    @ops_command("bot_deps")
    @app_commands.describe(target="A configured checkout (default: the bot's own)")
    async def deps_command(self, ctx: commands.Context[Any], *, target: str = "") -> None:
        """Install a checkout's requirements into the bot's virtual environment."""
        typed = target.strip()
        await self.pipeline.invoke(
            ctx,
            "bot_deps",
            lambda inv: self.updates.configure_deps(inv, typed),
            args=_typed(typed),
        )

    @ops_command("bot_rollback")
    @app_commands.describe(target="A configured checkout (default: the bot's own)")
    async def rollback_command(self, ctx: commands.Context[Any], *, target: str = "") -> None:
        """Move a checkout back to where its last recorded pull found it."""
        typed = target.strip()
        await self.pipeline.invoke(
            ctx,
            "bot_rollback",
            lambda inv: self.updates.configure_rollback(inv, typed),
            args=_typed(typed),
        )

    @ops_command("ops_reload")
    @app_commands.describe(names="Extensions to reload, space-separated (default: changed ones)")
    async def reload_command(self, ctx: commands.Context[Any], *, names: str = "") -> None:
        """Reload the named extensions, or every one whose source changed since it loaded."""
        typed = names.split()
        await self.pipeline.invoke(
            ctx, "ops_reload", lambda inv: self.reloads.configure(inv, typed), args=typed
        )

    # ------------------------------------------------------------------ autocompletion

    async def _may_see(self, interaction: discord.Interaction[Any], command: str) -> bool:
        """Whether the names may be shown: the command's role and channel checks pass."""
        refused = await self.admission.refused(
            interaction.guild, interaction.user, interaction.channel, command
        )
        return refused is None

    @pull_command.autocomplete("target")
    @fetch_command.autocomplete("target")
    @deps_command.autocomplete("target")
    @rollback_command.autocomplete("target")
    @fleet_pull_command.autocomplete("target")
    async def _target_names(
        self, interaction: discord.Interaction[Any], typed: str
    ) -> list[app_commands.Choice[str]]:
        command = interaction.command.name if interaction.command is not None else ""
        if not await self._may_see(interaction, command):
            return []
        return choices((t.name for t in self.settings.pull_targets), typed)

    @fleet_restart_command.autocomplete("unit")
    async def _unit_names(
        self, interaction: discord.Interaction[Any], typed: str
    ) -> list[app_commands.Choice[str]]:
        if not await self._may_see(interaction, "fleet_restart"):
            return []
        units = (self.settings.bot_service, self.settings.proxy_service)
        return choices((unit for unit in units if unit), typed)

    @logs_command.autocomplete("unit")
    async def _readable_units(
        self, interaction: discord.Interaction[Any], typed: str
    ) -> list[app_commands.Choice[str]]:
        if not await self._may_see(interaction, "ops_logs"):
            return []
        return choices(self.settings.readable_units, typed)

    @reload_command.autocomplete("names")
    async def _extension_names(
        self, interaction: discord.Interaction[Any], typed: str
    ) -> list[app_commands.Choice[str]]:
        if not await self._may_see(interaction, "ops_reload"):
            return []
        return choices(sorted(self.bot.extensions), typed)

    async def cog_command_error(self, ctx: commands.Context[Any], error: Exception) -> None:
        """Answer errors that escaped the pipeline (argument parsing) in one sentence."""
        if isinstance(error, commands.UserInputError):
            await self.replies.reply(ctx, f"❌ {error}", private=True)
            return
        original = getattr(error, "original", error)
        log.error("command %s failed", ctx.command, exc_info=original)
        await self.replies.reply(
            ctx, "❌ That failed unexpectedly; the details are in the bot's log."
        )


async def setup(bot: commands.Bot) -> None:
    """Add the cog: settings from the bot when it carries them (``bot.py``), else the environment.

    The Redis client is built from ``REDIS_URL``. The process is made undumpable, as
    ``bot.py`` does at its start: a bot that loads this cog holds its token (and, with an
    in-process daemon, the fleet secret), and the git hooks of every checkout it pulls run as
    its user — they must not read its environment or memory.
    """
    if make_undumpable():
        log.info("process made undumpable: other processes of this user cannot read its memory")
    settings = getattr(bot, "settings", None)
    await bot.add_cog(AdminOps(bot, settings if isinstance(settings, Settings) else None))
