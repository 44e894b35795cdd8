"""How a daemon runs each command at most once and answers it exactly once.

Two records say whether a command id was started here: the ran marker in Redis (shared, so
publishers and operators can see it, but anyone who can write to Redis can delete it) and the
host's own :class:`~core.control_ops.host_state.CommandLedger` (the authority: nothing in Redis
can change it). The answer is written, signed, and the command acknowledged, in one script.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple

from core.control_ops.host_state import LedgerState
from core.control_ops.wire import (
    MARKER_GRACE_SECONDS,
    MAX_CLOCK_SKEW,
    MAX_COMMAND_TTL,
    RESULT_TTL_SECONDS,
    HostResult,
    SignedCommand,
)

__all__ = [
    "FINISH_LUA",
    "MARKER_READ_BYTES",
    "STARTED_PREFIX",
    "Claim",
    "Finish",
    "Marker",
    "keep_until",
    "marker_ttl_ms",
]

#: The most bytes of a ran marker anyone reads: "started:" and a 32-digit token, or "done".
MARKER_READ_BYTES: Final = 64

# Write one host's result, then acknowledge the command: one script, so a command is never
# acknowledged without its result, and a failure to write leaves it pending.
# KEYS: results stream, ran marker, command stream.
# ARGV: identity (the group, and the result's host), entry id, marker mode, marker ttl (ms),
# then the result's ok, ran, summary, duration, command signature and signature (field names
# are spelt here: fewer arguments to encode on every answer).
# Marker modes: "claim" takes the marker now (SET NX) and writes nothing if it was taken, for
# ops whose answer is computed without side effects; "done" finishes a marker taken before the
# op ran; "none" leaves it alone (a forged command must not be able to burn a real id).
# Returns {1} when written, or {0, marker value} when the claim lost. The marker is read with
# GETRANGE: anyone can plant a value of any size there, and only its first bytes mean anything.
FINISH_LUA: Final = f"""
local mode = ARGV[3]
if mode == 'claim' then
  if not redis.call('SET', KEYS[2], 'done', 'NX', 'PX', ARGV[4]) then
    return {{0, redis.call('GETRANGE', KEYS[2], 0, {MARKER_READ_BYTES - 1})}}
  end
elseif mode == 'done' then
  redis.call('SET', KEYS[2], 'done', 'XX', 'KEEPTTL')
end
redis.call('XADD', KEYS[1], '*', 'host', ARGV[1], 'ok', ARGV[5], 'ran', ARGV[6],
  'summary', ARGV[7], 'duration', ARGV[8], 'command_sig', ARGV[9], 'sig', ARGV[10])
redis.call('EXPIRE', KEYS[1], {RESULT_TTL_SECONDS})
redis.pcall('XACK', KEYS[3], ARGV[1], ARGV[2])
return {{1}}
"""
_DONE: Final = "done"
#: A marker taken before an op with side effects runs: this prefix, then a per-process token.
STARTED_PREFIX: Final = "started:"


class Claim(enum.Enum):
    """Where a command id stands on this host, read from its ran marker or the ledger."""

    #: This run holds the marker: the op may run.
    NEW = "new"
    #: An earlier run took the marker and never finished: the op was interrupted.
    STARTED = "started"
    #: The command was answered here before.
    DONE = "done"

    @classmethod
    def of_marker(cls, value: str) -> Claim:
        """The claim a marker someone else holds stands for."""
        return cls.DONE if value == _DONE else cls.STARTED

    @classmethod
    def of_ledger(cls, state: LedgerState) -> Claim:
        """The claim a ledger entry stands for."""
        return cls.DONE if state is LedgerState.DONE else cls.STARTED


class Marker(enum.Enum):
    """What the finish script does with the ran marker (see FINISH_LUA)."""

    CLAIM = "claim"
    DONE = "done"
    NONE = "none"


class Finish(NamedTuple):
    """A result to write (kept in memory across a Redis outage until it is written).

    ``command_sig`` is the signature of the entry answered, if it verified (else empty): the
    answer belongs to that exact command. ``after`` runs once the answer is written.
    """

    entry_id: str
    command_id: str
    result: HostResult
    marker: Marker
    marker_ttl_ms: int
    after: Callable[[], Awaitable[None]] | None = None
    command_sig: str = ""


def marker_ttl_ms(command: SignedCommand) -> int:
    """How long the ran marker lives: the command's remaining validity plus a day."""
    remaining = min(max(0.0, command.expires_at - time.time()), MAX_COMMAND_TTL)
    return int((remaining + MARKER_GRACE_SECONDS) * 1000)


def keep_until(command: SignedCommand) -> float:
    """Until when the ledger keeps ``command``: past its expiry, by the clock skew allowed.

    After that this host refuses the command as expired anyway, even if its clock was
    stepped back by up to the skew. Validities are at most MAX_COMMAND_TTL and commands issued
    more than the skew in the future are refused, so no entry is kept longer than a day and
    a minute.
    """
    return command.expires_at + MAX_CLOCK_SKEW
