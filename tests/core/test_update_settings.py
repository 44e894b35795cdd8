"""Settings of the update commands and the crash-loop guard: one parser each, validated at load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from core import ops_exec
from core.settings import (
    COMMANDS,
    DEFAULT_COOLDOWNS,
    PROJECT_ROOT,
    RollbackSettings,
    Settings,
    SettingsError,
)
from tests.support.processes import write_script

BASE = {"DISCORD_TOKEN": "test-token-value-0123456789", "HOME": "/home/ops"}


def test_defaults() -> None:
    settings = Settings.from_env(BASE)

    assert settings.requirements == "requirements.txt"
    assert settings.pip_timeout == 300.0
    assert settings.healthy_after == 60.0


def test_the_new_commands_have_their_cooldowns_and_role_overrides() -> None:
    assert {c: DEFAULT_COOLDOWNS[c] for c in COMMANDS[-6:-2]} == {
        "bot_fetch": 15.0,
        "bot_deps": 60.0,
        "ops_reload": 5.0,
        "bot_rollback": 30.0,
    }
    settings = Settings.from_env(
        {**BASE, "OPS_COOLDOWN_BOT_DEPS": "600", "OPS_ROLE_IDS_BOT_ROLLBACK": "42"}
    )
    assert settings.cooldown("bot_deps") == 600.0
    assert settings.role_ids_for("bot_rollback") == frozenset({42})
    assert settings.cooldown("ops_reload") == 5.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("deploy/pins.txt", "deploy/pins.txt"), ("./requirements/prod.txt", "requirements/prod.txt")],
)
def test_requirements_is_a_path_inside_the_checkout(value: str, expected: str) -> None:
    assert Settings.from_env({**BASE, "OPS_REQUIREMENTS": value}).requirements == expected


@pytest.mark.parametrize(
    "value", ["/etc/passwd", "../other/requirements.txt", "a/../../b.txt", "."]
)
def test_requirements_outside_the_checkout_is_refused(value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**BASE, "OPS_REQUIREMENTS": value})

    assert raised.value.problems == (
        f"OPS_REQUIREMENTS: must be a path relative to the checkout, inside it, got {value!r}",
    )


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("OPS_PIP_TIMEOUT", "30", "pip_timeout", 30.0),
        ("OPS_HEALTHY_AFTER", "1", "healthy_after", 1.0),
        ("OPS_HEALTHY_AFTER", "3600", "healthy_after", 3600.0),
    ],
)
def test_the_new_durations(name: str, value: str, field: str, expected: float) -> None:
    assert getattr(Settings.from_env({**BASE, name: value}), field) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPS_PIP_TIMEOUT", "0"),
        ("OPS_PIP_TIMEOUT", "3601"),
        ("OPS_HEALTHY_AFTER", "0.5"),
        ("OPS_HEALTHY_AFTER", "3601"),
        ("OPS_HEALTHY_AFTER", "soon"),
    ],
)
def test_durations_out_of_range_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**BASE, name: value})

    (problem,) = raised.value.problems
    assert problem.startswith(f"{name}: ")


def test_the_guard_reads_the_bots_own_settings() -> None:
    settings = RollbackSettings.from_env(
        {
            "OPS_REPO_DIR": "/srv/admin-ops/app",
            "OPS_STATE_DIR": "/var/lib/admin-ops",
            "OPS_BOT_SERVICE": "admin-ops-bot",
            "OPS_PULL_TIMEOUT": "90",
            "OPS_CONTROL_SECRET": "a-secret-to-redact",
        }
    )

    assert settings == RollbackSettings(
        repo_dir=Path("/srv/admin-ops/app"),
        state_dir=Path("/var/lib/admin-ops"),
        bot_service="admin-ops-bot.service",
        git_timeout=90.0,
        secrets=("a-secret-to-redact",),
    )
    assert "a-secret-to-redact" not in repr(settings)


def test_the_guard_defaults_like_the_bot() -> None:
    settings = RollbackSettings.from_env(
        {"OPS_BOT_SERVICE": "bot.service", "STATE_DIRECTORY": "/var/lib/admin-ops"}
    )

    assert (settings.repo_dir, settings.state_dir) == (PROJECT_ROOT, Path("/var/lib/admin-ops"))


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({}, "OPS_BOT_SERVICE: is not set: the unit to roll back and start again"),
        ({"OPS_BOT_SERVICE": "bad unit"}, "OPS_BOT_SERVICE: "),
        ({"OPS_BOT_SERVICE": "bot", "OPS_SYSTEMCTL": "'unclosed"}, "OPS_SYSTEMCTL: "),
        ({"OPS_BOT_SERVICE": "bot", "OPS_REPO_DIR": "relative"}, "OPS_REPO_DIR: "),
    ],
)
def test_the_guard_refuses_settings_it_cannot_act_on(env: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError) as raised:
        RollbackSettings.from_env({"HOME": "/home/ops", **env})

    assert raised.value.problems[0].startswith(problem)


async def test_unit_primitives_run_exactly_these_command_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "argv.jsonl"
    stub = write_script(
        tmp_path / "systemctl",
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print('7' if 'show' in sys.argv else '')\n",
        interpreter=sys.executable,
    )
    monkeypatch.setenv("OPS_SYSTEMCTL", str(stub))

    started = await ops_exec.start_unit("bot")
    reset = await ops_exec.reset_failed_unit("bot.service")
    count = await ops_exec.unit_restart_count("bot.service")
    refused = await ops_exec.start_unit("bad unit")

    assert (started.ok, started.summary) == (True, "started bot.service")
    assert (reset.ok, reset.summary) == (True, "reset the failed state of bot.service")
    assert count == 7
    assert not refused.ok
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        ["--no-ask-password", "start", "--", "bot.service"],
        ["--no-ask-password", "reset-failed", "--", "bot.service"],
        ["--no-ask-password", "show", "--property=NRestarts", "--value", "--", "bot.service"],
    ]
