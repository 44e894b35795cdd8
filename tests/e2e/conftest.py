"""Fixtures for the end-to-end tests: the fake Discord, and real ``bot.py`` processes against it.

The helpers themselves live in :mod:`tests.support.fake_discord` and
:mod:`tests.support.fake_discord_bot`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.deploy_support import (
    BOT_UNIT,
    DeployTree,
    ShippedUnit,
    build_deploy_tree,
    skip_or_fail,
    start_polkit,
    start_system_bus,
)
from tests.deploy.systemd_harness import start_private_systemd, unavailable_reason
from tests.e2e.deployed_support import (
    SITE_INSIDE,
    ServiceInterpreter,
    install_project,
    install_site,
    install_venv,
    reachable_interpreter,
    write_settings,
)
from tests.support.chat import SystemctlStub
from tests.support.fake_discord import FakeDiscord
from tests.support.fake_discord_bot import (
    BASE_VARIABLE,
    GATEWAY_VARIABLE,
    BotProcess,
    StartBot,
    bot_env,
    start_bot,
)
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
        defaults = {"OPS_SYSTEMCTL": str(systemctl.path), "OPS_REPO_DIR": str(git_repos.clone)}
        env = bot_env(fake_discord, tmp_path / "state", **{**defaults, **settings})
        bot = await start_bot(fake_discord, env, tmp_path / f"bot-{len(started) + 1}.log")
        started.append(bot)
        return bot

    try:
        yield start
    finally:
        for bot in started:
            await bot.kill()


@dataclass(frozen=True)
class Deployment:
    """admin-ops installed as deploy/README.md says, in a private systemd with polkit."""

    tree: DeployTree
    interpreter: ServiceInterpreter
    commit: str


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A private systemd of this module's own, the project installed in it (see deployed_support).

    Its own rather than tests/deploy's: the checkout and its venv here are the real project's,
    which the tests there do not expect. Needs root and cgroup2 (else skipped, or failed with
    ``ADMIN_OPS_REQUIRE_SYSTEMD=1``).
    """
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    systemd = start_private_systemd(tmp_path_factory.mktemp("e2e-systemd"))
    try:
        tree = build_deploy_tree(systemd)
        start_system_bus(systemd)
        start_polkit(systemd)
        interpreter = reachable_interpreter(tree)
        commit = install_project(tree)
        install_venv(tree, interpreter)
        install_site(tree)
        yield Deployment(tree, interpreter, commit)
    finally:
        systemd.stop()


@pytest.fixture
async def deployed_bot(
    deployment: Deployment, fake_discord: FakeDiscord
) -> AsyncIterator[ShippedUnit]:
    """The shipped bot unit, set up for ``fake_discord`` (not started).

    ``bot.env`` names the fake's guild and ``alice``'s role; the token credential is the fake's;
    the test's drop-in only adds environment variables: where Discord is, the sitecustomize
    that says so, and where the moved interpreter's library is. Stopped afterwards (in a thread:
    the bot closes its connection to the fake, which needs this event loop running).
    """
    tree = deployment.tree
    write_settings(
        tree,
        fake_discord.token,
        {
            "OPS_ADMIN_ROLE_IDS": str(fake_discord.ops_role.id),
            "OPS_GUILD_IDS": str(fake_discord.guild.id),
            # Restarts at least 60 s apart by default: a test cannot wait that long.
            "OPS_RESTART_MIN_INTERVAL": "0",
            "OPS_CONFIRM": "none",
        },
    )
    environment = {
        "PYTHONPATH": SITE_INSIDE,
        BASE_VARIABLE: fake_discord.base_url,
        GATEWAY_VARIABLE: fake_discord.gateway_url,
    }
    if deployment.interpreter.ld_library_path:
        environment["LD_LIBRARY_PATH"] = deployment.interpreter.ld_library_path
    unit = ShippedUnit(tree, BOT_UNIT)
    log = tree.systemd.workdir / "admin-ops-bot.log"  # visible inside the namespace and out
    log.write_text("")  # this test's output only
    lines = [f"Environment={key}={value}" for key, value in environment.items()]
    lines += [f"StandardOutput=append:{log}", "StandardError=inherit"]
    await asyncio.to_thread(unit.configure, "".join(line + "\n" for line in lines))
    try:
        yield unit
    finally:
        await asyncio.to_thread(unit.reset)
