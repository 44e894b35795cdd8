"""Draining 1 GiB of stdout: peak RSS growth and throughput, side by side with a cat pipeline.

Each round runs these variants in a rotating order (one round = each variant once):

* ``run_exec``     — ``run_exec(["head", "-c", "1G", "/dev/zero"], max_output=65536)``, in a
  fresh interpreter; RSS growth = ``ru_maxrss`` after minus before (the interpreter's baseline
  with ``core.ops_exec`` imported and the event loop running; maxrss is a high-water mark, so
  every measurement needs its own process).
* ``streamreader`` — the usual asyncio way: ``create_subprocess_exec(..., stdout=PIPE)`` and a
  ``await proc.stdout.read(65536)`` loop that counts and drops the bytes, also in a fresh
  interpreter. For comparison only.
* ``cat``          — ``head -c 1G /dev/zero | cat >/dev/null`` through ``sh -c`` (the harness
  only ever uses a shell here): the reference time.

``communicate()`` is deliberately not run: it keeps all 1 GiB (plus copies, ~2 GiB peak).

Targets: RSS growth ≤ 32 MiB; median run_exec time ≤ 2 × median cat time. The run fails only on
a correctness problem (wrong byte count, missing truncation marker, a child that fails).

    .venv/bin/python bench/drain.py [--rounds 7] [--size 1G]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field

from _common import add_repo_root_to_path, median, ms, print_table, verdict

add_repo_root_to_path()

MAX_OUTPUT = 65536
TARGET_RSS_MIB = 32
TARGET_RATIO = 2.0
SIZES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M)")
    return int(match.group(1)) * SIZES.get(match.group(2), 1)


def maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# The child side: one measurement in a fresh interpreter, reported as one JSON line
# ---------------------------------------------------------------------------------------------


async def child_run_exec(size_arg: str, size: int) -> dict[str, object]:
    from core.ops_exec import run_exec

    before = maxrss_bytes()
    start = time.perf_counter()
    result = await run_exec(
        ["head", "-c", size_arg, "/dev/zero"], max_output=MAX_OUTPUT, timeout=120
    )
    elapsed = time.perf_counter() - start
    after = maxrss_bytes()
    marker = f"[… {size - MAX_OUTPUT} bytes truncated]"
    head, _, tail = result.stdout.partition("\n[…")
    problems = []
    if result.returncode != 0 or result.timed_out:
        problems.append(f"returncode={result.returncode} timed_out={result.timed_out}")
    if not result.truncated or not result.stdout.endswith(marker):
        problems.append(f"no or wrong truncation marker: {result.stdout[-60:]!r}")
    # sanitize_output drops NUL bytes, so the kept head is empty text for /dev/zero input;
    # what matters is that no more than max_output was kept.
    if len(head.encode()) > MAX_OUTPUT:
        problems.append(f"kept {len(head.encode())} bytes > {MAX_OUTPUT}")
    return {
        "seconds": elapsed,
        "rss_before": before,
        "rss_after": after,
        "bytes": size if not problems else None,
        "problems": problems,
        "tail": tail[-40:],
    }


async def child_streamreader(size_arg: str, size: int) -> dict[str, object]:
    # Imported for a like-for-like baseline: the run_exec child has this module loaded too.
    import core.ops_exec  # noqa: F401

    before = maxrss_bytes()
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "head",
        "-c",
        size_arg,
        "/dev/zero",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    total = 0
    while chunk := await proc.stdout.read(65536):
        total += len(chunk)
    code = await proc.wait()
    elapsed = time.perf_counter() - start
    after = maxrss_bytes()
    problems = []
    if code != 0 or total != size:
        problems.append(f"exit {code}, read {total} of {size} bytes")
    return {
        "seconds": elapsed,
        "rss_before": before,
        "rss_after": after,
        "bytes": total,
        "problems": problems,
    }


def child_main(variant: str, size_arg: str) -> int:
    size = parse_size(size_arg)
    func = {"run_exec": child_run_exec, "streamreader": child_streamreader}[variant]
    report = asyncio.run(func(size_arg, size))
    print(json.dumps(report))
    return 0


# ---------------------------------------------------------------------------------------------
# The harness side
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One measurement: seconds, and for the in-process variants the maxrss before and after."""

    seconds: float | None = None
    rss_before: int | None = None
    rss_after: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def growth_mib(self) -> float:
        assert self.rss_before is not None
        assert self.rss_after is not None
        return (self.rss_after - self.rss_before) / (1 << 20)


def run_child(variant: str, size_arg: str) -> Run:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", variant, "--size", size_arg],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return Run(problems=[f"child exited {proc.returncode}: {proc.stderr.strip()[-500:]}"])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    run = Run(
        seconds=float(report["seconds"]),
        rss_before=int(report["rss_before"]),
        rss_after=int(report["rss_after"]),
        problems=[str(p) for p in report["problems"]],
    )
    if proc.stderr.strip():
        run.problems.append(f"stderr: {proc.stderr.strip()[-300:]}")
    return run


def run_cat(size_arg: str) -> Run:
    start = time.perf_counter()
    proc = subprocess.run(
        ["sh", "-c", f"head -c {size_arg} /dev/zero | cat >/dev/null"],
        stdin=subprocess.DEVNULL,
        check=False,
    )
    elapsed = time.perf_counter() - start
    return Run(
        seconds=elapsed,
        problems=[] if proc.returncode == 0 else [f"pipeline exited {proc.returncode}"],
    )


def harness(rounds: int, size_arg: str) -> int:
    size = parse_size(size_arg)
    names = ["run_exec", "cat", "streamreader"]
    results: dict[str, list[Run]] = {name: [] for name in names}
    problems: list[str] = []
    started = time.perf_counter()
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            run = run_cat(size_arg) if name == "cat" else run_child(name, size_arg)
            problems += [f"{name} round {i + 1}: {p}" for p in run.problems]
            if run.seconds is not None:
                results[name].append(run)
    wall = time.perf_counter() - started

    def secs(name: str) -> list[float]:
        return [r.seconds for r in results[name] if r.seconds is not None]

    print(
        f"drain {size_arg} of /dev/zero through stdout: {rounds} rounds, variants interleaved "
        f"(rotating order), {os.cpu_count()} CPUs, {wall:.1f}s wall"
    )
    cat_med = median(secs("cat")) if results["cat"] else float("nan")
    rows = []
    for name in names:
        t = secs(name)
        if not t:
            rows.append([name, "0", "-", "-", "-", "-", "-", "-"])
            continue
        row = [
            name,
            str(len(t)),
            ms(median(t)),
            ms(min(t)),
            ms(max(t)),
            f"{median(t) / cat_med:.2f}x",
            f"{size / median(t) / (1 << 30):.2f}",
        ]
        if name == "cat":
            row.append("-")
        else:
            growth = [r.growth_mib for r in results[name]]
            base = median([(r.rss_before or 0) / (1 << 20) for r in results[name]])
            row.append(f"{median(growth):.1f} (max {max(growth):.1f}; baseline {base:.1f})")
        rows.append(row)
    print_table(
        ("variant", "n", "median ms", "min ms", "max ms", "vs cat", "GiB/s",
         "peak RSS growth MiB"),
        rows,
    )  # fmt: skip
    pairs = [
        (a.seconds or 0) / (b.seconds or 1)
        for a, b in zip(results["run_exec"], results["cat"], strict=False)
        if a.seconds and b.seconds
    ]
    if pairs:
        print(
            f"run_exec / cat per round (same round, adjacent runs): median {median(pairs):.2f}x, "
            f"range {min(pairs):.2f}–{max(pairs):.2f}x"
        )
    print("(communicate() is not run: it would hold the whole output in memory, ~2 GiB peak)")
    print()
    for problem in problems[:10]:
        print(f"problem: {problem}")
    verdict(
        "CHECK",
        "every drain completed with the right byte count and truncation marker",
        not problems,
        f"{len(problems)} problems",
    )
    if results["run_exec"] and results["cat"]:
        worst = max(r.growth_mib for r in results["run_exec"])
        verdict(
            "TARGET",
            f"run_exec peak RSS growth <= {TARGET_RSS_MIB} MiB",
            worst <= TARGET_RSS_MIB,
            f"max {worst:.1f} MiB over {len(results['run_exec'])} runs",
        )
        ratio = median(secs("run_exec")) / cat_med
        verdict(
            "TARGET",
            f"run_exec time <= {TARGET_RATIO}x the cat pipeline",
            ratio <= TARGET_RATIO,
            f"{ratio:.2f}x, medians of {len(secs('run_exec'))} and {len(secs('cat'))}",
        )
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds (each variant once)")
    parser.add_argument("--size", default="1G", help="bytes to drain, head -c syntax (1G)")
    parser.add_argument("--child", choices=["run_exec", "streamreader"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    parse_size(args.size)
    if args.child:
        return child_main(args.child, args.size)
    return harness(args.rounds, args.size)


if __name__ == "__main__":
    sys.exit(main())
