"""How a daemon tells the fleet it is there: its consumer group, then its heartbeat.

A publisher counts a daemon as expected only while its heartbeat key exists, and relies on the
daemon's consumer group existing by then (else the command would never reach it). So the group
is always created before, or in the same pipeline as, the heartbeat; a clean stop deletes the
heartbeat and leaves the index at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from redis.exceptions import ResponseError

from core.control_ops.wire import HEARTBEAT_TTL, heartbeat_value
from core.names import Keys
from core.ops_exec import bounded, redis_errors

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["Presence", "describe"]

log = logging.getLogger("admin_ops.control_ops")

# How long the clean stop may spend deleting the heartbeat.
_GOODBYE_SECONDS: Final = 2.0
# The shortest refresh period, whatever the TTL (tests use tiny ones).
_MIN_REFRESH: Final = 0.05


def _is_busy_group(error: BaseException) -> bool:
    """The group exists already: what XGROUP CREATE answers on every later start."""
    return isinstance(error, ResponseError) and "BUSYGROUP" in str(error)


# A heartbeat's free-text fields are cut to this many characters, its name lists to this many
# characters of JSON each: the signed value always stays below HEARTBEAT_VALUE_LIMIT.
_TEXT_WIDTH: Final = 64
_LIST_WIDTH: Final = 1024


def _names_json(names: Iterable[str]) -> str:
    """Sorted ``names`` as a compact JSON array, as many as fit in _LIST_WIDTH characters."""
    kept: list[str] = []
    for name in sorted(names):
        if len(json.dumps([*kept, name], separators=(",", ":"))) > _LIST_WIDTH:
            break  # informational only: the rest is left out rather than the heartbeat refused
        kept.append(name)
    return json.dumps(kept, separators=(",", ":"))


def describe(
    identity: str,
    *,
    version: str,
    started_at: float,
    pull_targets: Iterable[str],
    restart_units: Iterable[str],
) -> dict[str, str]:
    """A heartbeat's fields but its time: who the daemon is and what it may do, all text."""
    return {
        "identity": identity,
        "hostname": socket.gethostname()[:_TEXT_WIDTH],
        "pid": str(os.getpid()),
        "version": version[:_TEXT_WIDTH],
        "started_at": repr(started_at),
        "pull_targets": _names_json(pull_targets),
        "restart_units": _names_json(restart_units),
    }


class Presence:
    """One daemon's consumer group and heartbeat on the command stream of ``keys``.

    The group is named after the identity (every daemon sees every command) and has one
    consumer, the identity again. ``description`` gives the heartbeat's fields (see
    :func:`describe`); each beat adds the time it is sent and signs them with ``secret``, so
    a publisher believes only a heartbeat this daemon wrote, and only for a short while.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        identity: str,
        *,
        ttl: float,
        call_timeout: float,
        description: Callable[[], dict[str, str]],
        secret: str,
    ) -> None:
        """Nothing is written until :meth:`beat`."""
        self._redis = redis
        self._keys = keys
        self.identity = identity
        self._ttl = ttl
        self._call_timeout = call_timeout
        self._description = description
        self._secret = secret

    async def ensure_group(self) -> None:
        """Create this identity's group unless it exists.

        It starts at ``$``: a new identity never replays history. MKSTREAM: it needs no stream.
        """
        try:
            await bounded(self._create_group(self._redis), self._call_timeout)
        except ResponseError as exc:
            if not _is_busy_group(exc):
                raise

    def _create_group(self, target: Any) -> Any:
        return target.xgroup_create(self._keys.commands, self.identity, id="$", mkstream=True)

    async def beat(self) -> None:
        """Write the heartbeat (and the group first, and the index entry) in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        # The group first: after a Redis restart the heartbeat may come back before the serve
        # loop notices, and a publisher that sees the heartbeat relies on the group existing.
        self._create_group(pipe)
        fields = {**self._description(), "sent_at": repr(time.time())}
        value = heartbeat_value(fields, self._secret, self._keys.prefix)
        pipe.set(self._keys.heartbeat(self.identity), value, px=int(self._ttl * 1000))
        pipe.sadd(self._keys.hosts_index, self.identity)
        replies = await bounded(pipe.execute(raise_on_error=False), self._call_timeout)
        for reply in replies:
            if isinstance(reply, Exception) and not _is_busy_group(reply):
                raise reply

    async def keep_beating(self, serving: asyncio.Event) -> None:
        """Refresh the heartbeat well inside its TTL while ``serving`` is set; until cancelled."""
        # Publishers believe a heartbeat sent at most HEARTBEAT_TTL (plus the clock skew) ago:
        # a longer TTL of our own must not space the refreshes further apart than that allows.
        interval = max(_MIN_REFRESH, min(self._ttl, HEARTBEAT_TTL) / 3)
        while True:
            # A period, not synchronisation.
            await asyncio.sleep(interval)
            if not serving.is_set():
                continue
            try:
                await self.beat()
            except redis_errors() as exc:
                # The serve loop notices and logs the outage; this only keeps trying.
                log.debug("heartbeat of %s failed: %s", self.identity, exc)

    async def leave(self) -> None:
        """A clean stop: publishers stop expecting this host at once."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(self._keys.heartbeat(self.identity))
            pipe.srem(self._keys.hosts_index, self.identity)
            # Not bounded(): this runs while the task is being cancelled, on purpose.
            async with asyncio.timeout(_GOODBYE_SECONDS):
                await pipe.execute()
        except redis_errors() as exc:
            log.warning("could not delete the heartbeat of %s: %s", self.identity, exc)
