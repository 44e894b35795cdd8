"""Restart markers: what they say, and where they are kept (Redis, else the state file)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis.asyncio as aioredis

from core.chat.audit import AuditDraft
from core.chat.markers import MARKER_TTL, RestartMarker, RestartMarkers
from tests.support.redis_proc import free_port


def draft(**changes: object) -> AuditDraft:
    fields: dict[str, object] = {
        "invocation": "0123abcd",
        "user_id": 42,
        "user": "alice#0001",
        "user_shown": "alice",
        "guild_id": 7,
        "guild": "Ops",
        "channel_id": 9,
        "channel": "ops",
        "command": "bot_restart",
        "args": (),
        "prefix": "!",
        "started_at": 1_700_000_000.5,
    }
    fields.update(changes)
    return AuditDraft(**fields)


def test_a_marker_survives_its_json_with_its_audit_draft() -> None:
    marker = RestartMarker(
        channel_id=9,
        message_id=11,
        requested_at=1_700_000_001.0,
        guild_id=7,
        requester_id=42,
        requester="alice#0001",
        commit="1a2b3c4",
        unit="bot.service",
        audit=draft(args=("***",)),
    )
    stored = json.loads(json.dumps(marker.to_json()))
    assert RestartMarker.from_json(stored) == marker
    assert stored["audit"]["args"] == ["***"]
    assert RestartMarker.from_json({**stored, "audit": None}) == RestartMarker(
        **{**marker.__dict__, "audit": None}
    )


def test_a_marker_without_where_or_when_is_none_and_a_bad_draft_is_dropped() -> None:
    good = {"channel_id": 9, "message_id": 11, "requested_at": 5.0}
    assert RestartMarker.from_json(good) == RestartMarker(
        channel_id=9, message_id=11, requested_at=5.0
    )
    for missing in good:
        assert RestartMarker.from_json({k: v for k, v in good.items() if k != missing}) is None
    assert RestartMarker.from_json({**good, "channel_id": "general"}) is None
    # A draft that is not one does not cost the notice.
    marker = RestartMarker.from_json({**good, "audit": {"user_id": "x"}})
    assert marker is not None
    assert marker.audit is None


def test_an_audit_draft_rejects_what_it_did_not_write() -> None:
    data = draft().to_json()
    assert AuditDraft.from_json(data) == draft()
    assert AuditDraft.from_json(None) is None
    assert AuditDraft.from_json([]) is None
    assert AuditDraft.from_json({**data, "args": "rm -rf"}) is None
    assert AuditDraft.from_json({**data, "args": [1]}) is None
    assert AuditDraft.from_json({k: v for k, v in data.items() if k != "invocation"}) is None
    assert AuditDraft.from_json({**data, "guild_id": None, "guild": None}) == draft(
        guild_id=None, guild=None
    )


async def test_markers_live_in_redis_with_a_ttl_and_are_taken_once(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    markers = RestartMarkers(redis=redis_client, key=f"{key_prefix}:m", path=tmp_path / "m.json")
    await markers.save({"requested_at": 1.0, "channel_id": 9})
    assert 0 < await redis_client.ttl(f"{key_prefix}:m") <= MARKER_TTL
    assert not markers.path.exists()
    assert await markers.take() == {"requested_at": 1.0, "channel_id": 9}
    assert await markers.take() is None


async def test_markers_fall_back_to_the_state_file_and_the_newest_wins(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    dead = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5, socket_connect_timeout=0.5
    )
    path = tmp_path / "state" / "marker.json"
    try:
        fallback = RestartMarkers(redis=dead, key=f"{key_prefix}:m", path=path)
        await fallback.save({"requested_at": time.time(), "n": "file"})
        assert json.loads(path.read_text())["n"] == "file"
        assert await fallback.take() is not None  # Redis fails, the file answers
        assert not path.exists()
    finally:
        await dead.aclose()

    markers = RestartMarkers(redis=redis_client, key=f"{key_prefix}:m", path=path)
    path.write_text(json.dumps({"requested_at": 1.0, "n": "old file"}))
    await markers.save({"requested_at": 2.0, "n": "redis"})
    assert (await markers.take() or {})["n"] == "redis"
    assert not path.exists()  # both are gone: one restart, one notice


async def test_discard_forgets_the_marker_everywhere(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    markers = RestartMarkers(redis=redis_client, key=f"{key_prefix}:m", path=tmp_path / "m.json")
    markers.path.write_text("{}")
    await markers.save({"requested_at": 1.0})
    await markers.discard()
    assert await redis_client.exists(f"{key_prefix}:m") == 0
    assert not markers.path.exists()
    # A garbled file is no marker.
    markers.path.write_text("not json")
    await redis_client.set(f"{key_prefix}:m", "[1, 2]")
    assert await markers.take() is None
