"""Shared fixtures: an ephemeral redis-server, an isolated HOME, and git helpers.

Every test gets a private ``HOME`` and ``GIT_CONFIG_GLOBAL`` so nothing can read or write a real
user's git configuration. Redis is a throw-away server on a free loopback port started once per
session (``REDIS_URL`` overrides it); a Redis we did not start is never flushed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.support.git import GitRepos, make_git_repos
from tests.support.redis_proc import RedisServer, free_port, start_redis_server, stop_redis_server
from tests.support.wheels import venv_template

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's Redis: ``REDIS_URL`` when set, else our own on a free loopback port."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield RedisServer(url=url, owned=False)
        return
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = start_redis_server(workdir, port)
    try:
        yield RedisServer(
            url=f"redis://127.0.0.1:{port}/0", owned=True, port=port, pid=proc.pid, workdir=workdir
        )
    finally:
        stop_redis_server(proc)


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on the session Redis; our own server is flushed before each test."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    if redis_server.owned:
        await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def key_prefix() -> str:
    """A prefix unique to one test, so tests never see each other's keys on a shared Redis."""
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point HOME and git's global config at a fresh directory for every test."""
    home = tmp_path_factory.mktemp("home")
    gitconfig = home / ".gitconfig"
    gitconfig.write_text(
        "[user]\n\tname = Test\n\temail = test@example.invalid\n"
        "[init]\n\tdefaultBranch = main\n"
        '[protocol "file"]\n\tallow = always\n'
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(gitconfig))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for key in list(os.environ):
        # A developer's shell may carry GIT_DIR and friends; they would redirect our test repos.
        if key.startswith("GIT_") and key not in {"GIT_CONFIG_GLOBAL", "GIT_CONFIG_NOSYSTEM"}:
            monkeypatch.delenv(key)
    return home


@pytest.fixture
def git_repos(tmp_path: Path, isolated_home: Path) -> GitRepos:
    """Real repositories in tmp: ``clone`` (under test) and ``work`` both track ``origin``."""
    return make_git_repos(tmp_path)


@pytest.fixture(scope="session")
def pip_venv_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One virtual environment with pip for the session (``ensurepip``: no network).

    Building it takes seconds; each test installs into a copy of its own (``copy_venv``).
    """
    return venv_template(tmp_path_factory.mktemp("venv-template") / "venv")
