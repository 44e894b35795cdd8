"""core.names: the grammars and the Redis key layout that every part of admin-ops shares."""

from __future__ import annotations

import pytest

from core.names import IDENTITY, KEY_PREFIX, Keys, default_identity, target_name
from core.ops_exec import DEFAULT_KEY_PREFIX, pull_lock_key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bot", "bot"),
        (" Worker ", "worker"),
        ("site.v2_a-b", "site.v2_a-b"),
        ("a" * 32, "a" * 32),
        ("a" * 33, None),
        ("-x", None),
        ("we ird", None),
        ("", None),
        ("célé", None),
    ],
)
def test_target_names_are_case_insensitive_and_bounded(text: str, expected: str | None) -> None:
    assert target_name(text) == expected


def test_identity_and_prefix_grammars() -> None:
    assert IDENTITY.fullmatch("web-1:admin-ops-bot")
    assert not IDENTITY.fullmatch("web 1")
    assert KEY_PREFIX.fullmatch(DEFAULT_KEY_PREFIX)
    assert not KEY_PREFIX.fullmatch("sg control")
    assert IDENTITY.fullmatch(default_identity("bot"))


def test_every_key_lives_under_the_prefix() -> None:
    keys = Keys("p")
    assert keys.commands == "p:commands"
    assert keys.results("c1") == "p:results:c1"
    assert keys.heartbeat("web-1") == "p:hosts:web-1"
    assert keys.hosts_index == "p:hosts"
    assert keys.ran_marker("web-1", "c1") == "p:ran:web-1:c1"
    assert keys.cooldowns == "p:cooldown"
    assert keys.restart_marker("h", "bot.service") == "p:restart-marker:h:bot.service"
    assert keys.audit == "p:audit"
    assert keys.pull_lock("/srv/app", "h") == pull_lock_key("/srv/app", "h", prefix="p")
    assert Keys().commands == f"{DEFAULT_KEY_PREFIX}:commands"


def test_default_identity_is_always_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "h" * 80 + ".example_(x)")
    assert IDENTITY.fullmatch(default_identity("admin-ops-bot"))
    assert default_identity("admin-ops-bot").endswith(":admin-ops-bot")
    monkeypatch.setattr("socket.gethostname", lambda: "")
    assert default_identity() == "localhost"
