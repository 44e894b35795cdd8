"""``redact``: credentials in URLs, token shapes and exact secret values disappear."""

from __future__ import annotations

import time

import pytest

from core.ops_exec import redact

DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://user:tok@host/x.git", "https://***@host/x.git"),
        ("fatal: unable to access 'https://bot:s3cr3t@git.example/x/'",
         "fatal: unable to access 'https://***@git.example/x/'"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("ssh://git@host/x", "ssh://***@host/x"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789 here", "token *** here"),
        ("github_pat_11ABCDEFG0abcdefghijkl_mnopqrstuvwxyzABCDEFGHIJ", "***"),
        ("key AKIAIOSFODNN7EXAMPLE!", "key ***!"),
        (f"Bot {DISCORD_TOKEN}.", "Bot ***."),
        ("plain text stays", "plain text stays"),
        ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
    ],
)  # fmt: skip
def test_shapes_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_exact_secrets_are_removed_longest_first() -> None:
    text = "pass=hunter2hunter2 and hunter2"
    assert redact(text, ["hunter2", "hunter2hunter2"]) == "pass=*** and ***"


def test_empty_and_tiny_secrets_do_not_shred_text() -> None:
    assert redact("a normal sentence", ["", "a"]) == "a normal sentence"


def test_redaction_is_idempotent() -> None:
    once = redact(f"https://u:p@h {DISCORD_TOKEN}", ["p@h"])
    assert redact(once) == once


@pytest.mark.parametrize(
    "url",
    [
        "https://bot:p@ssw0rd@git.example/x.git",
        "https://ci:AbC/dEf+GhIjKlMnOp@git.example/x.git",
        "redis://:s3cr/et@10.0.0.5:6379/0",
    ],
)
def test_passwords_with_at_or_slash_are_redacted(url: str) -> None:
    redacted = redact(f"remote: '{url}'")
    assert "ssw0rd" not in redacted
    assert "dEf" not in redacted
    assert "s3cr" not in redacted
    assert "***@" in redacted


def test_credentials_in_query_parameters_are_redacted() -> None:
    text = "redis://127.0.0.1:6379/0?password=hunter2secret&db=1 https://x/y?token=abc123def"
    redacted = redact(text)
    assert "hunter2secret" not in redacted
    assert "abc123def" not in redacted
    assert "?password=***&db=1" in redacted


ADVERSARIAL = {
    "a.a.a": lambda n: ("a." * n)[:n],
    "x://x://": lambda n: ("x://" * n)[:n],
    "scheme characters": lambda n: ("ab+c.d-" * n)[:n],
    "token characters": lambda n: ("A" * n)[:n],
    "a-a-a": lambda n: ("a-" * n)[:n],
}


def best_time(text: str, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        redact(text, ["hunter2hunter2"])
        times.append(time.perf_counter() - started)
    return min(times)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_redaction_time_grows_linearly_with_adversarial_input(name: str) -> None:
    # 16x the text must cost about 16x the time; the old pattern cost 256x (quadratic), so
    # a forged 256 KiB fleet summary froze the bot's event loop. Compared within one run.
    make = ADVERSARIAL[name]
    small, large = best_time(make(64 * 1024)), best_time(make(1024 * 1024))
    assert large / small < 64, f"{name}: {small:.4f}s -> {large:.4f}s"


def test_credentials_deep_in_a_long_line_are_still_found() -> None:
    text = "a." * 200_000 + " https://bot:hunter2secret@git.example/x " + "x://" * 50_000
    redacted = redact(text)
    assert "hunter2secret" not in redacted
    assert "https://***@git.example/x" in redacted
