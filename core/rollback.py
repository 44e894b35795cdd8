"""The crash-loop guard: ``python -m core.rollback``, run by systemd when the bot's unit failed.

``deploy/admin-ops-rollback.service`` runs this through the bot unit's
``OnFailure=admin-ops-rollback.service``: the bot crashed at start until systemd's start limit
stopped it, so it cannot receive the command that would fix it. If the checkout's ``HEAD``
differs from the last good commit (recorded by the bot once it was healthy, see
:mod:`core.last_good`), this resets the checkout to it with ``git reset --keep`` semantics,
records the rollback episode, clears the unit's failed state and starts it again; the bot
says so in chat once back.

At most one automatic rollback per failure episode: when the bot fails again before it was
healthy (at the last good commit, or after this rollback), the unit is left failed and one
journal line says why. It also leaves alone a unit whose process did not fail by itself (a
stop that timed out, a credential file missing), when systemd says so.

Standard library only, with the bot's own settings (``OPS_REPO_DIR``, ``OPS_STATE_DIR``,
``OPS_BOT_SERVICE``, ``OPS_SYSTEMCTL``; :class:`core.settings.RollbackSettings`). Exit status:
0 when the checkout was rolled back and the bot started, 1 when the bot was left failed, 2 for
invalid settings. Every outcome is one line on standard output (the journal).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

from core.last_good import RollbackEpisode, read_episode, read_last_good, write_episode
from core.ops_exec import (
    CheckoutRefusal,
    git_commit,
    locked_checkout,
    redact,
    reset_failed_unit,
    start_unit,
    unit_restart_count,
)
from core.settings import RollbackSettings, SettingsError
from core.updates import reset_keep

__all__ = ["CRASH_RESULTS", "GuardResult", "guard", "main"]

#: systemd's results (``$MONITOR_SERVICE_RESULT``) for a bot whose own process failed: what a
#: crash loop ends in once the start limit stops the restarts (systemd 252 keeps the last run's
#: result; others say ``start-limit-hit``). Not ``timeout`` (a stop that hung) nor
#: ``resources`` (systemd could not set the process up: a missing credential file, say).
CRASH_RESULTS: Final = frozenset({"exit-code", "signal", "core-dump", "start-limit-hit"})
#: Names this guard as the holder of the checkout's lock.
_HOLDER: Final = "admin-ops crash-loop guard"


class GuardResult(NamedTuple):
    """What the guard did, and its one journal line."""

    rolled_back: bool
    line: str


def _times(failures: int | None) -> str:
    if failures is None:
        return "repeatedly"
    return "once" if failures == 1 else f"{failures} times"


async def guard(settings: RollbackSettings, environ: Mapping[str, str]) -> GuardResult:
    """Roll the bot's checkout back to its last good commit and start the bot, if that is due.

    ``environ`` carries what systemd tells a unit started by ``OnFailure=``: which unit failed
    (``MONITOR_UNIT``) and how (``MONITOR_SERVICE_RESULT``).
    """
    unit = settings.bot_service
    left = f"{unit} left failed"
    refusal = _not_ours(unit, environ)
    if refusal is not None:
        return GuardResult(False, refusal)
    repo = os.path.realpath(settings.repo_dir)
    good = await asyncio.to_thread(read_last_good, settings.state_dir, repo)
    if good is None:
        return GuardResult(False, f"{left}: no last good commit of {repo} is recorded.")
    episode = await asyncio.to_thread(read_episode, settings.state_dir, repo)
    if episode is not None:
        return GuardResult(
            False,
            f"{left}: it failed again after the rollback from {episode.failed[:7]} to "
            f"{episode.good[:7]}, and there is one automatic rollback per failure.",
        )
    head = await git_commit(repo)
    if head == good.commit:
        return GuardResult(
            False,
            f"{left}: it failed at the last good commit {good.commit[:7]}; "
            "there is nothing to roll back to.",
        )
    failures = await unit_restart_count(unit)
    async with locked_checkout(repo, holder=_HOLDER, refused="Not rolled back") as held:
        if isinstance(held, CheckoutRefusal):
            why = held.summary or f"another process ({held.holder or 'unknown'}) holds its lock."
            return GuardResult(False, f"{left}: {why}")
        problem = await reset_keep(held, good.commit, timeout=settings.git_timeout)
        if problem is not None:
            return GuardResult(False, f"{left}: {' '.join(problem.split())}")
        failed = held.head or ""
    episode = RollbackEpisode(repo, failed, good.commit, failures, time.time())
    await asyncio.to_thread(write_episode, settings.state_dir, episode)
    return await _start_again(settings, episode)


def _not_ours(unit: str, environ: Mapping[str, str]) -> str | None:
    """Why this failure is not one to roll back, from what systemd says; None when it is."""
    failed_unit = environ.get("MONITOR_UNIT", "")
    if failed_unit and failed_unit != unit:
        return f"triggered by {failed_unit}, not by OPS_BOT_SERVICE {unit}: nothing done."
    result = environ.get("MONITOR_SERVICE_RESULT", "")
    if result and result not in CRASH_RESULTS:
        return f"{unit} left failed: it failed ({result}), not by crashing; nothing done."
    return None


async def _start_again(settings: RollbackSettings, episode: RollbackEpisode) -> GuardResult:
    unit, secrets = settings.bot_service, settings.secrets
    what = (
        f"{unit} failed to start {_times(episode.failures)} at {episode.failed[:7]}: rolled "
        f"{episode.repo} back to the last good commit {episode.good[:7]}"
    )
    for step in (reset_failed_unit, start_unit):
        result = await step(unit, secrets=secrets)
        if not result.ok:
            return GuardResult(False, f"{what}, but could not start it again: {result.summary}")
    return GuardResult(True, f"{what} and started it again.")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the guard once; print its one line; 0 rolled back, 1 left failed, 2 bad settings."""
    del argv  # no options: everything comes from the bot's settings
    env = os.environ if environ is None else environ
    try:
        settings = RollbackSettings.from_env(env)
    except SettingsError as exc:
        print(f"admin-ops rollback: invalid settings: {'; '.join(exc.problems)}", flush=True)
        return 2
    result = asyncio.run(guard(settings, env))
    print(f"admin-ops rollback: {redact(result.line, settings.secrets)}", flush=True)
    return 0 if result.rolled_back else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
