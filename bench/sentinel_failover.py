"""From the master's SIGKILL to the first command answered by every host, vs Sentinel's own time.

One master, one replica and three sentinels (``redis-server --sentinel``, loopback,
``down-after-milliseconds`` 1000, from ``tests.support.sentinel``) and five control daemon
processes (``python -m core.control_ops daemon``) with ``REDIS_URL=redis+sentinel://…``. Each
round SIGKILLs the master and measures, from the kill:

* ``sentinels``: until a sentinel announces ``+switch-master`` (the sentinels' own failover
  time: detection, agreement, election, promotion);
* ``every host``: until a ``publish(ping)`` (retried every 50 ms while there is no master) has
  the answer of all five hosts. That is the publisher finding the new master, and every daemon
  reconnecting to it by itself and answering.

The killed node then rejoins as a replica of the new master, for the next round.

**Target:** ``every host`` at most 2 s after ``sentinels``, in every round (a ``TARGET`` line; a
miss does not change the exit status). **Check:** in every round each host answered the first
complete command exactly once.

    .venv/bin/python bench/sentinel_failover.py              # 5 rounds, ~30 s
    .venv/bin/python bench/sentinel_failover.py --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The checkout goes on sys.path just above, so `python bench/sentinel_failover.py` works anywhere.
from bench._common import median, print_table, verdict
from core.control_ops import FleetResult, alive_hosts, publish, results_key
from core.ops_exec import redis_errors
from core.redis_client import make_redis
from tests.support.sentinel import DaemonFleet, SentinelCluster

SECRET = uuid.uuid4().hex
PREFIX = "bench:failover"
HOSTS = 5
#: How long one publish waits for answers (a command published on the new master is answered
#: as soon as every daemon is back; one published too early fails at once).
PUBLISH_TIMEOUT = 5.0
#: The pause between two publish attempts while there is no master.
RETRY = 0.05
TARGET_EXTRA = 2.0
DEADLINE = 60.0


async def switch_master(sentinel_port: int, subscribed: asyncio.Event) -> float:
    """When (monotonic) the sentinel on ``sentinel_port`` announces ``+switch-master``."""
    client = aioredis.Redis(host="127.0.0.1", port=sentinel_port)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe("+switch-master")
        subscribed.set()
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=DEADLINE)
            if message is not None:
                return time.monotonic()
    finally:
        await pubsub.aclose()
        await client.aclose()


async def first_complete(publisher: aioredis.Redis) -> tuple[float, FleetResult]:
    """Publish ping until one command has every host's answer; when (monotonic), and it."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        try:
            result = await publish(
                publisher,
                "ping",
                [],
                requested_by="bench",
                secret=SECRET,
                timeout=PUBLISH_TIMEOUT,
                prefix=PREFIX,
            )
        except redis_errors():
            await asyncio.sleep(RETRY)  # no master yet: a retry period
            continue
        if result.ok and len(result.results) == HOSTS:
            return time.monotonic(), result
    raise RuntimeError("no command reached every host")


async def all_alive(publisher: aioredis.Redis) -> None:
    end = time.monotonic() + DEADLINE
    while len(await alive_hosts(publisher, prefix=PREFIX, secret=SECRET)) != HOSTS:
        if time.monotonic() > end:
            raise RuntimeError("the daemons did not all heartbeat")
        await asyncio.sleep(RETRY)  # polling the heartbeats: a poll period


async def one_round(
    cluster: SentinelCluster, publisher: aioredis.Redis
) -> tuple[float, float, bool]:
    """Kill the master; the sentinels' time, every host's time, whether exactly once held."""
    await all_alive(publisher)
    subscribed = asyncio.Event()
    watcher = asyncio.create_task(switch_master(cluster.sentinel_ports[0], subscribed))
    await subscribed.wait()
    old, killed = await asyncio.to_thread(cluster.kill_master)
    done, result = await first_complete(publisher)
    switched = await asyncio.wait_for(watcher, DEADLINE)
    entries = await publisher.xrange(results_key(result.command_id, PREFIX))
    hosts = [fields[b"host"] for _id, fields in entries]
    once = len(hosts) == len(set(hosts)) == HOSTS
    await asyncio.to_thread(cluster.rejoin, old)
    return switched - killed, done - killed, once


async def measure(rounds: int) -> int:
    with tempfile.TemporaryDirectory(prefix="sentinel-failover-") as workdir:
        cluster = SentinelCluster.start(Path(workdir) / "redis")
        fleet = DaemonFleet.start(
            Path(workdir) / "hosts",
            redis_url=cluster.url(),
            secret=SECRET,
            prefix=PREFIX,
            units=(),
            count=HOSTS,
            python=sys.executable,
            cwd=Path(__file__).resolve().parent.parent,
        )
        publisher = make_redis(cluster.url())
        try:
            results = [await one_round(cluster, publisher) for _ in range(rounds)]
        finally:
            await publisher.aclose()
            fleet.stop()
            cluster.stop()
    return report(results)


def report(results: list[tuple[float, float, bool]]) -> int:
    print(
        f"SIGKILL of the master → +switch-master (sentinels) and → first ping answered by all "
        f"{HOSTS} daemon processes (every host); down-after-milliseconds 1000"
    )
    rows = [
        [str(i), f"{sentinels:.2f}", f"{every:.2f}", f"{every - sentinels:+.2f}"]
        for i, (sentinels, every, _once) in enumerate(results, 1)
    ]
    extras = [every - sentinels for sentinels, every, _once in results]
    rows.append(
        [
            "median",
            f"{median([r[0] for r in results]):.2f}",
            f"{median([r[1] for r in results]):.2f}",
            f"{median(extras):+.2f}",
        ]
    )
    print_table(("round", "sentinels s", "every host s", "extra s"), rows)
    worst = max(extras)
    verdict(
        "TARGET",
        f"every host within {TARGET_EXTRA:g} s of the sentinels' failover",
        worst <= TARGET_EXTRA,
        f"worst {worst:+.2f} s, median {median(extras):+.2f} s",
    )
    bad = sum(1 for *_times, once in results if not once)
    verdict("CHECK", "each host answered exactly once", not bad, f"{bad} bad rounds")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    return asyncio.run(measure(args.rounds))


if __name__ == "__main__":
    sys.exit(main())
