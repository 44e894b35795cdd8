"""Fleet fan-out: publish → every host's result, for N simulated daemons, against its floor.

For each N (default 10, 100, 500; pass others as arguments) the same process runs:

* N ``ControlDaemon`` tasks, one Redis client each (``core.redis_client.make_redis``, as
  deployed), answering the no-op ``ping`` op; a round is ``publish(ping)`` until all N results
  are in (signing, the heartbeat read and the check of every heartbeat's signature and
  freshness, verification, the per-host at-most-once marker, the signed result write and
  acknowledgement, the publisher's bounded reads and the check of every answer's signature all
  included). The daemon uses redis-py's ordinary client calls only; its state dir is a
  temporary directory;
* two floors with no daemon logic: N bare consumers, one client each, doing XREADGROUP on
  their own group and an XADD "ack" per command, and a publisher doing XADD then XREAD until
  N acks. The "bare" floor sends one-field entries both ways (the minimal transport); the
  "wire" floor sends the very entries the fleet exchanges (the seven signed command fields out,
  the six result fields back, a signature included), so daemon/wire isolates the cost of the
  daemon's and the publisher's logic.

Rounds alternate between the three so drift (CPU frequency, other load) hits all alike, and the
ratios are printed side by side for each N. **Target:** the daemon's p50 at most 1.5 × the wire
floor's at every N (a ``TARGET`` line per N; a miss is printed, not an exit status). Every
round checks that each host answered exactly once and that every daemon's at-most-once marker
ended "done"; "lost"/"dup" count violations (and make the exit status 1). With 20 rounds, p99
is the slowest round. Redis is a throw-away ``redis-server`` on a free loopback port, or
``REDIS_URL`` (never flushed; keys go under a unique prefix and are deleted afterwards).

    .venv/bin/python bench/fleet_fanout.py            # N = 10 100 500, 20 rounds each
    .venv/bin/python bench/fleet_fanout.py 50 --rounds 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The checkout goes on sys.path just above, so `python bench/fleet_fanout.py` works anywhere.
from bench._fleet import daemon_fleet
from core.control_ops import (
    build_command,
    publish,
    ran_marker_key,
    results_key,
)
from tests.support.redis_proc import free_port, start_redis_server, stop_redis_server

SECRET = uuid.uuid4().hex  # any shared secret will do; a fresh one per run
ROUND_TIMEOUT = 30.0
#: The daemon's p50 over the wire floor's p50, at most.
TARGET_RATIO = 1.5


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """``REDIS_URL`` if set, else a redis-server of our own that keeps nothing on disk."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as workdir:
        # A connection per daemon and per floor consumer: room for thousands of clients.
        maxclients = ("--maxclients", "10000")
        try:
            proc = start_redis_server(Path(workdir), port, extra_args=maxclients)
        except RuntimeError as exc:
            sys.exit(str(exc))
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_redis_server(proc)


def _client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_timeout=30)


@dataclass
class Tally:
    """Latencies in seconds, and what went wrong, for one side of one N."""

    latencies: list[float] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the latencies, nearest rank."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- the daemons --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def daemons(url: str, n: int, prefix: str) -> AsyncIterator[aioredis.Redis]:
    with tempfile.TemporaryDirectory(prefix="fleet-bench-state-") as state:
        async with daemon_fleet(
            url, n, prefix=prefix, secret=SECRET, state_dir=Path(state)
        ) as publisher:
            yield publisher


async def daemon_round(publisher: aioredis.Redis, n: int, prefix: str, tally: Tally) -> None:
    started = time.perf_counter()
    fleet = await publish(
        publisher,
        "ping",
        [],
        requested_by="bench",
        secret=SECRET,
        timeout=ROUND_TIMEOUT,
        prefix=prefix,
    )
    tally.latencies.append(time.perf_counter() - started)
    # Lost: a host with no result, or whose at-most-once marker never reached "done".
    # Run twice: more than one result entry from one host.
    entries = await publisher.xrange(results_key(fleet.command_id, prefix))
    hosts = [fields[b"host"] for _id, fields in entries]
    markers = await publisher.mget(
        [ran_marker_key(f"host-{i:04d}", fleet.command_id, prefix) for i in range(n)]
    )
    tally.lost += max(n - len(set(hosts)), sum(1 for marker in markers if marker != b"done"))
    tally.duplicated += len(hosts) - len(set(hosts))


# -- the floor ----------------------------------------------------------------------------------
# Two floors, both with no daemon logic at all. "bare": a one-field command and a one-field ack,
# the minimal transport the issue describes. "wire": the same entries the fleet exchanges (the
# seven signed command fields out, the five result fields back), so the difference to the
# daemon is its logic alone (verification, marker, Lua result+ack, heartbeats).

BARE, WIRE = "bare", "wire"
# A signature's size on the wire (the floor signs and checks nothing).
FLOOR_SIG = "0" * 64


def _ack_key(prefix: str, mode: str, command_id: str) -> str:
    return f"{prefix}:floor-{mode}:acks:{command_id}"


async def bare_consumer(
    client: aioredis.Redis, prefix: str, mode: str, name: str, ready: asyncio.Event
) -> None:
    stream = f"{prefix}:floor-{mode}"
    await client.xgroup_create(stream, name, id="$", mkstream=True)
    ready.set()
    while True:
        # Python 3.11's asyncio.wait_for (inside redis-py) can swallow a cancellation; the task
        # still counts it, so stop here rather than hang the benchmark's shutdown.
        if (task := asyncio.current_task()) is not None and task.cancelling():
            raise asyncio.CancelledError
        response = await client.xreadgroup(name, name, {stream: ">"}, count=16, block=10_000)
        for _stream, entries in response or ():
            for _entry_id, fields in entries:
                ack: dict[str, str] = {"host": name}
                if mode == WIRE:
                    ack.update(ok="1", ran="1", summary="pong", duration="0.000", sig=FLOOR_SIG)
                await client.xadd(_ack_key(prefix, mode, fields[b"id"].decode()), ack)


@contextlib.asynccontextmanager
async def floor_consumers(
    url: str, n: int, prefix: str, mode: str
) -> AsyncIterator[aioredis.Redis]:
    clients = [_client(url) for _ in range(n)]
    readies = [asyncio.Event() for _ in range(n)]
    tasks = [
        asyncio.create_task(bare_consumer(client, prefix, mode, f"c{i}", ready))
        for i, (client, ready) in enumerate(zip(clients, readies, strict=True))
    ]
    publisher = _client(url)
    try:
        await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies)), 60)
        yield publisher
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(client.aclose() for client in clients))
        await publisher.aclose()


async def floor_round(
    publisher: aioredis.Redis, n: int, prefix: str, mode: str, tally: Tally
) -> None:
    command_id = uuid.uuid4().hex
    entry: dict[Any, Any] = {"id": command_id}
    if mode == WIRE:
        entry = dict(build_command("ping", [], requested_by="bench", secret=SECRET, prefix=prefix))
        command_id = entry["id"]
    acks = _ack_key(prefix, mode, command_id)
    started = time.perf_counter()
    await publisher.xadd(f"{prefix}:floor-{mode}", entry)
    seen: list[bytes] = []
    last = "0"
    deadline = time.monotonic() + ROUND_TIMEOUT
    while len(seen) < n and time.monotonic() < deadline:
        response = await publisher.xread({acks: last}, count=1000, block=5000)
        for _stream, entries in response or ():
            for entry_id, fields in entries:
                last = entry_id
                seen.append(fields[b"host"])
    tally.latencies.append(time.perf_counter() - started)
    tally.lost += n - len(set(seen))
    tally.duplicated += len(seen) - len(set(seen))


# -- driver -------------------------------------------------------------------------------------


async def measure(url: str, n: int, rounds: int, warmup: int) -> dict[str, Tally]:
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    tallies = {BARE: Tally(), WIRE: Tally(), "daemon": Tally()}
    async with (
        floor_consumers(url, n, prefix, BARE) as bare_pub,
        floor_consumers(url, n, prefix, WIRE) as wire_pub,
        daemons(url, n, prefix) as fleet_pub,
    ):
        for i in range(warmup + rounds):
            # Warm-up rounds go to a scratch tally: connections and scripts get set up there.
            pick = (lambda side: tallies[side]) if i >= warmup else (lambda _side: Tally())
            await floor_round(bare_pub, n, prefix, BARE, pick(BARE))
            await floor_round(wire_pub, n, prefix, WIRE, pick(WIRE))
            await daemon_round(fleet_pub, n, prefix, pick("daemon"))
    cleaner = _client(url)
    try:
        keys = [key async for key in cleaner.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await cleaner.delete(*keys[start : start + 1000])
    finally:
        await cleaner.aclose()
    return tallies


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _pair(tally: Tally) -> str:
    return f"{_ms(tally.quantile(0.5))}/{_ms(tally.quantile(0.99))}"


def _ratio(fleet: Tally, floor: Tally) -> str:
    p50 = fleet.quantile(0.5) / floor.quantile(0.5)
    p99 = fleet.quantile(0.99) / floor.quantile(0.99)
    return f"{p50:.2f}x ({p99:.2f}x)"


async def main_async(sizes: list[int], rounds: int, warmup: int) -> int:
    with redis_server() as url:
        print(
            f"fleet fan-out: publish → all N results; {rounds} rounds per N after {warmup} warm-up"
        )
        print("p50/p99 in ms; ratios are daemon p50 (p99) over each floor's p50 (p99)")
        print(
            f"{'N':>5} | {'bare floor':>13} | {'wire floor':>13} | {'daemon':>13} | "
            f"{'vs bare':>13} | {'vs wire':>13} | lost dup"
        )
        failures = 0
        verdicts: list[str] = []
        for n in sizes:
            tallies = await measure(url, n, rounds, warmup)
            bare, wire, fleet = tallies[BARE], tallies[WIRE], tallies["daemon"]
            lost = sum(t.lost for t in tallies.values())
            dup = sum(t.duplicated for t in tallies.values())
            failures += lost + dup

            print(
                f"{n:>5} | {_pair(bare):>13} | {_pair(wire):>13} | {_pair(fleet):>13} | "
                f"{_ratio(fleet, bare):>13} | {_ratio(fleet, wire):>13} | {lost:>4} {dup:>3}",
                flush=True,
            )
            ratio = fleet.quantile(0.5) / wire.quantile(0.5)
            verdicts.append(
                f"TARGET daemon within {TARGET_RATIO:g}x of the wire floor at N={n}: "
                f"{'PASS' if ratio <= TARGET_RATIO else 'FAIL'} (p50 {ratio:.2f}x)"
            )
        print("\n".join(verdicts))
        print(f"CHECK every host answered exactly once: {'FAIL' if failures else 'PASS'}")
        return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10, 100, 500])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Two sockets per daemon plus one per floor consumer (two floors): lift the soft fd limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 6 * max(args.sizes) + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    return asyncio.run(main_async(args.sizes, args.rounds, args.warmup))


if __name__ == "__main__":
    sys.exit(main())
