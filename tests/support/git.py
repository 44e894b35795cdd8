"""Real git repositories for tests: a bare origin, a clone under test, a clone that pushes."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import write_script


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


def make_git_repos(tmp_path: Path) -> GitRepos:
    """``origin`` (bare), ``work`` with one commit pushed, and ``clone`` tracking ``origin``."""
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


def counting_upload_pack(
    path: Path,
    counter: Path,
    *,
    delay: float = 0.0,
    redis_url: str | None = None,
    key: str | None = None,
    seen: Path | None = None,
    replace_with: str | None = None,
) -> Path:
    """An upload-pack wrapper that counts fetches, then execs the real ``git-upload-pack``.

    It appends a line to ``counter``, optionally records the Redis lock (``key``'s value, into
    ``seen``) or replaces it with another holder's token, and waits ``delay`` seconds first.
    """
    config = {
        "counter": str(counter),
        "delay": delay,
        "redis_url": redis_url,
        "key": key,
        "seen": str(seen) if seen else None,
        "replace_with": replace_with,
    }
    body = f"""
import os, sys, time
config = {config!r}
with open(config["counter"], "a") as counter:
    counter.write(f"{{os.getpid()}}\\n")
if config["redis_url"]:
    import redis
    client = redis.Redis.from_url(config["redis_url"], socket_timeout=5)
    if config["seen"]:
        with open(config["seen"], "wb") as seen:
            seen.write(client.get(config["key"]) or b"")
    if config["replace_with"]:
        client.set(config["key"], config["replace_with"], px=60_000)
    client.close()
time.sleep(config["delay"])
os.execvp("git-upload-pack", ["git-upload-pack", *sys.argv[1:]])
"""
    return write_script(path, body, interpreter=sys.executable)
