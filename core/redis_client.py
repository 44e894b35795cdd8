"""The one way admin-ops builds a Redis client, for the bot, the daemon and the command line.

Every call a caller makes is also bounded by the caller (``core.ops_exec.bounded``); the socket
timeouts here only make sure a half-open connection fails instead of hanging for ever.

A ``redis+sentinel://`` URL (``core.env_reader.parse_sentinel_url``) gives redis-py's
``Sentinel(...).master_for(service)``: every connection asks the sentinels where the master is
before it connects, so a client follows a failover by itself. Two things differ from redis-py's
defaults, both so that a failover costs a bounded, short time and never leads to the old master:

- A connection that has to connect again, however it is used (handed out by the pool, a
  pipeline, a client holding one connection, or one taken from the pool and used directly),
  asks the sentinels first. redis-py 8.1's ``SentinelManagedConnection`` does so only when the
  pool hands it out; used directly it reconnects to the address it had, the dead or demoted
  old master.
- redis-py does not send a failed command again by itself (see ``MASTER_RETRIES``).
- The sentinels are asked once each, without retries: one that is down costs a refused
  connection, not redis-py's ten retries with backoff, before the next one is asked.

Each entry point builds its client once per process (the cog, the daemon, ``publish``,
``--check``): a client belongs to the event loop it is used in, so none is shared across loops.
"""

from __future__ import annotations

from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import NoBackoff

from core.env_reader import SentinelTarget, is_sentinel_url, parse_sentinel_url

__all__ = [
    "CONNECT_TIMEOUT",
    "HEALTH_CHECK_INTERVAL",
    "MASTER_RETRIES",
    "SENTINEL_TIMEOUT",
    "SOCKET_TIMEOUT",
    "FailoverConnection",
    "make_redis",
    "sentinel_master",
    "uses_sentinel",
]

#: Seconds to set up a connection.
CONNECT_TIMEOUT: Final = 2.0
#: Seconds a reply may take. Blocking stream reads wait at most half of this (see
#: ``core.control_ops.wire.read_block_seconds``), since redis-py does not lengthen it for them.
SOCKET_TIMEOUT: Final = 10.0
#: Seconds of idleness after which a connection is checked before it is used again.
HEALTH_CHECK_INTERVAL: Final = 30
#: Seconds one sentinel may take to connect or answer before the next one is asked.
SENTINEL_TIMEOUT: Final = 1.0
#: How often redis-py sends a command again after a connection error, behind Sentinel: never.
#: A failed call reaches its caller at once, whose own handling applies (the cog falls back to
#: its state files, the daemon reconnects, re-reads what it was handed and answers it, the
#: publisher's collector reads again until its deadline). A silent re-send would skip that: a
#: daemon's read re-sent to the new master skips entries whose delivery reply was lost.
MASTER_RETRIES: Final = 0


class FailoverConnection(SentinelManagedConnection):
    """A connection to the master the sentinels name, also when it reconnects on its own.

    redis-py sends a command on a disconnected connection by reconnecting to the last address
    (``connect_check_health``); this one asks the sentinels instead. Without it, a connection
    used directly (or a retry, were retries on) goes back to the old master after a failover.
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Send ``command``, connecting first through the sentinels when disconnected."""
        if not self.is_connected:
            # SentinelManagedConnection.connect() asks the sentinels for the master's address.
            await self.connect()  # type: ignore[no-untyped-call]
        await super().send_packed_command(command, check_health)


class _SentinelPool(SentinelConnectionPool):
    """The master's pool; closing it (the client's ``aclose``) also closes the sentinels'."""

    async def aclose(self) -> None:
        """Disconnect from the master and from every sentinel."""
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def _sentinel_client(target: SentinelTarget) -> aioredis.Redis:
    no_retry = Retry(NoBackoff(), 0)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            "password": target.sentinel_password,
            "retry": no_retry,
        },
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
    client: aioredis.Redis = sentinel.master_for(
        target.service,
        connection_pool_class=_SentinelPool,
        connection_class=FailoverConnection,
        username=target.username,
        password=target.password,
        db=target.db,
        retry=Retry(NoBackoff(), MASTER_RETRIES),
    )
    return client


def make_redis(url: str) -> aioredis.Redis:
    """A client for ``url``: ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``.

    ``redis+sentinel://[[user]:password@]host:port,host:port/service[/db]`` gives the master
    the sentinels name for ``service``, followed across failovers. Raises ValueError for a URL
    that ``core.env_reader`` would refuse.
    """
    if is_sentinel_url(url):
        return _sentinel_client(parse_sentinel_url(url))
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )


def uses_sentinel(client: aioredis.Redis) -> bool:
    """Whether ``client`` finds its master through Sentinel (so it may move)."""
    return isinstance(client.connection_pool, SentinelConnectionPool)


async def sentinel_master(client: aioredis.Redis) -> tuple[str, int] | None:
    """Where the sentinels say ``client``'s master is now; None for a client without Sentinel.

    Raises ``redis.sentinel.MasterNotFoundError`` (a ConnectionError) when no sentinel names a
    master that is up.
    """
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return None
    host, port = await pool.sentinel_manager.discover_master(pool.service_name)
    return str(host), int(port)
