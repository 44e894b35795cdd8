"""What a signature binds: an answer to one command entry, everything to one fleet's prefix.

A Redis writer without the secret can append an entry that reuses a real command's id; the
daemon answers it (signed) "rejected: bad signature", and that answer must never stand for the
host's answer to the real command. Fleets sharing a Redis and a secret must not accept each
other's commands, answers or heartbeats.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.control_ops import build_command, command_stream_key, heartbeat_key, publish
from core.control_ops.wire import parse_result_fields, results_key
from tests.support.fleet import (
    DEADLINE,
    SECRET,
    install_systemctl_stand_in,
    make_daemon,
    plant_heartbeat,
    read_results,
    recorded_calls,
    serving,
    xadd_command,
)


async def first_command(redis: aioredis.Redis, prefix: str) -> tuple[str, dict[str, str]]:
    """The entry id and fields of the first command on the stream, once there is one."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        reply = await redis.xread({command_stream_key(prefix): "0"}, count=1, block=1000)
        if reply:
            [(_stream, [(entry_id, raw)])] = reply
            return entry_id.decode(), {k.decode(): v.decode() for k, v in raw.items()}
    raise AssertionError("no command was published")


async def first_answer_summary(redis: aioredis.Redis, command_id: str, prefix: str) -> str:
    """The summary of the first entry on the command's result stream, once there is one."""
    reply = await redis.xread({results_key(command_id, prefix): "0"}, count=1, block=10_000)
    assert reply, "no answer"
    [(_stream, [(_entry, raw)])] = reply
    result = parse_result_fields({k.decode(): v.decode() for k, v in raw.items()})
    assert result is not None
    return result.summary


async def test_an_answer_to_a_forged_entry_reusing_the_id_is_not_the_hosts_answer(
    new_client: Callable[..., aioredis.Redis], redis_client: aioredis.Redis, key_prefix: str
) -> None:
    # The writer holds back the real entry (deletes it) and puts a forged one with its id in
    # its place; the daemon answers that one first, signed. Later the real entry gets through.
    daemon = make_daemon(new_client(), "web-1", key_prefix)
    await daemon.presence.ensure_group()
    await daemon.presence.beat()  # expected: the command will reach its group
    ping = publish(redis_client, "ping", [], requested_by="o", secret=SECRET, prefix=key_prefix)
    publishing = asyncio.create_task(ping)
    entry_id, real = await first_command(redis_client, key_prefix)
    await redis_client.xdel(command_stream_key(key_prefix), entry_id)
    await xadd_command(redis_client, {**real, "requested_by": "mallory"}, key_prefix)
    async with serving(daemon):
        summary = await first_answer_summary(redis_client, real["id"], key_prefix)
        assert summary == "rejected: bad signature"  # signed by web-1, bound to no command
        await xadd_command(redis_client, real, key_prefix)
        fleet = await asyncio.wait_for(publishing, DEADLINE)
    assert fleet.ok, fleet
    assert fleet.results["web-1"].summary == "pong"
    assert fleet.ignored == {"answer to a forged command": 1}


async def test_a_command_signed_for_another_fleet_is_rejected(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    other = f"{key_prefix}:other"
    elsewhere = build_command("restart", ["proxy"], requested_by="a", secret=SECRET, prefix=other)
    daemon = make_daemon(new_client(), "web-1", key_prefix, restart_units=["proxy"])
    async with serving(daemon):
        await xadd_command(redis_client, elsewhere, key_prefix)  # copied into this fleet
        answer = await read_results(redis_client, elsewhere["id"], ["web-1"], key_prefix)
    assert answer["web-1"].summary == "rejected: bad signature"
    assert recorded_calls(record) == []  # nothing was restarted


async def test_a_heartbeat_copied_into_another_fleet_is_not_believed(
    new_client: Callable[..., aioredis.Redis], redis_client: aioredis.Redis, key_prefix: str
) -> None:
    other = f"{key_prefix}:other"
    async with serving(make_daemon(new_client(), "web-1", key_prefix)):
        value = await redis_client.get(heartbeat_key("web-1", key_prefix))
        await plant_heartbeat(redis_client, "web-1", other, value)
        fleet = await publish(
            redis_client, "ping", [], requested_by="ops", secret=SECRET, prefix=other
        )
    assert fleet.expected == frozenset()
    assert fleet.ignored == {"heartbeat: bad signature": 1}
