"""Fixtures for the cog tests: the send spy, the systemctl stand-in and the dpytest harness.

The harness itself lives in :mod:`tests.support.chat`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import discord.ext.test as dpytest
import pytest

import core.chat.spacing as chat_spacing
from tests.support.chat import (
    Harness,
    Sent,
    SystemctlStub,
    configured_bot,
    pings_nobody,
    spy_on_sends,
)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Sent]]:
    """Every message the bot sends or edits, recorded before discord.py sends it."""
    records: list[Sent] = []
    spy_on_sends(monkeypatch, records)
    yield records
    # Every test checks this for free: nothing the bot sent could ping anyone.
    for record in records:
        assert pings_nobody(record), record


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SystemctlStub:
    """The stand-in, installed through ``OPS_SYSTEMCTL``."""
    stub_dir = tmp_path / "systemctl-stub"
    stub_dir.mkdir()
    stub = SystemctlStub(stub_dir)
    monkeypatch.setenv("OPS_SYSTEMCTL", str(stub.path))
    return stub


@pytest.fixture
async def harness(
    tmp_path: Path,
    git_repos: Any,
    sent: list[Sent],
    systemctl: SystemctlStub,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Harness]:
    """Alice and Bob hold the ``ops`` role; Mallory holds none. The checkout is ``git_repos``."""
    # dpytest saves every sent attachment as ./dpytest_<n>.dat: keep them out of the project.
    monkeypatch.chdir(tmp_path)
    # The bot has been up for an hour (the test process itself started moments ago): without
    # systemd's answer, a restart of the bot is spaced from its process's start.
    monkeypatch.setattr(chat_spacing, "process_started_at", lambda: time.time() - 3600)
    bot, config = await configured_bot()
    guild = config.guilds[0]
    ops_role = dpytest.backend.make_role("ops", guild)
    other_role = dpytest.backend.make_role("deployers", guild)
    alice, bob, mallory = config.members
    for member in (alice, bob):
        await dpytest.add_role(member, ops_role)
    state_dir = tmp_path / "state"
    h = Harness(
        bot=bot,
        guild=guild,
        channel=config.channels[0],
        other_channel=config.channels[1],
        admins=[alice, bob],
        outsider=mallory,
        ops_role=ops_role,
        other_role=other_role,
        state_dir=state_dir,
        base_env={
            "DISCORD_TOKEN": "test-bot-token-value-0123456789",
            "OPS_STATE_DIR": str(state_dir),
            "OPS_REPO_DIR": str(git_repos.clone),
            "OPS_ADMIN_ROLE_IDS": str(ops_role.id),
            "OPS_BOT_SERVICE": "bot.service",
            "OPS_PROXY_SERVICE": "proxy.service",
            "OPS_RESTART_DELAY": "0",
            # dpytest cannot press buttons: confirmations are tested in tests/e2e, and here
            # through a scripted stand-in (tests/cogs/test_confirmations.py).
            "OPS_CONFIRM": "none",
        },
    )
    try:
        yield h
    finally:
        await dpytest.empty_queue()
        if "AdminOps" in bot.cogs:
            await bot.remove_cog("AdminOps")
