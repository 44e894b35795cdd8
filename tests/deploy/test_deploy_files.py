"""The ``deploy/`` files agree with each other and with the command lines admin-ops really runs.

No root needed: these read the files and record what ``core.ops_exec`` executes through a stand-in
``OPS_SYSTEMCTL``. (Whether systemd and polkitd accept the files is ``test_real_systemd.py``'s job.)
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from core import ops_exec
from tests.deploy.deploy_support import DEPLOY, ROOT
from tests.deploy.systemd_harness import SERVICE_USER

SYSTEMCTL = "/usr/bin/systemctl"


def sudoers_commands() -> dict[str, list[str]]:
    """``Cmnd_Alias`` name -> its commands, with line continuations joined."""
    text = (DEPLOY / "sudoers.d" / "admin-ops").read_text()
    logical = re.sub(r"\\\n", " ", text)
    aliases = {}
    for line in logical.splitlines():
        match = re.match(r"\s*Cmnd_Alias\s+(\w+)\s*=\s*(.*)$", line)
        if match:
            aliases[match[1]] = [" ".join(cmd.split()) for cmd in match[2].split(",")]
    return aliases


def sudoers_rules() -> list[str]:
    text = (DEPLOY / "sudoers.d" / "admin-ops").read_text()
    return [
        line
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "Cmnd_Alias"))
    ]


def polkit_list(name: str) -> list[str]:
    text = (DEPLOY / "polkit" / "50-admin-ops.rules").read_text()
    match = re.search(rf"var {name} = \[(.*?)\];", text, re.DOTALL)
    assert match, f"{name} not found in the polkit rule"
    return re.findall(r'"([^"]+)"', match[1])


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def sudoers_units() -> set[str]:
    units = set()
    for commands in sudoers_commands().values():
        for command in commands:
            units.add(command.rsplit(" ", 1)[1])
    return units


@pytest.fixture
def recorded_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``OPS_SYSTEMCTL`` becomes a stand-in that appends its argv (as JSON) to the returned file."""
    log = tmp_path / "argv.jsonl"
    recorder = tmp_path / "record.py"
    recorder.write_text(
        "import json, sys\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[2:]) + '\\n')\n"
    )
    monkeypatch.setenv("OPS_SYSTEMCTL", shlex.join([sys.executable, str(recorder), str(log)]))
    return log


async def test_sudoers_lists_exactly_the_command_lines_admin_ops_runs(recorded_argv: Path) -> None:
    units = sorted(sudoers_units())
    for unit in units:
        assert (await ops_exec.systemctl_restart(unit))[0]
        assert (await ops_exec.deferred_systemctl_restart(unit, delay=0))[0]
        await ops_exec.systemctl_is_active(unit)
    runs = [json.loads(line) for line in recorded_argv.read_text().splitlines()]
    possible = {" ".join([SYSTEMCTL, *argv]) for argv in runs}

    commands = [cmd for cmds in sudoers_commands().values() for cmd in cmds]
    assert commands, "no Cmnd_Alias in the sudoers file"
    assert set(commands) <= possible, set(commands) - possible
    for unit in units:
        # Every allowed unit can at least be restarted and queried the way admin-ops does it.
        assert f"{SYSTEMCTL} --no-ask-password restart -- {unit}" in commands
        assert f"{SYSTEMCTL} --no-ask-password is-active -- {unit}" in commands


def test_sudoers_has_no_wildcards_and_one_rule_for_the_service_user() -> None:
    for commands in sudoers_commands().values():
        for command in commands:
            assert not set(command) & set('*?[]"\\'), command
            assert command.startswith(SYSTEMCTL + " ")
    assert sudoers_rules() == [f"{SERVICE_USER} ALL=(root) NOPASSWD: ADMIN_OPS_SYSTEMCTL"]


def test_polkit_rule_and_sudoers_allow_the_same_units_for_the_same_user() -> None:
    assert set(polkit_list("UNITS")) == sudoers_units()
    assert polkit_list("VERBS") == ["restart", "try-restart"]
    text = (DEPLOY / "polkit" / "50-admin-ops.rules").read_text()
    assert f'var USER = "{SERVICE_USER}";' in text
    for unit in ("admin-ops-bot.service", "admin-ops-control.service"):
        assert unit in sudoers_units()
        settings = unit_settings(unit)
        assert settings["User"] == [SERVICE_USER]


@pytest.mark.parametrize("unit", ["admin-ops-bot.service", "admin-ops-control.service"])
def test_units_agree_with_the_documented_layout(unit: str) -> None:
    settings = unit_settings(unit)
    checkout = "/srv/admin-ops/app"
    assert settings["WorkingDirectory"] == [checkout]
    assert settings["ReadWritePaths"] == [checkout]
    assert settings["ExecStart"][0].startswith(f"{checkout}/.venv/bin/python ")
    assert settings["EnvironmentFile"][0].startswith("/etc/admin-ops/")
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    readme = (DEPLOY / "README.md").read_text()
    assert f"/etc/systemd/system/{unit}" in readme or f"deploy/{unit}" in readme


def test_bot_unit_restarts_on_exit_status_26_and_stops_crash_loops() -> None:
    settings = unit_settings("admin-ops-bot.service")
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartForceExitStatus"] == ["26"]
    # Every start counts, chat restarts included: 6 cooldown-paced !bot_restart in 10 min must fit.
    assert int(settings["StartLimitBurst"][0]) > 600 // 120
    assert settings["UMask"] == ["0022"]  # pulled files stay readable by the services serving them
    assert settings["StartLimitIntervalSec"] == ["10min"]
    assert settings["StateDirectory"] == ["admin-ops"]


def test_env_examples_name_only_settings_the_code_reads() -> None:
    sources = "\n".join(
        path.read_text()
        for pattern in ("core/**/*.py", "cogs/*.py", "bot.py")
        for path in ROOT.glob(pattern)
    )
    for example in ("admin-ops.env.example", "admin-ops-control.env.example"):
        names = re.findall(r"^#?([A-Z][A-Z0-9_]+)=", (DEPLOY / example).read_text(), re.MULTILINE)
        assert names, example
        unknown = [name for name in names if f'"{name}"' not in sources]
        assert unknown == [], f"{example} names settings no code reads: {unknown}"
