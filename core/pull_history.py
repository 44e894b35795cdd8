"""The pulls that moved a checkout, kept on this host, and taking the last one back.

Standard library only. :class:`PullHistory` keeps, per checkout, the last
:data:`KEPT_PULLS` pulls that moved ``HEAD`` (before and after commit, who, when) in one small
JSON file in the state dir, written atomically. :func:`roll_back_last_pull` moves the checkout
back to where the last recorded pull found it, with ``git reset --keep`` semantics, and
forgets that pull: repeated rollbacks step back one recorded pull each.

What is read back from the file is checked field by field: a commit must be a full hex hash,
since it is given to git.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

from core.ops_exec import (
    CheckoutRefusal,
    atomic_write_json,
    clean_text,
    git_commit,
    locked_checkout,
    read_json_file,
)
from core.updates import Commit, changed_files, commits_between, reset_keep

__all__ = [
    "HISTORY_FILE",
    "KEPT_PULLS",
    "PullHistory",
    "PullRollback",
    "RecordedPull",
    "full_commit",
    "roll_back_last_pull",
]

#: The history's file in the state dir.
HISTORY_FILE: Final = "pull-history.json"
#: Pulls kept per checkout.
KEPT_PULLS: Final = 10
#: A commit as git names it in full: SHA-1 or SHA-256.
_FULL_COMMIT: Final = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_WHO_LIMIT: Final = 100
#: Checkouts kept in one file: far more than any bot has, few enough to bound the file.
_MAX_CHECKOUTS: Final = 64


def full_commit(value: object) -> str:
    """A full commit hash, or ValueError (it is given to git: nothing else may pass)."""
    if not isinstance(value, str) or _FULL_COMMIT.fullmatch(value) is None:
        raise ValueError("not a full commit hash")
    return value


class RecordedPull(NamedTuple):
    """One pull that moved a checkout: from ``before`` to ``after``, by ``who``, at ``at``."""

    before: str
    after: str
    who: str
    #: Wall-clock time of the pull.
    at: float

    def to_json(self) -> dict[str, Any]:
        """The pull as stored."""
        return self._asdict()

    @classmethod
    def from_json(cls, data: object) -> RecordedPull | None:
        """The pull ``data`` describes, or None when it is not one this bot wrote."""
        if not isinstance(data, Mapping):
            return None
        try:
            at, who = data["at"], data["who"]
            if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
                return None
            if not isinstance(who, str):
                return None
            return cls(
                full_commit(data["before"]),
                full_commit(data["after"]),
                clean_text(who)[:_WHO_LIMIT],
                at,
            )
        except (KeyError, ValueError):
            return None


class PullHistory:
    """The last pulls that moved each checkout, in one JSON file shared by this host's bot."""

    def __init__(self, path: Path) -> None:
        """Keep the history in ``path`` (the state dir's ``pull-history.json``)."""
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, list[RecordedPull]]]:
        """The history, read, then written back if changed, under a lock.

        ``!bot_pull`` and ``!bot_rollback`` may change it at the same time.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(
            self.path.with_name(f".{self.path.name}.lock"),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            history = self._read()
            before = {key: list(pulls) for key, pulls in history.items()}
            yield history
            if history != before:
                data = {
                    key: [p.to_json() for p in pulls] for key, pulls in history.items() if pulls
                }
                atomic_write_json(self.path, {"checkouts": data})
        finally:
            os.close(lock)

    def _read(self) -> dict[str, list[RecordedPull]]:
        data = read_json_file(self.path)
        checkouts = data.get("checkouts") if isinstance(data, dict) else None
        if not isinstance(checkouts, dict):
            return {}
        history: dict[str, list[RecordedPull]] = {}
        for key, pulls in list(checkouts.items())[:_MAX_CHECKOUTS]:
            if isinstance(key, str) and isinstance(pulls, list):
                found = [RecordedPull.from_json(p) for p in pulls[-KEPT_PULLS:]]
                history[key] = [p for p in found if p is not None]
        return history

    def record(self, checkout: str, pull: RecordedPull) -> None:
        """Add ``pull`` of ``checkout`` (its real path), keeping the last :data:`KEPT_PULLS`."""
        with self._locked() as history:
            pulls = history.setdefault(checkout, [])
            pulls.append(pull._replace(who=clean_text(pull.who)[:_WHO_LIMIT]))
            del pulls[:-KEPT_PULLS]

    def pulls(self, checkout: str) -> list[RecordedPull]:
        """The recorded pulls of ``checkout``, oldest first."""
        with self._locked() as history:
            return list(history.get(checkout, []))

    def forget(self, checkout: str, pull: RecordedPull) -> None:
        """Drop ``pull`` of ``checkout`` when it is still the last one (it was taken back)."""
        with self._locked() as history:
            pulls = history.get(checkout, [])
            if pulls and pulls[-1] == pull:
                pulls.pop()


RollbackStatus = Literal["rolled back", "nothing", "moved", "blocked", "skipped", "failed"]


class PullRollback(NamedTuple):
    """What :func:`roll_back_last_pull` did."""

    status: RollbackStatus
    #: One sentence: what was done, or why nothing was.
    summary: str
    pull: RecordedPull | None = None
    #: The commits taken out (newest first, at most 15) and how many there were in all.
    commits: tuple[Commit, ...] = ()
    removed: int = 0
    #: The files the rollback changed (relative to the checkout), to classify.
    changed: tuple[str, ...] = ()
    #: The checkout's real path.
    path: str = ""

    @property
    def acted(self) -> bool:
        """Whether git changed the checkout."""
        return self.status == "rolled back"


async def roll_back_last_pull(
    repo_dir: str | os.PathLike[str],
    history: PullHistory,
    *,
    holder: str = "",
    timeout: float = 60.0,
) -> PullRollback:
    """Move ``repo_dir`` back to where its last recorded pull found it, and forget that pull.

    Refuses, changing nothing, when no pull is recorded, when ``HEAD`` is no longer where that
    pull left it (someone moved it since), or when local changes would be lost.
    """
    path = os.path.realpath(repo_dir)
    pulls = history.pulls(path)
    if not pulls:
        return PullRollback(
            "nothing", "Nothing to roll back: no recorded pull moved this checkout."
        )
    pull = pulls[-1]
    async with locked_checkout(path, holder=holder, refused="Not rolled back") as held:
        if isinstance(held, CheckoutRefusal):
            if not held.busy:
                return PullRollback("failed", held.summary, pull)
            who = f" ({held.holder})" if held.holder else ""
            return PullRollback(
                "skipped", f"Skipped: another process on this host{who} is working in it.", pull
            )
        if held.head != pull.after:
            at = held.head[:7] if held.head else "no commit"
            return PullRollback(
                "moved",
                f"Not rolled back: HEAD is at {at}, not at {pull.after[:7]} where the last "
                "recorded pull left it; someone moved it since. Nothing was changed.",
                pull,
            )
        if await git_commit(path, pull.before) != pull.before:
            return PullRollback(
                "failed",
                f"Not rolled back: {pull.before[:7]}, where that pull started, is no longer in "
                "the repository. Nothing was changed.",
                pull,
            )
        commits, removed = await commits_between(held.path, pull.before, pull.after)
        changed = await changed_files(held.path, pull.before, pull.after)
        problem = await reset_keep(held, pull.before, timeout=timeout)
        if problem is not None:
            return PullRollback("blocked", problem, pull)
    history.forget(path, pull)
    noun = "commit" if removed == 1 else "commits"
    summary = f"Rolled back {pull.after[:7]} → {pull.before[:7]} ({removed} {noun} taken out)."
    return PullRollback("rolled back", summary, pull, commits, removed, changed, path)
