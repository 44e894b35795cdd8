"""Run the admin-ops Discord bot, or check its configuration and host with ``--check``.

``python bot.py`` connects to Discord and loads the admin-ops cog; ``python bot.py --check``
validates the settings and the host without connecting, printing one ✅/❌ line per check.
Settings come from environment variables (README, "Settings").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import discord
from discord.ext import commands
from redis.asyncio import Redis

from core.hardening import CREDENTIALS, make_undumpable
from core.ops_exec import (
    UnitState,
    bounded,
    git_head,
    git_upstream,
    redact,
    redis_errors,
    systemctl_argv,
    unit_state,
)
from core.redis_client import make_redis, sentinel_master, uses_sentinel
from core.settings import Settings, SettingsError

#: Extensions loaded at start-up.
EXTENSIONS = ("cogs.admin_ops",)
#: Exit status for a configuration that cannot start (no token, invalid setting).
EXIT_CONFIG = 2
#: Seconds ``--check`` waits for Redis to answer a PING.
REDIS_CHECK_TIMEOUT = 3.0
#: A ``--check`` line: passed (True), failed (False) or advice that does not fail (None).
Verdict = bool | None
_MARKS: Final[Mapping[Verdict, str]] = {True: "✅", False: "❌", None: "⚠️"}

log = logging.getLogger("admin_ops.bot")

NO_DISCORD_LOGIN_HELP = (
    "DISCORD_TOKEN is not set: set it to your bot's token "
    "(Discord developer portal → your application → Bot → Reset Token), "
    "e.g. `DISCORD_TOKEN=... make run`."
)


class OpsBot(commands.Bot):
    """A bot that mentions nobody and loads the admin-ops cog at start-up.

    It carries its ``settings``: the cog's ``setup()`` uses them instead of reading the
    environment a second time.
    """

    def __init__(self, settings: Settings) -> None:
        """Prefix from settings; the message content and members intents the cog relies on."""
        self.settings = settings
        intents = discord.Intents.default()
        intents.message_content = True
        intents.members = True
        super().__init__(
            command_prefix=settings.command_prefix,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
        )

    async def setup_hook(self) -> None:
        """Load the extensions; a broken one stops the start (it would be a bot that ignores us)."""
        for extension in EXTENSIONS:
            await self.load_extension(extension)
            log.info("loaded %s", extension)


# --------------------------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------------------------


async def _check_target(name: str, path: Path) -> tuple[bool, str]:
    label = f"target {name} ({path})"
    if not path.is_dir():
        return False, f"{label}: does not exist or is not a directory"
    head = await git_head(path)
    if head is None:
        return False, f"{label}: not a git checkout"
    upstream = await git_upstream(path)
    if upstream is None:
        return False, (
            f"{label}: the current branch has no upstream "
            f"(fix: git -C {path} branch --set-upstream-to=origin/<branch>)"
        )
    return True, f"{label}: git checkout at {head}, tracking {upstream}"


def _check_systemctl(settings: Settings) -> tuple[bool, str]:
    try:
        argv = systemctl_argv()
    except ValueError as exc:
        return False, str(exc)
    needed = settings.proxy_service is not None or (
        settings.restart_mode == "systemd" and settings.bot_service is not None
    )
    found = shutil.which(argv[0])
    if found is not None:
        return True, f"systemctl program: {' '.join([found, *argv[1:]])}"
    if not needed:
        return True, f"systemctl program {argv[0]!r} not found, and no unit needs it"
    return False, (
        f"systemctl program {argv[0]!r} not found: install systemd's systemctl "
        "or point OPS_SYSTEMCTL at it"
    )


def _answered(state: UnitState) -> bool:
    """Whether systemctl could tell a unit's state (else it could not run, or was refused)."""
    return state.state is not None


async def _check_units(settings: Settings) -> list[tuple[bool, str]]:
    lines: list[tuple[bool, str]] = []
    if settings.bot_service is not None:
        state = await unit_state(settings.bot_service)
        lines.append((_answered(state), f"OPS_BOT_SERVICE: {settings.bot_service} ({state})"))
    elif settings.restart_mode == "exit":
        lines.append((True, "OPS_BOT_SERVICE not set: !bot_restart exits with status 26"))
    else:
        lines.append(
            (True, "OPS_BOT_SERVICE not set: !bot_restart is off (or set OPS_RESTART_MODE=exit)")
        )
    if settings.proxy_service is not None:
        state = await unit_state(settings.proxy_service)
        lines.append((_answered(state), f"OPS_PROXY_SERVICE: {settings.proxy_service} ({state})"))
    else:
        lines.append((True, "OPS_PROXY_SERVICE not set: !proxy_restart is off"))
    return lines


async def _check_redis(settings: Settings) -> tuple[bool, str]:
    if settings.redis_url is None:
        return True, "REDIS_URL not set: cooldowns and the restart marker use the state dir"
    shown = settings.masked_redis_url
    client = make_redis(settings.redis_url)
    try:
        if uses_sentinel(client):
            return await _check_sentinel_master(client, shown)
        started = time.monotonic()
        try:
            await bounded(client.ping(), REDIS_CHECK_TIMEOUT)
        except redis_errors() as exc:
            return False, f"Redis at {shown} does not answer: {_first_line(exc)}"
        return True, f"Redis at {shown} answers ({(time.monotonic() - started) * 1000:.1f} ms)"
    finally:
        await client.aclose()


async def _check_sentinel_master(client: Redis, shown: str | None) -> tuple[bool, str]:
    """Which master the sentinels name, and whether it answers."""
    try:
        master = await bounded(sentinel_master(client), REDIS_CHECK_TIMEOUT)
    except redis_errors() as exc:
        return False, f"Redis via Sentinel {shown}: no sentinel names a master: {_first_line(exc)}"
    named = f"the sentinels name {master[0]}:{master[1]} as master" if master else "no master"
    started = time.monotonic()
    try:
        await bounded(client.ping(), REDIS_CHECK_TIMEOUT)
    except redis_errors() as exc:
        return False, f"Redis via Sentinel {shown}: {named}; it does not answer: {_first_line(exc)}"
    took = (time.monotonic() - started) * 1000
    return True, f"Redis via Sentinel {shown}: {named}; it answers ({took:.1f} ms)"


def _first_line(exc: BaseException) -> str:
    detail = str(exc).splitlines()[0] if str(exc) else "no answer"
    return f"{type(exc).__name__}: {detail}"


def _check_fleet(settings: Settings) -> tuple[bool, str]:
    """Whether the ``!fleet_*`` commands can run, and the in-process daemon's identity."""
    missing = settings.fleet_missing
    if missing:
        line = f"fleet: !fleet_* commands off (they need {' and '.join(missing)})"
    else:
        line = (
            f"fleet: !fleet_* commands configured (key prefix {settings.control_prefix}, "
            f"answers awaited {settings.fleet_timeout:g} s)"
        )
    if not settings.control_in_process:
        return True, line
    daemon = settings.daemon_settings()
    if daemon is None:
        return False, f"{line}; OPS_CONTROL_IN_PROCESS=1 needs REDIS_URL and OPS_CONTROL_SECRET"
    return True, f"{line}; in-process daemon joins as {daemon.identity}"


def _check_passthrough(settings: Settings) -> list[tuple[bool, str]]:
    """Which variables git also gets (names only: their values may be sensitive)."""
    names = settings.git_env_passthrough
    if not names:
        return []
    unset = [name for name in names if name not in os.environ]
    line = f"OPS_GIT_ENV_PASSTHROUGH: git also gets {', '.join(names)}"
    if unset:
        line += f" (not set in this environment: {', '.join(unset)})"
    return [(True, line)]


def _check_state_dir(settings: Settings) -> tuple[bool, str]:
    state_dir = settings.state_dir
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".check-"):
            pass
    except OSError as exc:
        return False, f"state dir {state_dir} is not writable: {exc.strerror or exc}"
    return True, f"state dir {state_dir} is writable"


def _check_token(settings: Settings, environ: Mapping[str, str]) -> tuple[Verdict, str]:
    """Whether there is a token, and where it came from (never the token itself)."""
    if not settings.discord_token:
        return False, "DISCORD_TOKEN is not set: set it to your bot's token"
    if environ.get("DISCORD_TOKEN", "").strip():
        return True, "DISCORD_TOKEN is set (environment)"
    return True, f"DISCORD_TOKEN is set (systemd credential {CREDENTIALS['DISCORD_TOKEN']})"


def _check_guilds(settings: Settings) -> tuple[Verdict, str]:
    """Which servers the commands work in (and are slash commands in); all is worth a warning."""
    if not settings.guild_ids:
        return None, (
            "OPS_GUILD_IDS not set: commands work in any server the bot is in, as prefix "
            "commands only: no slash commands (set it to your servers' IDs)"
        )
    servers = ", ".join(str(guild) for guild in sorted(settings.guild_ids))
    return True, (
        f"OPS_GUILD_IDS: commands work only in servers {servers}, "
        "where they are also slash commands"
    )


async def run_checks(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> list[tuple[Verdict, str]]:
    """Every check of ``--check``, in order, as ``(verdict, line)``."""
    results: list[tuple[Verdict, str]] = [
        (
            True,
            f"settings: prefix {settings.command_prefix!r}, restart mode {settings.restart_mode}",
        ),
        _check_token(settings, os.environ if environ is None else environ),
        _check_guilds(settings),
    ]
    for target in settings.pull_targets:
        results.append(await _check_target(target.name, target.path))
    results.append(_check_systemctl(settings))
    results += await _check_units(settings)
    results.append(await _check_redis(settings))
    results.append(_check_fleet(settings))
    results += _check_passthrough(settings)
    results.append(_check_state_dir(settings))
    return results


def check(settings: Settings, print_line: Callable[[str], None] = print) -> int:
    """Print one ✅/⚠️/❌ line per check, secrets masked; 0 unless a check failed."""
    results = asyncio.run(run_checks(settings))
    secrets = settings.secrets
    for verdict, line in results:
        print_line(f"{_MARKS[verdict]} {redact(line, secrets)}")
    return 1 if any(verdict is False for verdict, _ in results) else 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bot (or ``--check``); the exit status is the process's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate settings and host (checkouts, units, Redis, fleet, state dir); no Discord",
    )
    args = parser.parse_args(argv)
    # The token is about to be read into this process, which runs git (and so the hooks of the
    # checkouts it pulls) as the same user: none of them may read its memory or environment.
    make_undumpable()
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"❌ {problem}", file=sys.stdout if args.check else sys.stderr)
        return 1 if args.check else EXIT_CONFIG
    if args.check:
        return check(settings)
    if not settings.discord_token:
        print(NO_DISCORD_LOGIN_HELP, file=sys.stderr)
        return EXIT_CONFIG
    bot = OpsBot(settings)
    # discord.py's own logging set-up, on the root logger so the cog's audit lines show too.
    discord.utils.setup_logging(root=True)
    asyncio.run(serve(bot, settings.discord_token))
    return 0


async def serve(bot: commands.Bot, token: str) -> None:
    """Run ``bot`` until it closes; SIGTERM or SIGINT close it cleanly, and this returns.

    systemd (like Docker and supervisord) stops a service with SIGTERM, which by default kills
    Python on the spot: the gateway connection dropped rather than closed, the cog never
    unloaded (an in-process fleet daemon not stopped). Cancelling the run instead ends whatever
    it is doing (logging in, or the gateway loop), and ``async with`` closes the bot (cogs
    unloaded, gateway closed with 1000, HTTP session closed) before the process exits 0.
    The SIGTERM of a restart that ``!bot_restart`` asked for is no different: the command
    itself knows that its request went out (:mod:`core.chat.restart`).
    """
    loop = asyncio.get_running_loop()
    run = asyncio.current_task()
    stopping: list[int] = []

    def stop(signum: int) -> None:
        log.info("%s received: closing", signal.Signals(signum).name)
        stopping.append(signum)
        if run is not None:  # always, under asyncio.run
            run.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    try:
        async with bot:
            await bot.start(token)
    except asyncio.CancelledError:
        if not stopping:
            raise  # not ours: let it propagate


if __name__ == "__main__":
    sys.exit(main())
