"""core.text: durations, fences that cannot be broken, replies that fit one message."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.text import MESSAGE_LIMIT, format_duration, format_reply, neutralise_fences


@pytest.mark.parametrize(
    ("seconds", "kwargs", "expected"),
    [
        (7.2, {}, "7 s"),
        (0.2, {"round_up": True}, "1 s"),
        (102, {}, "1m 42s"),
        (101.1, {"round_up": True}, "1m 42s"),
        (65, {}, "1m 05s"),
        (7500, {}, "2h 05m"),
        (-3, {}, "0 s"),
    ],
)
def test_format_duration(seconds: float, kwargs: dict[str, Any], expected: str) -> None:
    assert format_duration(seconds, **kwargs) == expected


@given(st.text(alphabet="`a\n ", max_size=60))
def test_no_run_of_three_backticks_survives(text: str) -> None:
    assert "```" not in neutralise_fences(text)


def test_format_reply_fits_or_attaches() -> None:
    content, attachment = format_reply("✅ done", "line\n```\n@everyone")
    assert attachment is None
    assert content.count("```") == 2
    assert content.startswith("✅ done\n```\n")

    long_details = "x" * 3000
    content, attachment = format_reply("✅ done", long_details)
    assert attachment == long_details + "\n"
    assert content.startswith("✅ done")
    assert len(content) <= MESSAGE_LIMIT

    content, attachment = format_reply("h" * 5000)
    assert len(content) == MESSAGE_LIMIT
    assert attachment is None
