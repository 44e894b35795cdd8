"""Redaction time on adversarial text at 64 KiB and 1 MiB: linear scaling shows as ~16x.

Text that other hosts wrote to Redis (fleet summaries) is redacted before it is shown, so a
pattern that backtracks quadratically would let anyone who can write to Redis freeze the bot's
event loop. Each input is redacted at both sizes, the sizes interleaved, and the ratio of the
medians printed: 16x for linear time, 256x for quadratic.

    .venv/bin/python bench/redaction.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from _common import add_repo_root_to_path, median, ms, print_table, verdict

add_repo_root_to_path()

from core.ops_exec import clean_text, redact  # noqa: E402

SMALL = 64 * 1024
LARGE = 1024 * 1024
#: Linear scaling gives LARGE / SMALL = 16; anything near 256 is quadratic.
TARGET_RATIO = 32.0
#: The issue's bound for 1 MiB of adversarial text.
TARGET_LARGE_SECONDS = 1.0

DISCORD_LIKE = "MTIzNDU2Nzg5MDEyMzQ1Njc4"

INPUTS: dict[str, Callable[[int], str]] = {
    "a.a.a…": lambda n: ("a." * n)[:n],
    "x:// repeated": lambda n: ("x://" * n)[:n],
    "scheme-ish run": lambda n: ("ab+c.d-" * n)[:n],
    "token chars": lambda n: ("A" * n)[:n],
    "token-ish dots": lambda n: ((DISCORD_LIKE + ".") * n)[:n],
    "a-a-a…": lambda n: ("a-" * n)[:n],
    "?password= run": lambda n: ("?password=x&" * n)[:n],
    "OSC unterminated": lambda n: ("\x1b]0;" * n)[:n],
    "CSI unterminated": lambda n: ("\x1b[0;1;" * n)[:n],
    "url with @ at end": lambda n: ("https://" + "u" * n)[: n - 1] + "@",
}


def seconds(func: Callable[[], object]) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def measure(make: Callable[[int], str], rounds: int) -> tuple[float, float]:
    small, large = make(SMALL), make(LARGE)
    secrets = ["hunter2hunter2", "s3cr3t-value"]
    small_times: list[float] = []
    large_times: list[float] = []
    for _ in range(rounds):
        small_times.append(seconds(lambda: redact(clean_text(small), secrets)))
        large_times.append(seconds(lambda: redact(clean_text(large), secrets)))
    return median(small_times), median(large_times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    worst_ratio = 0.0
    worst_large = 0.0
    for name, make in INPUTS.items():
        small, large = measure(make, args.rounds)
        ratio = large / small if small > 0 else float("inf")
        worst_ratio = max(worst_ratio, ratio)
        worst_large = max(worst_large, large)
        rows.append([name, ms(small), ms(large), f"{ratio:.1f}x"])
    print_table(("input", "64 KiB ms", "1 MiB ms", "ratio"), rows)
    verdict(
        "TARGET",
        "linear redaction",
        worst_ratio <= TARGET_RATIO,
        f"worst 1 MiB / 64 KiB ratio {worst_ratio:.1f}x; linear is 16x, quadratic 256x",
    )
    verdict(
        "TARGET",
        "1 MiB well under a second",
        worst_large < TARGET_LARGE_SECONDS,
        f"slowest 1 MiB input took {ms(worst_large)} ms",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
