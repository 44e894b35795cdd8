"""Collecting one command's answers: bounded reads of its result stream, verified answers only.

Anyone who can write to Redis can write to a result stream: forged answers, answers for hosts
that do not exist, ten thousand entries, entries of a megabyte. So every read is bounded before
anything is parsed, and only a signed answer from an expected host counts; the rest is counted
in :attr:`Collector.ignored` and logged at a bounded rate.

Two reads, both bounded. Waiting needs a blocking read, and Lua cannot block: the collector
waits with ``XREAD BLOCK COUNT k``, k at most WAKE_COUNT (a small count: at most that many
entries, each checked for size before it is decoded). When that read comes back full, or once
an entry larger than RESULT_ENTRY_LIMIT (no daemon writes one) was seen, it catches up with a
Lua script that hands over at most RESULT_READ_COUNT entries and about RESULT_READ_BYTES bytes
per call and returns an oversized entry as its id alone. After an oversized entry it stops
blocking altogether and polls with the script, so no more than one blocking read's worth of an
attacker's large entries is ever read whole. The script and the size check live in
:mod:`core.control_ops.streams`, shared with the daemon's reads of the command stream.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.control_ops.streams import (
    POLL_INTERVAL,
    SCAN_BYTES,
    Entry,
    bounded_entries,
    bounded_read_lua,
    checked_entries,
    raw_stream_client,
)
from core.control_ops.wire import (
    DEFAULT_PREFIX,
    RESULT_ENTRY_LIMIT,
    RESULT_FIELDS,
    HostResult,
    Untrusted,
    read_block_seconds,
    verify_result,
)
from core.names import IDENTITY
from core.ops_exec import as_text, bounded, clean_text, raise_if_cancelling

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "POLL_INTERVAL",
    "RECONNECT_BASE",
    "RECONNECT_CAP",
    "RESULT_READ_BYTES",
    "RESULT_READ_COUNT",
    "UNTRUSTED_LOG",
    "WAKE_COUNT",
    "Collector",
    "RateLimitedLog",
    "call_back",
    "read_result_entries",
    "shown_host",
]

log = logging.getLogger("admin_ops.control_ops")

#: The most result entries one catch-up read hands over.
RESULT_READ_COUNT: Final = 256
#: The most entries one blocking read hands over (each is size-checked before it is decoded).
WAKE_COUNT: Final = 16
#: About the most bytes of entries one read hands over (one entry more at most).
RESULT_READ_BYTES: Final = 256 * 1024
# The bounded read of a result stream (see core.control_ops.streams): the protocol's fields only,
# in RESULT_FIELDS order (the signature covers no other field), the order a daemon writes them.
_READ_LUA: Final = bounded_read_lua(RESULT_FIELDS)

#: The first pause before reading again after the connection failed; it doubles up to the cap.
RECONNECT_BASE: Final = 0.05
#: The longest pause between two attempts to read again (a failover takes seconds).
RECONNECT_CAP: Final = 0.5
# A read that failed because the connection did: retried. Anything else Redis says (a wrong
# type at the key, say) is an answer, and is raised to the caller as before.
_CONNECTION_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


# Seconds a read may take beyond its own blocking time or the deadline.
_READ_SLACK: Final = 2.0


def _entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a comparable pair; (0, 0) for one that is not an id."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)


def _not_counted(_reason: str, _host: str) -> None:
    """An untrusted entry read again after a reconnect: it was counted the first time."""


class RateLimitedLog:
    """At most ``burst`` warnings per ``window`` seconds; the rest counted, reported later."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Log to ``logger``."""
        self._logger = logger
        self._burst = burst
        self._window = window
        self._clock = clock
        self._started = clock()
        self._logged = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        """Log one line, unless ``burst`` lines were logged in this window already."""
        now = self._clock()
        if now - self._started >= self._window:
            if self._suppressed:
                self._logger.warning(
                    "%d similar lines suppressed in %.0f s", self._suppressed, self._window
                )
            self._started, self._logged, self._suppressed = now, 0, 0
        if self._logged < self._burst:
            self._logged += 1
            self._logger.warning(message, *args)
        else:
            self._suppressed += 1


#: Untrusted heartbeats and answers: one line each, at a bounded rate per process.
UNTRUSTED_LOG: Final = RateLimitedLog(log)


def shown_host(host: object) -> str:
    """An untrusted host name as a log can show it: cut, cleaned, quoted."""
    return repr(clean_text(as_text(host)[:64]))


async def call_back(callback: Callable[[Any], Any] | None, value: Any) -> None:
    """Call a sync or async callback; its failure is logged, never allowed to stop collecting."""
    if callback is None:
        return
    try:
        outcome = callback(value)
        if inspect.isawaitable(outcome):
            await outcome
    # The callback is the caller's code (a chat message, a terminal table): whatever it raises,
    # the fleet's answers must still be collected and returned.
    except Exception:
        log.exception("result callback %r failed", callback)


async def read_result_entries(
    redis: aioredis.Redis, key: str, last_id: str, *, count: int = RESULT_READ_COUNT
) -> tuple[list[Entry], bool]:
    """One bounded catch-up read after ``last_id``: the entries, and whether there may be more."""
    reply = await redis.eval(
        _READ_LUA, 1, key, last_id, count, RESULT_READ_BYTES, RESULT_ENTRY_LIMIT, SCAN_BYTES
    )
    return bounded_entries(reply, RESULT_FIELDS)


def _xread_entries(response: Any) -> list[Entry]:
    """An XREAD reply's entries; one larger than RESULT_ENTRY_LIMIT is not decoded at all."""
    return checked_entries(response, RESULT_FIELDS, RESULT_ENTRY_LIMIT)


class Collector:
    """The answers of ``expected`` hosts to ``command_id``, read from ``key`` as they arrive."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        command_id: str,
        key: str,
        expected: frozenset[str],
        secret: str,
        command_sig: str,
        prefix: str = DEFAULT_PREFIX,
        on_result: Callable[[HostResult], Any] | None = None,
    ) -> None:
        """Nothing is read until :meth:`run`.

        ``command_sig`` is the ``sig`` of the command entry published: only an answer to that
        entry counts. ``prefix`` is the fleet's key prefix (the answers' signatures cover it).
        """
        self._redis = redis
        self._raw = raw_stream_client(redis)
        self._command_id = command_id
        self._key = key
        self._expected = expected
        self._secret = secret
        self._command_sig = command_sig
        self._prefix = prefix
        self._on_result = on_result
        self._script = redis.register_script(_READ_LUA)
        self._last = "0"
        self._polling = False
        # Failed reads in a row, and the last entry looked at before the first of them.
        self._outages = 0
        self._seen: tuple[int, int] = (0, 0)
        #: The first verified answer of each expected host.
        self.results: dict[str, HostResult] = {}
        #: Entries not believed, by reason.
        self.ignored: Counter[str] = Counter()

    async def run(self, deadline: float) -> None:
        """Read until every expected host answered or ``deadline`` (monotonic) passed.

        A read that fails because the connection does (Redis restarting, or a Sentinel
        failover under way) is retried until the deadline, from the start of the stream: a
        promoted replica may lack answers read before, and may number new ones below them.
        """
        catching_up = False
        while not self._expected <= self.results.keys():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                entries, catching_up = await self._read(catching_up, remaining)
            except _CONNECTION_ERRORS as exc:
                raise_if_cancelling()
                await self._lost(exc, remaining)
                catching_up = False
                continue
            raise_if_cancelling()
            if self._outages:
                self._back()
            if entries:
                self._last = entries[-1][0]
                await self._take(entries)
            elif self._polling and not catching_up:
                await asyncio.sleep(min(POLL_INTERVAL, remaining))  # a poll period

    async def _read(self, catching_up: bool, remaining: float) -> tuple[list[Entry], bool]:
        """One bounded read: the entries, and whether to catch up with the script next."""
        if catching_up or self._polling:
            return await bounded(self._catch_up(), remaining + _READ_SLACK)
        block = min(remaining, read_block_seconds(self._redis))
        # Bounded as well: a master that went silent (not closed) must not hold the read past
        # the deadline for the whole socket timeout.
        entries = await bounded(self._wait(max(1, int(block * 1000))), block + _READ_SLACK)
        return entries, len(entries) >= self._wake_count() or self._polling

    async def _lost(self, exc: BaseException, remaining: float) -> None:
        """The connection failed: say so once, wait a little (bounded), read from the start."""
        if not self._outages:
            log.warning(
                "lost Redis while collecting the answers to %s (%s): reading again until the"
                " deadline",
                self._command_id,
                exc,
            )
        self._outages += 1
        # Entries up to here were looked at already: not counted again as untrusted.
        self._seen = max(self._seen, _entry_order(self._last))
        self._last = "0"
        step = min(RECONNECT_CAP, RECONNECT_BASE * 2 ** min(self._outages, 8))
        await asyncio.sleep(min(step, remaining))  # a retry period, bounded by the deadline

    def _back(self) -> None:
        log.info("reading the answers to %s again", self._command_id)
        self._outages = 0

    def _wake_count(self) -> int:
        return max(1, min(WAKE_COUNT, len(self._expected - self.results.keys())))

    async def _wait(self, block_ms: int) -> list[Entry]:
        """Block until there are entries after the last one read; at most a few, size-checked."""
        response = await self._raw.xread(
            {self._key: self._last}, count=self._wake_count(), block=block_ms
        )
        return self._checked(response)

    def _checked(self, response: Any) -> list[Entry]:
        """A blocking read's entries; after an oversized one, stop blocking (see the module)."""
        entries = _xread_entries(response)
        if any(fields is None for _id, fields in entries):
            # Blocking reads hand over whole entries; an attacker's may be huge: stop using them.
            UNTRUSTED_LOG.warning("result stream %s holds oversized entries: polling it", self._key)
            self._polling = True
        return entries

    async def _catch_up(self) -> tuple[list[Entry], bool]:
        """One bounded read with the script: the entries, and whether there may be more."""
        args = (self._last, RESULT_READ_COUNT, RESULT_READ_BYTES, RESULT_ENTRY_LIMIT, SCAN_BYTES)
        reply = await self._script(keys=[self._key], args=args)
        return bounded_entries(reply, RESULT_FIELDS)

    async def _take(self, entries: Iterable[Entry]) -> None:
        for entry_id, fields in entries:
            if self._seen and _entry_order(entry_id) <= self._seen:
                # Read again after a reconnect: only an answer not counted yet matters.
                if fields is not None and fields["host"] in self.results:
                    continue
                await self._take_answer(fields, count_ignored=False)
                continue
            await self._take_answer(fields, count_ignored=True)

    async def _take_answer(self, fields: dict[str, str] | None, *, count_ignored: bool) -> None:
        ignore = self._ignore if count_ignored else _not_counted
        if fields is None:
            ignore("oversized", "?")
            return
        host = fields["host"]
        if host not in self._expected:
            ignore("not expected" if IDENTITY.fullmatch(host) else "bad host name", host)
            return
        try:
            result = verify_result(
                fields,
                self._command_id,
                self._secret,
                command_sig=self._command_sig,
                prefix=self._prefix,
                host_checked=True,
            )
        except Untrusted as exc:
            ignore(str(exc), host)
            return
        if result.host in self.results:
            return  # the first answer per host counts; a later one is a redelivery
        self.results[result.host] = result
        await call_back(self._on_result, result)

    def _ignore(self, reason: str, host: str) -> None:
        self.ignored[reason] += 1
        UNTRUSTED_LOG.warning(
            "ignored an answer to %s from %s: %s", self._command_id, shown_host(host), reason
        )
