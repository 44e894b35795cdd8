"""Unit-name validation and the systemctl calls, against a stand-in program that records argv."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.ops_exec import (
    deferred_systemctl_restart,
    systemctl_argv,
    systemctl_is_active,
    systemctl_restart,
    validate_unit_name,
)

# systemctl gets a scrubbed environment, so the stand-in learns where to log and how to behave
# from paths baked into it, not from environment variables.
STAND_IN = """\
import json, os, sys, time
LOG = {log!r}
record = {{"argv": sys.argv[1:], "at": time.time(), "env": sorted(os.environ)}}
with open(LOG, "a") as log:
    log.write(json.dumps(record) + "\\n")
try:
    behaviour = open(LOG + ".mode").read().strip()
except FileNotFoundError:
    behaviour = "ok"
if behaviour == "fail":
    print("Failed to restart proxy.service: Access denied", file=sys.stderr)
    sys.exit(4)
if behaviour == "sleep":
    time.sleep(30)
if behaviour == "secret":
    print("Failed: https://bot:ghp_abcdefghijklmnopqrstuvwxyz0123456789@example.invalid/x",
          file=sys.stderr)
    sys.exit(1)
if "is-active" in sys.argv:
    print("active")
"""


class StandIn:
    """A fake systemctl: records each call's argv as a JSON line."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def behave(self, mode: str) -> None:
        """``ok`` (default), ``fail``, ``sleep`` or ``secret``."""
        Path(f"{self.log}.mode").write_text(mode)

    def calls(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def argvs(self) -> list[list[str]]:
        return [list(call["argv"]) for call in self.calls()]  # type: ignore[call-overload]


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    script = tmp_path / "systemctl-standin.py"
    log = tmp_path / "systemctl.log"
    script.write_text(STAND_IN.format(log=str(log)))
    monkeypatch.setenv("OPS_SYSTEMCTL", f"{sys.executable} {script}")
    return StandIn(log)


def test_systemctl_argv_defaults_to_systemctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPS_SYSTEMCTL", raising=False)
    assert systemctl_argv() == ["systemctl"]
    monkeypatch.setenv("OPS_SYSTEMCTL", "sudo -n systemctl")
    assert systemctl_argv() == ["sudo", "-n", "systemctl"]


async def test_restart_runs_the_exact_argv(standin: StandIn) -> None:
    ok, summary = await systemctl_restart("proxy")
    assert (ok, summary) == (True, "restarted proxy.service")
    assert standin.argvs() == [["--no-ask-password", "restart", "--", "proxy.service"]]


async def test_restart_passes_no_secrets_to_systemctl(
    standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "canary")
    monkeypatch.setenv("REDIS_URL", "redis://:canary@127.0.0.1")
    await systemctl_restart("proxy.service")
    env = standin.calls()[0]["env"]
    assert "DISCORD_TOKEN" not in env
    assert "REDIS_URL" not in env
    assert "PATH" in env


async def test_restart_failure_text_comes_through(
    standin: StandIn,
) -> None:
    standin.behave("fail")
    ok, summary = await systemctl_restart("proxy.service")
    assert not ok
    assert "exit 4" in summary
    assert "Access denied" in summary


async def test_restart_failure_text_is_redacted(
    standin: StandIn,
) -> None:
    standin.behave("secret")
    ok, summary = await systemctl_restart("proxy.service")
    assert not ok
    assert "ghp_" not in summary
    assert "https://***@example.invalid" in summary


async def test_restart_timeout_is_reported_on_time(
    standin: StandIn,
) -> None:
    standin.behave("sleep")
    started = time.monotonic()
    ok, summary = await systemctl_restart("proxy.service", timeout=1)
    assert not ok
    assert "timed out after 1s" in summary
    assert time.monotonic() - started < 1 + 2 + 1


async def test_missing_systemctl_program_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_SYSTEMCTL", "/nonexistent/systemctl")
    ok, summary = await systemctl_restart("proxy.service")
    assert not ok
    assert "could not run systemctl" in summary


@pytest.mark.parametrize(
    "bad",
    ["-H", "--host=evil", "proxy*", "pro?xy", "[ab].service", "a/b.service", "a b", "a;b",
     "$(id)", "`id`", "a|b", "", "getty@.service", "a@b@c.service", "pröxy", "x\n.service",
     "@foo.service", ".service"],
)  # fmt: skip
async def test_invalid_names_run_nothing(standin: StandIn, bad: str) -> None:
    ok, summary = await systemctl_restart(bad)
    assert not ok
    assert summary
    assert "\n" not in summary
    ok, summary = await deferred_systemctl_restart(bad, delay=0)
    assert not ok
    assert standin.calls() == []


async def test_deferred_restart_waits_then_does_not_block(standin: StandIn) -> None:
    started = time.time()
    ok, summary = await deferred_systemctl_restart("bot.service", delay=0.3)
    assert (ok, summary) == (True, "restart of bot.service requested")
    [call] = standin.calls()
    assert call["argv"] == ["--no-block", "--no-ask-password", "restart", "--", "bot.service"]
    assert float(call["at"]) >= started + 0.3  # type: ignore[arg-type]


async def test_deferred_restart_failure_is_reported(
    standin: StandIn,
) -> None:
    standin.behave("fail")
    ok, summary = await deferred_systemctl_restart("bot.service", delay=0)
    assert not ok
    assert "Access denied" in summary


async def test_is_active_reports_the_state(standin: StandIn) -> None:
    assert await systemctl_is_active("proxy") == "active"
    assert standin.argvs() == [["--no-ask-password", "is-active", "--", "proxy.service"]]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("proxy", "proxy.service"),
        ("proxy.service", "proxy.service"),
        ("getty@tty1.service", "getty@tty1.service"),
        ("getty@tty1", "getty@tty1.service"),
        ("backup.timer", "backup.timer"),
        ("dev-sda1.device", "dev-sda1.device"),
        ("system-getty.slice", "system-getty.slice"),
        ("a:b_c.d-e\\x2d", "a:b_c.d-e\\x2d.service"),
        ("web.app", "web.app.service"),
    ],
)
def test_valid_names(name: str, expected: str) -> None:
    assert validate_unit_name(name) == expected


def test_length_limit_applies_to_the_final_name() -> None:
    assert validate_unit_name("a" * 247) == "a" * 247 + ".service"  # 255 characters
    with pytest.raises(ValueError, match="longer than 255"):
        validate_unit_name("a" * 248)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("-H", "must not start with '-'"),
        ("x*", "globs"),
        ("x/y", "'/'"),
        ("pröxy", "ASCII"),
        ("a b", "only letters"),
        ("getty@.service", "instance"),
        ("", "empty"),
        ("a@b@c", "at most one '@'"),
    ],
)
def test_invalid_names_say_why(bad: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        validate_unit_name(bad)


GRAMMAR = re.compile(
    r"(?!-)[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]+)?"
    r"\.(service|socket|device|mount|automount|swap|target|path|timer|slice|scope)"
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=40) | st.from_regex(r"-?[a-z@*?\[/ ;$]{0,12}(\.service)?", fullmatch=True))
def test_nothing_outside_the_grammar_is_accepted(name: str) -> None:
    try:
        unit = validate_unit_name(name)
    except ValueError as exc:
        reason = str(exc)
        assert reason
        assert "\n" not in reason
        return
    assert GRAMMAR.fullmatch(unit), unit
    assert len(unit) <= 255
    assert unit.isascii()


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=12))
async def test_nothing_outside_the_grammar_reaches_the_program(name: str) -> None:
    # A separate log per example: hypothesis reuses the fixture-free function many times.
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "standin.py"
        log = Path(tmp) / "log"
        script.write_text(STAND_IN.format(log=str(log)))
        os.environ["OPS_SYSTEMCTL"] = f"{sys.executable} {script}"
        try:
            await systemctl_restart(name, timeout=5)
        finally:
            del os.environ["OPS_SYSTEMCTL"]
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for call in calls:
        *_, unit = call["argv"]
        assert GRAMMAR.fullmatch(unit), unit
        assert call["argv"][:3] == ["--no-ask-password", "restart", "--"]


async def test_summaries_are_redacted_even_for_bad_names(standin: StandIn) -> None:
    token = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"
    ok, summary = await systemctl_restart(f"https://deploy:{token}@host/x")
    assert not ok
    assert token not in summary
    assert "GaBcDe" not in summary
    standin.behave("fail")
    ok, summary = await systemctl_restart(token)  # a token fits the unit-name grammar
    assert not ok
    assert "GaBcDe" not in summary


async def test_caller_secrets_are_removed_from_systemctl_failures(standin: StandIn) -> None:
    standin.behave("fail")
    ok, summary = await systemctl_restart("proxy.service", secrets=["Access denied"])
    assert not ok
    assert "Access denied" not in summary
    assert "***" in summary
