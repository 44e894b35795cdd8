"""``python -m core.control_ops daemon | publish OP [ARGS...]``: the fleet from a shell.

``daemon`` serves this host until SIGTERM; ``publish`` sends one command and prints a row per
host as the answers arrive. Settings come from the environment through :mod:`core.settings`,
the Redis client from :func:`core.redis_client.make_redis`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Mapping, Sequence
from typing import Final, TextIO, TypeVar

from core.control_ops.daemon import ControlDaemon
from core.control_ops.publisher import DEFAULT_PUBLISH_TIMEOUT, REPLICA_WAIT_SECONDS, publish
from core.control_ops.report import (
    UNREPLICATED,
    FleetTally,
    HostStatus,
    host_status,
    in_order,
    ok_sentence,
)
from core.control_ops.wire import (
    DEFAULT_COMMAND_TTL,
    OPS,
    FleetResult,
    HostResult,
    Published,
    cut_summary,
)
from core.hardening import make_undumpable
from core.ops_exec import clean_text, redact, redis_errors
from core.redis_client import make_redis
from core.settings import DaemonSettings, PublisherSettings, SettingsError
from core.text import one_line

__all__ = ["ConfigError", "LiveTable", "daemon_settings_from_env", "main"]

log = logging.getLogger("admin_ops.control_ops")

T = TypeVar("T")

#: A bad environment setting; each line of the message names its variable.
ConfigError = SettingsError

# The table's words for each status (the chat board has icons for the same statuses).
_WORDS: Final = {
    HostStatus.OK: "ok",
    HostStatus.SKIPPED: "skipped",
    HostStatus.FAILED: "FAILED",
    HostStatus.WAITING: "waiting",
    HostStatus.SILENT: "SILENT",
}
# The longest host name shown; a longer one is cut, like on the chat board.
_HOST_WIDTH: Final = 64


def daemon_settings_from_env(env: Mapping[str, str]) -> DaemonSettings:
    """The daemon's settings from ``env``; raise ConfigError naming each bad variable."""
    return DaemonSettings.from_env(env)


def _shown(text: str) -> str:
    """Text from another host as one terminal-safe line: no escape sequences, no newlines.

    Cut to a bound first (then cleaned, then cut to the width): nothing unbounded is scanned.
    """
    return one_line(clean_text(text[: 4 * _HOST_WIDTH]), _HOST_WIDTH)


# ---------------------------------------------------------------------------------------------
# daemon
# ---------------------------------------------------------------------------------------------


async def _run_until_signalled(main_coro: Awaitable[T]) -> T:
    """Run ``main_coro`` as a task that SIGTERM/SIGINT cancel (a clean stop, not a kill)."""
    task: asyncio.Future[T] = asyncio.ensure_future(main_coro)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _daemon_main(settings: DaemonSettings) -> None:
    client = make_redis(settings.redis_url)
    try:
        daemon = ControlDaemon.from_settings(client, settings)
        log.info(
            "control daemon %s starting (redis %s, targets %s, units %s, own %s)",
            settings.identity,
            redact(settings.redis_url, settings.secrets),
            ",".join(sorted(daemon.pull_targets)) or "-",
            ",".join(sorted(daemon.restart_units)) or "-",
            ",".join(sorted(daemon.own_units)) or "-",
        )
        await daemon.run()
    finally:
        await client.aclose()


def _cmd_daemon(env: Mapping[str, str]) -> int:
    try:
        settings = daemon_settings_from_env(env)
    except SettingsError as exc:
        print(f"control daemon not started: {exc}", file=sys.stderr)
        return 2
    # The daemon holds the fleet's secret and runs git, whose hooks run as our user: they must
    # not be able to read our environment or memory through /proc.
    make_undumpable()
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(_run_until_signalled(_daemon_main(settings)))
    return 0


# ---------------------------------------------------------------------------------------------
# publish
# ---------------------------------------------------------------------------------------------


class LiveTable:
    """The terminal's table: rows printed as hosts answer, so a slow host holds back nobody.

    Host names and summaries come from other hosts through Redis: they are cut to their limits,
    then escape sequences and control characters are stripped and ``secrets`` redacted, before
    anything is printed.
    """

    def __init__(self, out: TextIO, secrets: Sequence[str] = ()) -> None:
        """Print to ``out``."""
        self._out = out
        self._secrets = tuple(secrets)
        self._width = 24

    def header(self, published: Published) -> None:
        """The command, and the hosts expected to answer (``publish``'s ``on_published``)."""
        names = in_order(_shown(host) for host in published.expected)
        self._width = max([self._width, *(len(name) for name in names)])
        self._print(f"command {published.command_id}: {published.op} {' '.join(published.args)}")
        self._print(f"expecting {len(names)} host(s): {', '.join(names) or 'none'}")
        if published.replicated is False:
            self._print(f"warning: {UNREPLICATED} (waited {REPLICA_WAIT_SECONDS:g} s)")
        self._print(f"{'HOST':<{self._width}}  {'STATUS':<8}  {'DURATION':>8}  SUMMARY")

    def row(self, result: HostResult) -> None:
        """One host's answer (``publish``'s ``on_result``)."""
        summary = redact(clean_text(cut_summary(result.summary)), self._secrets)
        lines = summary.splitlines() or [""]
        word = _WORDS[host_status(result, finished=False)]
        duration = f"{result.duration:.2f}s"
        self._print(f"{_shown(result.host):<{self._width}}  {word:<8}  {duration:>8}  {lines[0]}")
        for line in lines[1:]:
            self._print(f"{'':<{self._width}}  {'':<8}  {'':>8}  {line}")

    def footer(self, fleet: FleetResult) -> None:
        """The silent hosts, then "9/12 hosts ok in 30.0 s" and who failed or stayed silent."""
        tally = FleetTally.of_fleet(fleet)
        silent = _WORDS[HostStatus.SILENT]
        for host in tally.unanswered:
            self._print(f"{_shown(host):<{self._width}}  {silent:<8}  {'-':>8}  no answer")
        if not fleet.expected:
            self._print("no hosts alive: no daemon heartbeat found")
        if fleet.ignored:
            ignored = ", ".join(f"{why} {n}" for why, n in sorted(fleet.ignored.items()))
            self._print(f"ignored as untrusted (forged, stale, oversized or unexpected): {ignored}")
        line = ok_sentence(tally, fleet.elapsed)
        if tally.failed:
            line += f"; failed: {', '.join(map(_shown, tally.failed))}"
        if tally.unanswered:
            line += f"; silent: {', '.join(map(_shown, tally.unanswered))}"
        self._print(line)

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)


def _default_requester() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


async def _publish_main(
    args: argparse.Namespace, settings: PublisherSettings, table: LiveTable
) -> FleetResult:
    client = make_redis(settings.redis_url)
    try:
        return await publish(
            client,
            args.op,
            args.args,
            requested_by=args.requested_by or _default_requester(),
            secret=settings.secret,
            timeout=args.timeout,
            ttl=args.ttl,
            on_result=table.row,
            on_published=table.header,
            prefix=settings.prefix,
        )
    finally:
        await client.aclose()


def _cmd_publish(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        settings = PublisherSettings.from_env(env)
    except SettingsError as exc:
        print(f"not published: {exc}", file=sys.stderr)
        return 2
    table = LiveTable(sys.stdout, settings.secrets)
    try:
        fleet = asyncio.run(_publish_main(args, settings, table))
    except redis_errors() as exc:
        detail = redact(str(exc), settings.secrets)
        print(f"not published: Redis unavailable ({detail})", file=sys.stderr)
        return 1
    table.footer(fleet)
    return 0 if fleet.ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.control_ops",
        description="Fleet control over Redis: run the per-host daemon, or publish a command.",
        epilog="Environment: REDIS_URL (redis://… or redis+sentinel://…), OPS_CONTROL_SECRET, "
        "OPS_CONTROL_PREFIX; the daemon also "
        "reads OPS_IDENTITY, OPS_REPO_DIR (the target 'bot'), OPS_PULL_TARGETS (name=/path,...), "
        "OPS_PULL_TIMEOUT, OPS_GIT_ENV_PASSTHROUGH, OPS_RESTART_UNITS, OPS_OWN_UNITS, "
        "OPS_RESTART_DELAY. The wire format: docs/fleet-protocol.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("daemon", help="serve fleet commands on this host until SIGTERM")
    pub = sub.add_parser("publish", help="publish a command and show each host's answer")
    pub.add_argument("op", choices=OPS)
    pub.add_argument("args", nargs="*", help="e.g. the pull target or the unit to restart")
    pub.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_PUBLISH_TIMEOUT,
        help="seconds to wait for answers",
    )
    pub.add_argument(
        "--ttl", type=float, default=DEFAULT_COMMAND_TTL, help="seconds the command stays valid"
    )
    pub.add_argument("--requested-by", default="", help="who asks (default: cli:user@host)")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point of ``python -m core.control_ops``; returns the exit status."""
    args = _parser().parse_args(argv)
    environ = os.environ if env is None else env
    level = logging.getLevelName(environ.get("OPS_LOG_LEVEL", "INFO").strip().upper())
    logging.basicConfig(
        level=level if isinstance(level, int) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "daemon":
        return _cmd_daemon(environ)
    return _cmd_publish(args, environ)
