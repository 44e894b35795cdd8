"""The cog through a Sentinel failover: cooldowns, the restart marker, the audit stream, pulls.

A real master, replica and sentinels (``tests.support.sentinel``); the cog's client comes from
the one factory, as ``REDIS_URL=redis+sentinel://…`` gives it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.names import Keys
from core.redis_client import make_redis
from tests.support.chat import Harness, Sent, only_reply, replies_to
from tests.support.sentinel import SentinelCluster, info, wait_for


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    started = SentinelCluster.start(tmp_path / "redis")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
async def client(cluster: SentinelCluster) -> AsyncIterator[aioredis.Redis]:
    made = make_redis(cluster.url())
    try:
        yield made
    finally:
        await made.aclose()


def fallback_lines(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(what)
    ]


async def test_a_cooldown_and_a_restart_marker_set_before_a_failover_hold_after_it(
    harness: Harness,
    cluster: SentinelCluster,
    client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    git_repos: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = Keys(key_prefix)
    settings = harness.settings(REDIS_URL=cluster.url())
    cog = await harness.add_cog(settings, redis=client, key_prefix=key_prefix)
    request = await harness.say("!bot_restart")
    assert only_reply(sent, request).content.startswith("♻️ Restarting")
    # Both are on the replica before the master dies (what WAIT would confirm for a command).
    replica = cluster.replica()
    cooldown_key = f"{keys.cooldowns}:bot_restart"
    for key in (cooldown_key, cog.markers.key):
        await asyncio.to_thread(
            wait_for, f"{key} on the replica", lambda k=key: cluster.has_key(replica, k)
        )

    old, _killed_at = await asyncio.to_thread(cluster.kill_master)
    with caplog.at_level(logging.WARNING):
        # During the switch (the sentinels still name the dead master): the commands go on,
        # the cooldowns fall back to the state dir as when Redis is down, saying so once.
        during = [await harness.say("!proxy_restart") for _ in range(2)]
        again = await harness.say("!bot_restart")
    assert only_reply(sent, during[0]).content.startswith("✅")
    assert "is cooling down" in only_reply(sent, during[1]).content
    assert "is cooling down" in only_reply(sent, again).content
    # One line, however many calls: Redis is left alone for a while after a failure. (None
    # if the sentinels were quicker than this test and every call reached the new master.)
    assert len(fallback_lines(caplog, "cooldown try_acquire: Redis unavailable")) <= 1

    new = await asyncio.to_thread(cluster.wait_for_failover, old)
    caplog.clear()
    # The next process, on another host (a state dir of its own: only Redis can carry the
    # cooldown and the marker over), finds both on the promoted replica.
    elsewhere = harness.settings(
        REDIS_URL=cluster.url(), OPS_STATE_DIR=str(harness.state_dir / "elsewhere")
    )
    with caplog.at_level(logging.WARNING):
        await harness.reload_and_get_ready(settings=elsewhere, redis=client, key_prefix=key_prefix)
        notice = replies_to(sent, request)[-1]
        assert (notice.content or "").startswith("✅ Back online after ")
        assert not cluster.has_key(new, cog.markers.key)  # taken: it is announced once
        refused = await harness.say("!bot_restart")
        assert "is cooling down" in only_reply(sent, refused).content
        # The pull dedupe lock and the audit stream work on the new master too.
        pull = await harness.say("!bot_pull")
        assert only_reply(sent, pull).content.startswith("✅ `bot` already up to date")
    assert fallback_lines(caplog, "cooldown") == []
    assert fallback_lines(caplog, "restart marker") == []
    assert fallback_lines(caplog, "audit") == []
    # The pull took its lock on the new master and released it there (a script: the only one
    # the cog runs; the promoted replica had applied none of its own).
    assert "calls=1," in info(new, "commandstats")["cmdstat_eval"]
    assert cluster.node(new, "KEYS", f"{key_prefix}:pull:*") == []
    audit = cluster.node(new, "XRANGE", keys.audit, "-", "+")
    commands = [dict(zip(f[::2], f[1::2], strict=True))["command"] for _id, f in audit]
    assert commands[-2:] == ["bot_restart", "bot_pull"]
