"""After the crash-loop guard: the bot says it is back and why, and records its last good commit.

The guard (``python -m core.rollback``) leaves its episode in the state dir; the process that
comes back reads it once. The waits of ``OPS_HEALTHY_AFTER`` are the test's (``sleep`` is
injected into the cog).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import discord.ext.test as dpytest
import pytest

from core import last_good
from core.last_good import (
    EPISODE_FILE,
    LAST_GOOD_FILE,
    RollbackEpisode,
    read_episode,
    read_last_good,
    write_episode,
)
from tests.support.chat import Harness, Sent, replies_to

GOOD, BAD = "9f8e7d6" + "0" * 33, "abc1234" + "f" * 33
NOTICE = (
    "⚠️ Back online after rolling back from abc1234 to 9f8e7d6: the bot failed to start 10 times"
)


@pytest.fixture(autouse=True)
def fresh_start_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(last_good, "_STARTED_AT", {})


def episode_for(harness: Harness, git_repos: Any, **changes: Any) -> RollbackEpisode:
    repo = os.path.realpath(git_repos.clone)
    return RollbackEpisode(**{**RollbackEpisode(repo, BAD, GOOD, 10, 1.0).to_json(), **changes})


class Sleeps:
    """``asyncio.sleep`` for the cog's health watch: it returns when the test says."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.calls.put((seconds, done))
        await done

    async def elapse(self) -> float:
        seconds, done = await self.calls.get()
        done.set_result(None)
        return seconds


async def test_the_notice_answers_the_restart_that_led_to_the_rollback(
    harness: Harness, git_repos: Any, sent: list[Sent]
) -> None:
    await harness.add_cog()
    request = await harness.say("!bot_restart")
    # The restart crashed in a loop; the guard rolled back and started the bot again.
    write_episode(harness.state_dir, episode_for(harness, git_repos))
    count = len(sent)

    await harness.reload_and_get_ready()

    [notice] = sent[count:]
    assert (notice.content, notice.reference) == (NOTICE, request.id)
    episode = read_episode(harness.state_dir, os.path.realpath(git_repos.clone))
    assert episode is not None
    assert episode.announced
    # Said once: the next start (or a reload of the cog) says nothing more.
    await harness.reload_and_get_ready()
    assert sent[count + 1 :] == []


async def test_without_a_restart_request_the_notice_goes_to_the_audit_channel(
    harness: Harness, git_repos: Any, sent: list[Sent]
) -> None:
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id))
    write_episode(harness.state_dir, episode_for(harness, git_repos, failures=1))

    await harness.reload_and_get_ready(settings=settings)

    [notice] = sent
    assert notice.content == (
        "⚠️ Back online after rolling back from abc1234 to 9f8e7d6: the bot failed to start once"
    )
    assert notice.reference is None
    assert dpytest.get_message(peek=True).channel.id == harness.other_channel.id


async def test_a_stale_restart_request_sends_the_notice_to_the_audit_channel(
    harness: Harness, git_repos: Any, sent: list[Sent]
) -> None:
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id))
    cog = await harness.add_cog(settings)
    request = await harness.say("!bot_restart")
    marker = json.loads(cog.markers.path.read_text())
    marker["requested_at"] -= 3600
    cog.markers.path.write_text(json.dumps(marker))
    write_episode(harness.state_dir, episode_for(harness, git_repos, failures=None))
    count = len(sent)

    await harness.reload_and_get_ready(settings=settings)

    # The restart's record goes to the audit channel too; the notice replies to nothing.
    [notice] = [s for s in sent[count:] if (s.content or "").startswith("⚠️")]
    assert notice.content == (
        "⚠️ Back online after rolling back from abc1234 to 9f8e7d6: the bot kept failing to start"
    )
    assert replies_to(sent[count:], request) == []


async def test_without_an_audit_channel_the_notice_is_logged(
    harness: Harness, git_repos: Any, sent: list[Sent], caplog: pytest.LogCaptureFixture
) -> None:
    write_episode(harness.state_dir, episode_for(harness, git_repos))

    with caplog.at_level(logging.WARNING):
        await harness.reload_and_get_ready()

    assert sent == []
    assert f"{NOTICE} (no audit channel to say it in)" in caplog.text


@pytest.mark.parametrize(
    "change",
    [
        {"failed": "@everyone" + "a" * 31},
        {"good": "not-a-commit"},
        {"failures": "10 [phish](https://evil.example)"},
        {"repo": "/srv/another-checkout"},
    ],
)
async def test_an_episode_file_that_is_not_the_guards_shows_nothing(
    harness: Harness, git_repos: Any, sent: list[Sent], change: dict[str, Any]
) -> None:
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id))
    data = {**episode_for(harness, git_repos).to_json(), **change}
    harness.state_dir.mkdir(parents=True, exist_ok=True)
    (harness.state_dir / EPISODE_FILE).write_text(json.dumps(data))

    await harness.reload_and_get_ready(settings=settings)

    assert sent == []


async def test_a_healthy_bot_records_its_start_commit_and_ends_the_episode(
    harness: Harness, git_repos: Any, sent: list[Sent]
) -> None:
    started = git_repos.head()
    settings = harness.settings(
        OPS_HEALTHY_AFTER="90", OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id)
    )
    write_episode(harness.state_dir, episode_for(harness, git_repos))
    sleeps = Sleeps()

    cog = await harness.reload_and_get_ready(settings=settings, sleep=sleeps)

    assert [s.content for s in sent] == [NOTICE]
    assert await sleeps.elapse() == 90
    assert cog.health_task is not None
    await cog.health_task
    good = read_last_good(harness.state_dir, os.path.realpath(git_repos.clone))
    assert good is not None
    assert good.commit == started
    assert not (harness.state_dir / EPISODE_FILE).exists()


async def test_a_disconnect_before_the_time_is_up_records_nothing_yet(
    harness: Harness, git_repos: Any
) -> None:
    sleeps = Sleeps()
    cog = await harness.reload_and_get_ready(sleep=sleeps)
    _, done = await sleeps.calls.get()
    harness.bot.dispatch("disconnect")
    await dpytest.run_all_events()
    done.set_result(None)
    harness.bot.dispatch("resumed")
    await dpytest.run_all_events()
    # The wait that spanned the disconnect did not count: a new one began.
    assert await sleeps.elapse() == 60
    assert cog.health_task is not None
    await cog.health_task
    assert (harness.state_dir / LAST_GOOD_FILE).exists()
