"""Everything a publisher reads from Redis is bounded before it is processed.

Host names are identities (at most 64 characters) or dropped; summaries are cut to
SUMMARY_LIMIT first; answers of hosts that were not expected are dropped; each read hands over
a bounded number of entries and bytes, and an oversized entry comes back as its id alone;
heartbeat values are size-checked before they are parsed; the hosts index is read a bounded
number of members at a time. Wall-clock figures under a flood are in ``bench/fleet_flood.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.control_ops import (
    SUMMARY_LIMIT,
    HostResult,
    collect,
    heartbeat_key,
    hosts_index_key,
    publish,
    publisher,
    results_key,
    verify_heartbeat,
    wire,
)
from core.control_ops.collect import (
    RESULT_READ_BYTES,
    RESULT_READ_COUNT,
    WAKE_COUNT,
    Collector,
    read_result_entries,
)
from core.control_ops.streams import FIELD_COST, checked_entries
from core.control_ops.wire import (
    COMMAND_ENTRY_LIMIT,
    HEARTBEAT_VALUE_LIMIT,
    MAX_FLEET_HOSTS,
    RESULT_ENTRY_LIMIT,
    Untrusted,
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
    read_results,
    serving,
    signed_ghost,
)

MIB = 1024 * 1024


def size(fields: dict[str, str]) -> int:
    """The bytes of an entry's fields as written (a field it lacks is read as '')."""
    return sum(len(name) + len(value.encode()) for name, value in fields.items() if value)


async def test_an_answer_from_a_host_that_was_not_expected_is_dropped(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    # Even signed with the fleet's secret, and even a failure: only expected hosts count.
    await signed_ghost(redis_client, "web-1", key_prefix)

    async def answers() -> None:
        command_id = await next_command_id(redis_client, key_prefix)
        late = HostResult("late-1", False, True, "failed", 0.0)
        await plant_answer(redis_client, command_id, key_prefix, late)
        await plant_answer(
            redis_client, command_id, key_prefix, HostResult("web-1", True, True, "pong", 0.0)
        )

    answering = asyncio.create_task(answers())
    fleet = await publish(
        redis_client, "ping", [], requested_by="t", secret=SECRET, prefix=key_prefix
    )
    await asyncio.wait_for(answering, DEADLINE)
    assert set(fleet.results) == {"web-1"}
    assert fleet.ok
    assert fleet.ignored == {"not expected": 1}


async def test_host_names_that_are_no_identity_are_dropped_even_when_signed(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    bad_names = ["x" * 65, "web 1", "\x1b]52;c;eA==\x07web-1", "", "-web"]
    for name in bad_names:
        if name and len(name) <= 64:  # fresh, and signed with the secret: only the name is bad
            value = wire.heartbeat_value(heartbeat_fields(name), SECRET, key_prefix)
            await plant_heartbeat(redis_client, name, key_prefix, value)
    await redis_client.sadd(hosts_index_key(key_prefix), "y" * 300)  # never an identity
    await signed_ghost(redis_client, "web-1", key_prefix)

    async def answers() -> None:
        command_id = await next_command_id(redis_client, key_prefix)
        for name in bad_names:
            await plant_answer(
                redis_client, command_id, key_prefix, HostResult(name, True, True, "ok", 0.0)
            )
        await plant_answer(
            redis_client, command_id, key_prefix, HostResult("web-1", True, True, "pong", 0.0)
        )

    answering = asyncio.create_task(answers())
    fleet = await publish(
        redis_client, "ping", [], requested_by="t", secret=SECRET, prefix=key_prefix
    )
    await asyncio.wait_for(answering, DEADLINE)
    assert fleet.expected == {"web-1"}
    assert set(fleet.results) == {"web-1"}
    assert fleet.ignored == {"heartbeat: bad host name": 3, "bad host name": 5}
    # A name longer than any identity is dropped from the index at once.
    assert not await redis_client.sismember(hosts_index_key(key_prefix), "y" * 300)


async def test_a_signed_summary_is_cut_before_anyone_sees_it(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    await signed_ghost(redis_client, "web-1", key_prefix)
    seen: list[HostResult] = []

    async def answer() -> None:
        command_id = await next_command_id(redis_client, key_prefix)
        long = HostResult("web-1", True, True, "é" * (2 * SUMMARY_LIMIT), 0.0)
        await plant_answer(redis_client, command_id, key_prefix, long)

    answering = asyncio.create_task(answer())
    fleet = await publish(
        redis_client,
        "ping",
        [],
        requested_by="t",
        secret=SECRET,
        prefix=key_prefix,
        on_result=seen.append,
    )
    await asyncio.wait_for(answering, DEADLINE)
    [result] = seen
    assert result.summary == "é" * SUMMARY_LIMIT + " […]"
    assert fleet.results["web-1"] == result


async def test_each_read_hands_over_a_bounded_number_of_entries_and_bytes(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    key = results_key("c1", key_prefix)
    pipe = redis_client.pipeline(transaction=False)
    for n in range(1000):
        pipe.xadd(key, {"host": f"h{n}", "ok": "1", "summary": "x" * 200})
    for _ in range(12):
        pipe.xadd(key, {"host": "big", "summary": "y" * MIB})
    # At the limit exactly: its bytes and FIELD_COST for each of its four elements.
    edge = RESULT_ENTRY_LIMIT - len("hostedgesummary") - 4 * FIELD_COST
    limit_sized = {"host": "edge", "summary": "z" * edge}
    pipe.xadd(key, limit_sized)
    for n in range(1000):
        pipe.xadd(key, {"host": f"g{n}", "summary": "x" * 900})
    await pipe.execute()

    last, reads, seen, oversized, more = "0", 0, 0, 0, True
    while more:
        entries, more = await read_result_entries(redis_client, key, last)
        reads += 1
        assert len(entries) <= RESULT_READ_COUNT
        fields = [f for _id, f in entries if f is not None]
        assert sum(size(f) for f in fields) <= RESULT_READ_BYTES + RESULT_ENTRY_LIMIT
        assert all(size(f) <= RESULT_ENTRY_LIMIT for f in fields)
        oversized += sum(1 for _id, f in entries if f is None)
        seen += len(entries)
        last = entries[-1][0] if entries else last
    assert (seen, oversized) == (2013, 12)  # every entry once, in order; the huge ones as ids
    assert await read_result_entries(redis_client, key, last) == ([], False)
    assert reads >= 2000 * 1000 // RESULT_READ_BYTES


async def test_a_flood_is_read_in_bounded_steps_and_the_real_answer_still_counts(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[tuple[str, int, int, int]] = []  # kind, entries, bytes decoded, oversized
    wait, catch_up = Collector._wait, Collector._catch_up

    def note(kind: str, entries: list[Any]) -> None:
        decoded = [f for _id, f in entries if f is not None]
        oversized = len(entries) - len(decoded)
        reads.append((kind, len(entries), sum(size(f) for f in decoded), oversized))

    async def counted_wait(self: Collector, block_ms: int) -> list[Any]:
        entries = await wait(self, block_ms)
        note("wait", entries)
        return entries

    async def counted_catch_up(self: Collector) -> tuple[list[Any], bool]:
        entries, more = await catch_up(self)
        note("catch up", entries)
        return entries, more

    monkeypatch.setattr(Collector, "_wait", counted_wait)
    monkeypatch.setattr(Collector, "_catch_up", counted_catch_up)
    await signed_ghost(redis_client, "silent-1", key_prefix)  # so the whole flood is read

    async def flood() -> None:
        command_id = await next_command_id(redis_client, key_prefix)
        key = results_key(command_id, key_prefix)
        pipe = redis_client.pipeline(transaction=False)
        for n in range(3000):
            pipe.xadd(key, {"host": "web-1", "ok": "1", "ran": "1", "summary": f"forged {n}"})
        for _ in range(8):
            pipe.xadd(key, {"host": "web-1", "ok": "1", "summary": "y" * MIB})
        for n in range(500):
            pipe.xadd(key, {"host": "web-1", "ok": "1", "ran": "1", "summary": f"more {n}"})
        await pipe.execute()

    async with serving(make_daemon(new_client(), "web-1", key_prefix)):
        flooding = asyncio.create_task(flood())
        fleet = await publish(
            redis_client,
            "ping",
            [],
            requested_by="t",
            secret=SECRET,
            timeout=2.0,
            prefix=key_prefix,
        )
        await asyncio.wait_for(flooding, DEADLINE)
    assert fleet.results["web-1"].summary == "pong"
    assert fleet.silent == {"silent-1"}
    assert fleet.ignored.get("oversized") == 8
    assert fleet.ignored.get("unsigned", 0) + fleet.ignored.get("bad signature", 0) >= 3499
    for kind, entries, decoded, _oversized in reads:
        limit = WAKE_COUNT if kind == "wait" else RESULT_READ_COUNT
        assert entries <= limit
        assert decoded <= RESULT_READ_BYTES + RESULT_ENTRY_LIMIT
    # A blocking read hands over whole entries: once one brought an oversized entry, the
    # collector never blocks again (it polls with the bounded script).
    waits = [i for i, read in enumerate(reads) if read[0] == "wait"]
    oversized_waits = [i for i in waits if reads[i][3]]
    if oversized_waits:
        assert waits[-1] == oversized_waits[0]


async def test_a_blocking_read_never_decodes_an_oversized_entry(
    redis_client: aioredis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Twenty hosts still to answer: a blocking read may hand over WAKE_COUNT entries. The flood
    # is all there, written at once, before the first read (while the chat posts its message).
    ghosts = [f"silent-{n}" for n in range(20)]
    for ghost in ghosts:
        await signed_ghost(redis_client, ghost, key_prefix)
    blocking: list[list[Any]] = []
    entries_of = collect._xread_entries

    def spy(response: Any) -> list[Any]:
        entries = entries_of(response)
        blocking.append(entries)
        return entries

    monkeypatch.setattr(collect, "_xread_entries", spy)

    async def flood(published: Any) -> None:
        pipe = redis_client.pipeline(transaction=True)
        for _ in range(20):
            pipe.xadd(
                results_key(published.command_id, key_prefix),
                {"host": "silent-1", "summary": "y" * MIB},
            )
        await pipe.execute()

    fleet = await publish(
        redis_client,
        "ping",
        [],
        requested_by="t",
        secret=SECRET,
        timeout=0.5,
        prefix=key_prefix,
        on_published=flood,
    )
    assert fleet.ignored == {"oversized": 20}
    [first] = blocking  # one blocking read, then only bounded polling
    assert len(first) == WAKE_COUNT
    assert all(fields is None for _id, fields in first)  # none decoded


def test_a_heartbeat_value_is_size_checked_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[int] = []
    real = json.loads

    def loads(text: Any) -> Any:
        parsed.append(len(text))
        return real(text)

    monkeypatch.setattr(wire.json, "loads", loads)
    huge = '{"identity": "web-1", "pad": "' + "x" * HEARTBEAT_VALUE_LIMIT + '"}'
    with pytest.raises(Untrusted, match=r"^oversized heartbeat$"):
        verify_heartbeat("web-1", huge, SECRET)
    assert parsed == []


async def test_the_hosts_index_is_read_a_bounded_number_of_members_at_a_time(
    redis_client: aioredis.Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replies: list[list[Any]] = []
    believed = publisher._believed

    async def spy(reply: Any, *args: Any) -> frozenset[str]:
        replies.append(list(reply))
        return await believed(reply, *args)

    monkeypatch.setattr(publisher, "_believed", spy)
    monkeypatch.setattr(
        publisher, "UNTRUSTED_LOG", collect.RateLimitedLog(publisher.log, burst=1000)
    )
    index = hosts_index_key(key_prefix)
    pipe = redis_client.pipeline(transaction=False)
    for n in range(2 * MAX_FLEET_HOSTS):
        pipe.sadd(index, f"junk-{n}")
        if n % 2:  # half of them with a heartbeat too large to be a daemon's, half with none
            pipe.set(heartbeat_key(f"junk-{n}", key_prefix), "j" * (HEARTBEAT_VALUE_LIMIT + 1))
    await pipe.execute()
    fleet = await publish(
        redis_client, "ping", [], requested_by="t", secret=SECRET, timeout=0.2, prefix=key_prefix
    )
    [reply] = replies
    assert int(reply[0]) == 2 * MAX_FLEET_HOSTS
    assert len(reply) <= 1 + 2 * MAX_FLEET_HOSTS
    values = reply[2::2]
    assert values
    assert all(value is None for value in values)  # oversized values never came back
    assert fleet.expected == frozenset()
    assert fleet.ignored["heartbeat: oversized heartbeat"] == len(values)
    # The members considered whose heartbeat was gone were dropped from the index.
    assert await redis_client.scard(index) == 2 * MAX_FLEET_HOSTS - (MAX_FLEET_HOSTS - len(values))
    assert f"the hosts index holds {2 * MAX_FLEET_HOSTS} names" in caplog.text


def test_result_fields_carry_a_signature_over_the_command_and_every_field() -> None:
    result = HostResult("web-1", True, True, "pong", 0.5)
    fields = result_fields(result, command_id="c1", secret=SECRET, command_sig="s1", prefix="p")
    assert set(fields) == set(wire.RESULT_FIELDS)
    assert wire.verify_result(fields, "c1", SECRET, command_sig="s1", prefix="p") == result
    tampered = [{**fields, "duration": "0.400"}, {**fields, "host": "web-2"}]
    for fake in tampered:
        with pytest.raises(Untrusted, match=r"^bad signature$"):
            wire.verify_result(fake, "c1", SECRET, command_sig="s1", prefix="p")
    with pytest.raises(Untrusted, match=r"^bad signature$"):
        wire.verify_result(fields, "c2", SECRET, command_sig="s1", prefix="p")
    with pytest.raises(Untrusted, match=r"^bad signature$"):  # signed for another fleet
        wire.verify_result(fields, "c1", SECRET, command_sig="s1", prefix="q")
    with pytest.raises(Untrusted, match=r"^bad signature$"):  # rebound to another entry
        wire.verify_result({**fields, "command_sig": "s2"}, "c1", SECRET, command_sig=None)
    with pytest.raises(Untrusted, match=r"^answer to another entry$"):
        wire.verify_result(fields, "c1", SECRET, command_sig="s2", prefix="p")
    unbound = result_fields(result, command_id="c1", secret=SECRET, prefix="p")
    with pytest.raises(Untrusted, match=r"^answer to a forged command$"):
        wire.verify_result(unbound, "c1", SECRET, command_sig="s1", prefix="p")


async def test_a_daemon_answers_an_oversized_command_without_looking_further(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.control_ops import daemon as daemon_module

    verified: list[str] = []
    real = daemon_module.verify_signature

    def spy(fields: Any, *args: Any) -> Any:
        verified.append(fields["id"])
        return real(fields, *args)

    monkeypatch.setattr(daemon_module, "verify_signature", spy)
    big = wire.build_command("ping", [], requested_by="x" * MIB, secret=SECRET)
    async with serving(make_daemon(new_client(), "web-1", key_prefix)):
        await redis_client.xadd(wire.command_stream_key(key_prefix), big)
        answer = (await read_results(redis_client, big["id"], ["web-1"], key_prefix))["web-1"]
    assert (
        answer.summary == f"rejected: malformed command (larger than {COMMAND_ENTRY_LIMIT} bytes)"
    )
    assert verified == []


async def test_reads_work_after_redis_forgets_the_scripts(
    new_client: Callable[..., aioredis.Redis], redis_client: aioredis.Redis, key_prefix: str
) -> None:
    async with serving(make_daemon(new_client(), "web-1", key_prefix)):
        await redis_client.script_flush()
        fleet = await publish(
            redis_client, "ping", [], requested_by="t", secret=SECRET, prefix=key_prefix
        )
    assert fleet.ok, fleet


async def test_a_long_allow_list_still_fits_the_heartbeat(
    new_client: Callable[..., aioredis.Redis], redis_client: aioredis.Redis, key_prefix: str
) -> None:
    units = [f"{'u' * 190}-{n:03d}.service" for n in range(60)]
    targets = {f"t{'x' * 28}{n:02d}": f"/srv/{n}" for n in range(40)}
    daemon = make_daemon(
        new_client(), "w" * 64, key_prefix, restart_units=units, pull_targets=targets
    )
    async with serving(daemon):
        value = await redis_client.get(heartbeat_key("w" * 64, key_prefix))
        fleet = await publish(
            redis_client, "ping", [], requested_by="t", secret=SECRET, prefix=key_prefix
        )
    assert len(value) <= HEARTBEAT_VALUE_LIMIT
    assert fleet.ok, fleet
    fields = verify_heartbeat("w" * 64, value, SECRET, prefix=key_prefix)
    assert 0 < len(json.loads(fields["restart_units"])) < len(units)  # cut, still valid JSON


@pytest.mark.parametrize("resp3", [False, True], ids=["RESP2", "RESP3"])
def test_a_blocking_reads_entries_are_measured_as_redis_sent_them(resp3: bool) -> None:
    """A value hidden under a repeated name, or thousands of empty fields, is oversized."""
    hidden = [b"host", b"web-1", b"summary", b"x" * MIB, b"summary", b"ok"]
    empty = [b"host", b"web-2", *([b"p", b""] * 1000)]
    real = [b"host", b"web-3", b"ok", b"1", b"summary", b"pong"]
    entries = [[b"1-0", hidden], [b"2-0", empty], [b"3-0", real]]
    reply: Any = {b"s": entries} if resp3 else [[b"s", entries]]

    checked = checked_entries(reply, wire.RESULT_FIELDS, RESULT_ENTRY_LIMIT)

    assert [(entry_id, fields is None) for entry_id, fields in checked] == [
        ("1-0", True),
        ("2-0", True),
        ("3-0", False),
    ]
    assert checked[2][1] is not None
    assert (checked[2][1]["host"], checked[2][1]["summary"]) == ("web-3", "pong")
