"""Shared fixtures: an ephemeral redis-server, an isolated HOME, and git helpers.

Every test gets a private ``HOME`` and ``GIT_CONFIG_GLOBAL`` so nothing can read or write a real
user's git configuration. Redis is a throw-away server on a free loopback port started once per
session (``REDIS_URL`` overrides it); a Redis we did not start is never flushed.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

# Other test modules import free_port and start_redis_server from here: keep them importable.
from tests.redis_proc import free_port, start_redis_server, stop_redis_server

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RedisServer:
    """Where the test Redis lives, and whether this session owns it."""

    url: str
    owned: bool
    port: int | None = None
    pid: int | None = None
    workdir: Path | None = None


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


def git(cwd: Path, *args: str) -> str:
    """Run git in ``cwd`` for test set-up; raises on failure so a broken fixture is obvious."""
    out = subprocess.run(
        ["git", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    return out.stdout.strip()


@dataclass(frozen=True)
class GitRepos:
    """A bare ``origin``, a ``clone`` tracking it, and a ``work`` clone that pushes new commits."""

    origin: Path
    clone: Path
    work: Path

    def commit_upstream(self, subject: str, filename: str | None = None) -> str:
        """Add a commit to origin (through ``work``) and return its full hash."""
        name = filename or f"f-{uuid.uuid4().hex[:8]}.txt"
        (self.work / name).write_text(subject + "\n")
        git(self.work, "add", name)
        git(self.work, "commit", "-q", "-m", subject)
        git(self.work, "push", "-q", "origin", "HEAD:main")
        return git(self.work, "rev-parse", "HEAD")

    def head(self) -> str:
        """The clone's current HEAD."""
        return git(self.clone, "rev-parse", "HEAD")


@pytest.fixture
def git_repos(tmp_path: Path, isolated_home: Path) -> GitRepos:
    """Real repositories in tmp: ``clone`` (under test) and ``work`` both track ``origin``."""
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(origin), str(work))
    (work / "README").write_text("first\n")
    git(work, "add", "README")
    git(work, "commit", "-q", "-m", "initial commit")
    git(work, "push", "-q", "origin", "HEAD:main")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    return GitRepos(origin=origin, clone=clone, work=work)
