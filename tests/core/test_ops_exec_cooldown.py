"""``Cooldown``: atomic per-key cooldowns in Redis, a state file, or memory; outage fallback."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.ops_exec import Cooldown, read_json_file
from tests.support.redis_proc import free_port


@pytest.fixture
async def silent_redis() -> AsyncIterator[aioredis.Redis]:
    """A client pointed at a listener that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    try:
        yield client
    finally:
        server.close()
        for writer in held:
            writer.close()
        await client.aclose()


async def acquire_many(cooldown: Cooldown, key: str, n: int = 50) -> list[float]:
    return list(await asyncio.gather(*(cooldown.try_acquire(key) for _ in range(n))))


async def test_memory_concurrent_calls_admit_exactly_one() -> None:
    results = await acquire_many(Cooldown(30), "bot_pull")
    assert results.count(0.0) == 1
    assert all(0 < r <= 30 for r in results if r)


async def test_state_file_concurrent_calls_admit_exactly_one(tmp_path: Path) -> None:
    results = await acquire_many(Cooldown(30, state_file=tmp_path / "cd.json"), "bot_pull")
    assert results.count(0.0) == 1


async def test_redis_concurrent_calls_admit_exactly_one(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    results = await acquire_many(Cooldown(30, redis=redis_client, prefix=key_prefix), "bot_pull")
    assert results.count(0.0) == 1
    assert 29_000 < await redis_client.pttl(f"{key_prefix}:bot_pull") <= 30_000


async def test_keys_are_independent() -> None:
    cooldown = Cooldown(30)
    assert await cooldown.try_acquire("a") == 0.0
    assert await cooldown.try_acquire("b") == 0.0
    assert await cooldown.try_acquire("a") > 0


async def test_redis_cooldown_survives_a_restart(
    redis_client: aioredis.Redis, key_prefix: str
) -> None:
    assert await Cooldown(120, redis=redis_client, prefix=key_prefix).try_acquire("restart") == 0
    fresh = Cooldown(120, redis=redis_client, prefix=key_prefix)
    left = await fresh.try_acquire("restart")
    assert 119 < left <= 120
    assert 119 < await fresh.remaining("restart") <= 120


async def test_state_file_cooldown_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state" / "cooldowns.json"
    assert await Cooldown(120, state_file=state).try_acquire("restart") == 0
    assert "restart" in read_json_file(state)
    left = await Cooldown(120, state_file=state).try_acquire("restart")
    assert 119 < left <= 120


async def test_cooldown_expires() -> None:
    now = [1000.0]
    cooldown = Cooldown(10, clock=lambda: now[0])
    assert await cooldown.try_acquire("k") == 0.0
    now[0] += 9.5
    assert await cooldown.try_acquire("k") == pytest.approx(0.5)
    now[0] += 0.6
    assert await cooldown.try_acquire("k") == 0.0


async def test_state_file_cooldown_expires(tmp_path: Path) -> None:
    now = [1000.0]
    state = tmp_path / "cd.json"
    assert await Cooldown(10, state_file=state, clock=lambda: now[0]).try_acquire("k") == 0.0
    now[0] += 11
    assert await Cooldown(10, state_file=state, clock=lambda: now[0]).try_acquire("k") == 0.0


@pytest.mark.parametrize("backend", ["memory", "state_file", "redis"])
async def test_release_lets_the_next_use_through(
    backend: str, tmp_path: Path, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    kwargs: dict[str, object] = {
        "memory": {},
        "state_file": {"state_file": tmp_path / "cd.json"},
        "redis": {"redis": redis_client, "prefix": key_prefix},
    }[backend]
    cooldown = Cooldown(60, **kwargs)  # type: ignore[arg-type]
    assert await cooldown.try_acquire("pull") == 0.0
    assert await cooldown.remaining("pull") > 59
    await cooldown.release("pull")
    assert await cooldown.remaining("pull") == 0.0
    assert await cooldown.try_acquire("pull") == 0.0


async def test_remaining_records_nothing() -> None:
    cooldown = Cooldown(60)
    assert await cooldown.remaining("k") == 0.0
    assert await cooldown.try_acquire("k") == 0.0


async def test_redis_down_falls_back_to_the_state_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    state = tmp_path / "cd.json"
    cooldown = Cooldown(60, redis=down, state_file=state)
    with caplog.at_level(logging.WARNING, logger="admin_ops.ops_exec"):
        assert await cooldown.try_acquire("pull") == 0.0
        started = time.monotonic()
        assert await cooldown.try_acquire("pull") > 50
    # The second call skipped the Redis it had just seen fail, instead of waiting on it again.
    assert time.monotonic() - started < 1
    assert caplog.text.count("Redis unavailable") == 1
    assert "pull" in read_json_file(state)
    await down.aclose()


async def test_redis_that_never_answers_does_not_block_the_operator(
    silent_redis: aioredis.Redis,
) -> None:
    cooldown = Cooldown(60, redis=silent_redis)
    started = time.monotonic()
    assert await cooldown.try_acquire("pull") == 0.0
    # Bounded by the ~2 s Redis call limit, not by the client's 30 s socket timeout.
    assert time.monotonic() - started < 2 + 1
    assert await cooldown.try_acquire("pull") > 0


def test_negative_seconds_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Cooldown(-1)


async def test_zero_seconds_never_refuses() -> None:
    cooldown = Cooldown(0)
    assert [await cooldown.try_acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]


MULTIPROCESS_HARNESS = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from core.ops_exec import Cooldown

async def main():
    cooldown = Cooldown(60, state_file=sys.argv[2])
    results = await asyncio.gather(*(cooldown.try_acquire("bot_pull") for _ in range(20)))
    print(sum(1 for r in results if r == 0.0))

asyncio.run(main())
"""


def test_state_file_admits_exactly_one_across_processes(tmp_path: Path) -> None:
    # Within one process the asyncio lock serialises callers; across processes only the
    # file lock does, so several interpreters race on one state file here.
    root = str(Path(__file__).resolve().parents[2])
    state = str(tmp_path / "cd.json")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTIPROCESS_HARNESS, root, state],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    admitted = [int(proc.communicate(timeout=60)[0]) for proc in procs]
    assert sum(admitted) == 1, admitted


async def test_state_file_held_by_a_stuck_peer_falls_back_to_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "cd.json"
    lock = os.open(f"{state}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a peer that took the lock and stopped
    try:
        cooldown = Cooldown(60, state_file=state)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="admin_ops.ops_exec"):
            assert await cooldown.try_acquire("k") == 0.0
        assert time.monotonic() - started < 2 + 1
        assert "state file unusable" in caplog.text
    finally:
        os.close(lock)


class FlakyRedis:
    """Wraps a real client; while ``down``, every call fails as if Redis were unreachable."""

    def __init__(self, real: aioredis.Redis) -> None:
        self.real = real
        self.down = False

    def __getattr__(self, name: str) -> object:
        method = getattr(self.real, name)

        async def call(*args: object, **kwargs: object) -> object:
            if self.down:
                raise ConnectionError("Redis is down (simulated)")
            return await method(*args, **kwargs)

        return call


async def test_use_recorded_in_redis_still_counts_during_an_outage(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = FlakyRedis(redis_client)
    state = tmp_path / "cd.json"
    first = Cooldown(60, redis=flaky, prefix=key_prefix, state_file=state)
    assert await first.try_acquire("k") == 0.0
    flaky.down = True
    assert await Cooldown(60, redis=flaky, prefix=key_prefix, state_file=state).try_acquire("k")


async def test_use_recorded_during_an_outage_still_counts_when_redis_is_back(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = FlakyRedis(redis_client)
    state = tmp_path / "cd.json"
    flaky.down = True
    assert (
        await Cooldown(60, redis=flaky, prefix=key_prefix, state_file=state).try_acquire("k") == 0
    )
    flaky.down = False
    assert await Cooldown(60, redis=flaky, prefix=key_prefix, state_file=state).try_acquire("k")


async def test_use_seen_in_redis_from_another_host_is_mirrored_locally(
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    other_host = Cooldown(60, redis=redis_client, prefix=key_prefix, state_file=tmp_path / "a")
    assert await other_host.try_acquire("k") == 0.0
    flaky = FlakyRedis(redis_client)
    here = Cooldown(60, redis=flaky, prefix=key_prefix, state_file=tmp_path / "b")
    assert await here.try_acquire("k") > 59
    flaky.down = True
    assert await Cooldown(
        60, redis=flaky, prefix=key_prefix, state_file=tmp_path / "b"
    ).try_acquire("k")


TEN_YEARS_MS = 10 * 365 * 86_400_000


@pytest.mark.parametrize("ttl_ms", [TEN_YEARS_MS, None])
async def test_a_cooldown_planted_in_redis_counts_as_the_configured_length_at_most(
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    ttl_ms: int | None,
) -> None:
    # Anyone who can write to Redis could otherwise block a command for years, and the value
    # would be copied into the state file and outlive Redis being cleaned.
    state = tmp_path / "cooldowns.json"
    await redis_client.set(f"{key_prefix}:bot_restart", "1", px=ttl_ms)
    cooldown = Cooldown(120, redis=redis_client, state_file=state, prefix=key_prefix)

    left = await cooldown.try_acquire("bot_restart")

    assert 0 < left <= 120
    assert 0 < await cooldown.remaining("bot_restart") <= 120
    assert 0 < await redis_client.pttl(f"{key_prefix}:bot_restart") <= 120_000
    stored = read_json_file(state) or {}
    assert all(expires <= time.time() + 120 + 1 for expires in stored.values())
    assert "written by someone else" in caplog.text


async def test_a_state_file_edited_by_hand_counts_as_the_configured_length_at_most(
    tmp_path: Path,
) -> None:
    state = tmp_path / "cooldowns.json"
    state.write_text('{"bot_pull": %f}' % (time.time() + 10 * 365 * 86_400))
    cooldown = Cooldown(15, state_file=state)
    assert 0 < await cooldown.try_acquire("bot_pull") <= 15
    assert 0 < await cooldown.remaining("bot_pull") <= 15


def test_a_state_file_too_deep_or_too_large_is_ignored(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    assert read_json_file(deep) is None
    large = tmp_path / "large.json"
    large.write_text('{"k": "' + "x" * (2 << 20) + '"}')
    assert read_json_file(large) is None
    fine = tmp_path / "fine.json"
    fine.write_text('{"k": 1}')
    assert read_json_file(fine) == {"k": 1}


def test_a_state_file_that_is_a_symlink_or_a_fifo_is_not_read(tmp_path: Path) -> None:
    """Planted in the state file's place: not followed, and reading never blocks."""
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"planted": 1}')
    link = tmp_path / "link.json"
    link.symlink_to(elsewhere)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)

    assert read_json_file(elsewhere) == {"planted": 1}
    assert read_json_file(link) is None
    assert read_json_file(fifo) is None  # returns at once: no writer is waited for
