"""Small helpers shared by the benchmark scripts: statistics, a plain table, verdict lines.

Every benchmark measures the compared variants side by side in one run (interleaved, many
repetitions, medians) and prints ratios: the machines this runs on are small and noisy, so an
absolute figure on its own means little.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def add_repo_root_to_path() -> None:
    """Make ``import core.ops_exec`` work when a script runs as ``python bench/x.py``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; the median for q=0.5."""
    data = sorted(samples)
    if not data:
        raise ValueError("no samples")
    pos = (len(data) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def ms(seconds: float) -> str:
    """Seconds as milliseconds with a precision that suits the size."""
    value = seconds * 1000
    if abs(value) < 10:
        return f"{value:.3f}"
    if abs(value) < 1000:
        return f"{value:.1f}"
    return f"{value:.0f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A left-aligned first column and right-aligned figures."""
    widths = [max(len(str(cell)) for cell in col) for col in zip(headers, *rows, strict=True)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def timing_row(name: str, samples: Sequence[float]) -> list[str]:
    """name, n, median, p10, p90, min, max (milliseconds)."""
    return [
        name,
        str(len(samples)),
        ms(median(samples)),
        ms(quantile(samples, 0.1)),
        ms(quantile(samples, 0.9)),
        ms(min(samples)),
        ms(max(samples)),
    ]


TIMING_HEADERS = ("variant", "n", "median ms", "p10 ms", "p90 ms", "min ms", "max ms")


def verdict(kind: str, name: str, ok: bool, detail: str) -> None:
    """One final line per target: ``TARGET`` (timing, never fails the run) or ``CHECK``."""
    print(f"{kind} {name}: {'PASS' if ok else 'FAIL'} ({detail})")
