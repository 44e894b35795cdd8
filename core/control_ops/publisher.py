"""Publishing a fleet command, and knowing which hosts to expect an answer from.

The hosts to expect are those whose heartbeat is signed with the fleet's secret, names the host
it is stored under, and is fresh, at the moment the command is appended: one script reads the
heartbeats and appends the command atomically, and the publisher checks the heartbeats it
returns. Anyone can add names to the hosts index or write heartbeat keys; a forged or copied
heartbeat is counted as ignored, never expected. The answers are collected by
:class:`~core.control_ops.collect.Collector`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from core.control_ops.collect import UNTRUSTED_LOG, Collector, call_back, shown_host
from core.control_ops.wire import (
    COMMAND_STREAM_MAXLEN,
    DEFAULT_COMMAND_TTL,
    DEFAULT_PREFIX,
    HEARTBEAT_VALUE_LIMIT,
    MAX_FLEET_HOSTS,
    FleetResult,
    HostResult,
    Published,
    Untrusted,
    build_command,
    check_fresh,
    command_stream_key,
    heartbeat_key,
    hosts_index_key,
    results_key,
    verify_heartbeat,
)
from core.names import IDENTITY
from core.ops_exec import as_text, redis_errors

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["DEFAULT_PUBLISH_TIMEOUT", "REPLICA_WAIT_SECONDS", "alive_hosts", "publish"]

# A fixed name: under `python -m core.control_ops` __name__ would be "__main__".
log = logging.getLogger("admin_ops.control_ops")

#: Seconds ``publish`` waits for the hosts' answers by default.
DEFAULT_PUBLISH_TIMEOUT: Final = 30.0
#: Seconds ``publish`` waits for a replica to confirm it holds a new command (``WAIT 1``), when
#: the master has replicas. A healthy replica confirms in about a round trip.
REPLICA_WAIT_SECONDS: Final = 1.0
# Heartbeats checked between two yields to the event loop (a full index is a thousand).
_CHECKS_PER_YIELD: Final = 100

# The hosts index's members (at most ARGV[2] of them, at random if there are more, so a flooded
# index costs a bounded reply) with their heartbeat values (false when larger than ARGV[3] or
# not a string; GETRANGE copies at most one byte more than that, whatever the value's size).
# Members that cannot be identities, or whose heartbeat is gone, are dropped from the index in
# the same step, so a daemon that has just come back and re-added itself is
# never removed by a publisher that saw it missing a moment earlier. The heartbeat keys are
# derived from the members, so these scripts need a standalone Redis (not a cluster).
# KEYS: the index set; ARGV: the heartbeat key prefix, most members, largest value.
# Returns {members in the index, member, value, member, value, ...}.
_ALIVE_LUA_BODY: Final = """
local out = {redis.call('SCARD', KEYS[1])}
local most, largest = tonumber(ARGV[2]), tonumber(ARGV[3])
for _, member in ipairs(redis.call('SRANDMEMBER', KEYS[1], most)) do
  local value = ''
  if #member <= 64 then
    value = redis.pcall('GETRANGE', ARGV[1] .. member, 0, largest)
  end
  if type(value) ~= 'string' then
    out[#out + 1] = member
    out[#out + 1] = false
  elseif #value == 0 then
    redis.call('SREM', KEYS[1], member)
  else
    out[#out + 1] = member
    out[#out + 1] = #value <= largest and value
  end
end
"""
_ALIVE_LUA: Final = _ALIVE_LUA_BODY + "return out\n"

# Publishing: read the heartbeats and XADD the command in one atomic step, so no daemon can
# come or go between the two and the expected set is exactly the set that will see the command
# (a heartbeat exists only once its consumer group does). One round trip, too. The reply ends
# with the number of replicas connected to this master (INFO is allowed in scripts; ROLE is
# not), so the publisher knows whether to wait for one of them to confirm the command; -1 when
# INFO is refused (an ACL user without it): then nothing is waited for or said.
# KEYS: the index set, the command stream; ARGV: as above, then maxlen, field/value pairs.
_PUBLISH_LUA: Final = (
    _ALIVE_LUA_BODY
    + """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
local replication = redis.pcall('INFO', 'replication')
if type(replication) == 'string' then
  out[#out + 1] = tonumber(string.match(replication, 'connected_slaves:(%d+)')) or 0
else
  out[#out + 1] = -1
end
return out
"""
)


def _alive_args(prefix: str) -> list[str]:
    return [heartbeat_key("", prefix), str(MAX_FLEET_HOSTS), str(HEARTBEAT_VALUE_LIMIT)]


class _Verified:
    """Heartbeats that verified, with when they were sent: each is checked once, not per publish.

    A daemon writes a new value every few seconds; a publisher that publishes again meanwhile
    (a chat command, then another) finds it here and only checks that it is still fresh. Keyed
    by the secret, the key prefix, the identity and the exact value (a heartbeat believed in one
    fleet is not believed in another); bounded, the oldest forgotten first.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._sent: dict[tuple[str, str, str, Any], float] = {}

    def sent_at(self, secret: str, prefix: str, identity: str, value: Any, now: float) -> float:
        """When the heartbeat was sent, if signed, its own and this fleet's; else Untrusted."""
        key = (secret, prefix, identity, value)
        sent = self._sent.get(key)
        if sent is None:
            fields = verify_heartbeat(identity, value, secret, now=now, prefix=prefix)
            sent = self._sent[key] = float(fields["sent_at"])
            while len(self._sent) > self._size:
                del self._sent[next(iter(self._sent))]
        check_fresh(sent, now)
        return sent


_VERIFIED: Final = _Verified(2 * MAX_FLEET_HOSTS)


async def _believed(
    reply: Sequence[Any], secret: str, prefix: str, ignored: Counter[str]
) -> frozenset[str]:
    """The hosts whose heartbeat in ``reply`` verifies (for ``prefix``) and is fresh."""
    in_index = int(reply[0])
    if in_index > MAX_FLEET_HOSTS:
        UNTRUSTED_LOG.warning(
            "the hosts index holds %d names; %d of them, at random, were considered",
            in_index,
            MAX_FLEET_HOSTS,
        )
    now = time.time()
    hosts: set[str] = set()
    for i in range(1, len(reply) - 1, 2):
        if i % (2 * _CHECKS_PER_YIELD) == 1 and i > 1:
            await asyncio.sleep(0)  # a thousand checks must not hold the event loop
        identity = as_text(reply[i])
        try:
            _VERIFIED.sent_at(secret, prefix, identity, reply[i + 1], now)
        except Untrusted as exc:
            reason = "bad host name" if not IDENTITY.fullmatch(identity) else str(exc)
            ignored[f"heartbeat: {reason}"] += 1
            UNTRUSTED_LOG.warning("ignored the heartbeat of %s: %s", shown_host(identity), reason)
            continue
        hosts.add(identity)
    return frozenset(hosts)


async def alive_hosts(
    redis: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX, secret: str | None = None
) -> frozenset[str]:
    """Identities with a heartbeat right now; with ``secret``, only those that verify.

    Without the secret the heartbeats cannot be checked: the names are what Redis claims.
    """
    script = redis.register_script(_ALIVE_LUA)
    reply = await script(keys=[hosts_index_key(prefix)], args=_alive_args(prefix))
    if secret is None:
        names = (as_text(reply[i]) for i in range(1, len(reply) - 1, 2))
        return frozenset(name for name in names if IDENTITY.fullmatch(name))
    return await _believed(reply, secret, prefix, Counter())


async def _append(
    redis: aioredis.Redis, fields: Mapping[str, str], prefix: str
) -> tuple[Sequence[Any], bool | None]:
    """Run the publish script; its reply (heartbeats) and whether a replica confirmed it.

    One connection for both steps: WAIT counts the replicas that have every write made on the
    connection it is sent on. With no replica connected it is not sent at all (it would only
    wait out its timeout). None: no replica to confirm; False: none confirmed in time.
    """
    script = redis.register_script(_PUBLISH_LUA)
    script_args = [*_alive_args(prefix), str(COMMAND_STREAM_MAXLEN)]
    for name, value in fields.items():
        script_args += (name, value)
    async with redis.client() as connection:
        reply = await script(
            keys=[hosts_index_key(prefix), command_stream_key(prefix)],
            args=script_args,
            client=connection,
        )
        if int(reply[-1]) <= 0:
            return reply[:-1], None
        try:
            confirmed = await connection.wait(1, int(REPLICA_WAIT_SECONDS * 1000))
        except redis_errors() as exc:
            # The command is out (the script answered); only its safety is unknown.
            log.warning("command %s: WAIT failed (%s)", fields["id"], exc)
            return reply[:-1], False
    if int(confirmed) < 1:
        log.warning(
            "command %s: no replica confirmed it within %g s; a failover now could lose it",
            fields["id"],
            REPLICA_WAIT_SECONDS,
        )
    return reply[:-1], int(confirmed) >= 1


def _log_ignored(command_id: str, ignored: Counter[str]) -> None:
    """One line for all the heartbeats and answers not believed for a command, by reason."""
    if ignored:
        log.warning(
            "command %s: ignored %d untrusted heartbeat(s) and answer(s): %s",
            command_id,
            sum(ignored.values()),
            ", ".join(f"{reason} {count}" for reason, count in sorted(ignored.items())),
        )


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

    Returns as soon as every host expected (alive, by a verified heartbeat, when the command
    was appended) has answered, or when ``timeout`` passes. Only verified answers of expected
    hosts count. ``on_result`` (a function or coroutine function) is called once per host as
    its answer arrives; ``on_published`` once, with the hosts expected to answer, before that.
    """
    started = time.monotonic()
    fields = build_command(
        op, args, requested_by=requested_by, secret=secret, ttl=ttl, prefix=prefix
    )
    command_id = fields["id"]
    key = results_key(command_id, prefix)
    reply, replicated = await _append(redis, fields, prefix)
    ignored: Counter[str] = Counter()
    expected = await _believed(reply, secret, prefix, ignored)
    log.info("published %s %s %s for %d host(s)", command_id, op, fields["args"], len(expected))
    await call_back(on_published, Published(command_id, op, tuple(args), expected, replicated))
    collector = Collector(
        redis,
        command_id=command_id,
        key=key,
        expected=expected,
        secret=secret,
        # Only an answer to the very entry published counts (not one to a forged entry that
        # reuses its id), and only one signed for this fleet.
        command_sig=fields["sig"],
        prefix=prefix,
        on_result=on_result,
    )
    await collector.run(started + timeout)
    ignored.update(collector.ignored)
    _log_ignored(command_id, ignored)
    return FleetResult(
        command_id=command_id,
        results=collector.results,
        silent=frozenset(expected - collector.results.keys()),
        expected=expected,
        elapsed=time.monotonic() - started,
        ignored=dict(ignored),
        replicated=replicated,
    )
