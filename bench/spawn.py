"""Spawn overhead of ``run_exec(["true"])`` against the same spawn done plainly, side by side.

Three variants run interleaved (the order rotates every iteration) in one event loop:

* ``run_exec``   — ``core.ops_exec.run_exec(["true"])``
* ``asyncio``    — ``asyncio.create_subprocess_exec("true", stdin=DEVNULL, stdout=PIPE,
  stderr=PIPE, start_new_session=True)`` + ``communicate()``: the same spawn, done plainly
* ``posix_spawn``— ``os.posix_spawn`` + ``os.waitpid`` of ``true`` (the floor, blocking)

Target: median(run_exec) ≤ 1.15 × median(asyncio). Timing misses are printed, never fatal;
the run fails only when a spawn itself goes wrong.

    .venv/bin/python bench/spawn.py [--iterations 1000] [--warmup 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable

from _common import (
    TIMING_HEADERS,
    add_repo_root_to_path,
    median,
    print_table,
    quantile,
    timing_row,
    verdict,
)

add_repo_root_to_path()

from core.ops_exec import run_exec  # noqa: E402

TARGET_RATIO = 1.15
TRUE = shutil.which("true") or "/bin/true"


async def via_run_exec() -> int | None:
    result = await run_exec([TRUE])
    code: int | None = result.returncode
    return code


async def via_asyncio() -> int | None:
    proc = await asyncio.create_subprocess_exec(
        TRUE,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    await proc.communicate()
    return proc.returncode


async def via_posix_spawn() -> int | None:
    pid = os.posix_spawn(TRUE, [TRUE], os.environ)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


VARIANTS: dict[str, Callable[[], Awaitable[int | None]]] = {
    "run_exec": via_run_exec,
    "asyncio": via_asyncio,
    "posix_spawn": via_posix_spawn,
}


async def measure(iterations: int, warmup: int) -> tuple[list[dict[str, float]], list[str]]:
    """One dict per measured iteration: variant name → seconds (a failed call is left out)."""
    names = list(VARIANTS)
    rounds: list[dict[str, float]] = []
    errors: list[str] = []
    for i in range(warmup + iterations):
        # Rotate the order so no variant always runs first (or right after another one).
        shift = i % len(names)
        timings: dict[str, float] = {}
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            try:
                code = await VARIANTS[name]()
            except (OSError, ValueError, TypeError) as exc:  # counted and reported, not timed
                errors.append(f"{name}: {type(exc).__name__}: {exc} in iteration {i}")
                continue
            elapsed = time.perf_counter() - start
            if code != 0:
                errors.append(f"{name}: exit status {code!r} in iteration {i}")
            timings[name] = elapsed
        if i >= warmup:
            rounds.append(timings)
    return rounds, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000, help="measured calls per variant")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured calls per variant")
    args = parser.parse_args()

    started = time.perf_counter()
    rounds, errors = asyncio.run(measure(args.iterations, args.warmup))
    wall = time.perf_counter() - started
    samples = {name: [r[name] for r in rounds if name in r] for name in VARIANTS}

    print(
        f"spawn of {TRUE}: {args.iterations} measured + {args.warmup} warm-up calls per variant, "
        f"interleaved; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {wall:.1f}s wall"
    )
    print_table(TIMING_HEADERS, [timing_row(name, s) for name, s in samples.items()])

    run_exec_med = median(samples["run_exec"])
    plain_med = median(samples["asyncio"])
    floor_med = median(samples["posix_spawn"])
    ratio = run_exec_med / plain_med
    # Per-iteration ratios are a second opinion that is less sensitive to drifting noise.
    paired = [r["run_exec"] / r["asyncio"] for r in rounds if "run_exec" in r and "asyncio" in r]
    print()
    print(
        f"run_exec / asyncio     : {ratio:.3f}x (ratio of medians); "
        f"paired median {median(paired):.3f}x, paired p10–p90 "
        f"{quantile(paired, 0.1):.2f}–{quantile(paired, 0.9):.2f}x"
    )
    print(f"run_exec / posix_spawn : {run_exec_med / floor_med:.3f}x")
    print(f"asyncio  / posix_spawn : {plain_med / floor_med:.3f}x")
    print(f"run_exec extra cost    : {(run_exec_med - plain_med) * 1e6:+.0f} µs per call")
    print()
    for error in errors[:5]:
        print(f"error: {error}")
    if len(errors) > 5:
        print(f"error: … and {len(errors) - 5} more")
    calls = (args.warmup + args.iterations) * len(VARIANTS)
    verdict(
        "CHECK",
        "every spawn returned and exited 0",
        not errors,
        f"{len(errors)} failures in {calls} calls",
    )
    verdict(
        "TARGET",
        f"run_exec median <= {TARGET_RATIO}x plain asyncio",
        ratio <= TARGET_RATIO,
        f"{ratio:.3f}x",
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
