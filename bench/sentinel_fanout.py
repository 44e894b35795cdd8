"""Fleet fan-out through Sentinel vs a direct connection to the same master, side by side.

One master, one replica and three sentinels (``redis-server --sentinel``, on loopback, from
``tests.support.sentinel``). Two fleets of N ``ControlDaemon`` tasks run in this process, each
with its own key prefix and its own clients from ``core.redis_client.make_redis``:

* ``sentinel``: ``REDIS_URL=redis+sentinel://…/admin-ops`` (daemons and publisher alike);
* ``direct``: ``redis://127.0.0.1:<the same master>/0``.

A round is ``publish(ping)`` until all N answers are in, on one fleet then the other (the order
alternates every round), so both see the same machine at the same time. Both masters are the
same one, with the same replica: both publishers WAIT for it, and the difference is the client
alone (asking the sentinels at connect time, the failover-aware connection class).

**Target:** sentinel p50 ≤ 1.1 × direct p50 (a ``TARGET`` line; a miss does not change the exit
status). **Check:** every host answered every round exactly once, and a replica confirmed every
command.

    .venv/bin/python bench/sentinel_fanout.py              # N = 10, 200 rounds
    .venv/bin/python bench/sentinel_fanout.py 50 --rounds 100
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

# The checkout goes on sys.path just above, so `python bench/sentinel_fanout.py` works anywhere.
from bench._common import TIMING_HEADERS, median, print_table, timing_row, verdict
from bench._fleet import daemon_fleet
from core.control_ops import publish, results_key
from tests.support.sentinel import SentinelCluster

SECRET = uuid.uuid4().hex
ROUND_TIMEOUT = 30.0
TARGET_RATIO = 1.1


class Side:
    """One fleet's latencies and what went wrong."""

    def __init__(self, name: str, publisher: aioredis.Redis, prefix: str, n: int) -> None:
        self.name, self.publisher, self.prefix, self.n = name, publisher, prefix, n
        self.latencies: list[float] = []
        self.wrong = 0

    async def round(self, keep: bool) -> None:
        started = time.perf_counter()
        result = await publish(
            self.publisher,
            "ping",
            [],
            requested_by="bench",
            secret=SECRET,
            timeout=ROUND_TIMEOUT,
            prefix=self.prefix,
        )
        took = time.perf_counter() - started
        entries = await self.publisher.xrange(results_key(result.command_id, self.prefix))
        hosts = [fields[b"host"] for _id, fields in entries]
        once = len(hosts) == len(set(hosts)) == self.n
        if not (result.ok and once and result.replicated is True):
            self.wrong += 1
        if keep:
            self.latencies.append(took)


async def measure(n: int, rounds: int, warmup: int) -> int:
    with tempfile.TemporaryDirectory(prefix="sentinel-fanout-") as workdir:
        cluster = SentinelCluster.start(Path(workdir) / "redis")
        try:
            master = cluster.master()
            urls = {"sentinel": cluster.url(), "direct": f"redis://127.0.0.1:{master}/0"}
            async with (
                daemon_fleet(
                    urls["sentinel"],
                    n,
                    prefix="bench:s",
                    secret=SECRET,
                    state_dir=Path(workdir) / "s",
                ) as via_sentinel,
                daemon_fleet(
                    urls["direct"],
                    n,
                    prefix="bench:d",
                    secret=SECRET,
                    state_dir=Path(workdir) / "d",
                ) as direct,
            ):
                sides = [
                    Side("sentinel", via_sentinel, "bench:s", n),
                    Side("direct", direct, "bench:d", n),
                ]
                for i in range(warmup + rounds):
                    order = sides if i % 2 == 0 else sides[::-1]
                    for side in order:
                        await side.round(keep=i >= warmup)
            assert cluster.named_master() == master  # no failover happened meanwhile
        finally:
            cluster.stop()
    return report(n, rounds, warmup, sides)


def report(n: int, rounds: int, warmup: int, sides: list[Side]) -> int:
    print(
        f"fan-out of ping to {n} daemons through Sentinel vs direct to the same master "
        f"(with one replica, WAIT included): {rounds} rounds each after {warmup} warm-up"
    )
    print_table(TIMING_HEADERS, [timing_row(side.name, side.latencies) for side in sides])
    via_sentinel, direct = sides
    ratio = median(via_sentinel.latencies) / median(direct.latencies)
    pairs = sorted(s / d for s, d in zip(via_sentinel.latencies, direct.latencies, strict=True))
    per_round = pairs[len(pairs) // 2]
    print(
        f"sentinel / direct: p50 ratio {ratio:.3f}x (median of per-round ratios {per_round:.3f}x)"
    )
    verdict(
        "TARGET", f"sentinel p50 ≤ {TARGET_RATIO:g}x direct", ratio <= TARGET_RATIO, f"{ratio:.3f}x"
    )
    wrong = via_sentinel.wrong + direct.wrong
    verdict(
        "CHECK",
        "every host answered once and a replica confirmed it",
        not wrong,
        f"{wrong} bad rounds",
    )
    return 1 if wrong else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=10, help="daemons per fleet")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(measure(args.n, args.rounds, args.warmup))


if __name__ == "__main__":
    sys.exit(main())
