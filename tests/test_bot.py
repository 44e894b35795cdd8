"""bot.py: ``--check`` on good and bad configurations, the missing-token exit, the bot's set-up."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import discord
import pytest

from bot import OpsBot
from core.settings import Settings
from tests.support import ROOT
from tests.support.fake_discord_bot import discord_site_env
from tests.support.git import git
from tests.support.redis_proc import free_port


def run_bot(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python bot.py args`` with only ``env`` (plus PATH and HOME) in its environment."""
    base = {
        key: os.environ[key] for key in ("PATH", "HOME", "GIT_CONFIG_GLOBAL") if key in os.environ
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "bot.py"), *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def systemctl_stub(tmp_path: Path) -> Path:
    path = tmp_path / "systemctl"
    path.write_text("#!/bin/sh\necho active\n")
    path.chmod(0o755)
    return path


def test_check_passes_on_a_good_configuration(
    git_repos: Any, redis_server: Any, systemctl_stub: Path, tmp_path: Path
):
    token = "good-config-token-0123456789"
    result = run_bot(
        {
            "DISCORD_TOKEN": token,
            "OPS_REPO_DIR": str(git_repos.clone),
            "OPS_SYSTEMCTL": str(systemctl_stub),
            "OPS_BOT_SERVICE": "admin-ops-bot",
            "OPS_PROXY_SERVICE": "nginx",
            "REDIS_URL": redis_server.url,
            "OPS_STATE_DIR": str(tmp_path / "state"),
            "OPS_GUILD_IDS": "111111111111111111,222222222222222222",
        },
        "--check",
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(line.startswith("✅ ") for line in lines), lines
    text = result.stdout
    assert "DISCORD_TOKEN is set" in text
    assert f"target bot ({git_repos.clone}): git checkout at" in text
    assert "tracking origin/main" in text
    assert f"systemctl program: {systemctl_stub}" in text
    assert "OPS_BOT_SERVICE: admin-ops-bot.service (active)" in text
    assert "OPS_PROXY_SERVICE: nginx.service (active)" in text
    assert "answers" in text
    assert "is writable" in text
    assert "fleet: !fleet_* commands off (they need OPS_CONTROL_SECRET)" in text
    assert (
        "✅ OPS_GUILD_IDS: commands work only in servers 111111111111111111, 222222222222222222,"
        " where they are also slash commands"
    ) in lines
    assert token not in text
    assert len(lines) == 10


def test_check_shows_the_fleet_and_what_git_also_gets(
    git_repos: Any, redis_server: Any, systemctl_stub: Path, tmp_path: Path
):
    secret = "fleet-check-secret-0123456789"
    agent = "/run/user/1000/agent.sock"
    result = run_bot(
        {
            "DISCORD_TOKEN": "fleet-config-token-0123456789",
            "OPS_REPO_DIR": str(git_repos.clone),
            "OPS_SYSTEMCTL": str(systemctl_stub),
            "REDIS_URL": redis_server.url,
            "OPS_STATE_DIR": str(tmp_path / "state"),
            "OPS_CONTROL_SECRET": secret,
            "OPS_CONTROL_IN_PROCESS": "1",
            "OPS_IDENTITY": "web-1:bot",
            "OPS_GIT_ENV_PASSTHROUGH": "SSH_AUTH_SOCK,HTTPS_PROXY",
            "SSH_AUTH_SOCK": agent,
        },
        "--check",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(
        line.startswith("✅ fleet: !fleet_* commands configured (key prefix sg:control, ")
        and line.endswith("; in-process daemon joins as web-1:bot")
        for line in lines
    ), lines
    assert (
        "✅ OPS_GIT_ENV_PASSTHROUGH: git also gets SSH_AUTH_SOCK, HTTPS_PROXY "
        "(not set in this environment: HTTPS_PROXY)"
    ) in lines
    assert agent not in result.stdout  # names only
    assert secret not in result.stdout + result.stderr


def test_check_fails_on_a_bad_configuration_and_masks_secrets(
    git_repos: Any, tmp_path: Path, isolated_home: Path
):
    not_a_repo = tmp_path / "plain-dir"
    not_a_repo.mkdir()
    no_upstream = tmp_path / "no-upstream"
    no_upstream.mkdir()
    git(no_upstream, "init", "-q", "-b", "main")
    git(no_upstream, "commit", "-q", "--allow-empty", "-m", "only commit")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    result = run_bot(
        {
            "OPS_REPO_DIR": str(not_a_repo),
            "OPS_PULL_TARGETS": f"site={no_upstream}",
            "OPS_SYSTEMCTL": str(tmp_path / "missing" / "systemctl"),
            "OPS_PROXY_SERVICE": "nginx",
            "REDIS_URL": f"redis://:hunter2-redis@127.0.0.1:{free_port()}/0",
            "OPS_STATE_DIR": str(blocker / "state"),
        },
        "--check",
    )
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("❌ ")]
    text = "\n".join(failed)
    assert "DISCORD_TOKEN is not set" in text
    assert f"target bot ({not_a_repo}): not a git checkout" in text
    assert f"target site ({no_upstream}): the current branch has no upstream" in text
    assert "systemctl program" in text
    assert "Redis at redis://***@127.0.0.1:" in text
    assert f"state dir {blocker / 'state'} is not writable" in text
    # The unit lines fail too: systemctl could not run, so their state is unknown.
    assert "OPS_PROXY_SERVICE" in text
    assert len(failed) == 7
    assert "hunter2-redis" not in result.stdout + result.stderr


def test_check_names_an_invalid_setting():
    result = run_bot({"OPS_COOLDOWN_BOT_PULL": "soon", "OPS_PROXY_SERVICE": "-H x"}, "--check")
    assert result.returncode == 1
    assert sorted(result.stdout.splitlines()) == [
        "❌ OPS_COOLDOWN_BOT_PULL: 'soon' is not a number of seconds",
        "❌ OPS_PROXY_SERVICE: invalid unit name '-H x': must not start with '-'",
    ]


def test_without_a_token_the_bot_says_what_to_set_and_exits_2(tmp_path: Path):
    result = run_bot({"OPS_STATE_DIR": str(tmp_path / "state")})
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("DISCORD_TOKEN is not set")


def test_an_invalid_setting_stops_the_bot_with_status_2():
    result = run_bot({"DISCORD_TOKEN": "x" * 30, "OPS_RESTART_MODE": "docker"})
    assert result.returncode == 2
    assert "OPS_RESTART_MODE: must be 'systemd' or 'exit'" in result.stderr


async def test_the_bot_mentions_nobody_and_loads_the_cog(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("OPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("REDIS_URL", raising=False)
    bot = OpsBot(Settings.from_env({"OPS_PREFIX": "?", "HOME": str(tmp_path)}))
    assert bot.intents.message_content
    assert bot.intents.members
    assert bot.command_prefix == "?"
    mentions = bot.allowed_mentions
    assert mentions is not None
    assert mentions.to_dict() == discord.AllowedMentions.none().to_dict()
    await bot.setup_hook()
    assert "AdminOps" in bot.cogs
    cog: Any = bot.get_cog("AdminOps")
    assert cog.settings is bot.settings  # read once, by bot.py
    assert {c.name for c in bot.commands} >= {
        "bot_pull",
        "bot_restart",
        "proxy_restart",
        "ops_status",
    }
    await bot.unload_extension("cogs.admin_ops")


def test_check_warns_when_commands_work_in_any_server(
    systemctl_stub: Path, git_repos: Any, tmp_path: Path
):
    result = run_bot(
        {
            "DISCORD_TOKEN": "any-server-token-0123456789",
            "OPS_REPO_DIR": str(git_repos.clone),
            "OPS_SYSTEMCTL": str(systemctl_stub),
            "OPS_STATE_DIR": str(tmp_path / "state"),
        },
        "--check",
    )
    # Advice, not a failure: a private bot in one server may leave it unset.
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if not line.startswith("✅ ")]
    assert warnings == [
        "⚠️ OPS_GUILD_IDS not set: commands work in any server the bot is in, as prefix "
        "commands only: no slash commands (set it to your servers' IDs)"
    ]


def test_check_fails_naming_both_variables_when_role_names_lack_servers(tmp_path: Path):
    result = run_bot(
        {
            "DISCORD_TOKEN": "role-names-token-0123456789",
            "OPS_ADMIN_ROLE_NAMES": "ops",
            "OPS_STATE_DIR": str(tmp_path / "state"),
        },
        "--check",
    )
    assert result.returncode == 1
    [line] = [line for line in result.stdout.splitlines() if "OPS_ADMIN_ROLE_NAMES" in line]
    assert line.startswith("❌ OPS_ADMIN_ROLE_NAMES: ")
    assert "OPS_GUILD_IDS" in line


def test_check_says_the_token_came_from_a_systemd_credential(
    systemctl_stub: Path, git_repos: Any, tmp_path: Path
):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    token = "credential-token-0123456789"
    (credentials / "discord-token").write_text(token + "\n")
    result = run_bot(
        {
            "CREDENTIALS_DIRECTORY": str(credentials),
            "OPS_REPO_DIR": str(git_repos.clone),
            "OPS_SYSTEMCTL": str(systemctl_stub),
            "OPS_STATE_DIR": str(tmp_path / "state"),
            "OPS_GUILD_IDS": "111111111111111111",
        },
        "--check",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✅ DISCORD_TOKEN is set (systemd credential discord-token)" in result.stdout
    assert token not in result.stdout + result.stderr


# --- the running bot keeps its environment to itself -------------------------------------------

CANARY = "canary-bot-token-MTIzNDU2Nzg5"


def as_unprivileged(argv: list[str]) -> list[str]:
    """``argv`` without any capability (root's CAP_SYS_PTRACE reads any process)."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to drop root's capabilities")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--", *argv]


@pytest.fixture
def bot_logging_in(tmp_path: Path) -> Iterator[int]:
    """A real ``python bot.py`` holding a token, waiting for Discord to answer its login (PID).

    Its REST base is a local socket that accepts and never answers, so the bot goes through its
    start-up and then waits in its login, offline.
    """
    with socket.create_server(("127.0.0.1", 0)) as discord_stand_in:
        port = discord_stand_in.getsockname()[1]
        env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ["HOME"],
            "DISCORD_TOKEN": CANARY,
            "OPS_STATE_DIR": str(tmp_path / "state"),
            **discord_site_env(f"http://127.0.0.1:{port}/api/v10"),
        }
        process = subprocess.Popen(
            as_unprivileged([sys.executable, str(ROOT / "bot.py")]),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            discord_stand_in.settimeout(60)
            try:
                connection, _ = discord_stand_in.accept()  # bot.py is past its start-up
            except TimeoutError:
                process.kill()
                pytest.fail(f"bot.py never tried to log in: {process.communicate()[1]!r}")
            with connection:
                yield process.pid
        finally:
            process.kill()
            process.wait(timeout=10)
            if process.stderr is not None:
                process.stderr.close()


def read_as_sibling(path: str) -> str:
    """What an unprivileged process of the same user gets reading ``path``: content or error."""
    reader = (
        f"import sys\ntry:\n    sys.stdout.write(open({path!r}, 'rb').read().decode('latin-1'))\n"
    )
    reader += "except OSError as exc:\n    sys.stdout.write(f'error: {exc.strerror}')\n"
    done = subprocess.run(
        as_unprivileged([sys.executable, "-c", reader]),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def test_the_running_bot_is_undumpable_so_a_sibling_cannot_read_its_token(bot_logging_in: int):
    """A git hook, or any process of the bot's user, walking up to the bot finds nothing."""
    for entry in ("environ", "mem"):
        assert read_as_sibling(f"/proc/{bot_logging_in}/{entry}") == "error: Permission denied"


def test_a_sibling_reads_the_environment_of_a_dumpable_process(tmp_path: Path):
    """The control: the same read works on an ordinary process, so the test above can fail."""
    process = subprocess.Popen(
        as_unprivileged([sys.executable, "-c", "import sys; sys.stdin.read()"]),
        env={"PATH": os.environ["PATH"], "DISCORD_TOKEN": CANARY},
        stdin=subprocess.PIPE,
    )
    try:
        assert CANARY in read_as_sibling(f"/proc/{process.pid}/environ")
    finally:
        process.kill()
        process.wait(timeout=10)
