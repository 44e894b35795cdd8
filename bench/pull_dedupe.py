"""50 concurrent ``run_git_pull`` of one checkout: exactly one fetch, wall vs a single pull.

Set-up (not timed): a temp dir with an isolated ``HOME``/``GIT_CONFIG_GLOBAL`` and
``GIT_CONFIG_NOSYSTEM=1``, a bare ``origin``, a ``work`` clone that pushes commits, and the
checkout under test (``clone``) whose ``remote.origin.uploadpack`` is a wrapper that appends a
line to a counter file and execs ``git upload-pack``: one line = one fetch. A throw-away
``redis-server`` on a free 127.0.0.1 port (or ``REDIS_URL`` when set; never flushed), stopped
by its PID at the end, also on error.

Every measured pull gets a fresh upstream commit first, so there is always something to fetch.
Per round, in a rotating order:

* ``git pull``        — the bare floor: one plain ``git pull --ff-only`` through asyncio
* ``single``          — one ``run_git_pull(clone, redis=client)``
* ``50 concurrent``   — ``gather`` of 50 ``run_git_pull(clone, redis=client)``
* ``50 conc. no redis`` — the same with ``redis=None`` (host-local flock only)

Checks (exit 1 when one fails): each concurrent batch has exactly one ``ran=True``, every result
``ok``, exactly one fetch, HEAD at the new commit; each single pull fetched once and updated.
Target (printed only): median(50 concurrent) ≤ 1.5 × median(single).

    .venv/bin/python bench/pull_dedupe.py [--rounds 10] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from _common import add_repo_root_to_path, median, ms, print_table, verdict

add_repo_root_to_path()

import redis.asyncio as aioredis  # noqa: E402

from core.ops_exec import PullResult, git_env, run_git_pull  # noqa: E402
from tests.support.redis_proc import free_port, start_redis_server, stop_redis_server  # noqa: E402

TARGET_RATIO = 1.5
FLOOR_ARGV = ("git", "-c", "credential.helper=", "pull", "--ff-only", "--no-rebase", "-q")


# ---------------------------------------------------------------------------------------------
# Set-up: an isolated git world and a throw-away Redis
# ---------------------------------------------------------------------------------------------


def isolate_git(home: Path) -> None:
    """Point HOME and git's global config at ``home``; drop any other GIT_* the shell carried."""
    home.mkdir(parents=True)
    gitconfig = home / ".gitconfig"
    gitconfig.write_text(
        "[user]\n\tname = Bench\n\temail = bench@example.invalid\n"
        "[init]\n\tdefaultBranch = main\n"
        # No automatic gc/maintenance: a background gc would make timings jump at random.
        "[gc]\n\tauto = 0\n[maintenance]\n\tauto = false\n"
    )
    for key in [k for k in os.environ if k.startswith("GIT_")]:
        del os.environ[key]
    # git_env() passes HOME through, so run_git_pull's git reads $HOME/.gitconfig too.
    os.environ["HOME"] = str(home)
    os.environ["GIT_CONFIG_GLOBAL"] = str(gitconfig)
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    return out.stdout.strip()


@dataclass
class Repos:
    origin: Path
    work: Path
    clone: Path
    counter: Path
    serial: int = 0

    def commit_upstream(self) -> str:
        self.serial += 1
        name = f"f{self.serial}.txt"
        (self.work / name).write_text(f"change {self.serial}\n")
        git(self.work, "add", name)
        git(self.work, "commit", "-q", "-m", f"change {self.serial}")
        git(self.work, "push", "-q", "origin", "HEAD:main")
        return git(self.work, "rev-parse", "HEAD")

    def fetches(self) -> int:
        try:
            return len(self.counter.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def head(self) -> str:
        return git(self.clone, "rev-parse", "HEAD")


def make_repos(tmp: Path) -> Repos:
    origin, work, clone = tmp / "origin.git", tmp / "work", tmp / "clone"
    git(tmp, "init", "-q", "--bare", "-b", "main", str(origin))
    git(tmp, "clone", "-q", str(origin), str(work))
    (work / "README").write_text("bench\n")
    git(work, "add", "README")
    git(work, "commit", "-q", "-m", "initial commit")
    git(work, "push", "-q", "origin", "HEAD:main")
    git(tmp, "clone", "-q", str(origin), str(clone))
    counter = tmp / "upload-pack-count"
    wrapper = tmp / "counting-upload-pack"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> {counter}\nexec git upload-pack "$@"\n')
    wrapper.chmod(0o755)
    git(clone, "config", "remote.origin.uploadpack", str(wrapper))
    return Repos(origin=origin, work=work, clone=clone, counter=counter)


# ---------------------------------------------------------------------------------------------
# The measured variants
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    variant: str
    seconds: float
    fetches: int
    results: list[PullResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def floor_pull(repos: Repos, client: Any, n: int) -> list[PullResult]:
    proc = await asyncio.create_subprocess_exec(
        *FLOOR_ARGV,
        cwd=repos.clone,
        env=git_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    _, err = await proc.communicate()
    return [PullResult(ran=True, ok=proc.returncode == 0, summary=err.decode(errors="replace"))]


async def pulls(repos: Repos, client: Any, n: int) -> list[PullResult]:
    return list(
        await asyncio.gather(
            *(run_git_pull(repos.clone, redis=client, instance_id=f"bench-{i}") for i in range(n))
        )
    )


Variant = Callable[[Repos, Any, int], Awaitable[list[PullResult]]]


async def one_sample(name: str, func: Variant, repos: Repos, client: Any, n: int) -> Sample:
    new_head = repos.commit_upstream()
    before = repos.fetches()
    start = time.perf_counter()
    results = await func(repos, client, n)
    elapsed = time.perf_counter() - start
    sample = Sample(name, elapsed, repos.fetches() - before, results)
    ran = [r for r in results if r.ran]
    if len(ran) != 1:
        sample.problems.append(f"{len(ran)} results with ran=True, expected 1")
    bad = [r for r in results if not r.ok]
    if bad:
        sample.problems.append(f"{len(bad)} results not ok, e.g. {bad[0].summary[:300]!r}")
    if sample.fetches != 1:
        sample.problems.append(f"{sample.fetches} fetches, expected exactly 1")
    if repos.head() != new_head:
        sample.problems.append("HEAD is not at the new upstream commit")
    return sample


async def measure(
    repos: Repos, url: str, rounds: int, concurrency: int
) -> tuple[list[Sample], list[Sample]]:
    client = aioredis.Redis.from_url(url, socket_timeout=5)
    try:
        await client.ping()
        variants: list[tuple[str, Variant, Any, int]] = [
            ("git pull (floor)", floor_pull, None, 1),
            ("single", pulls, client, 1),
            (f"{concurrency} concurrent", pulls, client, concurrency),
            (f"{concurrency} conc. no redis", pulls, None, concurrency),
        ]
        warmup = [await one_sample(n, f, repos, c, k) for n, f, c, k in variants]
        samples: list[Sample] = []
        for i in range(rounds):
            shift = i % len(variants)
            for name, func, cli, n in variants[shift:] + variants[:shift]:
                samples.append(await one_sample(name, func, repos, cli, n))
        return warmup, samples
    finally:
        await client.aclose()


def skip_kinds(results: list[PullResult]) -> str:
    kinds: Counter[str] = Counter()
    for r in results:
        if r.ran:
            continue
        kinds["flock" if "on this host" in r.summary else "redis"] += 1
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "-"


def report(
    warmup: list[Sample], samples: list[Sample], concurrency: int, wall: float, rounds: int
) -> int:
    """Print the table and verdicts; the warm-up round counts for the checks, not the times."""
    names = list(dict.fromkeys(s.variant for s in samples))
    print(
        f"git pull dedupe: {rounds} rounds, variants interleaved (rotating order), a fresh "
        f"upstream commit before every pull, {os.cpu_count()} CPUs, {wall:.1f}s wall"
    )
    single = median([s.seconds for s in samples if s.variant == "single"])
    rows = []
    for name in names:
        mine = [s for s in samples if s.variant == name]
        secs = [s.seconds for s in mine]
        rows.append(
            [
                name,
                str(len(mine)),
                ms(median(secs)),
                ms(min(secs)),
                ms(max(secs)),
                f"{median(secs) / single:.2f}x",
                str(sum(s.fetches for s in mine)),
                skip_kinds(mine[-1].results),
            ]
        )
    print_table(
        ("variant", "n", "median ms", "min ms", "max ms", "vs single", "fetches",
         "skips (last round)"),
        rows,
    )  # fmt: skip
    conc_name = f"{concurrency} concurrent"
    conc = median([s.seconds for s in samples if s.variant == conc_name])
    print()
    problems = [f"{s.variant} (warm-up): {p}" for s in warmup for p in s.problems]
    problems += [f"{s.variant}: {p}" for s in samples for p in s.problems]
    for problem in problems[:10]:
        print(f"problem: {problem}")
    batches = [s for s in warmup + samples if s.variant.startswith(f"{concurrency} ")]
    verdict(
        "CHECK",
        "each pull fetched exactly once, one ran=True per batch, all ok, HEAD updated",
        not problems,
        f"{len(batches)} batches of {concurrency}, {len(problems)} problems",
    )
    verdict(
        "TARGET",
        f"{conc_name} wall <= {TARGET_RATIO}x a single pull",
        conc / single <= TARGET_RATIO,
        f"{conc / single:.2f}x ({ms(conc)} vs {ms(single)} ms, medians)",
    )
    return 1 if problems else 0


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so the finally blocks stop redis-server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (>= 5)")
    parser.add_argument("--concurrency", type=int, default=50, help="pulls per batch")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _raise_exit)

    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp_name:
        tmp = Path(tmp_name)
        isolate_git(tmp / "home")
        repos = make_repos(tmp)
        redis_proc: subprocess.Popen[bytes] | None = None
        url = os.environ.get("REDIS_URL", "")
        try:
            if not url:
                port = free_port()
                try:
                    redis_proc = start_redis_server(tmp / "redis", port)
                except RuntimeError as exc:
                    raise SystemExit(str(exc)) from None
                url = f"redis://127.0.0.1:{port}/0"
            started = time.perf_counter()
            warmup, samples = asyncio.run(measure(repos, url, args.rounds, args.concurrency))
            wall = time.perf_counter() - started
        finally:
            if redis_proc is not None:
                stop_redis_server(redis_proc)
        where = "its own redis-server (now stopped)" if redis_proc is not None else "REDIS_URL"
        print(f"redis: {where}")
        return report(warmup, samples, args.concurrency, wall, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
