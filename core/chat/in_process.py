"""A fleet control daemon inside the bot's process (``OPS_CONTROL_IN_PROCESS=1``).

The bot then answers ``!fleet_*`` commands like any other host: it may pull its own checkout
(target ``bot``) and the ``OPS_PULL_TARGETS``, and restart its own and the proxy's unit (its own
deferred, so the answer goes out first). The daemon's settings are
:meth:`core.settings.Settings.daemon_settings`; it shares the cog's Redis client, and lives and
stops with the cog.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from core.control_ops import ControlDaemon
from core.settings import DaemonSettings

__all__ = ["InProcessDaemon"]

log = logging.getLogger("cogs.admin_ops.in_process")


class InProcessDaemon:
    """Start, watch and stop the bot's own control daemon."""

    def __init__(self, redis: aioredis.Redis, settings: DaemonSettings) -> None:
        """A daemon on ``redis`` configured by ``settings`` (not started yet)."""
        self.settings = settings
        self.daemon = ControlDaemon.from_settings(redis, settings)
        #: The task serving commands, while started.
        self.task: asyncio.Task[None] | None = None

    @property
    def identity(self) -> str:
        """The name this bot answers under in the fleet."""
        return self.daemon.identity

    def start(self) -> None:
        """Serve fleet commands as a task of the bot."""
        if self.task is not None:
            return
        self.task = asyncio.create_task(self.daemon.run(), name=f"control daemon {self.identity}")
        self.task.add_done_callback(self._ended)
        log.info("in-process control daemon %s started", self.identity)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("in-process control daemon %s stopped", self.identity, exc_info=error)
        else:
            log.warning("in-process control daemon %s returned", self.identity)

    async def stop(self) -> None:
        """A clean stop: the daemon deletes its heartbeat and acknowledges nothing unfinished."""
        task, self.task = self.task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})

    def status(self) -> str:
        """One line for ``!ops_status``."""
        state = "serving" if self.daemon.serving.is_set() else "not connected"
        return f"in-process daemon {self.identity}: {state}"
