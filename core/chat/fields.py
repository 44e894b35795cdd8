"""Checks for values read back from storage (Redis, the state dir) before anything uses them.

Each check returns the value as the type it must be, or raises ValueError (TypeError never:
callers catch one type). Booleans are not numbers here, and numbers are not text.
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = ["COMMIT", "commit_or_none", "finite_number", "snowflake"]

#: A commit as this bot writes it: 4 to 40 hex digits.
COMMIT: Final = re.compile(r"[0-9a-f]{4,40}")
#: Discord IDs are positive 64-bit integers.
_SNOWFLAKE_MAX: Final = 2**64 - 1


def snowflake(value: object) -> int:
    """A Discord ID: a positive integer of at most 64 bits (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _SNOWFLAKE_MAX:
        raise ValueError("not a Discord ID")
    return value


def finite_number(value: object) -> float:
    """A finite int or float (not a bool, not a string, not NaN or infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def commit_or_none(value: object) -> str | None:
    """A commit of 4 to 40 lowercase hex digits, else None (so it is never shown)."""
    if isinstance(value, str) and COMMIT.fullmatch(value):
        return value
    return None
