"""What the bot says once back after the crash-loop guard rolled its checkout back.

``python -m core.rollback`` leaves the rollback episode in the state dir (host-local, never
Redis: see :mod:`core.last_good`). The next process that gets ready takes it once:
"⚠️ Back online after rolling back from abc1234 to 9f8e7d6: the bot failed to start 5 times",
in reply to the ``!bot_restart`` that led there when its marker is there, else in the audit
channel (:meth:`core.chat.restart.SelfRestart.back_online`). The episode's fields were checked
when it was read (full hex commits, a count); nothing else of it is shown.
"""

from __future__ import annotations

import asyncio
import logging
import os

from core.last_good import RollbackEpisode, mark_announced, read_episode
from core.settings import Settings

__all__ = ["RollbackNotices", "notice_text"]

log = logging.getLogger("cogs.admin_ops.rollback_notice")


def notice_text(episode: RollbackEpisode) -> str:
    """The one line that says what happened."""
    if episode.failures is None:
        why = "the bot kept failing to start"
    elif episode.failures == 1:
        why = "the bot failed to start once"
    else:
        why = f"the bot failed to start {episode.failures} times"
    return (
        f"⚠️ Back online after rolling back from {episode.failed[:7]} to {episode.good[:7]}: {why}"
    )


class RollbackNotices:
    """Take the crash-loop guard's rollback, once, to say so."""

    def __init__(self, settings: Settings) -> None:
        """Read the episode of ``settings.repo_dir`` in ``settings.state_dir``."""
        self.state_dir = settings.state_dir
        self.repo = os.path.realpath(settings.repo_dir)

    async def take(self) -> str | None:
        """The notice of a rollback not announced yet (marking it announced), or None."""
        episode = await asyncio.to_thread(read_episode, self.state_dir, self.repo)
        if episode is None or episode.announced:
            return None
        try:
            await asyncio.to_thread(mark_announced, self.state_dir, episode)
        except OSError as exc:
            # Said once more after the next restart rather than never.
            log.warning("cannot mark the rollback as announced in %s: %s", self.state_dir, exc)
        return notice_text(episode)
