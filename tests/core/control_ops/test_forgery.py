"""Forged hosts and answers: a Redis writer without the secret cannot make a report lie.

Heartbeats and answers are signed by the daemon; a publisher counts a host only while its
heartbeat verifies and is fresh, and believes only verified answers of the hosts it expects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from core.chat.fleet_board import FleetBoard
from core.control_ops import (
    FleetResult,
    HostResult,
    collect,
    heartbeat_key,
    publish,
    publisher,
    verify_heartbeat,
)
from core.control_ops.collect import RateLimitedLog
from core.control_ops.wire import (
    HEARTBEAT_TTL,
    MAX_CLOCK_SKEW,
    Untrusted,
    heartbeat_value,
    result_fields,
)
from tests.support.fleet import (
    DEADLINE,
    SECRET,
    heartbeat_fields,
    make_daemon,
    next_command_id,
    plant_answer,
    plant_heartbeat,
    published_sig,
    serving,
    signed_ghost,
)

OTHER_SECRET = "not-the-fleet-secret"


async def publish_to_board(redis: aioredis.Redis, prefix: str, **options: object) -> FleetBoard:
    """Publish a ping as the chat does: a board fed as hosts answer, then finished."""
    board = FleetBoard(title="📡 Fleet status")
    fleet = await publish(
        redis,
        "ping",
        [],
        requested_by="test",
        secret=SECRET,
        on_published=board.published,
        on_result=board.add,
        prefix=prefix,
        **options,  # type: ignore[arg-type]
    )
    board.finish(fleet)
    return board


def forged_heartbeats(real: str, prefix: str) -> dict[str, str]:
    """What a Redis writer can store as the heartbeat of a host called ``web-2``."""
    now = time.time()
    unsigned = {**heartbeat_fields("web-2"), "sig": ""}
    copied = json.loads(real)  # web-1's real, signed heartbeat, under another name
    tampered = {**copied, "identity": "web-2"}
    return {
        "unsigned, as heartbeats used to be": json.dumps(unsigned),
        "signed with another secret": heartbeat_value(
            heartbeat_fields("web-2"), OTHER_SECRET, prefix
        ),
        "a real heartbeat copied under another name": real,
        "a real heartbeat, renamed": json.dumps(tampered),
        "an old heartbeat replayed": heartbeat_value(
            heartbeat_fields("web-2", sent_at=now - HEARTBEAT_TTL - MAX_CLOCK_SKEW - 5),
            SECRET,
            prefix,
        ),
        "sent in the future": heartbeat_value(
            heartbeat_fields("web-2", sent_at=now + MAX_CLOCK_SKEW + 60), SECRET, prefix
        ),
        "not JSON": "ok",
    }


async def answer_for(redis: aioredis.Redis, prefix: str, host: str, *, secret: str | None) -> None:
    """Wait for the next command and post an "ok" for ``host`` (signed with ``secret``)."""
    command_id = await next_command_id(redis, prefix)
    await plant_answer(
        redis, command_id, prefix, HostResult(host, True, True, "pong", 0.01), secret=secret
    )


@pytest.mark.parametrize(
    "forgery",
    [
        "unsigned, as heartbeats used to be",
        "signed with another secret",
        "a real heartbeat copied under another name",
        "a real heartbeat, renamed",
        "an old heartbeat replayed",
        "sent in the future",
        "not JSON",
    ],
)
async def test_a_host_that_does_not_exist_is_never_counted(
    forgery: str,
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:
    async with serving(make_daemon(new_client(), "web-1", key_prefix)):
        real = (await redis_client.get(heartbeat_key("web-1", key_prefix))).decode()
        await plant_heartbeat(
            redis_client, "web-2", key_prefix, forged_heartbeats(real, key_prefix)[forgery]
        )
        # The writer answers "ok" for its host the moment the command appears; even with the
        # fleet's secret, an answer from a host that was not expected would not count.
        forging = asyncio.create_task(answer_for(redis_client, key_prefix, "web-2", secret=SECRET))
        board = await publish_to_board(redis_client, key_prefix, timeout=DEADLINE)
        await asyncio.wait_for(forging, DEADLINE)
    assert board.fleet is not None
    assert board.fleet.expected == {"web-1"}
    assert set(board.fleet.results) == {"web-1"}
    assert board.footer().startswith("✅ 1/1 hosts ok in "), board.footer()
    assert "web-2" not in board.render()[0]
    heartbeats = {r: n for r, n in board.fleet.ignored.items() if r.startswith("heartbeat: ")}
    assert sum(heartbeats.values()) == 1, board.fleet.ignored


async def test_forged_answers_for_a_real_host_are_ignored(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    # web-1 is real (a stand-in that holds the secret) and refuses; before its answer arrives,
    # a Redis writer posts "ok" for it in every way it can.
    await signed_ghost(redis_client, "web-1", key_prefix)
    refused = HostResult("web-1", False, False, "refused: not allowed on this host", 0.01)
    ok = HostResult("web-1", True, True, "restarted sshd.service", 0.01)

    async def host_and_forger() -> None:
        command_id = await next_command_id(redis_client, key_prefix)
        sig = await published_sig(redis_client, command_id, key_prefix)
        await plant_answer(redis_client, command_id, key_prefix, ok, secret=None)
        await plant_answer(redis_client, command_id, key_prefix, ok, secret=OTHER_SECRET)
        # A genuine answer of web-1, to another command: signed, but not for this one.
        real_elsewhere = collect_fields(ok, "another-command", sig, key_prefix)
        await redis_client.xadd(f"{key_prefix}:results:{command_id}", real_elsewhere)
        # The real answer, tampered with: the refusal turned into an ok.
        tampered = {**collect_fields(refused, command_id, sig, key_prefix), "ok": "1", "ran": "1"}
        await redis_client.xadd(f"{key_prefix}:results:{command_id}", tampered)
        await plant_answer(redis_client, command_id, key_prefix, refused)  # the real one

    answering = asyncio.create_task(host_and_forger())
    fleet = await publish(
        redis_client, "restart", ["sshd"], requested_by="t", secret=SECRET, prefix=key_prefix
    )
    await asyncio.wait_for(answering, DEADLINE)
    assert not fleet.ok
    assert fleet.results["web-1"] == refused
    assert fleet.ignored == {"unsigned": 1, "bad signature": 3}


def collect_fields(
    result: HostResult, command_id: str, command_sig: str, prefix: str
) -> dict[str, str]:
    """``result`` as a daemon of the fleet ``prefix`` signs it for ``command_id``."""
    return result_fields(
        result, command_id=command_id, secret=SECRET, command_sig=command_sig, prefix=prefix
    )


async def test_untrusted_entries_are_logged_one_line_each_at_a_bounded_rate(
    redis_client: aioredis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limiter = RateLimitedLog(logging.getLogger("admin_ops.control_ops"), burst=5, window=60)
    monkeypatch.setattr(collect, "UNTRUSTED_LOG", limiter)
    monkeypatch.setattr(publisher, "UNTRUSTED_LOG", limiter)
    caplog.set_level(logging.WARNING, logger="admin_ops.control_ops")
    await signed_ghost(redis_client, "web-1", key_prefix)

    async def flood() -> None:
        command_id = await next_command_id(redis_client, key_prefix)
        sig = await published_sig(redis_client, command_id, key_prefix)
        pipe = redis_client.pipeline(transaction=False)
        for n in range(1000):
            forged = collect_fields(
                HostResult("web-1", True, True, f"forged {n}", 0.0), "other", sig, key_prefix
            )
            pipe.xadd(f"{key_prefix}:results:{command_id}", forged)
        await pipe.execute()
        await plant_answer(
            redis_client, command_id, key_prefix, HostResult("web-1", True, True, "pong", 0.0)
        )

    flooding = asyncio.create_task(flood())
    fleet = await publish(
        redis_client, "ping", [], requested_by="t", secret=SECRET, prefix=key_prefix
    )
    await asyncio.wait_for(flooding, DEADLINE)
    assert fleet.ok
    assert fleet.ignored == {"bad signature": 1000}
    lines = [r.getMessage() for r in caplog.records]
    per_entry = [line for line in lines if line.startswith("ignored an answer to ")]
    assert len(per_entry) == 5
    assert per_entry[0] == f"ignored an answer to {fleet.command_id} from 'web-1': bad signature"
    assert [line for line in lines if "untrusted heartbeat(s) and answer(s)" in line] == [
        f"command {fleet.command_id}: ignored 1000 untrusted heartbeat(s) and answer(s): "
        "bad signature 1000"
    ]


def test_the_rate_limited_log_reports_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = RateLimitedLog(logging.getLogger("t.rate"), burst=2, window=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.rate"):
        for n in range(5):
            limiter.warning("forged %d", n)
        now[0] = 10.0
        limiter.warning("forged %d", 5)
    assert [r.getMessage() for r in caplog.records] == [
        "forged 0",
        "forged 1",
        "3 similar lines suppressed in 10 s",
        "forged 5",
    ]


def test_a_heartbeat_verifies_only_for_its_own_host_with_the_secret_and_fresh() -> None:
    now = 1_700_000_000.0
    value = heartbeat_value(heartbeat_fields("web-1", sent_at=now), SECRET)
    assert verify_heartbeat("web-1", value, SECRET, now=now)["identity"] == "web-1"
    assert verify_heartbeat("web-1", value.encode(), SECRET, now=now + HEARTBEAT_TTL)
    cases = {
        ("web-2", value, SECRET, now): "heartbeat of another host",
        ("web-1", value, OTHER_SECRET, now): "bad signature",
        ("web-1", value, SECRET, now + HEARTBEAT_TTL + MAX_CLOCK_SKEW + 1): "stale heartbeat",
        ("web-1", value, SECRET, now - MAX_CLOCK_SKEW - 1): "stale heartbeat",
        ("web-1", value.replace('"pid":"1"', '"pid":"2"'), SECRET, now): "bad signature",
        ("web-1", "[]", SECRET, now): "malformed heartbeat",
        ("web-1", None, SECRET, now): "oversized heartbeat",
        ("web 1", value, SECRET, now): "bad host name",
    }
    for (identity, given, secret, at), reason in cases.items():
        with pytest.raises(Untrusted, match=f"^{reason}$"):
            verify_heartbeat(identity, given, secret, now=at)


async def test_a_daemons_heartbeat_is_signed_and_fresh(
    new_client: Callable[..., aioredis.Redis], redis_client: aioredis.Redis, key_prefix: str
) -> None:
    daemon = make_daemon(new_client(), "web-1", key_prefix, restart_units=["proxy"])
    async with serving(daemon):
        value = await redis_client.get(heartbeat_key("web-1", key_prefix))
    fields = verify_heartbeat("web-1", value, SECRET, prefix=key_prefix)
    assert fields["restart_units"] == '["proxy.service"]'
    assert abs(float(fields["sent_at"]) - time.time()) < DEADLINE


def test_fleet_results_say_what_was_ignored() -> None:
    assert FleetResult("c", {}, frozenset()).ignored == {}
