"""Fixtures of the fleet tests (helpers live in ``tests.support.fleet``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from tests.support.fleet import client_for
from tests.support.redis_proc import RedisServer


@pytest.fixture
async def new_client(redis_server: RedisServer) -> AsyncIterator[Callable[..., aioredis.Redis]]:
    """Make Redis clients (one per daemon, as on real hosts); all are closed after the test."""
    made: list[aioredis.Redis] = []

    def make(url: str | None = None) -> aioredis.Redis:
        made.append(client_for(url or redis_server.url))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()
