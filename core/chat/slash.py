"""The cog's commands as slash commands: where they are registered, when they are synced.

Every command is a hybrid command (``!bot_pull`` and ``/bot_pull`` run the same code). Their
application commands are registered in the bot's own command tree as **guild** commands of the
servers in ``OPS_GUILD_IDS`` only, never globally (:func:`register_in_guilds`); without
``OPS_GUILD_IDS`` the cog stays prefix-only. A host bot that syncs its tree for one of those
servers keeps them.

Discord rate-limits syncs hard, so :class:`CommandSync` syncs a server at start only when what
the tree holds for it differs from what was last synced there (a hash per server, kept in the
state dir), and ``!ops_sync`` forces one.

Autocompletion offers configured names only (targets, units, extensions), never what another
host answered (:func:`choices`), and only to someone the role and channel checks would let run
the command (the cog asks them first): a list of names is configuration.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, cast

import discord
from discord import app_commands
from discord.ext import commands

from core.chat.invocation import Action, Invocation, NotConfigured, Outcome, Reply
from core.chat.replies import SEND_ERRORS, Replies
from core.journal import MAX_LINES
from core.ops_exec import atomic_write_json, read_json_file

__all__ = [
    "SYNC_STATE_FILE",
    "CommandSync",
    "LineCount",
    "choices",
    "ops_command",
    "register_in_guilds",
]

log = logging.getLogger("cogs.admin_ops.slash")

#: The file in the state dir holding, per server, the hash of the command set last synced there.
SYNC_STATE_FILE: Final = "app-commands.json"
#: Discord shows at most this many autocomplete choices.
MAX_CHOICES: Final = 25
#: What a sync may raise besides Discord's refusal (no application ID, a bad command set).
SYNC_ERRORS: Final = (*SEND_ERRORS, app_commands.AppCommandError, discord.ClientException)


#: A command method of the cog.
Callback = Callable[..., Coroutine[Any, Any, None]]


def ops_command(name: str) -> Callable[[Callback], commands.HybridCommand[Any, ..., None]]:
    """``!name`` and ``/name`` in one: a hybrid command shown to members who manage the server.

    ``default_permissions`` only makes Discord hide the slash command from members without
    "Manage Server" (server admins can change that): the pipeline's role checks still decide.
    """
    # discord.py's decorator is typed for functions mypy cannot match to a cog method.
    make = cast(
        Callable[[Callback], "commands.HybridCommand[Any, ..., None]"],
        commands.hybrid_command(name=name),
    )

    def decorate(func: Callback) -> commands.HybridCommand[Any, ..., None]:
        return make(app_commands.default_permissions(manage_guild=True)(func))

    return decorate


def register_in_guilds(cog: commands.Cog, guild_ids: Iterable[int]) -> None:
    """Make ``cog``'s hybrid commands guild commands of ``guild_ids``, or prefix-only without any.

    Called on the cog's own copies of its commands, before the cog is added: adding a hybrid
    command adds its application command to the tree under these guilds (and removing it
    removes it from there).
    """
    guilds = sorted(set(guild_ids))
    for command in cog.get_commands():
        if not isinstance(command, commands.HybridCommand) or command.app_command is None:
            continue
        if guilds:
            # discord.py's own field for the guilds of an application command; the tree reads it
            # when the command is added without explicit guilds, as hybrid commands are.
            command.app_command._guild_ids = guilds
        else:
            command.app_command = None
            command.with_app_command = False


def choices(names: Iterable[str], typed: str) -> list[app_commands.Choice[str]]:
    """Autocomplete choices among ``names``: those containing ``typed``, prefix matches first."""
    wanted = typed.strip().lower()
    found = [name for name in dict.fromkeys(names) if wanted in name.lower()]
    found.sort(key=lambda name: (not name.lower().startswith(wanted), name))
    return [app_commands.Choice(name=name[:100], value=name[:100]) for name in found[:MAX_CHOICES]]


class LineCount(commands.Converter[str], app_commands.Transformer):
    """``lines`` of ``!ops_logs``: a whole number from 1 to 2000 as a slash option, text typed.

    Either way the command receives text and checks it itself, so a mistyped number is
    answered like any other refusal (after the role check, recorded), not by discord.py.
    """

    async def convert(self, ctx: commands.Context[Any], argument: str) -> str:
        """The prefix form: the word as typed."""
        return argument

    @property
    def type(self) -> discord.AppCommandOptionType:
        """An integer option."""
        return discord.AppCommandOptionType.integer

    @property
    def min_value(self) -> int:
        """Discord's client enforces the range before the command is sent."""
        return 1

    @property
    def max_value(self) -> int:
        """See :attr:`min_value`."""
        return MAX_LINES

    async def transform(self, interaction: discord.Interaction[Any], value: Any, /) -> str:
        """The slash form: the number, as the text the command parses."""
        return str(value)


def command_set_hash(application_id: int, guild_id: int, payload: Sequence[Any]) -> str:
    """A hash of what a sync of ``guild_id`` sends: changes in any command change it."""
    ordered = sorted(payload, key=lambda c: (c.get("type", 1), c.get("name", "")))
    text = json.dumps([application_id, guild_id, ordered], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class CommandSync:
    """Sync the tree for each server of ``OPS_GUILD_IDS``: at start when changed, on demand."""

    def __init__(
        self, bot: commands.Bot, guild_ids: Iterable[int], state_dir: Path, replies: Replies
    ) -> None:
        """Keep the hashes of what was synced in ``state_dir``."""
        self.bot = bot
        self.guild_ids = tuple(sorted(set(guild_ids)))
        self.state_file = state_dir / SYNC_STATE_FILE
        self.replies = replies
        self._lock = asyncio.Lock()
        #: The task syncing at start (tests await it).
        self.task: asyncio.Task[None] | None = None

    def _hashes(self) -> dict[str, str]:
        data = read_json_file(self.state_file)
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def _current(self, guild_id: int) -> str | None:
        application_id = self.bot.application_id
        if application_id is None:
            return None
        guild = discord.Object(guild_id)
        payload = [
            command.to_dict(self.bot.tree) for command in self.bot.tree.get_commands(guild=guild)
        ]
        return command_set_hash(application_id, guild_id, payload)

    def start(self) -> None:
        """Sync at start (in the background) the servers whose command set changed."""
        if self.task is None and self.guild_ids and self.bot.application_id is not None:
            self.task = asyncio.create_task(self.at_start(), name="admin-ops command sync")

    async def at_start(self) -> None:
        """Sync each server whose command set differs from the last one synced there.

        The hash says what this bot last sent; what Discord holds may have changed since (a host
        bot that synced its tree without these commands, another process of the application),
        so a server whose hash matches is still synced when a command is missing there: one
        GET per server at start, against a PUT that Discord rate-limits hard.
        """
        stored = await asyncio.to_thread(self._hashes)
        changed = [g for g in self.guild_ids if stored.get(str(g)) != self._current(g)]
        for guild_id in self.guild_ids:
            if guild_id not in changed and await self._missing_in(guild_id):
                changed.append(guild_id)
        if not changed:
            log.info("slash commands unchanged in %d server(s): not synced", len(self.guild_ids))
            return
        for guild_id, error in await self._sync(changed):
            if error is None:
                log.info("slash commands synced in server %s", guild_id)
            else:
                log.warning("slash commands not synced in server %s: %s", guild_id, error)

    async def _missing_in(self, guild_id: int) -> bool:
        """Whether Discord lacks one of the tree's commands in ``guild_id`` (False if unsure)."""
        guild = discord.Object(guild_id)
        try:
            registered = await self.bot.tree.fetch_commands(guild=guild)
        except SYNC_ERRORS as exc:
            log.warning("cannot list the slash commands of server %s: %s", guild_id, _why(exc))
            return False
        names = {command.name for command in registered}
        missing = [c.name for c in self.bot.tree.get_commands(guild=guild) if c.name not in names]
        if missing:
            log.info("server %s lacks %d slash command(s): syncing it", guild_id, len(missing))
        return bool(missing)

    async def _sync(self, guild_ids: Sequence[int]) -> list[tuple[int, str | None]]:
        """Sync each of ``guild_ids``; per server, None or why it failed. Hashes kept on success."""
        results: list[tuple[int, str | None]] = []
        async with self._lock:
            hashes = await asyncio.to_thread(self._hashes)
            for guild_id in guild_ids:
                expected = self._current(guild_id)
                try:
                    await self.bot.tree.sync(guild=discord.Object(guild_id))
                except SYNC_ERRORS as exc:
                    results.append((guild_id, _why(exc)))
                    continue
                if expected is not None:
                    hashes[str(guild_id)] = expected
                results.append((guild_id, None))
            try:
                await asyncio.to_thread(atomic_write_json, self.state_file, hashes)
            except OSError as exc:
                log.warning("cannot keep the synced command sets in %s: %s", self.state_file, exc)
        return results

    # ------------------------------------------------------------------ !ops_sync

    def configure(self, inv: Invocation) -> Action | NotConfigured:
        """Sync every server of ``OPS_GUILD_IDS``; nothing to sync without it."""
        if not self.guild_ids:
            return NotConfigured.missing(inv, ["OPS_GUILD_IDS"])
        return self.sync

    async def sync(self, inv: Invocation) -> Outcome:
        """Sync now, whatever the hashes say, and say how each server went."""
        async with self.replies.typing(inv.ctx):
            results = await self._sync(self.guild_ids)
        count = len(self._commands_of(self.guild_ids[0]))
        lines = [
            f"{'✅' if error is None else '❌'} server {guild_id}: {error or 'synced'}"
            for guild_id, error in results
        ]
        failed = [guild_id for guild_id, error in results if error is not None]
        servers = f"{len(results)} server" + ("" if len(results) == 1 else "s")
        if not failed:
            reply = Reply(f"✅ Synced {count} slash commands in {servers}", "\n".join(lines))
            return Outcome("ok", detail=f"synced in {servers}", reply=reply)
        acted = len(failed) < len(results)
        reply = Reply(f"❌ Sync failed in {len(failed)} of {servers}", "\n".join(lines))
        return Outcome(
            "failed", acted=acted, detail=f"failed in {len(failed)} of {servers}", reply=reply
        )

    def _commands_of(self, guild_id: int) -> list[Any]:
        return list(self.bot.tree.get_commands(guild=discord.Object(guild_id)))


def _why(exc: BaseException) -> str:
    """One line on a failed sync; the usual cause of a refusal is the missing invite scope."""
    if isinstance(exc, discord.Forbidden):
        return (
            f"{exc.text or 'Missing Access'} (invite the bot with the applications.commands scope)"
        )
    if isinstance(exc, discord.HTTPException):
        return f"{exc.status} {exc.text or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"
