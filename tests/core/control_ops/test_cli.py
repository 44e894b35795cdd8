"""``python -m core.control_ops``: settings from the environment, a daemon process, the table."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.control_ops import (
    INTERRUPTED,
    NOT_ALLOWED,
    ConfigError,
    FleetResult,
    HostResult,
    Published,
    build_command,
    daemon_settings_from_env,
    heartbeat_key,
    main,
    results_key,
)
from core.control_ops.cli import LiveTable
from core.control_ops.wire import heartbeat_value
from core.settings import SettingsError
from tests.support.fleet import (
    DEADLINE,
    SECRET,
    heartbeat_fields,
    kill_orphaned_group,
    lines,
    make_daemon,
    next_command_id,
    pending_count,
    plant_answer,
    plant_heartbeat,
    read_results,
    recorded_calls,
    run_cli,
    serving,
    signed_ghost,
    start_daemon_process,
    stop_process,
    systemctl_stand_in,
    upload_pack_gate,
    wait_until,
    xadd_command,
)
from tests.support.git import GitRepos
from tests.support.redis_proc import RedisServer


def test_daemon_settings_from_env() -> None:
    settings = daemon_settings_from_env(
        {
            "OPS_CONTROL_SECRET": SECRET,
            "OPS_IDENTITY": "web-1:bot",
            # The target "bot" is OPS_REPO_DIR, for the daemon as for the bot.
            "OPS_REPO_DIR": "/srv/bot",
            "OPS_PULL_TARGETS": "site=/srv/site",
            "OPS_RESTART_UNITS": "bot proxy.service",
            "OPS_OWN_UNITS": "bot",
        }
    )
    assert settings.identity == "web-1:bot"
    assert settings.pull_targets == {"bot": "/srv/bot", "site": "/srv/site"}
    assert settings.restart_units == ("bot.service", "proxy.service")
    assert settings.own_units == ("bot.service",)
    assert settings.prefix == "sg:control"
    assert daemon_settings_from_env({"OPS_CONTROL_SECRET": SECRET}).identity  # the hostname
    for env, variable in (
        ({}, "OPS_CONTROL_SECRET"),
        ({"OPS_CONTROL_SECRET": "  "}, "OPS_CONTROL_SECRET"),
        ({"OPS_CONTROL_SECRET": SECRET, "OPS_RESTART_UNITS": "-H evil"}, "OPS_RESTART_UNITS"),
        ({"OPS_CONTROL_SECRET": SECRET, "OPS_OWN_UNITS": "getty@.service"}, "OPS_OWN_UNITS"),
        ({"OPS_CONTROL_SECRET": SECRET, "OPS_PULL_TARGETS": "bot"}, "OPS_PULL_TARGETS"),
        ({"OPS_CONTROL_SECRET": SECRET, "OPS_PULL_TARGETS": "bot=/srv/bot"}, "OPS_PULL_TARGETS"),
        ({"OPS_CONTROL_SECRET": SECRET, "OPS_IDENTITY": "a b"}, "OPS_IDENTITY"),
    ):
        with pytest.raises(ConfigError, match=variable):
            daemon_settings_from_env(env)
    assert ConfigError is SettingsError  # one settings error for the bot and the daemon


def test_cli_refuses_to_start_without_secret_or_with_a_bad_unit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["daemon"], env={"OPS_RESTART_UNITS": "proxy"}) == 2
    assert "OPS_CONTROL_SECRET" in capsys.readouterr().err
    assert main(["daemon"], env={"OPS_CONTROL_SECRET": SECRET, "OPS_RESTART_UNITS": "a*"}) == 2
    assert "OPS_RESTART_UNITS" in capsys.readouterr().err


async def test_daemon_process_killed_mid_command_never_runs_it_twice(
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    git_repos: GitRepos,
) -> None:
    stand_in, record = systemctl_stand_in(tmp_path)
    fetches, _release = upload_pack_gate(tmp_path, git_repos.clone)
    git_repos.commit_upstream("interrupted deploy")
    identity = "sub-host"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ["HOME"],
        "GIT_CONFIG_GLOBAL": os.environ["GIT_CONFIG_GLOBAL"],
        "GIT_CONFIG_NOSYSTEM": "1",
        "REDIS_URL": redis_server.url,
        "OPS_CONTROL_SECRET": SECRET,
        "OPS_IDENTITY": identity,
        "OPS_CONTROL_PREFIX": key_prefix,
        "OPS_REPO_DIR": str(git_repos.clone),
        "OPS_RESTART_UNITS": "a.service,b.service",
        "OPS_SYSTEMCTL": str(stand_in),
    }
    log = tmp_path / "daemon.log"
    heartbeat = heartbeat_key(identity, key_prefix)
    pull = build_command("pull", ["bot"], requested_by="ops", secret=SECRET, prefix=key_prefix)

    first = start_daemon_process(env, log)
    try:
        await wait_until(lambda: redis_client.exists(heartbeat), "the daemon's heartbeat")
        await xadd_command(redis_client, pull, key_prefix)
        await wait_until(lambda: lines(fetches), "the fetch to start")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=DEADLINE)
    finally:
        stop_process(first)
        # The killed daemon's git is still blocked at the gate: end it (we started it).
        for pid in lines(fetches):
            kill_orphaned_group(int(pid))

    # While it is down: one command still valid when it returns, one that will have expired.
    valid = build_command(
        "restart", ["a"], requested_by="ops", secret=SECRET, prefix=key_prefix, ttl=120
    )
    stale = build_command(
        "restart",
        ["b"],
        requested_by="ops",
        secret=SECRET,
        prefix=key_prefix,
        now=time.time() - 100,
        ttl=60,
    )
    await xadd_command(redis_client, valid, key_prefix)
    await xadd_command(redis_client, stale, key_prefix)

    second = start_daemon_process(env, log)
    try:
        answers = {
            name: (await read_results(redis_client, fields["id"], [identity], key_prefix))[identity]
            for name, fields in (("pull", pull), ("valid", valid), ("stale", stale))
        }
        assert answers["pull"].summary == INTERRUPTED
        assert not answers["pull"].ok
        assert (answers["valid"].ok, answers["valid"].summary) == (True, "restarted a.service")
        assert (answers["stale"].ok, answers["stale"].summary) == (False, "rejected: expired")
        assert [c["argv"][-1] for c in recorded_calls(record)] == ["a.service"]
        assert len(lines(fetches)) == 1  # the interrupted pull never ran again

        # A replay of the same signed entry is answered, not run.
        await redis_client.delete(results_key(pull["id"], key_prefix))
        await xadd_command(redis_client, pull, key_prefix)
        replay = (await read_results(redis_client, pull["id"], [identity], key_prefix))[identity]
        assert replay.summary == "already handled; not run again"
        assert len(lines(fetches)) == 1
        assert await pending_count(redis_client, identity, key_prefix) == 0

        # SIGTERM is a clean stop: exit 0 and the heartbeat is deleted.
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=DEADLINE) == 0, log.read_text()
        assert await redis_client.exists(heartbeat) == 0
    finally:
        stop_process(second)


async def test_cli_publish_prints_a_table_and_exits_nonzero_on_failure(
    new_client: Callable[..., aioredis.Redis],
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:
    env = {
        "REDIS_URL": redis_server.url,
        "OPS_CONTROL_SECRET": SECRET,
        "OPS_CONTROL_PREFIX": key_prefix,
    }
    async with serving(make_daemon(new_client(), "cli-host", key_prefix)):
        code, out = await run_cli("publish", "ping", env=env)
        assert code == 0, out
        assert "cli-host" in out
        assert "pong" in out
        assert "1/1 hosts ok" in out

        code, out = await run_cli("publish", "restart", "sshd", env=env)
        assert code == 1, out
        assert "FAILED" in out
        assert NOT_ALLOWED in out

    code, out = await run_cli("publish", "ping", "--timeout", "1", env=env)
    assert code == 1, out
    assert "no hosts alive" in out

    code, out = await run_cli("publish", "ping", env={**env, "OPS_CONTROL_SECRET": ""})
    assert code == 2
    assert "OPS_CONTROL_SECRET" in out


async def answer_as(url: str, prefix: str, host: str, summary: str) -> None:
    """Stand in for ``host`` (it holds the secret): answer the next command ok, signed."""
    client = aioredis.Redis.from_url(url, socket_timeout=DEADLINE + 5)
    try:
        command_id = await next_command_id(client, prefix)
        await plant_answer(client, command_id, prefix, HostResult(host, True, True, summary, 0.01))
    finally:
        await client.aclose()


# OSC 52: "write this (base64) to the clipboard", in its 7-bit and its C1 form.
OSC52 = "\x1b]52;c;cHduZWQ=\x07"
OSC52_C1 = "\x9d52;c;cHduZWQ=\x9c"


def assert_terminal_safe(out: str) -> None:
    """No escape sequence can start: no ESC, no other C0 control but newline, no C1 control.

    (The text of a C1-introduced sequence may remain, as inert characters.)
    """
    assert "\x1b" not in out
    assert not any("\x80" <= ch <= "\x9f" or (ch < " " and ch not in "\n\t") for ch in out)


async def test_cli_shows_nothing_from_redis_raw_in_its_header_rows_or_footer(
    redis_server: RedisServer, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    # Host names and summaries come from Redis: whoever can write there could write the
    # operator's clipboard (OSC 52), retitle (OSC 0) or clear (CSI) the terminal through the
    # header, a row or the footer. Names that are no identity are never shown at all (even
    # when signed with the secret); summaries of real hosts are shown cleaned.
    await plant_heartbeat(redis_client, f"{OSC52}web-3", key_prefix, "{}")
    evil = f"evil{OSC52_C1}\x1b[2J"
    await plant_heartbeat(
        redis_client, evil, key_prefix, heartbeat_value(heartbeat_fields(evil), SECRET)
    )
    await signed_ghost(redis_client, "web-1", key_prefix)  # answered by the stand-in below
    await signed_ghost(redis_client, "web-2", key_prefix)  # silent
    env = {
        "REDIS_URL": redis_server.url,
        "OPS_CONTROL_SECRET": SECRET,
        "OPS_CONTROL_PREFIX": key_prefix,
    }
    summary = f"pong {OSC52}\x1b]0;pwned\x07\x1b[31mred\x1b[0m"
    stand_in = asyncio.create_task(answer_as(redis_server.url, key_prefix, "web-1", summary))
    code, out = await run_cli("publish", "ping", "--timeout", "2", env=env)
    await asyncio.wait_for(stand_in, DEADLINE)
    assert code == 1, out
    assert_terminal_safe(out)
    assert "pwned" not in out
    shown = out.splitlines()
    assert "expecting 2 host(s): web-1, web-2" in shown
    assert any(line.startswith("web-1 ") and line.endswith("  pong red") for line in shown)
    assert any(line.startswith("web-2 ") and "SILENT" in line for line in shown)
    assert "ignored as untrusted (forged, stale, oversized or unexpected): " in out
    assert "heartbeat: bad host name 2" in out
    assert shown[-1].startswith("1/2 hosts ok in ")
    assert shown[-1].endswith(" s; silent: web-2")


def test_the_table_cleans_what_it_is_handed_in_header_rows_and_footer() -> None:
    # The terminal layer cleans on its own too, whatever publish let through.
    hosts = [f"{OSC52}web-1", f"web-2{OSC52_C1}", "web-3\x1b[2J"]
    out = io.StringIO()
    table = LiveTable(out, secrets=["hunter2-secret"])
    table.header(Published("c1", "ping", (), frozenset(hosts)))
    failed = HostResult(hosts[0], False, True, f"{OSC52}hunter2-secret\nline 2", 0.1)
    table.row(failed)
    table.footer(FleetResult("c1", {hosts[0]: failed}, frozenset(hosts[1:]), frozenset(hosts)))
    text = out.getvalue()
    assert_terminal_safe(text)
    assert "hunter2-secret" not in text
    assert "cHduZWQ" not in text.splitlines()[1].split("web-2")[0]  # 7-bit OSC 52 gone whole
    assert "expecting 3 host(s): web-1, web-3, web-252;c;cHduZWQ=" in text
    assert text.splitlines()[-1].endswith("; failed: web-1; silent: web-252;c;cHduZWQ=, web-3")
