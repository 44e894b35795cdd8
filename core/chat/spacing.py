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
Another process on the host (a control daemon) may restart the same unit: a restart reserved
under the host-wide lock on the unit (:func:`core.ops_exec.unit_restart_lock`, in
``OPS_LOCK_DIR``, by default the state dir) by any process counts, and the action
(:meth:`RestartSpacing.locked`) checks again under that lock, reserves its restart and holds the
lock until the request is made. So the bot and a daemon never both restart a unit within the
interval. A lock that cannot be taken refuses the restart, like the daemon does: a lock path
that is unsafe (a symlink, not a regular file, writable by others:
:class:`~core.ops_exec.UnsafeLockError`), and any other error (a file of another user, a full
disk): run unlocked, whoever planted it could switch the lock off for every process.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import time
from collections.abc import Callable

from core.chat.admission import Refusal
from core.chat.invocation import Action, Guard, Invocation, Outcome, Reply
from core.chat.process import process_started_at
from core.ops_exec import UnitRestartLock, UnsafeLockError, unit_restart_lock, unit_started_ago
from core.text import format_duration, inline_code

__all__ = ["RestartSpacing"]

log = logging.getLogger("cogs.admin_ops.spacing")


def _refused(refusal: Refusal) -> Outcome:
    """A refusal met by the action itself: nothing acted, the refusal's sentence as the answer."""
    return Outcome(refusal.status, acted=False, reply=Reply(refusal.message))


class RestartSpacing:
    """Refuse a restart of a unit that became active too recently."""

    def __init__(
        self,
        interval: float,
        *,
        lock_dir: str | os.PathLike[str] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """At least ``interval`` seconds between two starts; ``wall_clock`` for the fallback.

        ``lock_dir``: where the host-wide restart locks live (the state dir); None: no lock.
        """
        self.interval = interval
        self.lock_dir = lock_dir
        self.wall_clock = wall_clock

    def guard(self, unit: str | None, *, own: bool) -> Guard:
        """The guard for a restart of ``unit``; ``own``: it is this bot's unit (or process)."""

        async def check(inv: Invocation) -> Refusal | None:
            return await self.check(inv, unit, own=own)

        return check

    async def check(self, inv: Invocation, unit: str | None, *, own: bool) -> Refusal | None:
        """Why ``inv`` may not restart ``unit`` now, or None: the guard, before the action.

        A restart reserved by another process on the host counts; nothing is reserved here
        (see :meth:`locked`).
        """
        if self.interval <= 0:
            return None
        if unit is None or self.lock_dir is None:
            return self._refusal(inv, unit, await self._started_ago(unit, own=own))
        try:
            async with unit_restart_lock(self.lock_dir, unit) as lock:
                return await self._locked_check(inv, unit, lock, own=own)
        except TimeoutError:
            return self._busy(inv, unit)
        except OSError as exc:
            return self._no_lock(inv, unit, exc)

    def locked(self, unit: str, action: Action, *, own: bool) -> Action:
        """``action`` under the host-wide lock on ``unit``, checked again and reserved there.

        Between the guard and the action another process (a control daemon) may have passed
        its own check: so the action checks again under the lock, reserves the restart before
        it runs, holds the lock until it returns, and withdraws the reservation if it did not
        act (systemctl refused, or it failed before asking). A cancellation keeps it: the
        request may be out (systemd stops this process when it restarts the bot's unit).
        """
        if self.interval <= 0 or self.lock_dir is None:
            return action
        lock_dir = self.lock_dir

        async def run(inv: Invocation) -> Outcome:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    lock = await stack.enter_async_context(unit_restart_lock(lock_dir, unit))
                except TimeoutError:
                    return _refused(self._busy(inv, unit))
                except OSError as exc:
                    return _refused(self._no_lock(inv, unit, exc))
                refusal = await self._locked_check(inv, unit, lock, own=own)
                if refusal is not None:
                    return _refused(refusal)
                lock.reserve()
                try:
                    outcome = await action(inv)
                except Exception:
                    lock.withdraw()
                    raise
                if not outcome.acted:
                    lock.withdraw()
                return outcome
            raise AssertionError("unreachable")  # for mypy: the stack never swallows

        return run

    async def _locked_check(
        self, inv: Invocation, unit: str, lock: UnitRestartLock, *, own: bool
    ) -> Refusal | None:
        ago = await self._started_ago(unit, own=own)
        reserved = lock.reserved_ago()
        if reserved is not None:
            ago = reserved if ago is None else min(ago, reserved)
        return self._refusal(inv, unit, ago)

    def _busy(self, inv: Invocation, unit: str) -> Refusal:
        what = inline_code(unit)
        return Refusal("refused:running", f"{inv.shown} refused: {what} is being restarted.")

    def _no_lock(self, inv: Invocation, unit: str, exc: OSError) -> Refusal:
        """The restart refused, its lock not taken; the log has the path and the errno.

        Unlocked, it could follow another process's restart of the unit within the interval.
        """
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        log.error("refusing to restart %s: %s (%s, %s)", unit, exc.strerror, exc.filename, code)
        what = inline_code(unit)
        why = "is unsafe" if isinstance(exc, UnsafeLockError) else "cannot be taken"
        return Refusal(
            "refused:config",
            f"{inv.shown} refused: the restart lock of {what} on this host {why} "
            "(see the bot's log).",
        )

    async def _started_ago(self, unit: str | None, *, own: bool) -> float | None:
        ago = await unit_started_ago(unit) if unit is not None else None
        if ago is None and own:
            ago = max(self.wall_clock() - process_started_at(), 0.0)
        return ago

    def _refusal(self, inv: Invocation, unit: str | None, ago: float | None) -> Refusal | None:
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
