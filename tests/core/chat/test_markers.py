"""Restart markers: what they say, and where they are kept (Redis, else the state file)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from core.chat.audit import AuditDraft
from core.chat.markers import (
    MARKER_MAX_BYTES,
    MARKER_TTL,
    RestartMarker,
    RestartMarkers,
    marker_key,
)
from tests.support.redis_proc import free_port


def signing_key() -> bytes:
    """The key the markers sign with (asked for at each use, as the cog's is)."""
    return marker_key("test-bot-token-value-0123456789")


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
    markers = RestartMarkers(
        redis=redis_client, key=f"{key_prefix}:m", path=tmp_path / "m.json", signing_key=signing_key
    )
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
        fallback = RestartMarkers(
            redis=dead, key=f"{key_prefix}:m", path=path, signing_key=signing_key
        )
        await fallback.save({"requested_at": time.time(), "n": "file"})
        assert json.loads(path.read_text())["n"] == "file"
        assert await fallback.take() is not None  # Redis fails, the file answers
        assert not path.exists()
    finally:
        await dead.aclose()

    markers = RestartMarkers(
        redis=redis_client, key=f"{key_prefix}:m", path=path, signing_key=signing_key
    )
    path.write_text(json.dumps({"requested_at": 1.0, "n": "old file"}))
    await markers.save({"requested_at": 2.0, "n": "redis"})
    assert (await markers.take() or {})["n"] == "redis"
    assert not path.exists()  # both are gone: one restart, one notice


async def test_discard_forgets_the_marker_everywhere(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    markers = RestartMarkers(
        redis=redis_client, key=f"{key_prefix}:m", path=tmp_path / "m.json", signing_key=signing_key
    )
    markers.path.write_text("{}")
    await markers.save({"requested_at": 1.0})
    await markers.discard()
    assert await redis_client.exists(f"{key_prefix}:m") == 0
    assert not markers.path.exists()
    # A garbled file is no marker.
    markers.path.write_text("not json")
    await redis_client.set(f"{key_prefix}:m", "[1, 2]")
    assert await markers.take() is None


# --------------------------------------------------------------------------------------------
# What a Redis writer cannot do with a marker
# --------------------------------------------------------------------------------------------

GOOD = {"channel_id": 9, "message_id": 11, "requested_at": 1_700_000_001.0}


def test_every_field_is_checked_not_converted() -> None:
    """Numbers as text, booleans, NaN and infinities, oversized IDs: not a marker this bot wrote."""
    assert RestartMarker.from_json(GOOD) is not None
    for field, bad in [
        ("channel_id", "9"),
        ("channel_id", 9.0),
        ("channel_id", True),
        ("channel_id", 0),
        ("channel_id", -9),
        ("channel_id", 2**64),
        ("message_id", "11"),
        ("message_id", None),
        ("requested_at", "1700000001"),
        ("requested_at", float("nan")),
        ("requested_at", float("inf")),
        ("requested_at", True),
        ("guild_id", "7"),
        ("requester_id", 1.5),
        ("requester", 42),
        ("mode", "shell"),
    ]:
        assert RestartMarker.from_json({**GOOD, field: bad}) is None, (field, bad)


def test_only_a_hex_commit_and_a_valid_unit_are_kept() -> None:
    def commit(value: object) -> object:
        marker = RestartMarker.from_json({**GOOD, "commit": value})
        assert marker is not None
        return marker.commit

    assert commit("1a2b3c4") == "1a2b3c4"
    assert commit("0" * 40) == "0" * 40
    for bad in ["abc", "0" * 41, "# Heading", "[click](https://evil.example)", "1a2b 3c4", 1234567]:
        assert commit(bad) is None, bad
    marker = RestartMarker.from_json({**GOOD, "unit": "-H evil"})
    assert marker is not None
    assert marker.unit is None


def test_a_forged_draft_is_not_a_draft() -> None:
    data = draft().to_json()
    for field, bad in [
        ("command", "rm -rf"),
        ("user_id", "42"),
        ("user_id", True),
        ("invocation", "not hex!"),
        ("started_at", float("nan")),
        ("args", ["x"] * 100),
        ("args", ["x" * 5000]),
        ("user_shown", "x" * 10_000),
        ("prefix", None),
    ]:
        assert AuditDraft.from_json({**data, field: bad}) is None, (field, bad)


async def test_an_unsigned_or_wrongly_signed_marker_in_redis_is_dropped(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"{key_prefix}:m"
    markers = RestartMarkers(
        redis=redis_client, key=key, path=tmp_path / "m.json", signing_key=signing_key
    )
    forged = {**GOOD, "requested_at": time.time()}
    other_key = RestartMarkers(
        redis=redis_client, key=key, path=tmp_path / "m.json", signing_key=lambda: b"x" * 32
    )
    elsewhere = RestartMarkers(
        redis=redis_client,
        key=f"{key_prefix}:other",
        path=tmp_path / "m.json",
        signing_key=signing_key,
    )
    sealed = json.loads(markers.sealed(forged) or "")
    tampered = json.dumps({**sealed, "payload": sealed["payload"].replace("11", "12")})
    for stored in [
        json.dumps(forged),  # the old, unsigned format
        other_key.sealed(forged),  # signed with another key
        elsewhere.sealed(forged),  # signed for another host's key
        tampered,
        json.dumps({"payload": sealed["payload"]}),
        "[" * 50_000,  # deeper than the JSON parser goes
        "x" * (MARKER_MAX_BYTES + 1),
    ]:
        assert stored is not None
        await redis_client.set(key, stored)
        with caplog.at_level(logging.WARNING, logger="cogs.admin_ops"):
            assert await markers.take() is None
        assert "unsigned or wrongly signed: dropped" in caplog.text
        caplog.clear()
    await redis_client.set(key, markers.sealed(forged) or "")
    assert await markers.take() == forged


async def test_without_a_key_markers_stay_out_of_redis(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    key = f"{key_prefix}:m"
    markers = RestartMarkers(redis=redis_client, key=key, path=tmp_path / "m.json")
    await markers.save(GOOD)
    assert await redis_client.exists(key) == 0
    assert json.loads(markers.path.read_text()) == GOOD
    assert markers.path.stat().st_mode & 0o777 == 0o600
    # Nothing in Redis is read either: no key signed it.
    await redis_client.set(key, json.dumps({**GOOD, "requested_at": time.time()}))
    assert await markers.take() == GOOD


async def test_a_marker_put_back_after_it_was_taken_is_a_replay(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    key = f"{key_prefix}:m"
    markers = RestartMarkers(
        redis=redis_client,
        key=key,
        path=tmp_path / "m.json",
        signing_key=signing_key,
        seen_path=tmp_path / "seen.json",
    )
    await markers.save(GOOD)
    captured = await redis_client.get(key)
    assert await markers.take() == GOOD
    await redis_client.set(key, captured or b"")
    assert await markers.take() is None
    # The next restart's marker is newer, and is taken.
    newer = {**GOOD, "requested_at": GOOD["requested_at"] + 60}
    await markers.save(newer)
    assert await markers.take() == newer


class _Person:
    def __init__(self, name: str) -> None:
        self.id = 42
        self.name = name
        self.display_name = name

    def __str__(self) -> str:
        return self.name


@given(
    name=st.text(max_size=300),
    place=st.text(max_size=300),
    prefix=st.text(max_size=80),
    args=st.lists(st.text(max_size=3000), max_size=12),
)
def test_a_draft_always_survives_being_stored(
    name: str, place: str, prefix: str, args: list[str]
) -> None:
    # A draft the next process cannot read back would leave a self-restart with no record:
    # whatever Discord lets a name, a thread or a prefix be, the stored draft is accepted.
    ctx = SimpleNamespace(
        guild=SimpleNamespace(id=7, name=place),
        author=_Person(name),
        channel=SimpleNamespace(id=9, name=place),
        clean_prefix=prefix,
    )
    made = AuditDraft.of(ctx, "bot_restart", args, lambda text: text)  # type: ignore[arg-type]
    assert AuditDraft.from_json(json.loads(json.dumps(made.to_json()))) == made


def test_a_draft_that_fails_its_checks_is_recorded_from_the_markers_ids() -> None:
    good = {
        "channel_id": 9,
        "message_id": 11,
        "requested_at": 5.0,
        "guild_id": 7,
        "requester_id": 42,
        "requester": "alice",
    }
    marker = RestartMarker.from_json({**good, "audit": {"user_id": "x"}})
    assert marker is not None
    assert marker.audit is not None
    assert (marker.audit.user_id, marker.audit.user, marker.audit.command) == (
        42,
        "user 42",
        "bot_restart",
    )
    assert (marker.audit.channel_id, marker.audit.guild_id) == (9, 7)
