"""How a daemon reads its consumer group on the command stream: in bounded steps.

Anyone who can write to Redis can append a command entry of hundreds of megabytes. XREADGROUP
hands over whole entries, so the daemon reads the way the collector reads result streams (see
:mod:`core.control_ops.streams`): its pending entries and every catch-up read go through the
bounded Lua script (at most ``NEW_COUNT`` or ``PENDING_COUNT`` entries a call, an entry larger
than COMMAND_ENTRY_LIMIT as its id alone, never decoded); only the wait for new work blocks, with
``XREADGROUP COUNT 1``, and its entry is size-checked before it is decoded. Once a blocking read
has brought an oversized entry, this reader never blocks again: it polls with the script every
POLL_INTERVAL seconds. So the most an attacker's large entries cost a daemon is one entry read
whole (not decoded), once per process.

A burst is read one entry per blocking read (it returns at once while entries wait): commands
are rare, and a catch-up read after each one would cost every host one more round trip per
command, which the fan-out pays for as a whole (``bench/fleet_fanout.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from core.control_ops.streams import (
    POLL_INTERVAL,
    SCAN_BYTES,
    Entry,
    bounded_entries,
    bounded_read_lua,
    checked_entries,
    raw_stream_client,
    short_field,
)
from core.control_ops.wire import COMMAND_ENTRY_LIMIT, SIGNED_FIELDS

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["COMMAND_FIELDS", "NEW_COUNT", "PENDING_COUNT", "READ_BYTES", "CommandReader"]

log = logging.getLogger("admin_ops.control_ops")

#: The fields of a command entry a daemon reads (the signed ones and the signature): no other
#: field means anything, so no other is handed over.
COMMAND_FIELDS: Final = (*SIGNED_FIELDS, "sig")
#: The most new commands one catch-up read hands over.
NEW_COUNT: Final = 16
#: The most pending commands one read hands over (after a reconnect or a restart).
PENDING_COUNT: Final = 100
#: About the most bytes of command entries one read decodes (a batch more at most).
READ_BYTES: Final = 256 * 1024
_READ_LUA: Final = bounded_read_lua(COMMAND_FIELDS, group=True)
# The longest command id (core.names.COMMAND_ID): the most of an oversized entry ever read.
_ID_BYTES: Final = 64


class CommandReader:
    """Bounded reads of ``consumer``'s entries in ``group`` on the command stream ``stream``."""

    def __init__(self, redis: aioredis.Redis, stream: str, *, group: str, consumer: str) -> None:
        """Nothing is read before the first call."""
        self._redis = redis
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._script = redis.register_script(_READ_LUA)
        self._raw = raw_stream_client(redis)
        #: Whether this reader stopped blocking (it saw an oversized entry): it polls instead.
        self.polling = False

    async def pending(self, after: str) -> list[Entry]:
        """Entries handed over before and never acknowledged, after entry id ``after``."""
        entries, _more = await self._read(after, PENDING_COUNT)
        return entries

    async def new(self, block_ms: int) -> list[Entry]:
        """New entries: a blocking wait of one entry, then catch-up reads until none is left.

        Returns an empty list when the wait (or a poll period) ended without work.
        """
        if self.polling:
            entries, _more = await self._read(">", NEW_COUNT)
            if not entries:
                await asyncio.sleep(POLL_INTERVAL)  # a poll period
            return entries
        response = await self._raw.xreadgroup(
            self._group, self._consumer, {self._stream: ">"}, count=1, block=block_ms
        )
        entries = checked_entries(response, COMMAND_FIELDS, COMMAND_ENTRY_LIMIT)
        if any(fields is None for _id, fields in entries):
            # A blocking read hands over whole entries; an attacker's may be huge: stop using them.
            log.warning("command stream %s holds oversized entries: polling it", self._stream)
            self.polling = True
        return entries

    async def command_id(self, entry_id: str) -> str:
        """The ``id`` field of an oversized entry, if it can be a command id (else "")."""
        return await short_field(self._redis, self._stream, entry_id, "id", _ID_BYTES)

    async def _read(self, after: str, most: int) -> tuple[list[Entry], bool]:
        args = [
            after, str(most), str(READ_BYTES), str(COMMAND_ENTRY_LIMIT), str(SCAN_BYTES),
            self._group, self._consumer,
        ]  # fmt: skip
        reply = await self._script(keys=[self._stream], args=args)
        return bounded_entries(reply, COMMAND_FIELDS)
