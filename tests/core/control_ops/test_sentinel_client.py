"""The client behind ``redis+sentinel://``: passwords, a connection used directly, replica WAIT.

Real ``redis-server`` and ``redis-server --sentinel`` processes on loopback
(``tests.support.sentinel``); the failover scenarios with five daemons are in
``test_sentinel_failover.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError

from core.control_ops import HostResult, alive_hosts, publish, results_key
from core.control_ops.collect import Collector
from core.control_ops.report import UNREPLICATED, FleetTally, ok_sentence
from core.control_ops.wire import result_fields
from core.redis_client import make_redis
from tests.support import ROOT
from tests.support.fleet import DEADLINE, SECRET, run_cli, wait_until
from tests.support.redis_proc import RedisServer
from tests.support.sentinel import SERVICE, DaemonFleet, SentinelCluster

MASTER_PASSWORD = "master-pw-7f2c"
SENTINEL_PASSWORD = "sentinel-pw-9d41"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    started = SentinelCluster.start(tmp_path / "redis")
    try:
        yield started
    finally:
        started.stop()


async def role_of(connection: object) -> str:
    """ROLE sent on a connection used directly, as a daemon's own connection once was."""
    await connection.send_command("ROLE")  # type: ignore[attr-defined]
    reply = await connection.read_response()  # type: ignore[attr-defined]
    return str(reply[0].decode() if isinstance(reply[0], bytes) else reply[0])


async def test_a_connection_used_directly_follows_the_failover_through_the_sentinels(
    cluster: SentinelCluster,
) -> None:
    """redis-py 8.1's own Sentinel connection goes back to the old address; ours asks first."""
    ours = make_redis(cluster.url())
    stock = Sentinel([("127.0.0.1", port) for port in cluster.sentinel_ports]).master_for(SERVICE)
    ours_conn = await ours.connection_pool.get_connection()
    stock_conn = await stock.connection_pool.get_connection()
    try:
        old = cluster.master()
        for conn in (ours_conn, stock_conn):
            assert (await role_of(conn), conn.port) == ("master", old)
        await asyncio.to_thread(cluster.kill, old)
        new = await asyncio.to_thread(cluster.wait_for_failover, old)

        # The first send finds the dead socket; the next one reconnects: to the new master.
        with pytest.raises(RedisConnectionError):
            await role_of(ours_conn)
        assert await role_of(ours_conn) == "master"
        assert ours_conn.port == new
        # redis-py's class, used the same way, keeps dialling the dead master: the trap that
        # left a daemon with its own connection silent after a failover.
        for _ in range(3):
            with pytest.raises(RedisConnectionError):
                await role_of(stock_conn)
            assert stock_conn.port == old
    finally:
        await ours.connection_pool.release(ours_conn)
        await stock.connection_pool.release(stock_conn)
        await ours.aclose()
        await stock.aclose()
        await stock.connection_pool.sentinel_manager.aclose()


async def test_without_a_replica_the_publisher_waits_for_none_and_says_nothing(
    redis_server: RedisServer, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    waits_before = await _wait_calls(redis_client)
    result = await publish(
        redis_client, "ping", [], requested_by="test", secret=SECRET, timeout=1, prefix=key_prefix
    )
    assert result.replicated is None
    assert await _wait_calls(redis_client) == waits_before  # no WAIT was sent
    assert UNREPLICATED not in ok_sentence(FleetTally.of_fleet(result), result.elapsed)


async def _wait_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def test_a_command_no_replica_confirmed_is_reported_as_such(
    cluster: SentinelCluster, key_prefix: str
) -> None:
    replica = cluster.nodes[cluster.replica()]
    client = make_redis(cluster.url())
    env = {
        "REDIS_URL": cluster.url(),
        "OPS_CONTROL_SECRET": SECRET,
        "OPS_CONTROL_PREFIX": key_prefix,
    }
    # A replica that is connected but stopped: it cannot confirm anything.
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        result = await publish(
            client, "ping", [], requested_by="test", secret=SECRET, timeout=1, prefix=key_prefix
        )
        code, out = await run_cli("publish", "ping", "--timeout", "1", env=env)
    finally:
        os.kill(replica.pid, signal.SIGCONT)
        await client.aclose()
    assert result.replicated is False
    assert UNREPLICATED in ok_sentence(FleetTally.of_fleet(result), result.elapsed)
    assert code == 1, out
    assert f"warning: {UNREPLICATED} (waited 1 s)" in out
    assert "0/0 hosts ok in " in out
    assert UNREPLICATED in out.splitlines()[-1]


async def test_both_passwords_reach_their_servers_and_show_nowhere(
    tmp_path: Path, key_prefix: str
) -> None:
    cluster = SentinelCluster.start(
        tmp_path / "redis", password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD
    )
    fleet: DaemonFleet | None = None
    client = make_redis(cluster.url())
    try:
        env = {"REDIS_URL": cluster.url(), "OPS_CONTROL_SECRET": SECRET}
        env["OPS_CONTROL_PREFIX"] = key_prefix
        fleet = DaemonFleet.start(
            tmp_path / "hosts",
            redis_url=cluster.url(),
            secret=SECRET,
            prefix=key_prefix,
            units=("job-1",),
            count=1,
            python=sys.executable,
            cwd=ROOT,
        )

        async def alive() -> bool:
            return await alive_hosts(client, prefix=key_prefix, secret=SECRET) == {"host-1"}

        await wait_until(alive, "the daemon's heartbeat", deadline=DEADLINE)
        code, out = await run_cli("publish", "restart", "job-1", env=env)
        assert code == 0, out
        assert "1/1 hosts ok" in out
        # Each password is needed where it goes: without the sentinels' one, no sentinel
        # answers; with a wrong master password, the master refuses.
        no_sentinel_pw = cluster.url().partition("?")[0]
        wrong_master_pw = cluster.url().replace(MASTER_PASSWORD, "wrong-password")
        for url in (no_sentinel_pw, wrong_master_pw):
            code, refused = await run_cli("publish", "ping", env={**env, "REDIS_URL": url})
            assert code == 1, refused
            assert refused.startswith("not published: Redis unavailable"), refused
            out += refused
        daemon_log = fleet.log("host-1")
        assert "redis+sentinel://***@127.0.0.1:" in daemon_log
        for password in (MASTER_PASSWORD, SENTINEL_PASSWORD):
            assert password not in out
            assert password not in daemon_log
    finally:
        await client.aclose()
        if fleet is not None:
            fleet.stop()
        cluster.stop()


async def test_a_collector_that_loses_its_connection_reads_again_and_counts_nothing_twice(
    redis_client: aioredis.Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a failover does to a publisher waiting for answers.

    The read breaks; the new master holds what had been replicated (a forged entry, read and
    counted already) and answers written after the switch, numbered below the last entry read
    on the old master (a promoted replica numbers its own entries).
    """
    command_id = "c0ffee" * 5 + "00"
    key = results_key(command_id, key_prefix)
    expected = frozenset({"web-1", "web-2"})

    async def add(entry_id: str, result: HostResult, secret: str = SECRET) -> None:
        fields = result_fields(
            result, command_id=command_id, secret=secret, command_sig="c-sig", prefix=key_prefix
        )
        await redis_client.xadd(key, dict(fields), id=entry_id)

    forged = HostResult("web-1", True, True, "forged", 0.1)
    await add("1000-0", forged, secret="not-the-secret")
    await add("5000-0", HostResult("web-9", True, True, "not expected", 0.1))
    collector = Collector(
        redis_client,
        command_id=command_id,
        key=key,
        expected=expected,
        secret=SECRET,
        command_sig="c-sig",
        prefix=key_prefix,
    )
    real_wait = collector._wait
    reads: list[str] = []

    async def failing_over(block_ms: int) -> Any:
        reads.append(collector._last)
        if len(reads) == 2:  # the switch, after the first read
            await redis_client.delete(key)
            await add("1000-0", forged, secret="not-the-secret")
            for n, host in enumerate(sorted(expected)):
                await add(f"2000-{n}", HostResult(host, True, True, "ok", 0.1))
            raise RedisConnectionError("Connection closed by server.")
        return await real_wait(block_ms)

    monkeypatch.setattr(collector, "_wait", failing_over)
    with caplog.at_level(logging.INFO):
        await collector.run(time.monotonic() + DEADLINE)
    assert reads[:3] == ["0", "5000-0", "0"]  # after the break: from the start again
    assert {host: r.summary for host, r in collector.results.items()} == dict.fromkeys(
        expected, "ok"
    )
    # The forged and the unexpected entries were each counted once, before the break.
    assert sum(collector.ignored.values()) == 2
    lost = [r for r in caplog.records if r.getMessage().startswith("lost Redis while collecting")]
    assert len(lost) == 1
