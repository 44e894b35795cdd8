"""The crash-loop guard in the real systemd 252 of ``tests/deploy``: never down after a bad commit.

The shipped bot unit (``OnFailure=admin-ops-rollback.service``) and the shipped rollback unit run
a stand-in bot from the test checkout ``/srv/admin-ops/app``. That checkout holds a copy of the
project's ``core/`` (standard library only), so the stand-in records its last good commit through
admin-ops' own code (:class:`core.last_good.HealthWatch` with the bot's settings), and the guard
is the real ``python -m core.rollback``, asking the real polkitd with the shipped rule to clear
and start the bot unit. Only the bot's program and its restart delay (100 ms, not 5 s) differ
from what is shipped.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deploy.deploy_support import (
    BOT_UNIT,
    CHECKOUT_INSIDE,
    PLAIN_ENV,
    ROLLBACK_UNIT,
    ROOT,
    DeployTree,
    Polkit,
    ShippedUnit,
    as_service_user,
    as_user,
    git,
    shipped_unit_text,
)
from tests.deploy.systemd_harness import CONTROL_UID, SERVICE_UID, PrivateSystemd

pytestmark = pytest.mark.systemd

#: The bot's program in the test checkout: crashes at start when told, else "connects" at once.
STANDIN = '''\
"""A stand-in for bot.py: crashes at start when told to, else is healthy and stays up."""

import asyncio
import os
import sys

from core.last_good import HealthWatch
from core.settings import Settings

CRASH_AT_START = False


async def main() -> None:
    settings = Settings.from_env()
    if CRASH_AT_START or os.environ.get("STANDIN_CRASH") == "1":
        sys.exit("crash at start")
    watch = HealthWatch(
        state_dir=settings.state_dir,
        repo_dir=settings.repo_dir,
        healthy_after=settings.healthy_after,
    )
    watch.connected()  # as the cog does on_ready
    await watch.run()
    await asyncio.Event().wait()


asyncio.run(main())
'''
#: The program the bot unit runs, relative to its WorkingDirectory= (the checkout).
STANDIN_START = f"ExecStart=\nExecStart={CHECKOUT_INSIDE}/.venv/bin/python standin_bot.py\n"
#: The test's only changes to the bot unit: its program, a short healthy time and restart delay.
BOT_DROPIN = STANDIN_START + "Environment=OPS_HEALTHY_AFTER=1\nRestartSec=100ms\n"
GUARD_LINE = re.compile(r"^admin-ops rollback: .*$", re.MULTILINE)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``predicate`` every 50 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not {what} after {timeout:g} s")
        time.sleep(0.05)


def push(tree: DeployTree, files: dict[str, str], subject: str) -> str:
    """Commit ``files`` to the test checkout's upstream; the new commit's hash."""
    for name, text in files.items():
        path = tree.upstream / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        git(tree.upstream, "add", name, config=tree.gitconfig)
    git(tree.upstream, "commit", "-q", "-m", subject, config=tree.gitconfig)
    git(tree.upstream, "push", "-q", "origin", "HEAD:main", config=tree.gitconfig)
    return git(tree.upstream, "rev-parse", "HEAD", config=tree.gitconfig)


def pull_as_the_bot(systemd: PrivateSystemd) -> None:
    """``git pull --ff-only`` of the checkout as ``opsbot``, as ``!bot_pull`` would."""
    env = {**PLAIN_ENV, "HOME": "/srv/admin-ops"}
    # With the units' UMask=0002: what this pull writes, the daemon's user pulls over later.
    pull = f"umask 0002 && exec git -C {CHECKOUT_INSIDE} pull -q --ff-only"
    systemd.run(*as_user(SERVICE_UID), "/bin/sh", "-c", pull, env=env, check=True, timeout=30)


def core_files() -> dict[str, str]:
    """The project's standard-library modules, as the checkout would hold them."""
    return {
        f"core/{path.name}": path.read_text()
        for path in sorted((ROOT / "core").glob("*.py"))
        if path.name != "redis_client.py"  # the one that needs redis-py; nothing here imports it
    }


def read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@pytest.fixture
def state(deploy_tree: DeployTree) -> Iterator[Path]:
    """The bot's state directory (``StateDirectory=admin-ops``), without the guard's files."""
    path = deploy_tree.systemd.var_lib / "admin-ops"

    def clear() -> None:
        for name in ("last-good-commit.json", "rollback-episode.json"):
            (path / name).unlink(missing_ok=True)

    clear()
    yield path
    clear()
    deploy_tree.systemd.systemctl("reset-failed", ROLLBACK_UNIT, check=False)


def guard_lines(journal: Path) -> list[str]:
    """What the guard said (its standard output, which goes to the journal when shipped)."""
    text = journal.read_text() if journal.exists() else ""
    return GUARD_LINE.findall(text)


@pytest.mark.timeout(300)
def test_a_crash_loop_after_a_bad_commit_is_rolled_back_once_and_not_at_the_good_commit(
    bot_unit: ShippedUnit,
    shipped_unit: Callable[[str], ShippedUnit],
    deploy_tree: DeployTree,
    polkit: Polkit,
    state: Path,
) -> None:
    systemd = deploy_tree.systemd
    # The private systemd has no journal: the guard's output goes to a file instead.
    journal = systemd.scratch("guard") / "journal.log"
    shipped_unit(ROLLBACK_UNIT).configure(f"StandardOutput=append:{journal}\n")
    ignore = ".venv/\n__pycache__/\n"
    good = push(
        deploy_tree, {"standin_bot.py": STANDIN, ".gitignore": ignore, **core_files()}, "v1"
    )
    pull_as_the_bot(systemd)
    bot_unit.configure(BOT_DROPIN)

    # 1. Healthy at the good commit: the stand-in records it through core.last_good.
    systemd.systemctl("start", BOT_UNIT)
    wait_until(
        lambda: (read_json(state / "last-good-commit.json") or {}).get("commit") == good,
        "recorded as the last good commit",
    )

    # 2. A bad commit, pulled, crashes at start: the unit fails, the guard rolls back once.
    bad = push(
        deploy_tree,
        {"standin_bot.py": STANDIN.replace("CRASH_AT_START = False", "CRASH_AT_START = True")},
        "crash at start",
    )
    pull_as_the_bot(systemd)
    assert deploy_tree.checkout_head() == bad
    since = systemd.console_sync()
    systemd.systemctl("restart", BOT_UNIT)
    wait_until(lambda: len(guard_lines(journal)) == 1, "rolled back")
    wait_until(
        lambda: systemd.show(BOT_UNIT, "ActiveState")["ActiveState"] == "active",
        "started again",
    )

    console = systemd.console()[since:]
    assert f"{BOT_UNIT}: Start request repeated too quickly." in console
    assert f"{BOT_UNIT}: Triggering OnFailure= dependencies." in console
    (line,) = guard_lines(journal)
    failures = re.search(r"failed to start (\d+) times", line)
    assert failures is not None, line
    # systemd's count is the runs that crashed (the start limit refused the one after).
    crashed = console.count(f"{BOT_UNIT}: Main process exited, code=exited, status=1/FAILURE")
    assert int(failures[1]) == crashed > 1
    assert line == (
        f"admin-ops rollback: {BOT_UNIT} failed to start {failures[1]} times at {bad[:7]}: "
        f"rolled {CHECKOUT_INSIDE} back to the last good commit {good[:7]} and started it again."
    )
    assert deploy_tree.checkout_head() == good
    # The guard's last step starts the bot: it may still be exiting once the bot is active.
    wait_until(
        lambda: systemd.show(ROLLBACK_UNIT, "ActiveState")["ActiveState"] != "activating",
        "the guard's process exited",
    )
    guard = systemd.show(ROLLBACK_UNIT, "Result", "ExecMainStatus", "ActiveState")
    assert guard == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}
    episode = read_json(state / "rollback-episode.json")
    assert episode is not None
    assert (episode["failed"], episode["good"]) == (bad, good)
    assert episode["failures"] == int(failures[1])
    # Healthy again: the episode ends (the next failure is a new one).
    wait_until(lambda: not (state / "rollback-episode.json").exists(), "healthy again")

    # 3. It now fails at the good commit itself: left failed, one line, no loop.
    bot_unit.configure(BOT_DROPIN + "Environment=STANDIN_CRASH=1\n")
    systemd.systemctl("restart", BOT_UNIT)
    wait_until(lambda: len(guard_lines(journal)) == 2, "judged by the guard")
    wait_until(
        lambda: systemd.show(ROLLBACK_UNIT, "ActiveState")["ActiveState"] == "failed",
        "the guard done",
    )

    assert guard_lines(journal)[1:] == [
        f"admin-ops rollback: {BOT_UNIT} left failed: it failed at the last good commit "
        f"{good[:7]}; there is nothing to roll back to."
    ]
    bot = systemd.show(BOT_UNIT, "ActiveState", "Result")
    assert bot == {"ActiveState": "failed", "Result": "exit-code"}
    assert deploy_tree.checkout_head() == good
    # Nothing started it again: once the guard is done, the unit stays failed.
    systemd.console_sync()
    assert systemd.show(BOT_UNIT, "ActiveState", "Result") == bot
    assert len(guard_lines(journal)) == 2


def test_the_rollback_unit_loads_without_warnings_and_is_well_hardened(
    deploy_tree: DeployTree,
) -> None:
    systemd = deploy_tree.systemd
    fresh = f"loadcheck-{uuid.uuid4().hex[:8]}-{ROLLBACK_UNIT}"
    systemd.install_unit(fresh, shipped_unit_text(ROLLBACK_UNIT), reload=False)
    start = systemd.console_sync()
    assert systemd.show(fresh, "LoadState")["LoadState"] == "loaded"
    end = systemd.console_sync()
    assert [line for line in systemd.console()[start:end].splitlines() if fresh in line] == []
    verify = systemd.run(
        "systemd-analyze", "verify", "--man=no", str(systemd.unit_dir / ROLLBACK_UNIT),
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_UNIT_PATH": str(systemd.unit_dir)},
    )  # fmt: skip
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    result = systemd.run("systemd-analyze", "security", "--no-pager", ROLLBACK_UNIT, check=True)
    overall = result.stdout.strip().splitlines()[-1]
    exposure = float(overall.split("exposure level for")[1].split(":")[1].split()[0])
    assert exposure < 2.0, overall
    assert systemd.show(BOT_UNIT, "OnFailure")["OnFailure"] == ROLLBACK_UNIT


def test_polkit_lets_the_bots_user_clear_and_start_the_failed_bot_unit(
    bot_unit: ShippedUnit, deploy_tree: DeployTree, polkit: Polkit
) -> None:
    systemd = polkit.systemd
    # In the unit's state directory: its /tmp is its own.
    out, inside = deploy_tree.out_dir("crashing")
    flag = out / "crash"
    flag.touch()
    bot_unit.configure(
        f"ExecStartPre=/bin/sh -c 'test ! -e {inside}/crash'\nRestart=no\n"
        + "ExecStart=\nExecStart=/bin/sleep infinity\n"
    )
    systemd.systemctl("start", BOT_UNIT, check=False)
    assert systemd.show(BOT_UNIT, "ActiveState")["ActiveState"] == "failed"
    flag.unlink()

    for verb in ("reset-failed", "start"):
        result = systemd.run(
            *as_service_user(), "systemctl", "--no-ask-password", verb, "--", BOT_UNIT
        )
        assert (verb, result.returncode, result.stderr) == (verb, 0, "")

    assert systemd.show(BOT_UNIT, "ActiveState")["ActiveState"] == "active"


@pytest.mark.parametrize(
    ("uid", "verb", "unit"),
    [
        (SERVICE_UID, "start", "proxy.service"),
        (SERVICE_UID, "reset-failed", "proxy.service"),
        (SERVICE_UID, "start", ROLLBACK_UNIT),
        (SERVICE_UID, "stop", BOT_UNIT),
        (CONTROL_UID, "start", BOT_UNIT),
        (CONTROL_UID, "reset-failed", BOT_UNIT),
    ],
    ids=lambda value: str(value),
)
def test_polkit_allows_the_guard_nothing_more(
    bot_unit: ShippedUnit, polkit: Polkit, uid: int, verb: str, unit: str
) -> None:
    systemd = polkit.systemd
    bot_unit.configure("ExecStart=\nExecStart=/bin/sleep infinity\n")
    systemd.systemctl("start", BOT_UNIT)
    before = systemd.show(unit, "ActiveState", "MainPID")

    result = systemd.run(*as_user(uid), "systemctl", "--no-ask-password", verb, "--", unit)

    assert result.returncode != 0
    assert "Access denied" in result.stderr
    assert systemd.show(unit, "ActiveState", "MainPID") == before
