"""The restart marker: the note ``!bot_restart`` leaves for the process that comes back.

:class:`RestartMarkers` stores one JSON object, in Redis when a client and a signing key are
given (with the state file as a fallback when Redis fails), else in the state file (0600, in
the 0700 state dir). :class:`RestartMarker` is what the object says: where to post "back
online", which commit ran before, and, when the restart was asked of systemd, the invocation's
audit draft (the next process writes its one record).

Redis is a shared notice board: anyone who can write to it could leave a marker. So a marker
in Redis is signed (HMAC-SHA256 with a key derived from the bot's token, see
:func:`marker_key`, over the key it is stored under and its exact text); an unsigned or
wrongly signed one is logged and dropped. Every marker, wherever it was read, is then checked
field by field (:meth:`RestartMarker.from_json`), and one that is not newer than the last
marker this host took (kept in the state dir) is a replay and is dropped too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis

from core.chat.audit import AuditDraft
from core.chat.fields import commit_or_none, finite_number, snowflake
from core.ops_exec import (
    as_text,
    atomic_write_json,
    bounded,
    read_json_file,
    redis_errors,
    validate_unit_name,
)

__all__ = [
    "MARKER_MAX_AGE",
    "MARKER_MAX_BYTES",
    "MARKER_TTL",
    "RestartMarker",
    "RestartMarkers",
    "marker_key",
]

log = logging.getLogger("cogs.admin_ops.markers")

#: A restart marker older than this is stale: a "back online" notice would only confuse.
MARKER_MAX_AGE: Final = 600.0
#: How long Redis keeps a marker; longer than MARKER_MAX_AGE so a stale one is seen and logged.
MARKER_TTL: Final = 3600
#: A stored marker longer than this is not one of ours: it is dropped before it is parsed.
MARKER_MAX_BYTES: Final = 64 * 1024
#: What the marker key is derived for, so the same token keys nothing else the same way.
_KEY_PURPOSE: Final = b"admin-ops restart marker v1"
_MODES: Final = ("systemd", "exit")


def marker_key(secret: str) -> bytes:
    """The key that signs restart markers, derived from ``secret`` (the bot's token)."""
    return hmac.new(secret.encode(), _KEY_PURPOSE, hashlib.sha256).digest()


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
        """The marker ``data`` describes, or None when any field is not as this bot writes it.

        IDs must be Discord IDs and times finite numbers; a commit that is not 4 to 40 hex
        digits is left out (never shown); a draft that is not one is left out (the notice
        still goes, the record does not).
        """
        try:
            optional_id = _optional_id(data)
            mode = data.get("mode", "systemd")
            if mode not in _MODES:
                return None
            requester = data.get("requester", "?")
            if not isinstance(requester, str):
                return None
            marker = cls(
                channel_id=snowflake(data["channel_id"]),
                message_id=snowflake(data["message_id"]),
                requested_at=finite_number(data["requested_at"]),
                guild_id=optional_id("guild_id"),
                requester_id=optional_id("requester_id"),
                requester=requester[:100],
                commit=commit_or_none(data.get("commit")),
                unit=_unit_or_none(data.get("unit")),
                mode=str(mode),
                audit=AuditDraft.from_json(data.get("audit")),
            )
        except (KeyError, ValueError):
            return None
        if data.get("audit") is not None and marker.audit is None:
            # The draft did not survive its checks: the record is still written, from ids.
            return marker.with_standing_in_draft()
        return marker

    def with_standing_in_draft(self) -> RestartMarker:
        """This marker with a draft made of its own checked ids (none without a requester)."""
        if self.requester_id is None:
            return self
        # Ids only: the free text of a marker that failed its checks is not repeated anywhere.
        draft = AuditDraft.standing_in(
            command="bot_restart",
            user_id=self.requester_id,
            user=f"user {self.requester_id}",
            guild_id=self.guild_id,
            channel_id=self.channel_id,
            started_at=self.requested_at,
        )
        return dataclasses.replace(self, audit=draft)


def _optional_id(data: Mapping[str, Any]) -> Callable[[str], int | None]:
    def read(name: str) -> int | None:
        value = data.get(name)
        return None if value is None else snowflake(value)

    return read


def _unit_or_none(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return validate_unit_name(value)
    except ValueError:
        return None


def _requested_at(marker: Mapping[str, Any]) -> float:
    value = marker.get("requested_at", 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


class RestartMarkers:
    """Where ``!bot_restart`` leaves a note for the next process to say "back online".

    In Redis, signed, when a client and a key are given (with the state file as a fallback
    when Redis fails), else in the state file.
    """

    def __init__(
        self,
        *,
        redis: aioredis.Redis | None,
        key: str,
        path: Path,
        signing_key: Callable[[], bytes | None] = lambda: None,
        seen_path: Path | None = None,
    ) -> None:
        """Keep the marker under ``key`` in Redis, or in ``path``.

        ``signing_key`` is asked at each use (the bot's token is known once it logged in);
        without a key, Redis is not used for markers. ``seen_path`` keeps when the last marker
        taken was written, so an old one put back is not taken again.
        """
        self.redis = redis
        self.key = key
        self.path = path
        self.signing_key = signing_key
        self.seen_path = seen_path

    def sealed(self, marker: Mapping[str, Any]) -> str | None:
        """``marker`` as it is stored in Redis (signed); None without a signing key."""
        secret = self.signing_key()
        if secret is None:
            return None
        payload = json.dumps(dict(marker), sort_keys=True)
        return json.dumps({"payload": payload, "sig": self._signature(secret, payload)})

    def _signature(self, secret: bytes, payload: str) -> str:
        # The key name is signed too: a marker copied from another host's key is not ours.
        message = f"{self.key}\n{payload}".encode()
        return hmac.new(secret, message, hashlib.sha256).hexdigest()

    def _opened(self, raw: object) -> object:
        """The marker in a stored Redis value; None when it is not one this bot signed.

        Raises ValueError (or RecursionError) for text that is not JSON.
        """
        text = as_text(raw)
        secret = self.signing_key()
        if secret is None or len(text) > MARKER_MAX_BYTES:
            return None
        sealed = json.loads(text)
        if not isinstance(sealed, dict):
            return None
        payload, signature = sealed.get("payload"), sealed.get("sig")
        if not isinstance(payload, str) or not isinstance(signature, str):
            return None
        if not hmac.compare_digest(self._signature(secret, payload), signature):
            return None
        return json.loads(payload)

    async def save(self, marker: Mapping[str, Any]) -> None:
        """Record ``marker``; a failure is logged, never raised (the restart goes ahead)."""
        sealed = self.sealed(marker) if self.redis is not None else None
        if self.redis is not None and sealed is not None:
            try:
                await bounded(self.redis.set(self.key, sealed, ex=MARKER_TTL))
                return
            except redis_errors() as exc:
                log.warning("restart marker: Redis unavailable (%s); using %s", exc, self.path)
        try:
            await asyncio.to_thread(atomic_write_json, self.path, dict(marker))
        except OSError as exc:
            log.warning("restart marker: cannot write %s: %s", self.path, exc)

    async def take(self) -> dict[str, Any] | None:
        """Read and delete the marker, wherever it is; None when there is none (or no good one).

        The newest wins. Its fields are checked by the caller (:meth:`RestartMarker.from_json`).
        """
        found = [m for m in (await self._from_redis(), await self._from_file()) if m is not None]
        if not found:
            return None
        newest = max(found, key=_requested_at)
        if not await self._is_new(newest):
            return None
        return newest

    async def _from_redis(self) -> dict[str, Any] | None:
        if self.redis is None or self.signing_key() is None:
            return None  # no key, no markers in Redis: none was written there
        try:
            raw = await bounded(self.redis.getdel(self.key))
        except redis_errors() as exc:
            log.warning("restart marker: cannot read it from Redis: %s", exc)
            return None
        if raw is None:
            return None
        try:
            data = self._opened(raw)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            data = None
        if not isinstance(data, dict):
            # Read once per start, so this line cannot flood the log. Its text is not logged:
            # it is whatever a Redis writer wanted in our log.
            log.warning("restart marker in Redis is unsigned or wrongly signed: dropped")
            return None
        return data

    async def _from_file(self) -> dict[str, Any] | None:
        data = await asyncio.to_thread(read_json_file, self.path)
        if data is None:
            return None
        self._unlink()
        if not isinstance(data, dict):
            log.warning("restart marker in %s is not an object: dropped", self.path)
            return None
        return data

    async def _is_new(self, marker: Mapping[str, Any]) -> bool:
        """Whether ``marker`` is newer than the last one taken here (and remember it if so)."""
        if self.seen_path is None:
            return True
        at = _requested_at(marker)
        seen = await asyncio.to_thread(read_json_file, self.seen_path)
        last = _requested_at(seen) if isinstance(seen, dict) else 0.0
        if at <= last:
            log.warning("restart marker is not newer than the last one taken: a replay, dropped")
            return False
        try:
            await asyncio.to_thread(atomic_write_json, self.seen_path, {"requested_at": at})
        except OSError as exc:
            log.warning("restart marker: cannot write %s: %s", self.seen_path, exc)
        return True

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
