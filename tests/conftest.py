"""Shared fixtures: an ephemeral redis-server, an isolated HOME, and git helpers.

Every test gets a private ``HOME`` and ``GIT_CONFIG_GLOBAL`` so nothing can read or write a real
user's git configuration. Redis is a throw-away server on a free loopback port started once per
session (``REDIS_URL`` overrides it); a Redis we did not start is never flushed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RedisServer:
    """Where the test Redis lives, and whether this session owns it."""

    url: str
    owned: bool
    port: int | None = None
    pid: int | None = None
    workdir: Path | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_redis(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited early: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        # Polling a port that is being opened: there is no event to wait on.
        time.sleep(0.02)
    raise RuntimeError(f"redis-server did not answer on port {port}")


def start_redis_server(workdir: Path, port: int | None = None) -> subprocess.Popen[bytes]:
    """Start a redis-server that keeps nothing on disk; its output goes to a log file."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make test installs it as root)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--logfile", str(log),
        "--daemonize", "no",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    _wait_for_redis(port, proc, log)
    return proc


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
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
