"""The fleet on Redis Sentinel: five daemon processes, a master SIGKILLed under them.

Real processes on loopback (``tests.support.sentinel``): a master, one replica, three sentinels
(``redis-server --sentinel``) and five ``python -m core.control_ops daemon`` processes, all
reaching Redis through ``REDIS_URL=redis+sentinel://…``. What must hold across a failover,
where Redis replicates asynchronously and the newest writes can be lost:

- no command runs twice on a host, even when the promoted replica re-delivers commands done;
- no false ok: a command or answer lost in the switch shows that host silent (or failed);
- the daemons reconnect to the new master by themselves and the next command reaches every
  host exactly once, also once the old master is back as a replica.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.control_ops import (
    FleetResult,
    Published,
    alive_hosts,
    command_stream_key,
    publish,
    results_key,
)
from core.control_ops.wire import ALREADY_HANDLED
from core.redis_client import make_redis
from tests.support import ROOT
from tests.support.fleet import DEADLINE, SECRET, wait_until
from tests.support.sentinel import DaemonFleet, SentinelCluster, info, wait_for

HOSTS = frozenset(f"host-{n}" for n in range(1, 6))
UNITS = ("job-1", "job-2", "job-3", "job-4", "job-b", "gated-g", "gated-a")
#: Long enough for a failover (about 2 s here) and the daemons' return, with room to spare.
FAILOVER_WAIT = 20.0
#: How long a publisher waits for answers that will never come (lost in the switch): whether
#: it stops waiting before or after the failover, the report must be the same.
LOST_WAIT = 6.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    started = SentinelCluster.start(tmp_path / "redis")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def fleet(cluster: SentinelCluster, tmp_path: Path, key_prefix: str) -> Iterator[DaemonFleet]:
    daemons = DaemonFleet.start(
        tmp_path / "hosts",
        redis_url=cluster.url(),
        secret=SECRET,
        prefix=key_prefix,
        units=UNITS,
        python=sys.executable,
        cwd=ROOT,
    )
    try:
        yield daemons
    finally:
        daemons.stop()


@pytest.fixture
async def publisher(cluster: SentinelCluster) -> AsyncIterator[aioredis.Redis]:
    """The publisher's client, built by the one factory from the Sentinel URL."""
    client = make_redis(cluster.url())
    try:
        yield client
    finally:
        await client.aclose()


async def every_host_alive(client: aioredis.Redis, prefix: str) -> None:
    async def alive() -> bool:
        return await alive_hosts(client, prefix=prefix, secret=SECRET) == HOSTS

    await wait_until(alive, "all five daemons to heartbeat", deadline=FAILOVER_WAIT)


async def restart(
    client: aioredis.Redis, prefix: str, unit: str, timeout: float = DEADLINE, **options: Any
) -> FleetResult:
    return await publish(
        client,
        "restart",
        [unit],
        requested_by="failover test",
        secret=SECRET,
        timeout=timeout,
        prefix=prefix,
        **options,
    )


async def failover(cluster: SentinelCluster) -> tuple[int, int]:
    """SIGKILL the master; wait until the sentinels name a new one. Old and new ports."""
    old, _killed_at = await asyncio.to_thread(cluster.kill_master)
    new = await asyncio.to_thread(cluster.wait_for_failover, old)
    return old, new


def runs(fleet: DaemonFleet, unit: str) -> dict[str, int]:
    """How many times each host started restarting ``unit``."""
    return {host: len(fleet.runs(host, f"{unit}.service")) for host in fleet.hosts}


def answers(
    cluster: SentinelCluster, port: int, prefix: str, command_id: str
) -> list[tuple[str, str, str]]:
    """``(host, ok, summary)`` of every answer to ``command_id`` stored on the node at ``port``."""
    entries = cluster.node(port, "XRANGE", results_key(command_id, prefix), "-", "+")
    rows = []
    for _entry_id, flat in entries:
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        rows.append((fields["host"], fields["ok"], fields["summary"]))
    return rows


def assert_all_ok_once(result: FleetResult, fleet: DaemonFleet) -> None:
    # The daemons' logs of the hosts that did not answer ok say why.
    logs = "\n".join(
        f"--- {host}\n{fleet.log(host)[-3000:]}"
        for host in sorted(HOSTS)
        if host not in result.results or not result.results[host].ok
    )
    assert result.ok, f"{result}\n{logs}"
    assert result.expected == HOSTS
    assert {host: r.ran for host, r in result.results.items()} == dict.fromkeys(HOSTS, True)


async def test_fan_out_through_sentinel_every_host_answers_once(
    cluster: SentinelCluster, fleet: DaemonFleet, publisher: aioredis.Redis, key_prefix: str
) -> None:
    await every_host_alive(publisher, key_prefix)
    result = await restart(publisher, key_prefix, "job-1")
    assert_all_ok_once(result, fleet)
    # The master has a replica, and it confirmed the command before anyone relied on it.
    assert result.replicated is True
    assert runs(fleet, "job-1") == dict.fromkeys(HOSTS, 1)
    stored = answers(cluster, cluster.master(), key_prefix, result.command_id)
    assert sorted(host for host, _ok, _summary in stored) == sorted(HOSTS)


async def test_sigkill_of_the_master_between_two_commands_and_groups_lost_with_it(
    cluster: SentinelCluster, fleet: DaemonFleet, publisher: aioredis.Redis, key_prefix: str
) -> None:
    await every_host_alive(publisher, key_prefix)
    first = await restart(publisher, key_prefix, "job-1")
    assert_all_ok_once(first, fleet)

    old, new = await failover(cluster)
    # The same clients: the publisher's and every daemon's follow the sentinels by themselves.
    second = await restart(publisher, key_prefix, "job-2", timeout=FAILOVER_WAIT)
    assert_all_ok_once(second, fleet)
    assert runs(fleet, "job-1") == dict.fromkeys(HOSTS, 1)
    assert runs(fleet, "job-2") == dict.fromkeys(HOSTS, 1)
    # Exactly once: one answer per host on the new master, no redelivery of anything.
    stored = answers(cluster, new, key_prefix, second.command_id)
    assert sorted(host for host, _ok, _summary in stored) == sorted(HOSTS)
    # The new master has no replica (the old one is dead): the publisher waits for none and
    # says nothing about it.
    assert second.replicated is None
    for host in HOSTS:
        log = fleet.log(host)
        # One line for the outage and one for the return, not one per retry; behind Sentinel
        # a daemon tries again at least once a second (each try asks the sentinels first).
        assert log.count("Redis unavailable") == 1, log
        assert "retrying with backoff up to 1s" in log
        assert log.count("serving") == 2, log
    assert old != new

    # A promoted replica may lack the consumer groups (created after its last sync, say): the
    # daemons re-create theirs at "$" and never replay the history as new commands.
    stream = command_stream_key(key_prefix)
    for host in HOSTS:
        cluster.node(new, "XGROUP", "DESTROY", stream, host)

    def groups_back() -> bool:
        return len(cluster.node(new, "XINFO", "GROUPS", stream)) == len(HOSTS)

    await asyncio.to_thread(wait_for, "every daemon's group to be back", groups_back)
    third = await restart(publisher, key_prefix, "job-3")
    assert_all_ok_once(third, fleet)
    for unit, command_id in (("job-1", first.command_id), ("job-2", second.command_id)):
        assert runs(fleet, unit) == dict.fromkeys(HOSTS, 1)
        # Not even delivered again (then the ledger would have answered it): one answer each.
        assert len(answers(cluster, new, key_prefix, command_id)) == len(HOSTS)


async def test_sigkill_with_commands_in_flight_runs_nothing_twice_and_shows_no_false_ok(
    cluster: SentinelCluster, fleet: DaemonFleet, publisher: aioredis.Redis, key_prefix: str
) -> None:
    """The worst case: the promoted replica missed the last writes, ran markers included.

    G runs on every host (held at a gate) while A is published and confirmed by the replica;
    then the replica is cut off, so what follows is lost in the switch: G's answers, acks and
    ran markers, A's delivery and ran markers, and all of B, published while every host is
    busy with A. The master is SIGKILLed while A runs on every host.
    """
    await every_host_alive(publisher, key_prefix)
    announced: list[Published] = []
    read_g_late = asyncio.Event()

    async def hold_g(published: Published) -> None:
        announced.append(published)
        await read_g_late.wait()  # G's answers are read only after the failover

    g = asyncio.create_task(
        restart(publisher, key_prefix, "gated-g", LOST_WAIT, on_published=hold_g)
    )
    await wait_until(lambda: fleet.started_everywhere("gated-g.service"), "every host in G")
    a = asyncio.create_task(
        restart(publisher, key_prefix, "gated-a", FAILOVER_WAIT, on_published=announced.append)
    )
    await wait_until(lambda: len(announced) == 2, "A to be published")
    assert announced[1].replicated is True  # A is on the replica: it survives the switch
    await asyncio.to_thread(cluster.cut_replication)
    fleet.release("gated-g.service")
    await wait_until(lambda: fleet.started_everywhere("gated-a.service"), "every host in A")
    b = asyncio.create_task(
        restart(publisher, key_prefix, "job-b", LOST_WAIT, on_published=announced.append)
    )
    await wait_until(lambda: len(announced) == 3, "B to be published")

    _old, new = await failover(cluster)
    fleet.release("gated-a.service")
    read_g_late.set()
    g_result, a_result, b_result = await asyncio.gather(g, a, b)

    # At most once per host, whatever the promoted replica re-delivered.
    assert runs(fleet, "gated-g") == dict.fromkeys(HOSTS, 1)
    assert runs(fleet, "gated-a") == dict.fromkeys(HOSTS, 1)
    assert runs(fleet, "job-b") == dict.fromkeys(HOSTS, 0)  # lost before any host read it
    # The promoted replica re-delivered A (its delivery was lost, and its ran markers with
    # it): each host's own ledger refused it.
    stored = answers(cluster, new, key_prefix, a_result.command_id)
    handled = {host for host, ok, summary in stored if summary == ALREADY_HANDLED}
    assert handled == HOSTS, stored
    assert all(ok == "0" for _host, ok, summary in stored if summary == ALREADY_HANDLED)
    # No false ok. G's answers were lost with the old master: G shows no host ok.
    assert not any(r.ok for r in g_result.results.values()), g_result
    assert g_result.silent | g_result.results.keys() == HOSTS
    # A ran during the switch and its answers went to the new master: real, one run each.
    assert_all_ok_once(a_result, fleet)
    # B was lost whole: every host silent.
    assert (b_result.silent, b_result.results) == (HOSTS, {})

    # And the fleet is whole again: the next command reaches every host exactly once.
    after = await restart(publisher, key_prefix, "job-1", timeout=FAILOVER_WAIT)
    assert_all_ok_once(after, fleet)
    assert runs(fleet, "job-1") == dict.fromkeys(HOSTS, 1)


async def test_the_old_master_returns_as_a_replica_and_nothing_runs_again(
    cluster: SentinelCluster, fleet: DaemonFleet, publisher: aioredis.Redis, key_prefix: str
) -> None:
    await every_host_alive(publisher, key_prefix)
    assert_all_ok_once(await restart(publisher, key_prefix, "job-1"), fleet)
    old, new = await failover(cluster)
    assert_all_ok_once(await restart(publisher, key_prefix, "job-2", timeout=FAILOVER_WAIT), fleet)

    # Back with its old data (its append-only file), and claiming to be the master until the
    # sentinels turn it into a replica of the new one.
    await asyncio.to_thread(cluster.restart, old)
    assert_all_ok_once(await restart(publisher, key_prefix, "job-3"), fleet)
    await asyncio.to_thread(cluster.wait_until_replica, old)
    fourth = await restart(publisher, key_prefix, "job-4")
    assert_all_ok_once(fourth, fleet)
    assert fourth.replicated is True  # the old master, now a replica, confirmed it

    for unit in ("job-1", "job-2", "job-3", "job-4"):
        assert runs(fleet, unit) == dict.fromkeys(HOSTS, 1), unit
    # Nobody of ours talked to the old master since it came back: no daemon read there, no
    # publisher or daemon ran a script there (what a replica or a reloaded append-only file
    # applies are the effects, XCLAIM or XADD, never these commands).
    stats = info(old, "commandstats", password=cluster.password)
    for name in ("xreadgroup", "evalsha", "eval"):
        assert f"cmdstat_{name}" not in stats, stats
    assert cluster.named_master() == new
    assert cluster.node(new, "XLEN", command_stream_key(key_prefix)) == 4
