"""N control daemons in this process, each with a Redis client of its own, for the fleet benches.

Imported after the bench script put the checkout on ``sys.path`` (see ``bench/_common.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis

from core.control_ops import ControlDaemon, alive_hosts
from core.redis_client import make_redis


@contextlib.asynccontextmanager
async def daemon_fleet(
    url: str, n: int, *, prefix: str, secret: str, state_dir: Path
) -> AsyncIterator[aioredis.Redis]:
    """N daemons (``host-0000``…) answering on ``url``; yields a publisher's client.

    Returns once every daemon serves and heartbeats; stops them all (cancellation) at the end.
    """
    clients = [make_redis(url) for _ in range(n)]
    daemons = [
        ControlDaemon(
            client,
            identity=f"host-{i:04d}",
            secret=secret,
            pull_targets={},
            restart_units=(),
            prefix=prefix,
            state_dir=state_dir,
        )
        for i, client in enumerate(clients)
    ]
    tasks = [asyncio.create_task(daemon.run()) for daemon in daemons]
    publisher = make_redis(url)
    try:
        await asyncio.wait_for(asyncio.gather(*(d.serving.wait() for d in daemons)), 60)
        if len(await alive_hosts(publisher, prefix=prefix, secret=secret)) != n:
            raise RuntimeError("not every daemon heartbeated")
        yield publisher
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(client.aclose() for client in clients), publisher.aclose())
