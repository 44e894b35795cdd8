"""``core.last_good``: the last good commit, recorded once the bot is healthy, and its episode file.

The waits are the test's own (``sleep`` is injected): the test decides when the time is up.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from core import last_good
from core.last_good import (
    EPISODE_FILE,
    LAST_GOOD_FILE,
    HealthWatch,
    RollbackEpisode,
    read_episode,
    read_last_good,
    write_episode,
    write_last_good,
)
from core.ops_exec import pull_checkout
from tests.support.git import GitRepos

A, B = "a" * 40, "b" * 40


class Sleeps:
    """A stand-in for ``asyncio.sleep``: each call waits until the test lets it return."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.calls.put((seconds, done))
        await done

    async def elapse(self) -> float:
        """Let the next pending wait end; return how long it was asked to be."""
        seconds, done = await self.calls.get()
        done.set_result(None)
        return seconds


@pytest.fixture(autouse=True)
def fresh_start_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test is a new process as far as "the commit this process started at" goes."""
    monkeypatch.setattr(last_good, "_STARTED_AT", {})


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


async def test_a_connection_that_lasts_records_the_commit_the_process_started_at(
    git_repos: GitRepos, state: Path
) -> None:
    started = git_repos.head()
    sleeps = Sleeps()
    watch = HealthWatch(state_dir=state, repo_dir=git_repos.clone, healthy_after=60, sleep=sleeps)
    task = asyncio.create_task(watch.run())
    watch.connected()
    await asyncio.sleep(0)
    # A pull while the bot waits: the code running is still the start commit's.
    git_repos.commit_upstream("pulled meanwhile")
    await pull_checkout(git_repos.clone, timeout=20)

    assert await sleeps.elapse() == 60
    await task

    good = read_last_good(state, os.path.realpath(git_repos.clone))
    assert good is not None
    assert good.commit == started
    assert watch.recorded == started


async def test_a_break_in_the_connection_starts_the_wait_again(
    git_repos: GitRepos, state: Path
) -> None:
    sleeps = Sleeps()
    watch = HealthWatch(state_dir=state, repo_dir=git_repos.clone, healthy_after=5, sleep=sleeps)
    task = asyncio.create_task(watch.run())
    watch.connected()
    _, done = await sleeps.calls.get()
    watch.disconnected()
    watch.connected()  # resumed before the wait was up: that wait does not count
    done.set_result(None)

    assert await sleeps.elapse() == 5
    await task
    assert (state / LAST_GOOD_FILE).exists()


async def test_nothing_is_recorded_while_disconnected(git_repos: GitRepos, state: Path) -> None:
    sleeps = Sleeps()
    watch = HealthWatch(state_dir=state, repo_dir=git_repos.clone, healthy_after=5, sleep=sleeps)
    task = asyncio.create_task(watch.run())
    watch.connected()
    _, done = await sleeps.calls.get()
    watch.disconnected()
    done.set_result(None)
    await asyncio.sleep(0)

    assert not task.done()
    assert not (state / LAST_GOOD_FILE).exists()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_being_healthy_ends_the_rollback_episode_after_the_notice(
    git_repos: GitRepos, state: Path
) -> None:
    repo = os.path.realpath(git_repos.clone)
    write_episode(state, RollbackEpisode(repo, B, git_repos.head(), 10, 1.0))
    seen: list[bool] = []

    async def notice() -> None:
        seen.append(read_episode(state, repo) is not None)

    sleeps = Sleeps()
    watch = HealthWatch(state_dir=state, repo_dir=repo, healthy_after=1, sleep=sleeps)
    task = asyncio.create_task(watch.run(before_record=notice))
    watch.connected()
    await sleeps.elapse()
    await task

    assert seen == [True]
    assert read_episode(state, repo) is None


def test_last_good_is_read_back_only_for_its_own_checkout(state: Path) -> None:
    write_last_good(state, "/srv/bot", A, at=5.0)

    assert read_last_good(state, "/srv/bot") == last_good.LastGood("/srv/bot", A, 5.0)
    assert read_last_good(state, "/srv/other") is None


@pytest.mark.parametrize(
    "data",
    [
        {"repo": "/srv/bot", "commit": "--hard", "at": 1.0},
        {"repo": "/srv/bot", "commit": A[:12], "at": 1.0},
        {"repo": "/srv/bot", "commit": A},
        {"repo": "/srv/bot", "commit": A, "at": "yesterday"},
        ["/srv/bot", A],
    ],
)
def test_a_last_good_file_that_is_not_ours_counts_as_none(state: Path, data: object) -> None:
    (state / LAST_GOOD_FILE).write_text(json.dumps(data))

    assert read_last_good(state, "/srv/bot") is None


@pytest.mark.parametrize(
    "change",
    [
        {"failed": "deadbeef"},
        {"good": "--keep"},
        {"failures": -1},
        {"failures": True},
        {"failures": "5"},
        {"announced": "yes"},
        {"at": float("inf")},
        {"repo": "/srv/other"},
    ],
)
def test_an_episode_file_that_is_not_ours_counts_as_none(
    state: Path, change: dict[str, object]
) -> None:
    episode = RollbackEpisode("/srv/bot", A, B, 3, 1.0).to_json()
    (state / EPISODE_FILE).write_text(json.dumps({**episode, **change}, allow_nan=True))

    assert read_episode(state, "/srv/bot") is None


def test_an_episode_round_trips(state: Path) -> None:
    episode = RollbackEpisode("/srv/bot", A, B, None, 1.0)
    write_episode(state, episode)

    assert read_episode(state, "/srv/bot") == episode
    last_good.mark_announced(state, episode)
    assert read_episode(state, "/srv/bot") == RollbackEpisode("/srv/bot", A, B, None, 1.0, True)
