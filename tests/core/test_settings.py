"""core.settings: every variable, its default, and an error naming each bad one."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import (
    COMMANDS,
    PROJECT_ROOT,
    DaemonSettings,
    PullTarget,
    Settings,
    SettingsError,
    default_state_dir,
)

BASE = {"HOME": "/home/ops"}


def load(**env: str) -> Settings:
    return Settings.from_env({**BASE, **env})


def problems(**env: str) -> tuple[str, ...]:
    with pytest.raises(SettingsError) as caught:
        load(**env)
    return caught.value.problems


def test_defaults() -> None:
    settings = load()
    assert settings.discord_token is None
    assert settings.command_prefix == "!"
    assert settings.redis_url is None
    assert settings.state_dir == Path("/home/ops/.local/state/admin-ops")
    assert settings.repo_dir == PROJECT_ROOT
    assert settings.pull_targets == (PullTarget("bot", PROJECT_ROOT),)
    assert settings.bot_service is None
    assert settings.proxy_service is None
    assert settings.restart_mode == "systemd"
    assert settings.restart_delay == 1.0
    assert settings.pull_timeout == 60.0
    assert settings.admin_role_ids == frozenset()
    assert settings.admin_role_names == frozenset()
    assert settings.channel_ids == frozenset()
    assert settings.audit_channel_id is None
    assert [settings.cooldown(c) for c in COMMANDS] == [
        120.0,
        30.0,
        15.0,
        0.0,
        15.0,
        30.0,
        0.0,
        15.0,
        60.0,
        5.0,
        30.0,
        10.0,
        60.0,
    ]
    assert settings.control_secret is None
    assert settings.control_prefix == "sg:control"
    assert settings.fleet_timeout == 30.0
    assert settings.fleet_missing == ("REDIS_URL", "OPS_CONTROL_SECRET")
    assert not settings.control_in_process
    assert settings.control_identity is None
    assert settings.secrets == ()
    assert settings.cooldown_file == settings.state_dir / "cooldowns.json"
    assert settings.marker_file == settings.state_dir / "restart-marker.json"


def test_every_variable_is_read() -> None:
    settings = load(
        DISCORD_TOKEN="token-value",
        OPS_PREFIX="?",
        REDIS_URL="redis://:pw-secret@127.0.0.1:6390/2",
        OPS_STATE_DIR="/var/lib/ops",
        OPS_REPO_DIR="/srv/bot",
        OPS_PULL_TARGETS="worker=/srv/worker, Site=/srv/site",
        OPS_BOT_SERVICE="bot",
        OPS_PROXY_SERVICE="nginx.service",
        OPS_RESTART_MODE="EXIT",
        OPS_RESTART_DELAY="0.5",
        OPS_PULL_TIMEOUT="120",
        OPS_ADMIN_ROLE_IDS="111, 222",
        OPS_ADMIN_ROLE_NAMES="Ops, Site Reliability",
        OPS_GUILD_IDS="999000, 999001",
        OPS_RESTART_MIN_INTERVAL="90",
        OPS_ROLE_IDS_BOT_RESTART="333",
        OPS_ROLE_IDS_PROXY_RESTART="444,555",
        OPS_ROLE_IDS_BOT_PULL="666",
        OPS_CHANNEL_IDS="777",
        OPS_AUDIT_CHANNEL_ID="888",
        OPS_COOLDOWN_BOT_RESTART="300",
        OPS_COOLDOWN_PROXY_RESTART="0",
        OPS_COOLDOWN_BOT_PULL="2.5",
        OPS_REDACT_ENV="DB_PASSWORD",
        DB_PASSWORD="db-secret",
        OPS_CONTROL_SECRET=" fleet secret ",
        OPS_CONTROL_PREFIX="prod:control",
        OPS_FLEET_TIMEOUT="45",
        OPS_ROLE_IDS_FLEET_RESTART="999",
        OPS_COOLDOWN_FLEET_PULL="60",
        OPS_CONTROL_IN_PROCESS="yes",
        OPS_IDENTITY="web-1:bot",
    )
    assert settings.discord_token == "token-value"
    assert settings.command_prefix == "?"
    assert settings.redis_url == "redis://:pw-secret@127.0.0.1:6390/2"
    assert settings.state_dir == Path("/var/lib/ops")
    assert settings.pull_targets == (
        PullTarget("bot", Path("/srv/bot")),
        PullTarget("worker", Path("/srv/worker")),
        PullTarget("site", Path("/srv/site")),
    )
    assert settings.target("SITE") == PullTarget("site", Path("/srv/site"))
    assert settings.target("nope") is None
    assert settings.bot_service == "bot.service"
    assert settings.proxy_service == "nginx.service"
    assert settings.restart_mode == "exit"
    assert settings.restart_delay == 0.5
    assert settings.pull_timeout == 120.0
    assert settings.admin_role_ids == {111, 222}
    assert settings.admin_role_names == {"Ops", "Site Reliability"}
    assert settings.guild_ids == {999000, 999001}
    assert settings.restart_min_interval == 90.0
    assert settings.role_ids_for("bot_restart") == {333}
    assert settings.role_ids_for("proxy_restart") == {444, 555}
    assert settings.role_ids_for("bot_pull") == {666}
    assert settings.role_ids_for("ops_status") == {111, 222}
    assert settings.has_role_override("bot_pull")
    assert not settings.has_role_override("ops_status")
    assert settings.channel_ids == {777}
    assert settings.audit_channel_id == 888
    assert settings.cooldown("bot_restart") == 300.0
    assert settings.cooldown("proxy_restart") == 0.0
    assert settings.cooldown("bot_pull") == 2.5
    assert set(settings.secrets) == {"token-value", "pw-secret", "db-secret", " fleet secret "}
    assert settings.masked_redis_url == "redis://***@127.0.0.1:6390/2"
    # An HMAC key is used exactly as given, like the daemons do.
    assert settings.control_secret == " fleet secret "
    assert "fleet secret" not in repr(settings)
    assert settings.control_prefix == "prod:control"
    assert settings.fleet_timeout == 45.0
    assert settings.fleet_missing == ()
    assert settings.control_in_process
    assert settings.control_identity == "web-1:bot"
    assert settings.role_ids_for("fleet_restart") == {999}
    assert settings.role_ids_for("fleet_pull") == {111, 222}
    assert settings.cooldown("fleet_pull") == 60.0
    assert settings.cooldown("fleet_restart") == 30.0


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("OPS_PREFIX", "  ", "must not be empty"),
        ("REDIS_URL", "http://localhost", "must start with redis://"),
        ("REDIS_URL", "redis://host:notaport", "not a valid URL"),
        ("OPS_RESTART_MODE", "docker", "must be 'systemd' or 'exit'"),
        ("OPS_ADMIN_ROLE_IDS", "123,admins", "'admins' is not a role ID"),
        ("OPS_ROLE_IDS_BOT_PULL", "-5", "'-5' is not a role ID"),
        ("OPS_CHANNEL_IDS", "1.5", "is not a channel ID"),
        ("OPS_AUDIT_CHANNEL_ID", "ops-log", "is not a channel ID"),
        ("OPS_COOLDOWN_BOT_PULL", "soon", "'soon' is not a number of seconds"),
        ("OPS_COOLDOWN_BOT_RESTART", "-1", "must be between 0 and 3600 seconds"),
        ("OPS_COOLDOWN_PROXY_RESTART", "nan", "must be between"),
        ("OPS_PULL_TIMEOUT", "0", "must be between 1 and 3600 seconds"),
        ("OPS_FLEET_TIMEOUT", "0.2", "must be between 1 and 3600 seconds"),
        ("OPS_CONTROL_PREFIX", "sg control", "must be 1-64 of"),
        ("OPS_CONTROL_IN_PROCESS", "maybe", "must be 1 or 0"),
        ("OPS_CONTROL_IN_PROCESS", "1", "needs REDIS_URL and OPS_CONTROL_SECRET"),
        ("OPS_IDENTITY", "-web 1", "must be 1-64 of"),
        ("OPS_RESTART_DELAY", "120", "must be between 0 and 60 seconds"),
        ("OPS_STATE_DIR", "state", "must be an absolute path"),
        ("OPS_REPO_DIR", "./app", "must be an absolute path"),
        ("OPS_BOT_SERVICE", "-H evil", "invalid unit name"),
        ("OPS_PROXY_SERVICE", "nginx*", "globs are not allowed"),
        ("OPS_PROXY_SERVICE", "getty@.service", "needs an instance"),
        ("OPS_PULL_TARGETS", "worker", "is not of the form name=/path"),
        ("OPS_PULL_TARGETS", "worker=relative/dir", "needs an absolute path"),
        ("OPS_PULL_TARGETS", "bot=/srv/other", "set OPS_REPO_DIR"),
        ("OPS_PULL_TARGETS", "a=/x,A=/y", "listed twice"),
        ("OPS_PULL_TARGETS", "we ird=/x", "must be 1-32 of"),
        ("OPS_REDACT_ENV", "NOT-A-NAME", "is not an environment variable name"),
    ],
)
def test_a_bad_value_is_named(variable: str, value: str, fragment: str) -> None:
    [problem] = problems(**{variable: value})
    assert problem.startswith(f"{variable}: ")
    assert fragment in problem


def test_every_problem_is_reported_at_once() -> None:
    found = problems(OPS_COOLDOWN_BOT_PULL="x", OPS_RESTART_MODE="y", OPS_CHANNEL_IDS="z")
    assert [p.split(":")[0] for p in found] == [
        "OPS_RESTART_MODE",
        "OPS_COOLDOWN_BOT_PULL",
        "OPS_CHANNEL_IDS",
    ]
    assert str(SettingsError(found)).count("\n") == 2


def test_blank_values_mean_unset() -> None:
    settings = load(OPS_PROXY_SERVICE="  ", REDIS_URL="", OPS_ADMIN_ROLE_IDS=" , ")
    assert settings.proxy_service is None
    assert settings.redis_url is None
    assert settings.admin_role_ids == frozenset()


def test_state_dir_precedence() -> None:
    env = {"HOME": "/home/ops"}
    assert default_state_dir(env) == Path("/home/ops/.local/state/admin-ops")
    env["XDG_STATE_HOME"] = "/xdg"
    assert default_state_dir(env) == Path("/xdg/admin-ops")
    env["STATE_DIRECTORY"] = "/var/lib/admin-ops:/var/lib/other"
    assert default_state_dir(env) == Path("/var/lib/admin-ops")
    assert load(**env, OPS_STATE_DIR="/explicit").state_dir == Path("/explicit")
    assert load(**env).state_dir == Path("/var/lib/admin-ops")


def test_secrets_come_from_token_redis_url_and_named_variables() -> None:
    settings = load(
        DISCORD_TOKEN="the-token",
        REDIS_URL="redis://127.0.0.1:6379/0?password=query-pass",
        OPS_REDACT_ENV="API_KEY, SHORT, UNSET",
        API_KEY="key-value",
        SHORT="ab",
        OPS_CONTROL_SECRET="fleet-hmac-secret",
    )
    assert set(settings.secrets) == {"the-token", "query-pass", "key-value", "fleet-hmac-secret"}
    assert "query-pass" not in (settings.masked_redis_url or "")


def test_secrets_stay_out_of_repr_and_settings_are_frozen() -> None:
    settings = load(DISCORD_TOKEN="very-secret-token", REDIS_URL="redis://:pw-pw@h:1/0")
    assert "very-secret-token" not in repr(settings)
    assert "pw-pw" not in repr(settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.command_prefix = "?"  # type: ignore[misc]


def test_imports_only_the_standard_library() -> None:
    """The fleet CLI reuses settings on hosts without discord.py or redis-py."""
    script = (
        "import json, sys\n"
        "sys.modules['discord'] = None\n"
        "sys.modules['redis'] = None\n"
        "before = set(sys.modules)\n"
        "import core.settings\n"
        "new = sorted(set(sys.modules) - before)\n"
        "print(json.dumps(new))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(out.stdout)
    ours = {
        "core",
        "core.settings",
        "core.env_reader",
        "core.hardening",
        "core.journal",
        "core.names",
        "core.ops_exec",
    }
    foreign = [
        m for m in loaded if m not in ours and m.split(".")[0] not in sys.stdlib_module_names
    ]
    assert foreign == []
    assert "core.settings" in loaded


def test_problems_never_quote_a_secret() -> None:
    token = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"
    found = problems(
        DISCORD_TOKEN=token,
        OPS_ADMIN_ROLE_IDS=token,  # pasted into the wrong variable
        OPS_PULL_TARGETS="site=https://deploy:ghp_abcdefghijklmnopqrstuvwxyz0123456789@git.x/y",
        OPS_CONTROL_SECRET="control-secret-value",
        OPS_CHANNEL_IDS="control-secret-value",
    )
    text = "\n".join(found)
    assert any(p.startswith("OPS_ADMIN_ROLE_IDS") for p in found)
    assert any(p.startswith("OPS_CHANNEL_IDS") for p in found)
    assert "GaBcDe" not in text
    assert "ghp_" not in text
    assert "control-secret-value" not in text


def test_ops_systemctl_must_split_like_a_shell_would() -> None:
    [problem] = problems(OPS_SYSTEMCTL='sudo -n "systemctl')
    assert problem.startswith("OPS_SYSTEMCTL")
    assert "split" in problem
    assert load(OPS_SYSTEMCTL="sudo -n /usr/bin/systemctl")


# --------------------------------------------------------------------------------------------
# One parser per variable: the bot and the daemon read their shared variables the same way
# --------------------------------------------------------------------------------------------

DAEMON_BASE = {**BASE, "OPS_CONTROL_SECRET": "fleet-hmac-secret"}


def daemon(**env: str) -> DaemonSettings:
    return DaemonSettings.from_env({**DAEMON_BASE, **env})


def daemon_problems(**env: str) -> tuple[str, ...]:
    with pytest.raises(SettingsError) as caught:
        daemon(**env)
    return caught.value.problems


def test_shared_variables_mean_the_same_to_the_bot_and_the_daemon() -> None:
    env = {
        "OPS_REPO_DIR": "/srv/bot",
        "OPS_PULL_TARGETS": "Worker=/srv/worker",
        "OPS_CONTROL_PREFIX": "prod:control",
        "OPS_IDENTITY": "web-1",
        "OPS_PULL_TIMEOUT": "90",
        "OPS_GIT_ENV_PASSTHROUGH": "SSH_AUTH_SOCK, https_proxy",
        "OPS_STATE_DIR": "/var/lib/ops",
        "OPS_RESTART_DELAY": "2",
        "REDIS_URL": "redis://:pw-secret@10.0.0.5:6379/0",
    }
    bot = load(**env, OPS_CONTROL_SECRET="fleet-hmac-secret")
    host = daemon(**env)
    assert host.pull_targets == {t.name: str(t.path) for t in bot.pull_targets}
    assert host.pull_targets == {"bot": "/srv/bot", "worker": "/srv/worker"}
    assert host.prefix == bot.control_prefix == "prod:control"
    assert host.identity == bot.control_identity == "web-1"
    assert host.pull_timeout == bot.pull_timeout == 90.0
    assert host.env_passthrough == bot.git_env_passthrough == ("SSH_AUTH_SOCK", "https_proxy")
    assert host.state_dir == bot.state_dir == Path("/var/lib/ops")
    assert host.restart_delay == bot.restart_delay == 2.0
    assert host.redis_url == bot.redis_url
    assert "pw-secret" in host.secrets
    assert "fleet-hmac-secret" in host.secrets


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("OPS_PULL_TARGETS", "bot=/srv/other", "set OPS_REPO_DIR"),
        ("OPS_PULL_TARGETS", "worker=relative", "needs an absolute path"),
        ("OPS_PULL_TARGETS", "we ird=/x", "must be 1-32 of"),
        ("OPS_CONTROL_PREFIX", "sg control", "must be 1-64 of"),
        ("OPS_IDENTITY", "-web 1", "must be 1-64 of"),
        ("OPS_PULL_TIMEOUT", "0", "must be between 1 and 3600 seconds"),
        ("OPS_GIT_ENV_PASSTHROUGH", "NOT-A-NAME", "is not an environment variable name"),
        ("OPS_GIT_ENV_PASSTHROUGH", "DISCORD_TOKEN", "never handed to git"),
        ("REDIS_URL", "http://localhost", "must start with redis://"),
    ],
)
def test_a_shared_variable_is_refused_alike_by_both(
    variable: str, value: str, fragment: str
) -> None:
    [from_bot] = problems(**{variable: value})
    [from_daemon] = daemon_problems(**{variable: value})
    assert from_bot == from_daemon
    assert from_bot.startswith(f"{variable}: ")
    assert fragment in from_bot


def test_a_variable_named_for_redaction_is_never_handed_to_git() -> None:
    [problem] = problems(OPS_REDACT_ENV="DB_PASSWORD", OPS_GIT_ENV_PASSTHROUGH="DB_PASSWORD")
    assert problem.startswith("OPS_GIT_ENV_PASSTHROUGH: DB_PASSWORD holds a secret")


def test_daemon_units_accept_commas_and_spaces_and_need_a_secret() -> None:
    host = daemon(OPS_RESTART_UNITS="bot, proxy.service nginx", OPS_OWN_UNITS="bot")
    assert host.restart_units == ("bot.service", "proxy.service", "nginx.service")
    assert host.own_units == ("bot.service",)
    [problem] = problems_of_daemon_without_secret()
    assert problem.startswith("OPS_CONTROL_SECRET: ")


def problems_of_daemon_without_secret() -> tuple[str, ...]:
    with pytest.raises(SettingsError) as caught:
        DaemonSettings.from_env(BASE)
    return caught.value.problems


def test_in_process_daemon_settings_come_from_the_bots() -> None:
    bot = load(
        REDIS_URL="redis://127.0.0.1:6379/0",
        OPS_CONTROL_SECRET="fleet-hmac-secret",
        OPS_BOT_SERVICE="admin-ops-bot",
        OPS_PROXY_SERVICE="proxy",
        OPS_PULL_TARGETS="site=/srv/site",
    )
    host = bot.daemon_settings()
    assert host is not None
    assert host.identity.endswith(":admin-ops-bot")
    assert host.restart_units == ("admin-ops-bot.service", "proxy.service")
    assert host.own_units == ("admin-ops-bot.service",)
    assert set(host.pull_targets) == {"bot", "site"}
    assert load().daemon_settings() is None
    assert "fleet-hmac-secret" not in repr(host)


def test_secrets_can_come_from_systemd_credentials(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "discord-token").write_text("token-from-credential\n")
    (credentials / "control-secret").write_text("secret-from-credential")
    (credentials / "redis-url").write_text("redis://:cred-pw@10.0.0.5:6379/0\n")
    settings = load(CREDENTIALS_DIRECTORY=str(credentials))
    assert settings.discord_token == "token-from-credential"
    assert settings.control_secret == "secret-from-credential"
    assert settings.redis_url == "redis://:cred-pw@10.0.0.5:6379/0"
    assert {"token-from-credential", "secret-from-credential", "cred-pw"} <= set(settings.secrets)
    host = DaemonSettings.from_env({**BASE, "CREDENTIALS_DIRECTORY": str(credentials)})
    assert host.secret == "secret-from-credential"
    # An explicit variable wins over the credential.
    assert load(CREDENTIALS_DIRECTORY=str(credentials), DISCORD_TOKEN="env").discord_token == "env"


def test_role_names_need_the_servers_they_count_in() -> None:
    # Anyone who adds a public bot to a server of their own can create a role called "ops".
    [problem] = problems(OPS_ADMIN_ROLE_NAMES="ops")
    assert problem.startswith("OPS_ADMIN_ROLE_NAMES: ")
    assert "OPS_GUILD_IDS" in problem
    assert load(OPS_ADMIN_ROLE_NAMES="ops", OPS_GUILD_IDS="123").guild_ids == {123}
    [bad] = problems(OPS_GUILD_IDS="my-server")
    assert bad.startswith("OPS_GUILD_IDS: 'my-server' is not a server ID")


def test_restart_min_interval_is_shared_by_bot_and_daemon() -> None:
    assert load().restart_min_interval == 60.0
    assert daemon(OPS_RESTART_MIN_INTERVAL="0").restart_min_interval == 0.0
    [problem] = daemon_problems(OPS_RESTART_MIN_INTERVAL="-1")
    assert problem.startswith("OPS_RESTART_MIN_INTERVAL: must be between 0 and 3600")


def test_lock_dir_is_shared_by_bot_and_daemon_and_defaults_to_each_state_dir() -> None:
    """One lock for the bot's user and the daemon's: OPS_LOCK_DIR, read by one parser."""
    shared = {"OPS_LOCK_DIR": "/run/admin-ops", "REDIS_URL": "redis://127.0.0.1:6379/0"}
    bot = load(**shared, OPS_STATE_DIR="/var/lib/admin-ops", OPS_CONTROL_SECRET="fleet-hmac")
    host = daemon(**shared, OPS_STATE_DIR="/var/lib/admin-ops-control")
    assert bot.lock_dir == host.lock_dir == Path("/run/admin-ops")
    in_process = bot.daemon_settings()
    assert in_process is not None
    assert in_process.lock_dir == Path("/run/admin-ops")
    # Unset: each process's own state dir, as before the setting existed.
    assert load(STATE_DIRECTORY="/var/lib/admin-ops").lock_dir == Path("/var/lib/admin-ops")
    assert daemon(OPS_STATE_DIR="/var/lib/ctl").lock_dir == Path("/var/lib/ctl")
    [from_bot] = problems(OPS_LOCK_DIR="run/admin-ops")
    [from_daemon] = daemon_problems(OPS_LOCK_DIR="run/admin-ops")
    assert from_bot == from_daemon == "OPS_LOCK_DIR: must be an absolute path, got 'run/admin-ops'"
