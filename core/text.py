"""Text for people: durations, code blocks that cannot be broken out of, messages that fit.

Standard library only, pure functions: chat replies, the fleet board and the command-line table
all format through here.
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = [
    "MESSAGE_LIMIT",
    "cut",
    "format_duration",
    "format_reply",
    "inline_code",
    "natural_key",
    "neutralise_fences",
    "one_line",
]

#: Discord's limit on a message's text.
MESSAGE_LIMIT: Final = 2000

_DIGITS: Final = re.compile(r"([0-9]+)")


def format_duration(seconds: float, *, round_up: bool = False) -> str:
    """``7 s``, ``1m 42s``, ``2h 05m``, ``3d 04h``: how long something took or is left."""
    whole = math.ceil(seconds) if round_up else round(seconds)
    whole = max(int(whole), 0)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, secs = divmod(whole, 60)
        return f"{minutes}m {secs:02d}s"
    if whole < 86_400:
        hours, rest = divmod(whole, 3600)
        return f"{hours}h {rest // 60:02d}m"
    days, rest = divmod(whole, 86_400)
    return f"{days}d {rest // 3600:02d}h"


def neutralise_fences(text: str) -> str:
    """Make sure ``text`` cannot close the code block it is shown in.

    Every pair of backticks gets a zero-width space between them, so no run of three remains.
    """
    return text.replace("``", "`\u200b`")


def cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def inline_code(text: str, limit: int = 100) -> str:
    """``text`` as inline code; backticks inside are swapped for a look-alike."""
    return f"`{cut(text, limit).replace('`', 'ˋ')}`"


def one_line(text: str, width: int) -> str:
    """``text`` on one line (its lines joined with " · "), cut to ``width`` characters."""
    return cut(" · ".join(line.strip() for line in text.splitlines() if line.strip()), width)


def natural_key(name: str) -> tuple[str | int, ...]:
    """Sort key that puts web-2 before web-10 (text and numbers alternate, so types align)."""
    parts = _DIGITS.split(name)
    # split() with a group alternates text and digit runs, so odd positions are numbers.
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts))


def format_reply(
    headline: str, details: str | None = None, *, limit: int = MESSAGE_LIMIT
) -> tuple[str, str | None]:
    """The message text and, when it would not fit in ``limit``, the text to attach instead.

    The details go in a code block that they cannot break out of; an attachment holds the
    details verbatim (a file has no fences to break).
    """
    headline = cut(headline.strip(), limit)
    if details is None or not details.strip():
        return headline, None
    content = f"{headline}\n```\n{neutralise_fences(details.strip())}\n```"
    if len(content) <= limit:
        return content, None
    note = "\n📎 Full output attached."
    if len(headline) + len(note) <= limit:
        headline += note
    return headline, details.strip() + "\n"
