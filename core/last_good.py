"""The bot's last good commit and the crash-loop guard's rollback episode, in the state dir.

Standard library only: the crash-loop guard (``python -m core.rollback``) reads what the bot
writes here, and runs when the bot cannot.

- ``last-good-commit.json``: the commit the bot's checkout was at when this process started,
  written once the bot has been ready and connected for ``OPS_HEALTHY_AFTER`` seconds
  (:class:`HealthWatch`). A commit that crashes at start never gets there.
- ``rollback-episode.json``: written by the guard when it rolled the checkout back after the
  bot failed (from which commit to which, how often the bot failed to start), so that it rolls
  back at most once per failure episode, and so that the bot, once back, can say what
  happened. A healthy bot ends the episode (deletes the file).

Both are host-local on purpose (never Redis): whatever they say is acted on or shown. Each is
read back field by field; a commit must be a full hex hash and the checkout must be the one
asked about, or the file counts as absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

from core.ops_exec import atomic_write_json, git_commit, read_json_file
from core.pull_history import full_commit

__all__ = [
    "EPISODE_FILE",
    "LAST_GOOD_FILE",
    "HealthWatch",
    "LastGood",
    "RollbackEpisode",
    "end_episode",
    "mark_announced",
    "read_episode",
    "read_last_good",
    "start_commit",
    "write_episode",
    "write_last_good",
]

log = logging.getLogger("admin_ops.last_good")

LAST_GOOD_FILE: Final = "last-good-commit.json"
EPISODE_FILE: Final = "rollback-episode.json"
#: More failures than any start limit allows: a larger count is not systemd's.
_MAX_FAILURES: Final = 100_000

# The commit each checkout was at when this process first asked: the code it is running. Kept
# at module level, which reloading the cog does not reset.
_STARTED_AT: dict[str, str | None] = {}


def _finite(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("not a finite number")
    return float(value)


def _repo(value: object, wanted: str) -> str:
    if value != wanted:
        raise ValueError("another checkout")
    return wanted


@dataclass(frozen=True)
class LastGood:
    """The commit a checkout was at when the bot last proved healthy."""

    repo: str
    commit: str
    #: Wall-clock time it was recorded.
    at: float


def read_last_good(state_dir: Path, repo: str) -> LastGood | None:
    """The last good commit recorded for ``repo`` (a real path), or None."""
    data = read_json_file(state_dir / LAST_GOOD_FILE)
    if not isinstance(data, dict):
        return None
    try:
        return LastGood(
            _repo(data.get("repo"), repo), full_commit(data.get("commit")), _finite(data.get("at"))
        )
    except ValueError:
        return None


def write_last_good(state_dir: Path, repo: str, commit: str, at: float | None = None) -> None:
    """Record ``commit`` as ``repo``'s last good commit (atomically)."""
    good = LastGood(repo, full_commit(commit), time.time() if at is None else at)
    atomic_write_json(state_dir / LAST_GOOD_FILE, asdict(good))


@dataclass(frozen=True)
class RollbackEpisode:
    """The crash-loop guard rolled ``repo`` back from ``failed`` to ``good``."""

    repo: str
    failed: str
    good: str
    #: How often the bot failed to start before (systemd's count), when known.
    failures: int | None
    at: float
    #: The bot has said so in chat (or tried to).
    announced: bool = False

    def to_json(self) -> dict[str, Any]:
        """The episode as stored."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], repo: str) -> RollbackEpisode | None:
        """The episode ``data`` describes for ``repo``, or None when it is not one."""
        try:
            failures = data.get("failures")
            if failures is not None and (
                isinstance(failures, bool)
                or not isinstance(failures, int)
                or not 0 <= failures <= _MAX_FAILURES
            ):
                return None
            announced = data.get("announced", False)
            if not isinstance(announced, bool):
                return None
            return cls(
                repo=_repo(data.get("repo"), repo),
                failed=full_commit(data.get("failed")),
                good=full_commit(data.get("good")),
                failures=failures,
                at=_finite(data.get("at")),
                announced=announced,
            )
        except ValueError:
            return None


def read_episode(state_dir: Path, repo: str) -> RollbackEpisode | None:
    """The open rollback episode of ``repo``, or None."""
    data = read_json_file(state_dir / EPISODE_FILE)
    return RollbackEpisode.from_json(data, repo) if isinstance(data, dict) else None


def write_episode(state_dir: Path, episode: RollbackEpisode) -> None:
    """Record ``episode`` (atomically)."""
    atomic_write_json(state_dir / EPISODE_FILE, episode.to_json())


def end_episode(state_dir: Path) -> None:
    """The bot is healthy again: the next failure is a new episode."""
    with contextlib.suppress(FileNotFoundError):
        (state_dir / EPISODE_FILE).unlink()


def mark_announced(state_dir: Path, episode: RollbackEpisode) -> None:
    """Remember that the bot said it is back after ``episode``'s rollback."""
    write_episode(state_dir, replace(episode, announced=True))


async def start_commit(repo_dir: str | os.PathLike[str]) -> str | None:
    """The full commit ``repo_dir`` was at when this process first asked (what it runs)."""
    repo = os.path.realpath(repo_dir)
    if repo not in _STARTED_AT:
        _STARTED_AT[repo] = await git_commit(repo)
    return _STARTED_AT[repo]


class HealthWatch:
    """Record the last good commit once the bot has been ready and connected long enough.

    The bot (or anything that runs the same way) says :meth:`connected` and
    :meth:`disconnected` as its connection comes and goes; :meth:`run` returns once the
    connection has lasted ``healthy_after`` seconds without a break and the commit this
    process started at is recorded, ending any rollback episode.
    """

    def __init__(
        self,
        *,
        state_dir: Path,
        repo_dir: str | os.PathLike[str],
        healthy_after: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Watch for ``healthy_after`` s of connection; ``sleep`` waits (tests pass theirs)."""
        self.state_dir = state_dir
        self.repo = os.path.realpath(repo_dir)
        self.healthy_after = healthy_after
        self.sleep = sleep
        self._connected = asyncio.Event()
        # Counts connections and breaks, so a wait that spanned a break does not count.
        self._generation = 0
        #: The commit recorded, once it is.
        self.recorded: str | None = None

    def connected(self) -> None:
        """The bot is ready and connected (``on_ready``, ``on_resumed``)."""
        if not self._connected.is_set():
            self._generation += 1
            self._connected.set()

    def disconnected(self) -> None:
        """The bot lost its connection (``on_disconnect``)."""
        self._generation += 1
        self._connected.clear()

    async def run(self, before_record: Callable[[], Awaitable[None]] | None = None) -> None:
        """Wait for a long enough connection, then record the commit this process started at.

        ``before_record`` is awaited first (the bot says it is back before the episode ends).
        """
        commit = await start_commit(self.repo)
        while True:
            await self._connected.wait()
            generation = self._generation
            await self.sleep(self.healthy_after)
            if self._connected.is_set() and generation == self._generation:
                break
        if before_record is not None:
            await before_record()
        if commit is None:
            log.warning("healthy, but %s has no commit to record as good", self.repo)
            return
        try:
            await asyncio.to_thread(self._record, commit)
        except OSError as exc:
            log.warning("cannot record the last good commit in %s: %s", self.state_dir, exc)
            return
        self.recorded = commit
        log.info(
            "healthy for %g s: %s recorded as the last good commit", self.healthy_after, commit[:7]
        )

    def _record(self, commit: str) -> None:
        write_last_good(self.state_dir, self.repo, commit)
        end_episode(self.state_dir)
