"""Reading Redis stream replies, and how long a blocking stream read may wait.

Stream replies come in two shapes (RESP2 lists, RESP3 dicts) and the Redis client is the
caller's; these helpers accept both.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from core.ops_exec import as_text

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["MAX_BLOCK_SECONDS", "read_block_seconds", "stream_entries", "stream_pairs"]

#: The longest blocking stream read. XREADGROUP BLOCK must stay below the client's socket
#: timeout, or redis-py reports a timeout on a healthy idle connection (redis-py does not
#: stretch the read timeout for stream reads).
MAX_BLOCK_SECONDS: Final = 5.0


def _entries_per_stream(response: Any) -> Iterable[Any]:
    """Each stream's entry list: RESP2 replies are ``[[stream, entries], ...]``, RESP3 a dict."""
    if not response:
        return ()
    if isinstance(response, dict):
        return response.values()
    return (entries for _stream, entries in response)


def stream_pairs(response: Any) -> Iterator[tuple[Any, Any]]:
    """Each ``(entry id, fields)`` of an XREAD/XREADGROUP reply, as the client returned them.

    Nothing is decoded: a reader can look at the sizes first.
    """
    for entries in _entries_per_stream(response):
        if entries and isinstance(entries[0], list):
            entries = [entry for group in entries for entry in group]
        yield from entries or ()


def stream_entries(response: Any) -> list[tuple[str, dict[str, str]]]:
    """Flatten an XREAD/XREADGROUP reply into ``(entry id, fields)``.

    redis-py returns a list of ``[stream, entries]`` with RESP2 and a dict with RESP3 (where
    each value may be wrapped in one more list); the client is the caller's, so accept both.
    A trimmed entry that is still pending comes back with no fields.
    """
    return [
        (as_text(entry_id), {as_text(k): as_text(v) for k, v in (raw or {}).items()})
        for entry_id, raw in stream_pairs(response)
    ]


def _socket_timeout(client: aioredis.Redis) -> float | None:
    """The read timeout the client's connections use, including redis-py's own default.

    ``connection_kwargs`` holds only what the caller passed, so the default (5 s in redis-py 8)
    is read from the connection class, where it lives.
    """
    pool = client.connection_pool
    if "socket_timeout" in pool.connection_kwargs:
        value = pool.connection_kwargs["socket_timeout"]
        return None if value is None else float(value)
    for cls in pool.connection_class.__mro__:
        init = vars(cls).get("__init__")
        if init is None:
            continue
        param = inspect.signature(init).parameters.get("socket_timeout")
        if param is not None and param.default is not inspect.Parameter.empty:
            return None if param.default is None else float(param.default)
    return 1.0  # unknown client: assume a short timeout rather than risk a spurious one


def read_block_seconds(client: aioredis.Redis) -> float:
    """How long a blocking stream read may wait: half the socket timeout, at most 5 s."""
    timeout = _socket_timeout(client)
    if not timeout:
        return MAX_BLOCK_SECONDS
    return max(0.01, min(MAX_BLOCK_SECONDS, timeout / 2))
