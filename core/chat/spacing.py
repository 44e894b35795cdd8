"""Restarts of one unit at least ``OPS_RESTART_MIN_INTERVAL`` seconds apart, host-wide.

systemd stops restarting a unit that started too often in a short time (its start limit), and
then the unit stays down until someone resets it by hand. ``!bot_restart`` and
``!proxy_restart`` therefore refuse while their unit became active less than
:attr:`~core.settings.Settings.restart_min_interval` seconds ago, whoever started it (a chat
command, a fleet command, a crash): systemd's own record says when
(:func:`core.ops_exec.unit_started_ago`). When systemd cannot tell (no ``show`` allowed, no
systemd), the bot's own unit falls back to this process's start time; the proxy's is allowed.

The check is the pipeline's last one before the action (a :data:`~core.chat.invocation.Guard`):
after role, channel and configuration, so only someone who may run the command learns about
the unit; and while the command is marked running, so two invocations cannot both pass it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from core.chat.admission import Refusal
from core.chat.invocation import Guard, Invocation
from core.chat.process import process_started_at
from core.ops_exec import unit_started_ago
from core.text import format_duration, inline_code

__all__ = ["RestartSpacing"]


class RestartSpacing:
    """Refuse a restart of a unit that became active too recently."""

    def __init__(self, interval: float, *, wall_clock: Callable[[], float] = time.time) -> None:
        """At least ``interval`` seconds between two starts; ``wall_clock`` for the fallback."""
        self.interval = interval
        self.wall_clock = wall_clock

    def guard(self, unit: str | None, *, own: bool) -> Guard:
        """The guard for a restart of ``unit``; ``own``: it is this bot's unit (or process)."""

        async def check(inv: Invocation) -> Refusal | None:
            return await self.check(inv, unit, own=own)

        return check

    async def check(self, inv: Invocation, unit: str | None, *, own: bool) -> Refusal | None:
        """Why ``inv`` may not restart ``unit`` now, or None."""
        if self.interval <= 0:
            return None
        ago = await unit_started_ago(unit) if unit is not None else None
        if ago is None and own:
            ago = max(self.wall_clock() - process_started_at(), 0.0)
        if ago is None or ago >= self.interval:
            return None
        what = inline_code(unit) if unit is not None else "the bot"
        # Whole seconds that add up: 12.6 s ago and 47.4 s to go read "12 s" and "48 s".
        since = format_duration(math.floor(ago))
        wait = format_duration(self.interval - math.floor(ago), round_up=True)
        return Refusal(
            "refused:recent",
            f"{inv.shown} refused: {what} restarted {since} ago; try again in {wait}.",
        )
