"""A daemon reads its command stream in bounded steps: a huge entry is never handed over whole.

Measured on the server, not guessed at: each test has a Redis of its own, so the server's
``total_net_output_bytes`` counts exactly what it sent to the daemon (and the test's few small
reads). An 8 MiB entry read whole would add 8 MiB.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.control_ops import build_command, command_stream_key
from core.control_ops.wire import COMMAND_ENTRY_LIMIT
from tests.support.fleet import (
    SECRET,
    client_for,
    make_daemon,
    pending_count,
    read_results,
    serving,
    wait_until,
    xadd_command,
)
from tests.support.redis_proc import free_port, start_redis_server, stop_redis_server

MIB = 1024 * 1024
TOO_LARGE = f"rejected: malformed command (larger than {COMMAND_ENTRY_LIMIT} bytes)"
PREFIX = "reads"


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[str]:
    """A Redis server for this test alone (its byte counters are this test's)."""
    port = free_port()
    proc = start_redis_server(tmp_path / "redis", port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis_server(proc)


async def sent_bytes(client: aioredis.Redis) -> int:
    """Every byte the server has written to its clients so far."""
    return int((await client.info("stats"))["total_net_output_bytes"])


async def all_acknowledged(client: aioredis.Redis) -> bool:
    """Whether web-1 acknowledged every command it was handed."""
    return await pending_count(client, "web-1", PREFIX) == 0


def ping(**options: str) -> dict[str, str]:
    """A signed ping of this fleet; ``options`` replace fields after signing."""
    return {**build_command("ping", [], requested_by="t", secret=SECRET, prefix=PREFIX), **options}


async def test_a_burst_with_oversized_commands_costs_one_entry_at_most(
    own_redis: str, new_client: Callable[..., aioredis.Redis]
) -> None:
    """Behind a real command: one blocking read may hand one whole, the rest go by the script."""
    test = client_for(own_redis)
    try:
        first, huge, unnamed, last = ping(), ping(), ping(), ping()
        huge["requested_by"] = "x" * (8 * MIB)  # breaks the signature too: never looked at
        unnamed["id"] = "i" * (8 * MIB)  # no command id: nowhere to answer
        async with serving(make_daemon(new_client(own_redis), "web-1", PREFIX)):
            before = await sent_bytes(test)
            pipe = test.pipeline(transaction=True)  # all at once, as one burst
            for fields in (first, huge, unnamed, last):
                pipe.xadd(command_stream_key(PREFIX), fields)
            await pipe.execute()
            for fields, summary in ((first, "pong"), (huge, TOO_LARGE), (last, "pong")):
                answer = await read_results(test, fields["id"], ["web-1"], PREFIX)
                assert answer["web-1"].summary == summary
            await wait_until(lambda: all_acknowledged(test), "the acks")
            sent = await sent_bytes(test) - before
    finally:
        await test.aclose()
    assert sent < 9 * MIB, sent  # one 8 MiB entry once at most, never both


async def test_after_a_blocking_read_brought_an_oversized_entry_the_daemon_polls(
    own_redis: str, new_client: Callable[..., aioredis.Redis]
) -> None:
    test = client_for(own_redis)
    daemon = make_daemon(new_client(own_redis), "web-1", PREFIX)

    async def blocked() -> bool:
        clients = await test.client_list()
        return any(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in clients)

    try:
        async with serving(daemon):
            # The one entry a blocking read may hand over whole (it is not decoded).
            await wait_until(blocked, "the daemon to wait for work")
            first = ping(requested_by="x" * (8 * MIB))
            await xadd_command(test, first, PREFIX)
            answer = await read_results(test, first["id"], ["web-1"], PREFIX)
            assert answer["web-1"].summary == TOO_LARGE
            # From now on it polls with the bounded script: no blocking read hands over another.
            before = await sent_bytes(test)
            huge = [ping(requested_by="y" * (8 * MIB)) for _ in range(2)]
            for fields in (*huge, real := ping()):
                await xadd_command(test, fields, PREFIX)
            answer = await read_results(test, real["id"], ["web-1"], PREFIX)
            assert answer["web-1"].summary == "pong"
            sent = await sent_bytes(test) - before
            assert not await blocked()
    finally:
        await test.aclose()
    assert sent < MIB, sent


async def test_padding_under_repeated_names_or_in_many_tiny_fields_is_oversized(
    own_redis: str, new_client: Callable[..., aioredis.Redis]
) -> None:
    """Measured as Redis sent it, every element counted: a dict of it would look small."""
    test = client_for(own_redis)
    stream = command_stream_key(PREFIX)

    async def xadd_flat(fields: dict[str, str], *extra: str) -> None:
        flat = [item for pair in fields.items() for item in pair]
        await test.execute_command("XADD", stream, "*", *flat, *extra)

    try:
        daemon = make_daemon(new_client(own_redis), "web-1", PREFIX)
        async with serving(daemon):
            # A signed ping plus 2100 empty values under one repeated name: 2100 bytes as a
            # dict, well over the limit as sent. Through the blocking read.
            tiny = ping()
            await xadd_flat(tiny, *(["p", ""] * 2100))
            answer = await read_results(test, tiny["id"], ["web-1"], PREFIX)
            assert answer["web-1"].summary == TOO_LARGE
            assert daemon._reader.polling  # the switch the bound rests on
            # Now through the bounded script: the same, and a huge value hidden under a name
            # written twice costs the daemon nothing like its size.
            again, hidden = ping(), ping()
            before = await sent_bytes(test)
            await xadd_flat(again, *(["p", ""] * 2100))
            await xadd_flat(hidden, "pad", "x" * (8 * MIB), "pad", "s")
            for fields in (again, hidden):
                answer = await read_results(test, fields["id"], ["web-1"], PREFIX)
                assert answer["web-1"].summary == TOO_LARGE
            sent = await sent_bytes(test) - before
    finally:
        await test.aclose()
    assert sent < MIB, sent
