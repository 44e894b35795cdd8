"""``core.rollback``: the crash-loop guard against real git and a stand-in ``systemctl``.

The stand-in records each call, answers ``show --property=NRestarts`` with a count the test
sets, and fails ``reset-failed``/``start`` on request. (The real service manager runs the guard
in ``tests/deploy/test_crash_loop_guard.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.last_good import RollbackEpisode, read_episode, write_last_good
from core.ops_exec import pull_checkout
from core.rollback import guard
from core.settings import RollbackSettings
from tests.support.git import GitRepos
from tests.support.processes import write_script

UNIT = "bot.service"
# What systemd 252 hands OnFailure= after a crash loop hit the start limit.
CRASH_LOOP = {"MONITOR_UNIT": UNIT, "MONITOR_SERVICE_RESULT": "exit-code"}


@dataclass
class Systemctl:
    """The stand-in's files: its log of calls, the restart count, the failing verb."""

    path: Path
    log: Path
    restarts: Path
    failing: Path

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def acting(self) -> list[list[str]]:
        """The calls that change something (not ``show``)."""
        return [argv for argv in self.calls() if "show" not in argv]


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Systemctl:
    directory = tmp_path / "systemctl"
    directory.mkdir()
    stub = Systemctl(
        directory / "systemctl",
        directory / "calls.jsonl",
        directory / "nrestarts",
        directory / "fail",
    )
    stub.restarts.write_text("5")
    write_script(
        stub.path,
        "import json, sys\n"
        f"with open({str(stub.log)!r}, 'a') as log:\n"
        "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'show' in sys.argv:\n"
        f"    print(open({str(stub.restarts)!r}).read().strip())\n"
        "    sys.exit(0)\n"
        "try:\n"
        f"    failing = open({str(stub.failing)!r}).read().strip()\n"
        "except FileNotFoundError:\n"
        "    failing = ''\n"
        "if failing and failing in sys.argv:\n"
        "    sys.stderr.write('Failed to ' + failing + ': Access denied\\n')\n"
        "    sys.exit(4)\n",
        interpreter=sys.executable,
    )
    monkeypatch.setenv("OPS_SYSTEMCTL", str(stub.path))
    return stub


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def settings(git_repos: GitRepos, state: Path, systemctl: Systemctl) -> RollbackSettings:
    return RollbackSettings.from_env(
        {"OPS_REPO_DIR": str(git_repos.clone), "OPS_STATE_DIR": str(state), "OPS_BOT_SERVICE": UNIT}
    )


async def bad_commit_pulled(repos: GitRepos, state: Path) -> tuple[str, str]:
    """The good commit recorded, then a pull of a bad one: (good, bad)."""
    good = repos.head()
    write_last_good(state, os.path.realpath(repos.clone), good)
    repos.commit_upstream("crash at start", filename="bot.py")
    outcome = await pull_checkout(repos.clone, timeout=20)
    assert outcome.head_after is not None
    return good, outcome.head_after


async def test_a_crash_loop_after_a_bad_commit_is_rolled_back_once_and_the_bot_started(
    git_repos: GitRepos, state: Path, settings: RollbackSettings, systemctl: Systemctl
) -> None:
    good, bad = await bad_commit_pulled(git_repos, state)

    result = await guard(settings, CRASH_LOOP)

    assert result.rolled_back
    assert result.line == (
        f"{UNIT} failed to start 5 times at {bad[:7]}: rolled {os.path.realpath(git_repos.clone)} "
        f"back to the last good commit {good[:7]} and started it again."
    )
    assert git_repos.head() == good
    assert systemctl.acting() == [
        ["--no-ask-password", "reset-failed", "--", UNIT],
        ["--no-ask-password", "start", "--", UNIT],
    ]
    episode = read_episode(state, os.path.realpath(git_repos.clone))
    assert episode is not None
    assert (episode.failed, episode.good, episode.failures, episode.announced) == (
        bad, good, 5, False
    )  # fmt: skip

    # The bot fails again at the good commit: one line, left failed, no second rollback.
    again = await guard(settings, CRASH_LOOP)

    assert not again.rolled_back
    assert again.line == (
        f"{UNIT} left failed: it failed again after the rollback from {bad[:7]} to {good[:7]}, "
        "and there is one automatic rollback per failure."
    )
    assert len(systemctl.acting()) == 2
    assert git_repos.head() == good


async def test_one_rollback_per_episode_even_if_head_moved_again(
    git_repos: GitRepos, state: Path, settings: RollbackSettings, systemctl: Systemctl
) -> None:
    _, bad = await bad_commit_pulled(git_repos, state)
    assert (await guard(settings, CRASH_LOOP)).rolled_back
    # Someone pulls the bad commit again before the bot was ever healthy.
    await pull_checkout(git_repos.clone, timeout=20)
    assert git_repos.head() == bad

    again = await guard(settings, CRASH_LOOP)

    assert not again.rolled_back
    assert git_repos.head() == bad
    assert len(systemctl.acting()) == 2


async def test_a_failure_at_the_last_good_commit_is_left_failed(
    git_repos: GitRepos, state: Path, settings: RollbackSettings, systemctl: Systemctl
) -> None:
    good = git_repos.head()
    write_last_good(state, os.path.realpath(git_repos.clone), good)

    result = await guard(settings, CRASH_LOOP)

    assert result == (
        False,
        f"{UNIT} left failed: it failed at the last good commit {good[:7]}; there is nothing to "
        "roll back to.",
    )
    assert systemctl.acting() == []


async def test_without_a_last_good_commit_nothing_is_done(
    git_repos: GitRepos, settings: RollbackSettings, systemctl: Systemctl
) -> None:
    head = git_repos.head()

    result = await guard(settings, CRASH_LOOP)

    assert result.line == (
        f"{UNIT} left failed: no last good commit of {os.path.realpath(git_repos.clone)} is "
        "recorded."
    )
    assert git_repos.head() == head
    assert systemctl.calls() == []


async def test_local_changes_that_would_be_lost_leave_it_failed_and_change_nothing(
    git_repos: GitRepos, state: Path, settings: RollbackSettings, systemctl: Systemctl
) -> None:
    _, bad = await bad_commit_pulled(git_repos, state)
    (git_repos.clone / "bot.py").write_text("hot fix in progress\n")

    result = await guard(settings, CRASH_LOOP)

    assert not result.rolled_back
    assert result.line == (
        f"{UNIT} left failed: Not rolled back: local changes to bot.py would be lost. Commit, "
        "stash or discard them first; nothing was changed."
    )
    assert git_repos.head() == bad
    assert (git_repos.clone / "bot.py").read_text() == "hot fix in progress\n"
    assert systemctl.acting() == []
    assert read_episode(state, os.path.realpath(git_repos.clone)) is None


@pytest.mark.parametrize(
    ("environ", "line"),
    [
        (
            {"MONITOR_UNIT": "other.service", "MONITOR_SERVICE_RESULT": "start-limit-hit"},
            f"triggered by other.service, not by OPS_BOT_SERVICE {UNIT}: nothing done.",
        ),
        (
            {"MONITOR_UNIT": UNIT, "MONITOR_SERVICE_RESULT": "timeout"},
            f"{UNIT} left failed: it failed (timeout), not by crashing; nothing done.",
        ),
        (
            {"MONITOR_UNIT": UNIT, "MONITOR_SERVICE_RESULT": "resources"},
            f"{UNIT} left failed: it failed (resources), not by crashing; nothing done.",
        ),
    ],
    ids=["another unit", "a stop that timed out", "a credential missing"],
)
async def test_what_systemd_says_of_another_failure_is_respected(
    git_repos: GitRepos,
    state: Path,
    settings: RollbackSettings,
    systemctl: Systemctl,
    environ: dict[str, str],
    line: str,
) -> None:
    _, bad = await bad_commit_pulled(git_repos, state)

    result = await guard(settings, environ)

    assert result == (False, line)
    assert git_repos.head() == bad
    assert systemctl.calls() == []


async def test_a_start_systemd_refuses_is_said_and_the_episode_stays(
    git_repos: GitRepos, state: Path, settings: RollbackSettings, systemctl: Systemctl
) -> None:
    good, bad = await bad_commit_pulled(git_repos, state)
    systemctl.failing.write_text("start")
    systemctl.restarts.write_text("not a number")

    result = await guard(settings, CRASH_LOOP)

    assert not result.rolled_back
    assert result.line.startswith(
        f"{UNIT} failed to start repeatedly at {bad[:7]}: rolled "
        f"{os.path.realpath(git_repos.clone)} back to the last good commit {good[:7]}, but could "
        f"not start it again: systemctl start {UNIT} failed (exit 4): Failed to start: Access "
        "denied"
    )
    assert git_repos.head() == good
    assert read_episode(state, os.path.realpath(git_repos.clone)) is not None


async def test_a_healthy_bot_ends_the_episode_so_the_next_crash_loop_rolls_back_again(
    git_repos: GitRepos, state: Path, settings: RollbackSettings, systemctl: Systemctl
) -> None:
    repo = os.path.realpath(git_repos.clone)
    good, _ = await bad_commit_pulled(git_repos, state)
    assert (await guard(settings, CRASH_LOOP)).rolled_back
    # What HealthWatch does once the bot at the good commit has been up long enough.
    write_last_good(state, repo, good)
    (state / "rollback-episode.json").unlink()
    git_repos.commit_upstream("another bad one", filename="core.py")
    await pull_checkout(git_repos.clone, timeout=20)

    assert (await guard(settings, CRASH_LOOP)).rolled_back
    assert git_repos.head() == good


def run_main(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m core.rollback`` as systemd runs it: a process of its own."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-m", "core.rollback"],
        cwd=root,
        env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
        timeout=60,
    )


async def test_the_module_prints_one_line_and_exits_by_what_it_did(
    git_repos: GitRepos, state: Path, systemctl: Systemctl
) -> None:
    good, bad = await bad_commit_pulled(git_repos, state)
    env = {
        "OPS_REPO_DIR": str(git_repos.clone),
        "OPS_STATE_DIR": str(state),
        "OPS_BOT_SERVICE": UNIT,
        "OPS_SYSTEMCTL": str(systemctl.path),
        "GIT_CONFIG_GLOBAL": os.environ["GIT_CONFIG_GLOBAL"],
        **CRASH_LOOP,
    }

    first = run_main(env)
    second = run_main(env)

    assert (first.returncode, first.stderr) == (0, "")
    assert first.stdout.count("\n") == 1
    assert first.stdout.startswith(
        f"admin-ops rollback: {UNIT} failed to start 5 times at {bad[:7]}"
    )
    assert (second.returncode, second.stdout.count("\n")) == (1, 1)
    assert "failed again after the rollback" in second.stdout
    assert git_repos.head() == good


def test_the_module_refuses_to_run_without_the_bot_unit(state: Path) -> None:
    result = run_main({"OPS_STATE_DIR": str(state)})

    assert result.returncode == 2
    assert result.stdout == (
        "admin-ops rollback: invalid settings: OPS_BOT_SERVICE: is not set: the unit to roll "
        "back and start again\n"
    )


def test_the_guard_imports_nothing_but_the_standard_library() -> None:
    """It runs when the bot cannot: a broken virtual environment must not stop it."""
    root = Path(__file__).resolve().parents[2]
    probe = (
        "import sys; import core.rollback; "
        "roots = ('discord', 'redis', 'aiohttp'); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in roots); "
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_episode_file_holds_what_the_notice_needs(tmp_path: Path) -> None:
    episode = RollbackEpisode("/srv/bot", "a" * 40, "b" * 40, 10, 1.0)
    data: dict[str, Any] = episode.to_json()

    assert data == {
        "repo": "/srv/bot",
        "failed": "a" * 40,
        "good": "b" * 40,
        "failures": 10,
        "at": 1.0,
        "announced": False,
    }
