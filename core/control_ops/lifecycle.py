"""A daemon's lifecycle helpers: how long to wait before reconnecting, how to stop a task."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, Final

__all__ = ["BACKOFF_BASE", "BACKOFF_CAP", "SENTINEL_BACKOFF_CAP", "backoff_delay", "stop_task"]

#: The first reconnect delay after a Redis outage, in seconds (it doubles up to the cap).
BACKOFF_BASE: Final = 0.1
#: The longest a daemon waits between two reconnect attempts.
BACKOFF_CAP: Final = 30.0
#: The same when the client finds its master through Sentinel. Each attempt first asks the
#: sentinels where the master is (cheap for them, whatever the size of the fleet) and fails at
#: once while the switch is going on, so a daemon is back within about a second of a failover,
#: however long the sentinels took to decide it.
SENTINEL_BACKOFF_CAP: Final = 1.0


def backoff_delay(
    attempt: int,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    rng: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with equal jitter: between half and all of ``base * 2**attempt``.

    The jitter spreads a fleet's reconnects after a Redis restart; half the step is kept so a
    retry never comes immediately; ``cap`` bounds how long a daemon stays away.
    """
    step = min(cap, base * 2.0 ** min(attempt, 32))
    return step / 2 + rng() * step / 2


async def stop_task(task: asyncio.Task[Any], *, again: Callable[[], bool]) -> None:
    """Cancel ``task`` and wait until it has finished.

    If the cancellation was swallowed (see ``core.ops_exec.raise_if_cancelling``) while the task
    goes on to block, it is repeated, but only while ``again()`` says the task is merely
    waiting: a task that is cleaning up after a cancellation (run_exec killing a process group)
    is left to finish its cleanup undisturbed.
    """
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=0.05)
        if not task.done() and again():
            task.cancel()
