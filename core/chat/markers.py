"""The restart marker: the note ``!bot_restart`` leaves for the process that comes back.

:class:`RestartMarkers` stores one JSON object, in Redis when a client is given (with the state
file as a fallback when Redis fails), else in the state file. :class:`RestartMarker` is what the
object says: where to post "back online", which commit ran before, and, when the restart was
asked of systemd, the invocation's audit draft (the next process writes its one record).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis

from core.chat.audit import AuditDraft
from core.ops_exec import atomic_write_json, bounded, read_json_file, redis_errors

__all__ = ["MARKER_MAX_AGE", "MARKER_TTL", "RestartMarker", "RestartMarkers"]

log = logging.getLogger("cogs.admin_ops.markers")

#: A restart marker older than this is stale: a "back online" notice would only confuse.
MARKER_MAX_AGE: Final = 600.0
#: How long Redis keeps a marker; longer than MARKER_MAX_AGE so a stale one is seen and logged.
MARKER_TTL: Final = 3600


@dataclass(frozen=True, kw_only=True)
class RestartMarker:
    """What one ``!bot_restart`` tells the next process."""

    channel_id: int
    #: The ``!bot_restart`` message, which the notice replies to.
    message_id: int
    requested_at: float
    guild_id: int | None = None
    requester_id: int | None = None
    requester: str = "?"
    #: The short commit the process ran before the restart.
    commit: str | None = None
    unit: str | None = None
    mode: str = "systemd"
    #: Present when the next process writes the invocation's audit record.
    audit: AuditDraft | None = None

    def to_json(self) -> dict[str, Any]:
        """The marker as the JSON object that is stored."""
        return {
            "guild_id": self.guild_id,
            "channel_id": self.channel_id,
            "message_id": self.message_id,
            "requester_id": self.requester_id,
            "requester": self.requester,
            "requested_at": self.requested_at,
            "commit": self.commit,
            "unit": self.unit,
            "mode": self.mode,
            "audit": self.audit.to_json() if self.audit is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RestartMarker | None:
        """The marker ``data`` describes, or None when it lacks where to post or when."""
        try:
            requested_at = float(data["requested_at"])
            channel_id = int(data["channel_id"])
            message_id = int(data["message_id"])
            guild_id = data.get("guild_id")
            requester_id = data.get("requester_id")
            commit, unit = data.get("commit"), data.get("unit")
            return cls(
                channel_id=channel_id,
                message_id=message_id,
                requested_at=requested_at,
                guild_id=None if guild_id is None else int(guild_id),
                requester_id=None if requester_id is None else int(requester_id),
                requester=str(data.get("requester", "?")),
                commit=None if commit is None else str(commit),
                unit=None if unit is None else str(unit),
                mode=str(data.get("mode", "systemd")),
                audit=AuditDraft.from_json(data.get("audit")),
            )
        except (KeyError, TypeError, ValueError):
            return None


def _requested_at(marker: Mapping[str, Any]) -> float:
    try:
        value = float(marker.get("requested_at", 0))
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


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

    async def save(self, marker: Mapping[str, Any]) -> None:
        """Record ``marker``; a failure is logged, never raised (the restart goes ahead)."""
        if self.redis is not None:
            try:
                await bounded(self.redis.set(self.key, json.dumps(marker), ex=MARKER_TTL))
                return
            except redis_errors() as exc:
                log.warning("restart marker: Redis unavailable (%s); using %s", exc, self.path)
        try:
            await asyncio.to_thread(atomic_write_json, self.path, dict(marker))
        except OSError as exc:
            log.warning("restart marker: cannot write %s: %s", self.path, exc)

    async def take(self) -> dict[str, Any] | None:
        """Read and delete the marker, wherever it is; None when there is none."""
        found: list[object] = []
        unreadable: tuple[type[BaseException], ...] = (*redis_errors(), ValueError)
        if self.redis is not None:
            try:
                raw = await bounded(self.redis.getdel(self.key))
                if raw is not None:
                    found.append(json.loads(raw))
            except unreadable as exc:
                log.warning("restart marker: cannot read it from Redis: %s", exc)
        data = await asyncio.to_thread(read_json_file, self.path)
        if data is not None:
            found.append(data)
            self._unlink()
        markers = [m for m in found if isinstance(m, dict)]
        return max(markers, key=_requested_at) if markers else None

    async def discard(self) -> None:
        """Delete the marker (the restart it announces did not happen)."""
        # The file first: in a task being cancelled, a bounded Redis call raises once it is done.
        self._unlink()
        if self.redis is not None:
            try:
                await bounded(self.redis.delete(self.key))
            except redis_errors() as exc:
                log.warning("restart marker: cannot delete it from Redis: %s", exc)

    def _unlink(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("restart marker: cannot delete %s: %s", self.path, exc)
