"""Timeout of a SIGTERM-ignoring process tree: from the deadline to return and to every PID dead.

The tree: ``sh`` ignoring SIGTERM (``trap '' TERM``) that starts a second ``sh`` ignoring it too;
each starts a ``sleep 30`` (which inherits the ignored SIGTERM) and waits. Every process writes
its PID to a file, so the benchmark knows all four. SIGTERM does nothing here: only the SIGKILL
after ``kill_grace`` ends the tree, so the best possible time from the deadline to the end is
``kill_grace`` plus the cost of killing and reaping.

Two variants run interleaved (order alternates every round):

* ``run_exec`` — ``run_exec([sh, outer.sh, pidfile], timeout=T, kill_grace=G)``
* ``floor``    — the same done by hand: ``create_subprocess_exec(start_new_session=True)``,
  ``wait_for(proc.wait(), T)``, ``killpg(SIGTERM)``, ``wait_for(proc.wait(), G)``,
  ``killpg(SIGKILL)``, ``await proc.wait()``, then poll the recorded PIDs every 0.5 ms.

For each run: deadline → return, the overhead over ``kill_grace`` (target ≤ 50 ms, median and
max), and deadline → every recorded PID dead (a watcher thread polls /proc every 0.5 ms from
just before the SIGKILL). A zombie counts as dead. The run fails (exit 1) when a recorded PID is
still alive after return, or when the tree did not start or the call did not time out.

    .venv/bin/python bench/timeout_kill.py [--rounds 12] [--grace 0.25] [--timeout 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from _common import add_repo_root_to_path, median, ms, print_table, verdict

add_repo_root_to_path()

from core.ops_exec import run_exec  # noqa: E402

TARGET_OVERHEAD = 0.050
TREE_SIZE = 4  # outer sh, its sleep, inner sh, its sleep

OUTER = """trap '' TERM
echo $$ >> "$1"
sh "$(dirname "$0")/inner.sh" "$1" &
sleep 30 &
echo $! >> "$1"
wait
"""
INNER = """trap '' TERM
echo $$ >> "$1"
sleep 30 &
echo $! >> "$1"
wait
"""


def pid_alive(pid: int) -> bool:
    """Alive = exists and is not a zombie (a zombie has done all it will ever do)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def read_pids(pidfile: Path) -> list[int]:
    try:
        return [int(line) for line in pidfile.read_text().split()]
    except (OSError, ValueError):
        return []


@dataclass
class Round:
    variant: str
    to_return: float = 0.0  # deadline → return
    to_all_dead: float | None = None  # deadline → every recorded PID dead (watcher thread)
    pids: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class DeathWatcher(threading.Thread):
    """Polls the recorded PIDs from ``start_at`` on and notes when the last one died."""

    def __init__(self, pidfile: Path, start_at: float, give_up_at: float) -> None:
        super().__init__(daemon=True)
        self.pidfile, self.start_at, self.give_up_at = pidfile, start_at, give_up_at
        self.all_dead_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        delay = self.start_at - time.perf_counter()
        if delay > 0 and self.stop.wait(delay):
            return
        while not self.stop.is_set() and time.perf_counter() < self.give_up_at:
            pids = read_pids(self.pidfile)
            if len(pids) >= TREE_SIZE and not any(pid_alive(p) for p in pids):
                self.all_dead_at = time.perf_counter()
                return
            time.sleep(0.0005)


async def via_run_exec(argv: list[str], timeout: float, grace: float) -> bool:
    result = await run_exec(argv, timeout=timeout, kill_grace=grace)
    return bool(result.timed_out)


async def via_floor(argv: list[str], timeout: float, grace: float) -> bool:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        await asyncio.wait_for(proc.wait(), timeout)
        return False
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    pidfile = Path(argv[2])
    while any(pid_alive(p) for p in read_pids(pidfile)):
        await asyncio.sleep(0.0005)
    return True


async def one_round(
    name: str,
    func: Callable[[list[str], float, float], Awaitable[bool]],
    workdir: Path,
    index: int,
    timeout: float,
    grace: float,
) -> Round:
    pidfile = workdir / f"pids-{name}-{index}"
    argv = ["sh", str(workdir / "outer.sh"), str(pidfile)]
    start = time.perf_counter()
    deadline = start + timeout
    watcher = DeathWatcher(pidfile, deadline + grace - 0.02, deadline + grace + 5)
    watcher.start()
    timed_out = await func(argv, timeout, grace)
    returned = time.perf_counter()
    out = Round(name, to_return=returned - deadline)
    out.pids = read_pids(pidfile)
    out.survivors = [p for p in out.pids if pid_alive(p)]
    if not timed_out:
        out.problems.append("the call did not report a timeout")
    if len(out.pids) != TREE_SIZE:
        out.problems.append(f"expected {TREE_SIZE} recorded PIDs, got {out.pids}")
    if out.survivors:
        out.problems.append(f"alive after return: {out.survivors}")
    # Let the watcher see the end (it may lag the return by one poll), then stop it.
    await asyncio.to_thread(watcher.join, 0.5 if not out.survivors else 2.0)
    watcher.stop.set()
    if watcher.all_dead_at is not None:
        out.to_all_dead = watcher.all_dead_at - deadline
    for pid in out.survivors:  # only PIDs this run recorded: never anything else
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return out


async def measure(rounds: int, timeout: float, grace: float, workdir: Path) -> list[Round]:
    variants: list[tuple[str, Callable[[list[str], float, float], Awaitable[bool]]]] = [
        ("run_exec", via_run_exec),
        ("floor", via_floor),
    ]
    results: list[Round] = []
    for i in range(rounds):
        order = variants if i % 2 == 0 else variants[::-1]
        for name, func in order:
            results.append(await one_round(name, func, workdir, i, timeout, grace))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="runs per variant (>= 10)")
    parser.add_argument("--grace", type=float, default=0.25, help="kill_grace in seconds")
    parser.add_argument("--timeout", type=float, default=0.5, help="timeout in seconds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-timeout-") as tmp:
        workdir = Path(tmp)
        (workdir / "outer.sh").write_text(OUTER)
        (workdir / "inner.sh").write_text(INNER)
        started = time.perf_counter()
        results = asyncio.run(measure(args.rounds, args.timeout, args.grace, workdir))
        wall = time.perf_counter() - started

    grace = args.grace
    print(
        f"timeout={args.timeout}s kill_grace={grace}s, SIGTERM-ignoring tree of {TREE_SIZE} "
        f"processes, {args.rounds} rounds per variant interleaved, {os.cpu_count()} CPUs, "
        f"{wall:.1f}s wall"
    )
    rows = []
    stats: dict[str, tuple[float, float]] = {}
    for name in ("run_exec", "floor"):
        mine = [r for r in results if r.variant == name]
        over = [r.to_return - grace for r in mine]
        dead = [r.to_all_dead - grace for r in mine if r.to_all_dead is not None]
        stats[name] = (median(over), max(over))
        rows.append(
            [
                name,
                str(len(mine)),
                ms(median([r.to_return for r in mine])),
                ms(median(over)),
                ms(max(over)),
                ms(median(dead)) if dead else "-",
                ms(max(dead)) if dead else "-",
            ]
        )
    print_table(
        (
            "variant",
            "n",
            "deadline→return ms",
            "over grace: median",
            "max",
            "all PIDs dead, over grace: median",
            "max",
        ),
        rows,
    )
    run_med, run_max = stats["run_exec"]
    floor_med, _ = stats["floor"]
    print(f"run_exec overhead minus floor overhead (medians): {ms(run_med - floor_med)} ms")
    print()
    problems = [f"{r.variant}: {p}" for r in results for p in r.problems]
    for problem in problems[:10]:
        print(f"problem: {problem}")
    checked = sum(len(r.pids) for r in results)
    verdict(
        "CHECK",
        "every recorded PID dead when the call returned, every call timed out",
        not problems,
        f"{checked} PIDs checked, {len(problems)} problems",
    )
    verdict(
        "TARGET",
        f"run_exec deadline→return <= kill_grace + {TARGET_OVERHEAD * 1000:.0f} ms",
        run_max <= TARGET_OVERHEAD,
        f"overhead median {ms(run_med)} ms, max {ms(run_max)} ms",
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
