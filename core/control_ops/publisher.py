"""Publishing a fleet command and collecting the hosts' answers as they arrive."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from core.control_ops.wire import (
    COMMAND_STREAM_MAXLEN,
    DEFAULT_COMMAND_TTL,
    DEFAULT_PREFIX,
    FleetResult,
    HostResult,
    Published,
    build_command,
    command_stream_key,
    heartbeat_key,
    hosts_index_key,
    parse_result_fields,
    read_block_seconds,
    results_key,
    stream_entries,
)
from core.ops_exec import as_text, raise_if_cancelling

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["DEFAULT_PUBLISH_TIMEOUT", "alive_hosts", "publish"]

# A fixed name: under `python -m core.control_ops` __name__ would be "__main__".
log = logging.getLogger("admin_ops.control_ops")

#: Seconds ``publish`` waits for the hosts' answers by default.
DEFAULT_PUBLISH_TIMEOUT: Final = 30.0
# Result entries read per XREAD: a whole fleet's answers in one reply.
_READ_COUNT: Final = 1000

# The identities whose heartbeat key exists, in one round trip; members whose key is gone are
# dropped from the index in the same step, so a daemon that has just come back and re-added
# itself is never removed by a publisher that saw it missing a moment earlier. The heartbeat
# keys are derived from the members, so these scripts need a standalone Redis (not a cluster).
# KEYS: the index set; ARGV: the heartbeat key prefix ("{prefix}:hosts:").
_ALIVE_LUA_BODY: Final = """
local alive = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. member) == 1 then
    alive[#alive + 1] = member
  else
    redis.call('SREM', KEYS[1], member)
  end
end
"""
_ALIVE_LUA: Final = _ALIVE_LUA_BODY + "return alive\n"

# Publishing: read the alive hosts and XADD the command in one atomic step, so no daemon can
# come or go between the two and the expected set is exactly the set that will see the command
# (a heartbeat exists only once its consumer group does). One round trip, too.
# KEYS: the index set, the command stream; ARGV: heartbeat key prefix, maxlen, field/value pairs.
_PUBLISH_LUA: Final = (
    _ALIVE_LUA_BODY
    + """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return alive
"""
)


async def alive_hosts(redis: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> frozenset[str]:
    """Identities whose heartbeat key exists right now."""
    script = redis.register_script(_ALIVE_LUA)
    members = await script(keys=[hosts_index_key(prefix)], args=[heartbeat_key("", prefix)])
    return frozenset(as_text(member) for member in members)


async def publish(
    redis: aioredis.Redis,
    op: str,
    args: Sequence[str],
    *,
    requested_by: str,
    secret: str,
    timeout: float = DEFAULT_PUBLISH_TIMEOUT,
    ttl: float = DEFAULT_COMMAND_TTL,
    on_result: Callable[[HostResult], Any] | None = None,
    on_published: Callable[[Published], Any] | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> FleetResult:
    """Publish a signed command and collect the fleet's answers.

    Returns as soon as every host alive at publish time has answered, or when ``timeout``
    passes. ``on_result`` (a function or coroutine function) is called once per host as its
    answer arrives; ``on_published`` once, with the hosts expected to answer, before the first.
    """
    started = time.monotonic()
    fields = build_command(op, args, requested_by=requested_by, secret=secret, ttl=ttl)
    command_id = fields["id"]
    script = redis.register_script(_PUBLISH_LUA)
    script_args: list[str] = [heartbeat_key("", prefix), str(COMMAND_STREAM_MAXLEN)]
    for name, value in fields.items():
        script_args += (name, value)
    members = await script(
        keys=[hosts_index_key(prefix), command_stream_key(prefix)], args=script_args
    )
    expected = frozenset(as_text(member) for member in members)
    log.info("published %s %s %s for %d host(s)", command_id, op, fields["args"], len(expected))
    await _call_back(on_published, Published(command_id, op, tuple(args), expected))
    results = await _collect_results(
        redis,
        results_key(command_id, prefix),
        expected,
        deadline=started + timeout,
        on_result=on_result,
    )
    return FleetResult(
        command_id=command_id,
        results=results,
        silent=frozenset(expected - results.keys()),
        expected=expected,
        elapsed=time.monotonic() - started,
    )


async def _collect_results(
    redis: aioredis.Redis,
    key: str,
    expected: frozenset[str],
    *,
    deadline: float,
    on_result: Callable[[HostResult], Any] | None,
) -> dict[str, HostResult]:
    """Read the result stream until every expected host answered or the deadline passed."""
    results: dict[str, HostResult] = {}
    last_id = "0"
    block_cap = read_block_seconds(redis)
    while not expected <= results.keys():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        block_ms = max(1, int(min(remaining, block_cap) * 1000))
        response = await redis.xread({key: last_id}, count=_READ_COUNT, block=block_ms)
        raise_if_cancelling()
        for entry_id, raw in stream_entries(response):
            last_id = entry_id
            result = parse_result_fields(raw)
            # The first answer per host counts; a later duplicate (a redelivery) is ignored.
            if result is None or result.host in results:
                continue
            results[result.host] = result
            await _call_back(on_result, result)
    return results


async def _call_back(callback: Callable[[Any], Any] | None, value: Any) -> None:
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
