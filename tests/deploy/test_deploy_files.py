"""The ``deploy/`` files agree with each other and with the command lines admin-ops really runs.

No root needed: these read the files and record what ``core.ops_exec`` executes through a stand-in
``OPS_SYSTEMCTL``. (Whether systemd and polkitd accept the files is ``test_real_systemd.py``'s job.)
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from pathlib import Path

import pytest

from core import ops_exec
from core.env_reader import DEFAULT_RESTART_MIN_INTERVAL
from core.journal import journal_argv
from core.settings import DEFAULT_COOLDOWNS
from tests.deploy.deploy_support import DEPLOY, ROOT, SHIPPED_UNITS, readme_block
from tests.deploy.systemd_harness import CONTROL_USER, SERVICE_USER, SHARED_GROUP

SYSTEMCTL = "/usr/bin/systemctl"
#: Who runs what: the user of each shipped unit, and the sudoers alias of each user.
UNIT_USERS = {"admin-ops-bot.service": SERVICE_USER, "admin-ops-control.service": CONTROL_USER}
USER_ALIASES = {SERVICE_USER: "ADMIN_OPS_BOT", CONTROL_USER: "ADMIN_OPS_CONTROL"}


def sudoers_commands(*, raw: bool = False) -> dict[str, list[str]]:
    r"""``Cmnd_Alias`` name -> its commands, with line continuations joined.

    sudoers needs ``\ , : =`` escaped with a backslash in command arguments: a command is split
    at unescaped commas and, unless ``raw``, unescaped as sudo does before matching.
    """
    text = (DEPLOY / "sudoers.d" / "admin-ops").read_text()
    logical = re.sub(r"\\\n", " ", text)
    aliases = {}
    for line in logical.splitlines():
        match = re.match(r"\s*Cmnd_Alias\s+(\w+)\s*=\s*(.*)$", line)
        if match:
            commands = [" ".join(cmd.split()) for cmd in re.split(r"(?<!\\),", match[2])]
            if not raw:
                commands = [re.sub(r"\\(.)", r"\1", cmd) for cmd in commands]
            aliases[match[1]] = commands
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


def polkit_allowed() -> dict[str, list[str]]:
    """The rule's ``ALLOWED`` map: user -> the units it may restart."""
    text = (DEPLOY / "polkit" / "50-admin-ops.rules").read_text()
    match = re.search(r"var ALLOWED = \{(.*?)\n    \};", text, re.DOTALL)
    assert match, "ALLOWED not found in the polkit rule"
    return {
        user: re.findall(r'"([^"]+)"', units)
        for user, units in re.findall(r'"([^"]+)": \[(.*?)\]', match[1], re.DOTALL)
    }


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def sudoers_units(alias: str | None = None) -> set[str]:
    """The units named in one ``Cmnd_Alias`` (or in all of them)."""
    units = set()
    for name, commands in sudoers_commands().items():
        if alias in (None, name):
            units.update(command.rsplit(" ", 1)[1] for command in commands)
    return units


def systemd_seconds(span: str) -> float:
    """A systemd time span (``5min``, ``5s``, ``100ms``, ``1min 30s``, ``300``) in seconds."""
    scale = {"": 1, "s": 1, "sec": 1, "ms": 1e-3, "us": 1e-6, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts, span
    assert "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(number) * scale[unit] for number, unit in parts)


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
        await ops_exec.unit_started_ago(unit)
        # What the crash-loop guard (python -m core.rollback) runs.
        assert (await ops_exec.reset_failed_unit(unit)).ok
        assert (await ops_exec.start_unit(unit)).ok
        await ops_exec.unit_restart_count(unit)
    runs = [json.loads(line) for line in recorded_argv.read_text().splitlines()]
    possible = {" ".join([SYSTEMCTL, *argv]) for argv in runs}

    aliases = sudoers_commands()
    commands = [cmd for cmds in aliases.values() for cmd in cmds]
    assert commands, "no Cmnd_Alias in the sudoers file"
    assert set(commands) <= possible, set(commands) - possible
    for alias, alias_commands in aliases.items():
        for unit in sudoers_units(alias):
            # Every unit a user may restart can also be queried the way admin-ops does it,
            # including when it last became active (a restart waits OPS_RESTART_MIN_INTERVAL).
            assert f"{SYSTEMCTL} --no-ask-password restart -- {unit}" in alias_commands
            assert f"{SYSTEMCTL} --no-ask-password is-active -- {unit}" in alias_commands
            started = "show --property=ActiveEnterTimestampMonotonic --value"
            assert f"{SYSTEMCTL} --no-ask-password {started} -- {unit}" in alias_commands


def test_sudoers_has_no_wildcards_and_one_rule_per_service_user() -> None:
    for commands in sudoers_commands(raw=True).values():
        for command in commands:
            assert not set(command) & set('*?[]"'), command
            # A backslash only ever escapes what sudoers needs escaped (here: "=").
            assert re.sub(r"\\[=,:\\]", "", command).count("\\") == 0, command
            assert command.startswith(SYSTEMCTL + " ")
    assert sudoers_rules() == [
        f"{user} ALL=(root) NOPASSWD: {alias}" for user, alias in USER_ALIASES.items()
    ]


def polkit_guarded() -> dict[str, list[str]]:
    """The rule's ``GUARDED`` map: user -> the units its crash-loop guard clears and starts."""
    text = (DEPLOY / "polkit" / "50-admin-ops.rules").read_text()
    match = re.search(r"var GUARDED = \{(.*?)\n    \};", text, re.DOTALL)
    assert match, "GUARDED not found in the polkit rule"
    return {
        user: re.findall(r'"([^"]+)"', units)
        for user, units in re.findall(r'"([^"]+)": \[(.*?)\]', match[1], re.DOTALL)
    }


GUARD_FORMS = ("reset-failed --", "start --", "show --property=NRestarts --value --")


def test_the_crash_loop_guard_may_clear_and_start_the_bot_unit_and_nothing_more() -> None:
    """Polkit and sudoers agree: opsbot, the bot's unit, reset-failed and start (and a read)."""
    bot_unit = "admin-ops-bot.service"
    assert polkit_guarded() == {SERVICE_USER: [bot_unit]}
    assert polkit_list("GUARD_VERBS") == ["reset-failed", "start"]
    guard_lines = {
        alias: [cmd for cmd in commands if any(f" {form} " in cmd for form in GUARD_FORMS)]
        for alias, commands in sudoers_commands().items()
    }
    assert guard_lines == {
        USER_ALIASES[SERVICE_USER]: [
            f"{SYSTEMCTL} --no-ask-password {form} {bot_unit}" for form in GUARD_FORMS
        ],
        USER_ALIASES[CONTROL_USER]: [],
    }


def test_the_rollback_unit_is_the_bots_guard_with_the_bots_user_checkout_state_and_settings() -> (
    None
):
    bot = unit_settings("admin-ops-bot.service")
    guard = unit_settings("admin-ops-rollback.service")
    assert bot["OnFailure"] == ["admin-ops-rollback.service"]
    assert guard["Type"] == ["oneshot"]
    assert guard["ExecStart"] == ["/srv/admin-ops/app/.venv/bin/python -m core.rollback"]
    for setting in (
        "User", "Group", "SupplementaryGroups", "WorkingDirectory", "EnvironmentFile",
        "StateDirectory", "StateDirectoryMode", "UMask", "ProtectSystem",
        "NoNewPrivileges", "CapabilityBoundingSet", "SystemCallFilter",
    ):  # fmt: skip
        assert guard[setting] == bot[setting], setting
    # The checkout, not the restart locks: the guard restarts nothing, it starts the bot.
    assert guard["ReadWritePaths"] == [p for p in bot["ReadWritePaths"] if p != LOCK_DIR]
    assert guard["Environment"] == ["OPS_BOT_SERVICE=admin-ops-bot.service", "PYTHONUNBUFFERED=1"]
    # No credentials: the guard needs no secret.
    assert "LoadCredential" not in guard
    assert guard["RestrictAddressFamilies"] == ["AF_UNIX"]
    readme = (DEPLOY / "README.md").read_text()
    assert "deploy/admin-ops-rollback.service" in readme


def test_polkit_rule_and_sudoers_allow_the_same_units_for_the_same_users() -> None:
    allowed = polkit_allowed()
    assert set(allowed) == set(USER_ALIASES)
    for user, alias in USER_ALIASES.items():
        assert set(allowed[user]) == sudoers_units(alias), user
    assert polkit_list("VERBS") == ["restart", "try-restart"]
    for unit, user in UNIT_USERS.items():
        assert unit_settings(unit)["User"] == [user]


def test_each_user_may_restart_what_its_settings_name_and_no_more() -> None:
    """opsbot: its own unit and OPS_PROXY_SERVICE; opsctl: OPS_RESTART_UNITS."""
    allowed = polkit_allowed()
    bot_env = env_example("admin-ops.env.example")
    assert set(allowed[SERVICE_USER]) == {"admin-ops-bot.service", bot_env["OPS_PROXY_SERVICE"]}
    control_env = env_example("admin-ops-control.env.example")
    assert set(allowed[CONTROL_USER]) == set(control_env["OPS_RESTART_UNITS"].split(","))


def env_example(name: str) -> dict[str, str]:
    """The settings an env example sets (uncommented lines only)."""
    text = (DEPLOY / name).read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", text, re.MULTILINE))


@pytest.mark.parametrize("unit", ["admin-ops-bot.service", "admin-ops-control.service"])
def test_units_agree_with_the_documented_layout(unit: str) -> None:
    settings = unit_settings(unit)
    checkout = "/srv/admin-ops/app"
    assert settings["WorkingDirectory"] == [checkout]
    assert settings["ReadWritePaths"] == [checkout, LOCK_DIR]
    assert settings["ExecStart"][0].startswith(f"{checkout}/.venv/bin/python ")
    assert settings["EnvironmentFile"][0].startswith("/etc/admin-ops/")
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    readme = (DEPLOY / "README.md").read_text()
    assert f"/etc/systemd/system/{unit}" in readme or f"deploy/{unit}" in readme
    # Each unit its own user; the checkout shared through one group, group-writable.
    assert settings["User"] == settings["Group"] == [UNIT_USERS[unit]]
    assert settings["SupplementaryGroups"] == [SHARED_GROUP]
    assert settings["UMask"] == ["0002"]


@pytest.mark.parametrize(
    ("unit", "credentials"),
    [
        ("admin-ops-bot.service", ["discord-token", "control-secret", "redis-url"]),
        ("admin-ops-control.service", ["control-secret", "redis-url"]),
    ],
)
def test_units_take_their_secrets_as_credentials_and_the_env_files_hold_none(
    unit: str, credentials: list[str]
) -> None:
    settings = unit_settings(unit)
    assert settings["LoadCredential"] == [f"{name}:/etc/admin-ops/{name}" for name in credentials]
    secrets = {"DISCORD_TOKEN", "OPS_CONTROL_SECRET", "REDIS_URL"}
    for example in ("admin-ops.env.example", "admin-ops-control.env.example"):
        assert secrets.isdisjoint(env_example(example)), example
    readme = (DEPLOY / "README.md").read_text()
    for name in credentials:
        assert f"/etc/admin-ops/{name}" in readme


def test_bot_unit_restarts_on_exit_status_26() -> None:
    settings = unit_settings("admin-ops-bot.service")
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartForceExitStatus"] == ["26"]
    assert settings["StateDirectory"] == ["admin-ops"]


def command_starts(window: float, gap: float) -> int:
    """The most starts systemd's start-limit window can hold when starts are ``gap`` s apart.

    The window opens at a start and holds every start up to ``window`` seconds later (a start
    exactly ``window`` later still counts in it).
    """
    return math.floor(window / gap) + 1


@pytest.mark.parametrize("unit", SHIPPED_UNITS)
def test_no_sequence_of_commands_reaches_the_start_limit_but_a_crash_loop_does(unit: str) -> None:
    """The unit files' start limits against admin-ops' defaults, and deploy/README.md's numbers.

    Every restart admin-ops makes on a command, whoever asked (chat, any daemon), waits until
    systemd says the unit has been active for OPS_RESTART_MIN_INTERVAL; each command's cooldown
    spaces its own restarts further. A crash loop restarts every RestartSec.
    """
    settings = unit_settings(unit)
    window = systemd_seconds(settings["StartLimitIntervalSec"][-1])
    burst = int(settings["StartLimitBurst"][-1])
    restart_sec = systemd_seconds(settings["RestartSec"][-1])
    assert settings["Restart"] == ["on-failure"]

    most = command_starts(window, DEFAULT_RESTART_MIN_INTERVAL)
    for command in ("bot_restart", "fleet_restart"):
        gap = max(DEFAULT_RESTART_MIN_INTERVAL, DEFAULT_COOLDOWNS[command])
        assert command_starts(window, gap) <= most
    assert most <= burst, f"{most} command-driven starts fit in {window} s; the burst is {burst}"
    # The room left absorbs crashes between commands (and a restart racing another).
    assert burst - most >= 2
    # A crash loop must fill the burst before its window runs out, and fail within a minute.
    crash_loop = burst * restart_sec
    assert crash_loop <= 60
    assert crash_loop * 2 <= window

    readme = " ".join((DEPLOY / "README.md").read_text().split())
    minutes = window / 60
    quoted = [
        f"`StartLimitIntervalSec={settings['StartLimitIntervalSec'][-1]}`",
        f"`StartLimitBurst={burst}`",
        f"`RestartSec={settings['RestartSec'][-1]}`",
        f"`OPS_RESTART_MIN_INTERVAL` ({DEFAULT_RESTART_MIN_INTERVAL:g} s by default",
        f"at most {most} times in any {minutes:g}-minute window",
        f"{burst - most} below the burst",
        f"(`!bot_restart` {DEFAULT_COOLDOWNS['bot_restart']:g} s, "
        f"`!fleet_restart` {DEFAULT_COOLDOWNS['fleet_restart']:g} s)",
        f"restarted every {restart_sec:g} s, reaches {burst} starts in about {crash_loop:g} s",
        f"refuses the {burst + 1}th",
    ]
    assert [text for text in quoted if text not in readme] == []
    comment = " ".join(line.lstrip("# ") for line in (DEPLOY / unit).read_text().splitlines())
    if unit == "admin-ops-bot.service":
        assert f"at most {most} times in any {minutes:g}-minute window" in comment
        assert f"burst of {burst}" in comment


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


# --- the journal namespace that !ops_logs reads -----------------------------------------------

JOURNAL_NAMESPACE = "admin-ops"
JOURNAL_DIRECTORY = f"/var/log/journal/%m.{JOURNAL_NAMESPACE}"


def tmpfiles_rows() -> list[list[str]]:
    """The lines of deploy/tmpfiles.d/admin-ops-journal.conf, split into their fields."""
    text = (DEPLOY / "tmpfiles.d" / "admin-ops-journal.conf").read_text()
    return [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_the_journal_dropin_sets_the_namespace_and_nothing_else() -> None:
    text = (DEPLOY / "admin-ops-journal.conf").read_text()
    settings = [line for line in text.splitlines() if line.strip() and line[0] not in "#;"]
    assert settings == ["[Service]", f"LogNamespace={JOURNAL_NAMESPACE}"]
    assert "/etc/systemd/system/<unit>.d/admin-ops-journal.conf" in text


def test_tmpfiles_lets_only_the_bots_user_read_only_the_namespace() -> None:
    user = unit_settings("admin-ops-bot.service")["User"][0]
    rows = tmpfiles_rows()
    assert [row[:2] for row in rows] == [
        ["d", JOURNAL_DIRECTORY],
        ["a+", JOURNAL_DIRECTORY],
        ["a+", f"{JOURNAL_DIRECTORY}/*.journal*"],
    ]
    # Created as journald's own LogsDirectory= would be: journald keeps its files root's.
    assert rows[0][2:] == ["2755", "root", "systemd-journal", "-"]
    granted = {}
    for row in rows[1:]:
        assert row[2:6] == ["-"] * 4, row
        for entry in row[6].split(","):
            *default, tag, name, permissions = entry.split(":")
            assert (default, tag, name) in (([], "user", user), (["default"], "user", user)), entry
            granted[(row[1].endswith("*"), bool(default))] = permissions
    # Read (and, for the directory itself, list); never write.
    assert granted == {(False, False): "r-x", (False, True): "r--", (True, False): "r--"}


def test_the_example_bot_env_reads_the_namespace_with_the_command_line_of_ops_logs() -> None:
    argv = journal_argv("proxy.service", 50, environ=env_example("admin-ops.env.example"))

    assert argv == [
        "journalctl", f"--namespace={JOURNAL_NAMESPACE}", "-u", "proxy.service",
        "-n", "50", "--no-pager", "-o", "short-iso",
    ]  # fmt: skip


def test_readme_installs_the_journal_files_where_their_headers_say() -> None:
    block = readme_block("admin-ops-journal.conf")
    app = "/srv/admin-ops/app/deploy"
    tmpfiles = "/etc/tmpfiles.d/admin-ops-journal.conf"
    assert f"install -m 0644 {app}/tmpfiles.d/admin-ops-journal.conf /etc/tmpfiles.d/\n" in block
    assert f"systemd-tmpfiles --create {tmpfiles}\n" in block
    assert "for unit in admin-ops-bot.service " in block
    dropin = f"install -m 0644 {app}/admin-ops-journal.conf /etc/systemd/system/$unit.d/\n"
    assert dropin in block
    assert tmpfiles in (DEPLOY / "tmpfiles.d" / "admin-ops-journal.conf").read_text()
    setting = f"OPS_JOURNALCTL={env_example('admin-ops.env.example')['OPS_JOURNALCTL']}"
    assert f"`{setting}`" in (DEPLOY / "README.md").read_text()


# --- the restart locks both users share (OPS_LOCK_DIR) ------------------------------------------

LOCK_DIR = "/run/admin-ops"
LOCKS_TMPFILES = DEPLOY / "tmpfiles.d" / "admin-ops-locks.conf"


def test_the_locks_directory_is_the_shared_groups_and_named_alike_everywhere() -> None:
    """tmpfiles.d creates it for the group both units share; both units and examples name it."""
    text = LOCKS_TMPFILES.read_text()
    rows = [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]
    # setgid: files created there belong to the group; no o+w (admin-ops refuses that); no age.
    # Sticky, and locks/ root's: neither user can remove a lock file the other created.
    assert rows == [
        ["d", LOCK_DIR, "3770", "root", SHARED_GROUP, "-"],
        ["d", f"{LOCK_DIR}/locks", "3770", "root", SHARED_GROUP, "-"],
    ]
    for unit in SHIPPED_UNITS:
        assert LOCK_DIR in unit_settings(unit)["ReadWritePaths"], unit
        assert unit_settings(unit)["SupplementaryGroups"] == [SHARED_GROUP]
    for example in ("admin-ops.env.example", "admin-ops-control.env.example"):
        assert env_example(example)["OPS_LOCK_DIR"] == LOCK_DIR, example
    block = readme_block("admin-ops-locks.conf")
    installed = "/etc/tmpfiles.d/admin-ops-locks.conf"
    app = "/srv/admin-ops/app/deploy"
    assert f"install -m 0644 {app}/tmpfiles.d/admin-ops-locks.conf /etc/tmpfiles.d/\n" in block
    # Applied before the units are installed: without it they do not start.
    assert block.index(f"systemd-tmpfiles --create {installed}\n") < block.index(".service")
    assert installed in text
