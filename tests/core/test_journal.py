"""The journal tail of ``!ops_logs`` and its settings: one argv, a stand-in journalctl, bounds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from core.journal import MAX_LINES, MAX_OUTPUT, journal_argv, journalctl_argv, read_journal
from core.settings import DEFAULT_CONFIRM, Settings, SettingsError
from tests.support.processes import write_script

BASE = {"DISCORD_TOKEN": "test-token-value-0123456789", "HOME": "/home/ops"}

#: A journalctl that records its argv and environment, then prints what the test asked for.
RECORDING_JOURNALCTL = """
import json, os, sys
here = os.path.dirname(os.path.abspath(sys.argv[0]))
with open(os.path.join(here, "calls.jsonl"), "a") as log:
    log.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}) + "\\n")
answer = os.path.join(here, "answer.json")
if os.path.exists(answer):
    spec = json.load(open(answer))
    sys.stdout.write(spec.get("out", ""))
    sys.stderr.write(spec.get("err", ""))
    sys.exit(spec.get("code", 0))
for n in range(int(sys.argv[sys.argv.index("-n") + 1])):
    print(f"2024-05-01T12:00:{n % 60:02d}+0000 web-1 proxy[42]: line {n}")
"""


@pytest.fixture
def journalctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = write_script(tmp_path / "journalctl", RECORDING_JOURNALCTL, interpreter=sys.executable)
    monkeypatch.setenv("OPS_JOURNALCTL", str(script))
    monkeypatch.setenv("DISCORD_TOKEN", "test-token-that-must-not-reach-journalctl")
    return tmp_path


def calls(directory: Path) -> list[dict]:
    log = directory / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def answer(directory: Path, *, out: str = "", err: str = "", code: int = 0) -> None:
    (directory / "answer.json").write_text(json.dumps({"out": out, "err": err, "code": code}))


def test_the_command_line_is_the_documented_one() -> None:
    assert journal_argv("proxy", 50, {}) == [
        "journalctl", "-u", "proxy.service", "-n", "50", "--no-pager", "-o", "short-iso",
    ]  # fmt: skip
    assert journal_argv("web@1.service", 2000, {"OPS_JOURNALCTL": "sudo -n /bin/journalctl"})[
        :4
    ] == ["sudo", "-n", "/bin/journalctl", "-u"]


@pytest.mark.parametrize("lines", [0, -1, MAX_LINES + 1])
def test_a_line_count_outside_the_bounds_is_refused(lines: int) -> None:
    with pytest.raises(ValueError, match="lines must be between 1 and 2000"):
        journal_argv("proxy.service", lines, {})


@pytest.mark.parametrize("unit", ["--file=/etc/shadow", "a b", "../x", ""])
def test_nothing_typed_can_become_an_option(unit: str) -> None:
    with pytest.raises(ValueError):
        journal_argv(unit, 5, {})


def test_an_unsplittable_program_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="OPS_JOURNALCTL cannot be split"):
        journalctl_argv({"OPS_JOURNALCTL": "journalctl 'unclosed"})


async def test_reads_the_lines_without_the_bots_environment(journalctl: Path) -> None:
    tail = await read_journal("proxy.service", 3)

    assert tail.ok
    assert tail.summary == "3 lines"
    assert tail.text.splitlines() == [
        f"2024-05-01T12:00:0{n}+0000 web-1 proxy[42]: line {n}" for n in range(3)
    ]
    (call,) = calls(journalctl)
    assert call["argv"] == ["-u", "proxy.service", "-n", "3", "--no-pager", "-o", "short-iso"]
    # Nothing of the bot's environment but PATH: its token never reaches the program.
    assert set(call["env"]) <= {
        "PATH",
        "LC_ALL",
        "LANG",
        "SYSTEMD_COLORS",
        "SYSTEMD_PAGER",
        "LC_CTYPE",
    }
    assert "test-token-that-must-not-reach-journalctl" not in json.dumps(call["env"])


#: A journal of 2000 lines of about 1 KB each: ``-n N`` prints its newest N, like journalctl.
LONG_LINES_JOURNALCTL = """
import sys
n = int(sys.argv[sys.argv.index("-n") + 1])
with open(sys.argv[0] + ".calls", "a") as log:
    log.write(f"{n}\\n")
for k in range(2000 - n, 2000):
    print(f"2024-05-01T12:00:00+0000 web-1 proxy[42]: line {k} " + "x" * 1000)
"""


async def test_newest_lines_are_shown_when_the_asked_ones_do_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = write_script(
        tmp_path / "journalctl", LONG_LINES_JOURNALCTL, interpreter=sys.executable
    )
    monkeypatch.setenv("OPS_JOURNALCTL", str(script))

    tail = await read_journal("proxy.service", 2000)

    shown = tail.text.splitlines()
    asked = [int(n) for n in (tmp_path / "journalctl.calls").read_text().split()]
    assert asked[0] == 2000
    assert 1 < len(asked) <= 3
    # The newest lines, complete, as many as journalctl was last asked for; no cut marker.
    assert len(shown) == asked[-1] < 2000
    assert shown[-1].endswith("line 1999 " + "x" * 1000)
    assert all(line.endswith("x" * 1000) for line in shown)
    assert len(tail.text.encode()) <= MAX_OUTPUT
    assert tail.truncated
    assert tail.summary == f"{asked[-1]} lines"


#: 5000 entries of four lines each (a traceback's worth): ``-n N`` prints the newest N entries.
MULTI_LINE_JOURNALCTL = """
import sys
n = int(sys.argv[sys.argv.index("-n") + 1])
for k in range(5000 - n, 5000):
    print(f"2024-05-01T12:00:00+0000 web-1 proxy[42]: entry {k} " + "x" * 100)
    for part in range(3):
        print(f"                                              continued {k}.{part} " + "y" * 100)
"""


async def test_the_newest_entries_are_shown_when_entries_span_several_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-n`` counts entries, not lines: the retry asks for as many entries as fitted."""
    script = write_script(
        tmp_path / "journalctl", MULTI_LINE_JOURNALCTL, interpreter=sys.executable
    )
    monkeypatch.setenv("OPS_JOURNALCTL", str(script))

    tail = await read_journal("proxy.service", 2000)

    shown = tail.text.splitlines()
    assert shown[-4].startswith("2024-05-01T12:00:00+0000 web-1 proxy[42]: entry 4999 ")
    assert shown[-1].strip().startswith("continued 4999.2 ")
    assert "truncated]" not in tail.text
    assert tail.truncated
    starts = [line for line in shown if not line[0].isspace()]
    assert tail.summary == f"{len(starts)} lines"
    assert len(shown) == 4 * len(starts)  # whole entries only


async def test_no_entries_is_said_with_journalctls_hint(journalctl: Path) -> None:
    hint = "Hint: You are currently not seeing messages from other users and the system."
    answer(journalctl, out="-- No entries --\n", err=hint + "\n")

    tail = await read_journal("proxy.service", 50)

    assert tail.ok
    assert tail.summary == "no journal lines for proxy.service"
    assert tail.text == f"-- No entries --\n{hint}"


async def test_a_failing_journalctl_is_a_result_with_its_own_words(journalctl: Path) -> None:
    answer(journalctl, err="Failed to open journal: Permission denied\n", code=1)

    tail = await read_journal("proxy.service", 50)

    assert not tail.ok
    assert tail.summary == "journalctl failed (exit 1)"
    assert tail.text == "Failed to open journal: Permission denied"


async def test_a_missing_program_is_a_result(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("OPS_JOURNALCTL", str(tmp_path / "no-such-journalctl"))

    tail = await read_journal("proxy.service", 5)

    assert not tail.ok
    assert "program not found" in tail.summary


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def test_confirmation_and_log_settings_default() -> None:
    settings = Settings.from_env(BASE)

    assert settings.confirm == frozenset(DEFAULT_CONFIRM)
    assert DEFAULT_CONFIRM == ("bot_restart", "fleet_restart", "fleet_pull", "bot_rollback")
    assert settings.confirm_timeout == 30.0
    assert settings.log_units == ()
    assert settings.cooldown("ops_logs") == 10.0
    assert settings.cooldown("ops_sync") == 60.0


def test_confirmation_and_log_settings_are_read() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "OPS_CONFIRM": "!bot_pull, proxy_restart",
            "OPS_CONFIRM_TIMEOUT": "5",
            "OPS_LOG_UNITS": "nginx, worker@1.service",
            "OPS_BOT_SERVICE": "bot",
            "OPS_PROXY_SERVICE": "nginx",
            "OPS_COOLDOWN_OPS_LOGS": "0",
            "OPS_ROLE_IDS_OPS_SYNC": "42",
        }
    )

    assert settings.confirm == {"bot_pull", "proxy_restart"}
    assert settings.confirm_timeout == 5.0
    assert settings.log_units == ("nginx.service", "worker@1.service")
    assert settings.readable_units == ("bot.service", "nginx.service", "worker@1.service")
    assert settings.cooldown("ops_logs") == 0.0
    assert settings.role_ids_for("ops_sync") == {42}


def test_none_turns_confirmation_off() -> None:
    assert Settings.from_env({**BASE, "OPS_CONFIRM": "None"}).confirm == frozenset()


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("OPS_CONFIRM", "bot_restart,reboot", "OPS_CONFIRM: 'reboot' is not a command"),
        ("OPS_CONFIRM_TIMEOUT", "0", "OPS_CONFIRM_TIMEOUT: must be between 1 and 600 seconds"),
        ("OPS_CONFIRM_TIMEOUT", "601", "OPS_CONFIRM_TIMEOUT: must be between 1 and 600 seconds"),
        ("OPS_LOG_UNITS", "nginx,--all", "OPS_LOG_UNITS: "),
        ("OPS_JOURNALCTL", "journalctl 'x", "OPS_JOURNALCTL: cannot be split like a shell would"),
    ],
)
def test_invalid_values_name_their_variable(variable: str, value: str, problem: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**BASE, variable: value})
    assert any(line.startswith(problem) for line in raised.value.problems), raised.value.problems
