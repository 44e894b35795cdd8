"""Refusal floods: someone who may not run a command cannot make the bot talk at will.

A refused invocation normally costs a reply and an audit-channel line, so a member without the
role (or a stranger's server, or a DM) could make the bot spam by repeating a command.
:class:`RefusalFloodGate` lets through at most one refusal reply per member and command every
:data:`REPLY_INTERVAL` seconds and one audit-channel line per member every
:data:`POST_INTERVAL` seconds; the log line and the Redis audit stream still get every record.
Refusals for people who may run the command ("already running", "cooling down") are never
held back. Memory is bounded: entries expire after their window, and a full table stays silent
rather than grow.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Final, NamedTuple

__all__ = [
    "FLOOD_CAPACITY",
    "POST_INTERVAL",
    "QUIETED",
    "REPLY_INTERVAL",
    "Loudness",
    "RefusalFloodGate",
    "Window",
]

log = logging.getLogger("cogs.admin_ops.floods")

#: At most one refusal reply per member and command this often (seconds).
REPLY_INTERVAL: Final = 30.0
#: At most one audit-channel line per refused member this often (seconds).
POST_INTERVAL: Final = 60.0
#: The most members (or member and command pairs) remembered at once per window.
FLOOD_CAPACITY: Final = 4096
#: The refusals of someone who may not run the command at all: these are held back.
QUIETED: Final = frozenset({"refused:dm", "refused:guild", "refused:role", "refused:channel"})


class Loudness(NamedTuple):
    """What a refusal may still do besides its log line and stream entry."""

    reply: bool
    post: bool


class Window:
    """Remember keys for ``seconds``: :meth:`first` is true once per key per window.

    Keys are kept in the order they were added, which is the order they expire in (the clock
    never goes back), so expiring costs only the entries that expire. At ``capacity`` live
    entries a new key is refused: silence is the safe side of a flood.
    """

    def __init__(self, seconds: float, capacity: int, clock: Callable[[], float]) -> None:
        """A window of ``seconds`` holding at most ``capacity`` keys, timed by ``clock``."""
        self.seconds = seconds
        self.capacity = capacity
        self.clock = clock
        self._added: OrderedDict[Hashable, float] = OrderedDict()
        #: Keys refused because the window was full.
        self.overflowed = 0
        self._full_logged = False

    def __len__(self) -> int:
        """How many keys are remembered now (expired ones may linger until the next call)."""
        return len(self._added)

    def first(self, key: Hashable) -> bool:
        """Whether ``key`` is new in this window (and remember it when it is)."""
        now = self.clock()
        self._expire(now)
        if key in self._added:
            return False
        if len(self._added) >= self.capacity:
            self.overflowed += 1
            if not self._full_logged:  # once per flood, not once per refused message
                self._full_logged = True
                log.warning("refusal flood: %d refused at once; staying silent", len(self))
            return False
        self._full_logged = False
        self._added[key] = now
        return True

    def _expire(self, now: float) -> None:
        while self._added:
            key, added = next(iter(self._added.items()))
            if now - added < self.seconds:
                return
            del self._added[key]


class RefusalFloodGate:
    """Decide whether a refusal is still answered and posted to the audit channel."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        reply_interval: float = REPLY_INTERVAL,
        post_interval: float = POST_INTERVAL,
        capacity: int = FLOOD_CAPACITY,
    ) -> None:
        """Time the windows with ``clock`` (monotonic seconds; tests pass a fake one)."""
        self.replies = Window(reply_interval, capacity, clock)
        self.posts = Window(post_interval, capacity, clock)

    def loudness(self, user_id: int, command: str, status: str) -> Loudness:
        """How loud the record of ``user_id``'s ``command`` ending with ``status`` may be."""
        if status not in QUIETED:
            return Loudness(reply=True, post=True)
        # Both windows are asked every time, so each keeps its own rhythm.
        reply = self.replies.first((user_id, command))
        post = self.posts.first(user_id)
        return Loudness(reply=reply, post=post)
