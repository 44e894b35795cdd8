"""Fixtures for the end-to-end tests: the fake Discord, and real ``bot.py`` processes against it.

The helpers themselves live in :mod:`tests.support.fake_discord` and
:mod:`tests.support.fake_discord_bot`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.chat import SystemctlStub
from tests.support.fake_discord import FakeDiscord
from tests.support.fake_discord_bot import BotProcess, StartBot, bot_env, start_bot
from tests.support.git import GitRepos


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """Discord's API and gateway on a free port of 127.0.0.1, for this test only."""
    fake = FakeDiscord()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def systemctl(tmp_path: Path) -> SystemctlStub:
    """A recording stand-in for ``systemctl`` (``OPS_SYSTEMCTL``)."""
    return SystemctlStub(tmp_path)


@pytest.fixture
async def start_bots(
    fake_discord: FakeDiscord, systemctl: SystemctlStub, git_repos: GitRepos, tmp_path: Path
) -> AsyncIterator[StartBot]:
    """Start ``bot.py`` processes against the fake; they share a state dir, as on one host.

    Their checkout (``OPS_REPO_DIR``) is ``git_repos.clone``, never the project's own; systemctl
    is the recording stand-in. ``await start(**settings)`` adds or overrides ``OPS_*`` settings.
    Every process still running at the end is killed by its PID.
    """
    started: list[BotProcess] = []

    async def start(**settings: str) -> BotProcess:
        env = bot_env(
            fake_discord,
            tmp_path / "state",
            OPS_SYSTEMCTL=str(systemctl.path),
            OPS_REPO_DIR=str(git_repos.clone),
            **settings,
        )
        bot = await start_bot(fake_discord, env, tmp_path / f"bot-{len(started) + 1}.log")
        started.append(bot)
        return bot

    try:
        yield start
    finally:
        for bot in started:
            await bot.kill()
