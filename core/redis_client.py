"""The one way admin-ops builds a Redis client, for the bot, the daemon and the command line.

Every call a caller makes is also bounded by the caller (``core.ops_exec.bounded``); the socket
timeouts here only make sure a half-open connection fails instead of hanging for ever.
"""

from __future__ import annotations

from typing import Final

import redis.asyncio as aioredis

__all__ = ["CONNECT_TIMEOUT", "SOCKET_TIMEOUT", "make_redis"]

#: Seconds to set up a connection.
CONNECT_TIMEOUT: Final = 2.0
#: Seconds a reply may take. Blocking stream reads wait at most half of this (see
#: ``core.control_ops.wire.read_block_seconds``), since redis-py does not lengthen it for them.
SOCKET_TIMEOUT: Final = 10.0
#: Seconds of idleness after which a connection is checked before it is used again.
HEALTH_CHECK_INTERVAL: Final = 30


def make_redis(url: str) -> aioredis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
