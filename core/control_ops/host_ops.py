"""What a control daemon does on its host for each op: ping, status, pull and restart.

Every op acts through the hardened primitives of :mod:`core.ops_exec` and only on what this
host's allow-list names; the answer is an :class:`Outcome`, decided from typed results.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Final, NamedTuple

from core.control_ops.host_state import RestartRecord
from core.control_ops.wire import NOT_ALLOWED
from core.env_reader import DEFAULT_RESTART_MIN_INTERVAL
from core.names import DEFAULT_TARGET, target_name
from core.ops_exec import (
    UnitRestartLock,
    git_head,
    pull_checkout,
    pull_lock_ttl,
    request_restart,
    restart_unit,
    unit_restart_lock,
    unit_started_ago,
    unit_state,
    validate_unit_name,
)
from core.text import format_duration

__all__ = ["DEFAULT_PULL_TIMEOUT", "HostOps", "Outcome", "Refused", "project_version"]

log = logging.getLogger("admin_ops.control_ops")

#: Seconds a pull may take before git is stopped, when no ``pull_timeout`` is given.
DEFAULT_PULL_TIMEOUT: Final = 60.0
# is-active says one word; when systemctl cannot tell, the reason may be long: keep one line.
_UNIT_STATE_WIDTH: Final = 80


class Outcome(NamedTuple):
    """What an op decided; ``after`` runs only once the answer is written and acknowledged."""

    ok: bool
    ran: bool
    summary: str
    after: Callable[[], Awaitable[None]] | None = None


class Refused(Exception):
    """An op's way to answer without running anything; ``str(exc)`` is the summary."""


@cache
def project_version() -> str:
    """admin-ops' version: installed metadata, else the checkout's pyproject.toml."""
    try:
        return importlib.metadata.version("admin-ops")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _host_uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pull_targets(targets: Mapping[str, str | os.PathLike[str]]) -> dict[str, str]:
    """Target names checked against the one grammar (and lower-cased), paths made absolute."""
    checked: dict[str, str] = {}
    for name, path in targets.items():
        normal = target_name(name)
        if normal is None or normal in checked:
            raise ValueError(f"invalid or repeated pull target name {name!r}")
        checked[normal] = os.path.abspath(path)
    return checked


class HostOps:
    """The ops one daemon serves, limited to its allow-list.

    ``pull_targets`` maps target names to checkouts; ``restart_units`` lists the units this host
    may restart; ``own_units`` those among them that are restarted deferred (the daemon's own
    unit or its co-located bot's): it grants nothing by itself. ``redis`` dedupes pulls of one
    checkout across services; ``identity`` names this daemon as the holder of that lock.

    A unit restarted less than ``restart_min_interval`` seconds ago is not restarted again:
    systemd's last start of the unit counts (whoever caused it), and so do this daemon's own
    restarts, recorded in ``restarts`` (deferred ones included) before systemctl runs. With
    ``lock_dir``, the check and the record happen under the host-wide lock on the unit
    (:func:`core.ops_exec.unit_restart_lock`) that the bot takes too, and a restart reserved
    there by any process on the host counts as well: two processes never both pass the check.
    """

    def __init__(
        self,
        *,
        identity: str,
        redis: Any,
        pull_targets: Mapping[str, str | os.PathLike[str]],
        restart_units: Iterable[str],
        own_units: Iterable[str] = (),
        pull_timeout: float = DEFAULT_PULL_TIMEOUT,
        env_passthrough: Iterable[str] = (),
        restart_delay: float = 1.0,
        restart_min_interval: float = DEFAULT_RESTART_MIN_INTERVAL,
        restarts: RestartRecord | None = None,
        secrets: Iterable[str] = (),
        lock_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Validate the allow-list; raise ValueError on a bad target name or unit."""
        self.identity = identity
        self.redis = redis
        self.pull_targets = _pull_targets(pull_targets)
        # Normalised once, so "bot" in the allow-list matches a request for "bot.service".
        self.restart_units: frozenset[str] = frozenset(map(validate_unit_name, restart_units))
        self.own_units: frozenset[str] = frozenset(map(validate_unit_name, own_units))
        self.pull_timeout = pull_timeout
        self.env_passthrough = tuple(env_passthrough)
        self.restart_delay = restart_delay
        self.restart_min_interval = restart_min_interval
        self.restarts = restarts
        self.lock_dir = lock_dir
        self.secrets = tuple(secrets)
        self.started_at = time.time()
        self._ops: dict[str, Callable[[tuple[str, ...]], Awaitable[Outcome]]] = {
            "ping": self._ping,
            "status": self._status,
            "pull": self._pull,
            "restart": self._restart,
        }

    def knows(self, op: str) -> bool:
        """Whether ``op`` is one this daemon serves."""
        return op in self._ops

    async def run(self, op: str, args: tuple[str, ...]) -> Outcome:
        """Run a known ``op``; :class:`Refused` when its arguments or the allow-list say no."""
        return await self._ops[op](args)

    async def _ping(self, args: tuple[str, ...]) -> Outcome:
        if args:
            raise Refused("refused: bad arguments (ping takes none)")
        return Outcome(True, True, "pong")

    async def _status(self, args: tuple[str, ...]) -> Outcome:
        if args:
            raise Refused("refused: bad arguments (status takes none)")
        units = sorted(self.restart_units)
        heads, states = await asyncio.gather(
            asyncio.gather(*(git_head(path) for path in self.pull_targets.values())),
            asyncio.gather(*(unit_state(unit) for unit in units)),
        )
        first = f"admin-ops {project_version()}, daemon up {self._uptime()}"
        host_up = _host_uptime()
        if host_up is not None:
            first += f", host up {format_duration(host_up)}"
        lines = [first]
        if self.pull_targets:
            commits = (
                f"{name} {head or '(no commit)'}"
                for name, head in zip(self.pull_targets, heads, strict=True)
            )
            lines.append("targets: " + ", ".join(commits))
        if units:
            shown = (
                f"{unit} {(str(state).splitlines() or ['unknown'])[0][:_UNIT_STATE_WIDTH]}"
                for unit, state in zip(units, states, strict=True)
            )
            lines.append("units: " + ", ".join(shown))
        return Outcome(True, True, "\n".join(lines))

    def _uptime(self) -> str:
        return format_duration(time.time() - self.started_at)

    async def _pull(self, args: tuple[str, ...]) -> Outcome:
        if len(args) > 1:
            raise Refused("refused: bad arguments (pull takes one target)")
        name = target_name(args[0]) if args else DEFAULT_TARGET
        path = self.pull_targets.get(name) if name is not None else None
        if path is None:
            raise Refused(NOT_ALLOWED)
        # The identity names the holder in the dedupe lock, so a co-located daemon's skip
        # message says who is pulling.
        pulled = await pull_checkout(
            path,
            redis=self.redis,
            dedupe=True,
            lock_ttl=pull_lock_ttl(self.pull_timeout),
            instance_id=self.identity,
            timeout=self.pull_timeout,
            env_passthrough=self.env_passthrough,
            secrets=self.secrets,
        )
        if pulled.updated:
            log.info("pulled %s: %s → %s", name, pulled.head_before, pulled.head_after)
        return Outcome(pulled.ok, pulled.ran, pulled.summary)

    async def _restart(self, args: tuple[str, ...]) -> Outcome:
        if len(args) != 1:
            raise Refused("refused: bad arguments (restart takes one unit)")
        try:
            unit = validate_unit_name(args[0])
        except ValueError:
            raise Refused(NOT_ALLOWED) from None
        if unit not in self.restart_units:
            raise Refused(NOT_ALLOWED)
        await self._limit_restarts(unit)
        if unit in self.own_units:
            # Restarting our own unit synchronously would deadlock (systemd waits for us to stop
            # while we wait for systemctl), and once it happens nobody is left to answer:
            # answer first, then ask systemd for a non-blocking restart.
            return Outcome(
                True,
                True,
                f"restarting {unit} (this host's own unit: deferred until after this answer)",
                after=lambda: self._restart_self(unit),
            )
        restarted = await restart_unit(unit, secrets=self.secrets)
        # systemctl ran either way: "ran" says the host acted on the request, "ok" how it went.
        return Outcome(restarted.ok, True, restarted.summary)

    async def _limit_restarts(self, unit: str) -> None:
        """Refuse a restart too soon after the last one; else record this one, durably.

        systemd's timestamp counts every start of the unit on this host; this daemon's record
        also counts a deferred restart not yet carried out and a restart that left the unit
        failed (neither moves systemd's timestamp). The sooner of the two decides.
        """
        if self.restart_min_interval <= 0:
            return
        if self.lock_dir is None:
            await self._check_and_note(unit, None)
            return
        try:
            async with unit_restart_lock(self.lock_dir, unit) as lock:
                await self._check_and_note(unit, lock)
        except TimeoutError as exc:
            raise Refused(f"refused: {exc}") from None
        except OSError as exc:
            # An unusable or unsafe lock (UnsafeLockError: a symlink, o+w...) refuses: run
            # unlocked, the restart could follow another process's within the interval.
            log.error("cannot take the restart lock of %s: %s", unit, exc)
            reason = exc.strerror or str(exc)
            raise Refused(f"failed: cannot take the restart lock on this host ({reason})") from None

    async def _check_and_note(self, unit: str, lock: UnitRestartLock | None) -> None:
        """Refuse if ``unit`` (re)started too recently by any count; else record this restart."""
        known = [await unit_started_ago(unit)]
        if self.restarts is not None:
            known.append(await asyncio.to_thread(self.restarts.seconds_since, unit))
        if lock is not None:
            known.append(lock.reserved_ago())
        ago = min((seconds for seconds in known if seconds is not None), default=None)
        if ago is not None and ago < self.restart_min_interval:
            raise Refused(f"refused: restarted {int(ago)} s ago")
        if lock is not None:
            lock.reserve()
        if self.restarts is not None:
            try:
                await asyncio.to_thread(self.restarts.note, unit, self.restart_units)
            except OSError as exc:
                # Unrecorded, a deferred restart could be repeated at once: refuse instead.
                log.error("cannot record the restart of %s: %s", unit, exc)
                raise Refused(f"failed: cannot record the restart on this host ({exc})") from None

    async def _restart_self(self, unit: str) -> None:
        requested = await request_restart(unit, delay=self.restart_delay, secrets=self.secrets)
        if requested.ok:
            log.info("deferred restart of %s requested: %s", unit, requested.summary)
        elif requested.timed_out:
            log.warning("deferred restart of %s may still happen: %s", unit, requested.summary)
        else:
            log.error("deferred restart of %s failed: %s", unit, requested.summary)
