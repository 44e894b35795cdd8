"""Who may run a command here, and whether it may run now.

:meth:`Admission.check` answers *who and where*: in a server (one of ``OPS_GUILD_IDS`` when
set), by the owner or a member with an ops role of that server, in an allowed channel.
:meth:`Admission.admit` answers *when*: not while the same command runs, not during its
cooldown; it marks the command running until :meth:`Admission.done`. Each answer is a
:class:`Refusal` or None.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Final, Literal, NamedTuple

import discord
import redis.asyncio as aioredis
from discord.ext import commands

from core.chat.replies import display_name, shown
from core.ops_exec import Cooldown
from core.settings import Settings
from core.text import format_duration

__all__ = ["SERVER_ONLY", "Admission", "Refusal", "RefusalStatus", "Running", "make_cooldowns"]

log = logging.getLogger("cogs.admin_ops.admission")

#: Why a command was not run, as the audit record says it.
RefusalStatus = Literal[
    "refused:dm",
    "refused:guild",
    "refused:role",
    "refused:channel",
    "refused:config",
    "refused:running",
    "refused:cooldown",
    "refused:recent",
]

#: The answer to a command from a DM or from a server the operator did not list.
SERVER_ONLY: Final = "These commands only work in a server."


class Refusal(NamedTuple):
    """A command that will not run: the audit status, and the answer to the invoker."""

    status: RefusalStatus
    message: str


class Running(NamedTuple):
    """Who started a running command, and when (monotonic clock)."""

    user: str
    started: float


def make_cooldowns(
    settings: Settings, redis: aioredis.Redis | None, prefix: str
) -> dict[str, Cooldown]:
    """A cooldown per command that has one, kept in Redis under ``prefix`` and the state dir."""
    return {
        command: Cooldown(seconds, redis=redis, state_file=settings.cooldown_file, prefix=prefix)
        for command, seconds in settings.cooldowns
        if seconds > 0
    }


class Admission:
    """The role, channel, running and cooldown checks of every command."""

    def __init__(
        self, bot: commands.Bot, settings: Settings, cooldowns: Mapping[str, Cooldown]
    ) -> None:
        """Check against ``settings``; ``cooldowns`` maps a command to its cooldown."""
        self.bot = bot
        self.settings = settings
        self.cooldowns = cooldowns
        self._locks: dict[str, asyncio.Lock] = {}
        self._running: dict[str, Running] = {}

    @property
    def running(self) -> Mapping[str, Running]:
        """The commands running now."""
        return self._running

    async def check(self, ctx: commands.Context[Any], command: str) -> Refusal | None:
        """The first failing check of: server only (a listed one), role, channel."""
        status = await self.refused(ctx.guild, ctx.author, ctx.channel, command)
        if status is None:
            return None
        if status == "refused:role":
            return Refusal(status, f"You need an ops role to run {shown(ctx, command)}.")
        if status == "refused:channel":
            return Refusal(status, f"{shown(ctx, command)} can't be used in this channel.")
        return Refusal(status, SERVER_ONLY)

    async def refused(
        self, guild: discord.Guild | None, author: object, channel: object, command: str
    ) -> RefusalStatus | None:
        """Why ``author`` may not run ``command`` in ``channel`` of ``guild``, or None.

        The who-and-where of :meth:`check`, for what has no command context (autocompletion).
        """
        if guild is None or not isinstance(author, discord.Member):
            return "refused:dm"
        listed = self.settings.guild_ids
        # A stranger's server learns no more than a DM does, and not even the owner acts there.
        if listed and guild.id not in listed:
            return "refused:guild"
        if not await self.may_run_in(guild, author, command):
            return "refused:role"
        allowed = self.settings.channel_ids
        # A thread counts as its parent channel.
        parent_id = getattr(channel, "parent_id", None)
        if allowed and getattr(channel, "id", None) not in allowed and parent_id not in allowed:
            return "refused:channel"
        return None

    async def may_run(self, ctx: commands.Context[Any], command: str) -> bool:
        """Whether ``ctx``'s author may run ``command`` in ``ctx``'s server."""
        member, guild = ctx.author, ctx.guild
        if guild is None or not isinstance(member, discord.Member):
            return False
        return await self.may_run_in(guild, member, command)

    async def may_run_in(self, guild: discord.Guild, member: discord.Member, command: str) -> bool:
        """Whether ``member`` may run ``command`` in ``guild``.

        The application owner (or team) always; else a role, from the settings, that the member
        holds in that very server.
        """
        if member.guild.id != guild.id:
            return False
        try:
            if await self.bot.is_owner(member):
                return True
        except discord.HTTPException as exc:
            log.warning("cannot look up the application owner: %s", exc)
        # Only this server's roles: a role elsewhere says nothing about this server.
        roles = [role for role in member.roles if role.guild.id == guild.id]
        role_ids = self.settings.role_ids_for(command)
        if any(role.id in role_ids for role in roles):
            return True
        names = self.settings.admin_role_names
        if not names or self.settings.has_role_override(command):
            return False
        # Anyone can create a role with any name in a server of their own: names count only in
        # the servers the operator listed.
        if guild.id not in self.settings.guild_ids:
            return False
        return any(role.name in names for role in roles)

    async def admit(
        self, ctx: commands.Context[Any], command: str, *, take_cooldown: bool = True
    ) -> Refusal | None:
        """Refuse when the command is running or cooling down; else mark it running.

        ``take_cooldown=False`` (the command first asks for a confirmation): a cooldown under
        way still refuses, but the run takes its own only once confirmed
        (:meth:`take_cooldown`).
        """
        async with self._locks.setdefault(command, asyncio.Lock()):
            running = self._running.get(command)
            if running is not None:
                ago = format_duration(time.monotonic() - running.started)
                return Refusal(
                    "refused:running",
                    f"{shown(ctx, command)} is already running "
                    f"(started by {running.user} {ago} ago)",
                )
            cooldown = self.cooldowns.get(command)
            if cooldown is not None:
                if take_cooldown:
                    remaining = await cooldown.try_acquire(command)
                else:
                    remaining = await cooldown.remaining(command)
                if remaining > 0:
                    return _cooling_down(ctx, command, remaining)
            self._running[command] = Running(display_name(ctx.author), time.monotonic())
        return None

    async def take_cooldown(self, ctx: commands.Context[Any], command: str) -> Refusal | None:
        """Take the cooldown of a command admitted without it; a refusal if it was taken since."""
        cooldown = self.cooldowns.get(command)
        if cooldown is None:
            return None
        remaining = await cooldown.try_acquire(command)
        return _cooling_down(ctx, command, remaining) if remaining > 0 else None

    async def give_back(self, command: str) -> None:
        """Forget the cooldown use of a run that did nothing: the operator may retry at once."""
        cooldown = self.cooldowns.get(command)
        if cooldown is not None:
            await cooldown.release(command)

    def done(self, command: str) -> None:
        """The admitted run of ``command`` is over."""
        self._running.pop(command, None)


def _cooling_down(ctx: commands.Context[Any], command: str, remaining: float) -> Refusal:
    wait = format_duration(remaining, round_up=True)
    return Refusal(
        "refused:cooldown", f"{shown(ctx, command)} is cooling down — try again in {wait}."
    )
