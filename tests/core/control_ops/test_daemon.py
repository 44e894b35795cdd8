"""The control daemon: in-process daemons against a real Redis, real git and a stand-in systemctl.

Synchronisation is by events, stream reads and files with bounded deadlines, never by sleeping
for a guessed time (see ``tests.support.fleet``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from core.control_ops import (
    INTERRUPTED,
    NOT_ALLOWED,
    ControlDaemon,
    HostResult,
    alive_hosts,
    backoff_delay,
    build_command,
    command_stream_key,
    heartbeat_key,
    publish,
    ran_marker_key,
    results_key,
    sign_fields,
)
from core.settings import DaemonSettings
from tests.support.fleet import (
    DEADLINE,
    SECRET,
    client_for,
    install_systemctl_stand_in,
    lines,
    make_daemon,
    pending_count,
    read_results,
    recorded_calls,
    serving,
    upload_pack_gate,
    wait_until,
    xadd_command,
)
from tests.support.git import GitRepos, git
from tests.support.processes import pid_is_dead, write_script
from tests.support.redis_proc import RedisServer, free_port, start_redis_server


def test_backoff_is_jittered_exponential_and_capped_at_30s() -> None:
    assert backoff_delay(0, rng=lambda: 0.0) == pytest.approx(0.05)
    assert backoff_delay(0, rng=lambda: 1.0) == pytest.approx(0.1)
    assert backoff_delay(3, rng=lambda: 1.0) == pytest.approx(0.8)
    assert backoff_delay(200, rng=lambda: 1.0) == 30.0
    assert 15.0 <= backoff_delay(200) <= 30.0


def test_daemon_constructor_validates_its_allowlist() -> None:
    client = aioredis.Redis()  # never used: construction talks to nobody
    with pytest.raises(ValueError, match="secret"):
        ControlDaemon(client, identity="h", secret="", pull_targets={}, restart_units=())
    with pytest.raises(ValueError, match="unit"):
        ControlDaemon(client, identity="h", secret=SECRET, pull_targets={}, restart_units=["-x"])
    with pytest.raises(ValueError, match="identity"):
        ControlDaemon(client, identity="", secret=SECRET, pull_targets={}, restart_units=())
    daemon = ControlDaemon(
        client,
        identity="h",
        secret=SECRET,
        pull_targets={"bot": "/srv/bot"},
        restart_units=["bot", "proxy"],
        own_units=["bot"],
    )
    assert daemon.restart_units == {"bot.service", "proxy.service"}
    assert daemon.own_units == {"bot.service"}


async def test_forged_expired_and_disallowed_commands_run_nothing(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    git_repos: GitRepos,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="admin_ops.control_ops")
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    fetches, release = upload_pack_gate(tmp_path, git_repos.clone)
    release.touch()  # a pull, if one wrongly ran, would complete (and be counted)
    git_repos.commit_upstream("should not arrive")
    daemon = make_daemon(
        new_client(),
        "guarded",
        key_prefix,
        pull_targets={"bot": git_repos.clone},
        restart_units=["proxy"],
    )

    def sign(op: str, args: list[str], **options: float) -> dict[str, str]:
        return build_command(
            op, args, requested_by="m", secret=SECRET, prefix=key_prefix, **options
        )

    valid = build_command(
        "restart", ["proxy"], requested_by="mallory", secret=SECRET, prefix=key_prefix
    )
    cases: dict[str, tuple[dict[str, str], str]] = {
        "forged": (
            build_command("restart", ["proxy"], requested_by="mallory", secret="not-the-secret"),
            "rejected: bad signature",
        ),
        "tampered": ({**valid, "args": '["sshd"]'}, "rejected: bad signature"),
        "unsigned": (
            {k: v for k, v in sign("pull", []).items() if k != "sig"},
            "rejected: bad signature",
        ),
        "expired": (
            sign("restart", ["proxy"], now=time.time() - 300, ttl=60),
            "rejected: expired",
        ),
        "unit not allowed": (
            sign("restart", ["sshd"]),
            NOT_ALLOWED,
        ),
        "invalid unit": (
            sign("restart", ["-H evil"]),
            NOT_ALLOWED,
        ),
        "target not allowed": (
            sign("pull", ["other"]),
            NOT_ALLOWED,
        ),
        "unknown op": (
            sign("shell", ["rm -rf /"]),
            "refused: unknown op 'shell'",
        ),
    }  # fmt: skip
    async with serving(daemon):
        for fields, _summary in cases.values():
            await xadd_command(redis_client, fields, key_prefix)
        for name, (fields, summary) in cases.items():
            answer = (await read_results(redis_client, fields["id"], ["guarded"], key_prefix))[
                "guarded"
            ]
            assert (answer.ok, answer.ran, answer.summary) == (False, False, summary), name
        assert recorded_calls(record) == []  # no systemctl ran
        assert lines(fetches) == []  # no git fetch ran
        assert await pending_count(redis_client, "guarded", key_prefix) == 0
        # A forged command must not be able to burn the id of a real one.
        forged_id = cases["forged"][0]["id"]
        assert await redis_client.exists(ran_marker_key("guarded", forged_id, key_prefix)) == 0

        # The same daemon still does what it is allowed to do.
        fleet = await publish(
            redis_client, "restart", ["proxy"], requested_by="ops", secret=SECRET, prefix=key_prefix
        )
        assert fleet.ok, fleet
        assert len(recorded_calls(record)) == 1

    logged = caplog.text
    assert "rejected: bad signature: command " + cases["forged"][0]["id"] in logged
    assert "rejected: expired: command " + cases["expired"][0]["id"] in logged
    assert "refused: not allowed on this host" in logged


async def test_two_daemons_sharing_a_checkout_pull_once_and_both_answer(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    git_repos: GitRepos,
) -> None:
    fetches, release = upload_pack_gate(tmp_path, git_repos.clone)
    new_head = git_repos.commit_upstream("fleet deploy")
    bot, worker = (
        make_daemon(new_client(), name, key_prefix, pull_targets={"bot": git_repos.clone})
        for name in ("web-1:bot", "web-1:worker")
    )
    first_answer = asyncio.Event()

    def on_result(result: HostResult) -> None:
        first_answer.set()

    async with serving(bot, worker):
        pulling = asyncio.create_task(
            publish(
                redis_client,
                "pull",
                [],  # the default target, "bot"
                requested_by="test",
                secret=SECRET,
                timeout=DEADLINE,
                on_result=on_result,
                prefix=key_prefix,
            )
        )
        try:
            # One daemon's fetch is held at the gate; the other must answer meanwhile (a skip).
            await asyncio.wait_for(first_answer.wait(), DEADLINE)
            await wait_until(lambda: lines(fetches), "the held fetch")
            release.touch()
            fleet = await asyncio.wait_for(pulling, DEADLINE)
        finally:
            pulling.cancel()

    assert fleet.ok, fleet
    ran = [r for r in fleet.results.values() if r.ran]
    skipped = [r for r in fleet.results.values() if not r.ran]
    assert len(ran) == 1
    assert len(skipped) == 1
    assert ran[0].summary.startswith("Updated "), ran[0].summary
    assert skipped[0].ok
    assert ran[0].host in skipped[0].summary  # the skip names who is pulling
    assert len(lines(fetches)) == 1  # one fetch for the two services
    assert git_repos.head() == new_head


async def test_own_unit_restart_answers_before_requesting_the_restart(
    new_client: Callable[..., aioredis.Redis],
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The stand-in looks at Redis the moment systemd would be asked to restart us.
    probe = f"""
import redis
r = redis.Redis.from_url({redis_server.url!r})
entry["results"] = [
    [k.decode(), [i.decode() for i, _ in r.xrange(k)]]
    for k in r.scan_iter(match={key_prefix + ":results:*"!r})
]
entry["pending"] = r.xpending({command_stream_key(key_prefix)!r}, "web-1:bot")["pending"]
"""
    record = install_systemctl_stand_in(tmp_path, monkeypatch, probe)
    daemon = make_daemon(
        new_client(),
        "web-1:bot",
        key_prefix,
        restart_units=["bot", "proxy"],
        own_units=["bot.service"],
        deferred_restart_delay=0.0,
    )
    async with serving(daemon):
        fleet = await publish(
            redis_client, "restart", ["bot"], requested_by="ops", secret=SECRET, prefix=key_prefix
        )
        assert fleet.ok, fleet
        assert "deferred" in fleet.results["web-1:bot"].summary
        await wait_until(lambda: recorded_calls(record), "the deferred restart")

    [call] = recorded_calls(record)
    assert call["argv"] == ["--no-block", "--no-ask-password", "restart", "--", "bot.service"]
    # When systemctl was called, the answer was already written and the command acknowledged.
    [[key, [entry_id]]] = call["results"]
    assert key == results_key(fleet.command_id, key_prefix)
    assert call["pending"] == 0
    assert call["t"] * 1000 >= int(entry_id.split("-")[0])


async def test_cancel_mid_command_is_a_clean_stop_and_the_command_is_not_rerun(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    git_repos: GitRepos,
) -> None:
    fetches, release = upload_pack_gate(tmp_path, git_repos.clone)
    git_repos.commit_upstream("slow one")
    targets = {"bot": git_repos.clone}
    fields = build_command("pull", ["bot"], requested_by="ops", secret=SECRET, prefix=key_prefix)
    daemon = make_daemon(new_client(), "h1", key_prefix, pull_targets=targets)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.serving.wait(), DEADLINE)
        await xadd_command(redis_client, fields, key_prefix)
        await wait_until(lambda: lines(fetches), "the fetch to start")
    finally:
        task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), DEADLINE)
    # Stopped cleanly: heartbeat gone, the unfinished command neither answered nor acknowledged,
    # and run_exec took the git process group down with it.
    assert await redis_client.exists(heartbeat_key("h1", key_prefix)) == 0
    assert await pending_count(redis_client, "h1", key_prefix) == 1
    assert await redis_client.exists(results_key(fields["id"], key_prefix)) == 0
    marker = await redis_client.get(ran_marker_key("h1", fields["id"], key_prefix))
    assert marker is not None
    assert marker.startswith(b"started:")
    gate_pid = int(lines(fetches)[0])
    await wait_until(lambda: pid_is_dead(gate_pid), "the fetch to be killed")

    release.touch()
    again = make_daemon(new_client(), "h1", key_prefix, pull_targets=targets)
    async with serving(again):
        answer = (await read_results(redis_client, fields["id"], ["h1"], key_prefix))["h1"]
    assert (answer.ok, answer.summary) == (False, INTERRUPTED)
    assert len(lines(fetches)) == 1
    assert await pending_count(redis_client, "h1", key_prefix) == 0


async def test_daemons_reconnect_after_redis_restarts(
    new_client: Callable[..., aioredis.Redis], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="admin_ops.control_ops")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis_server(tmp_path / "redis", port)
    publisher = client_for(url)
    try:
        fleet = [make_daemon(new_client(url), f"r{i}", "restart-test") for i in range(2)]
        async with serving(*fleet):
            before = await publish(
                publisher, "ping", [], requested_by="t", secret=SECRET, prefix="restart-test"
            )
            assert before.ok
            assert len(before.results) == 2

            server.terminate()
            await asyncio.to_thread(server.wait, DEADLINE)
            # A real outage: both daemons notice it and retry against a closed port first.
            await wait_until(lambda: not any(d.serving.is_set() for d in fleet), "the outage")
            # The server comes back empty (no persistence): groups and heartbeats are gone too.
            server = await asyncio.to_thread(start_redis_server, tmp_path / "redis", port)

            async def both_alive() -> bool:
                try:
                    return len(await alive_hosts(publisher, prefix="restart-test")) == 2
                except (OSError, RedisError):
                    return False

            await wait_until(both_alive, "both daemons to heartbeat again")
            after = await publish(
                publisher, "ping", [], requested_by="t", secret=SECRET, prefix="restart-test"
            )
            assert after.ok, after
            assert set(after.results) == {"r0", "r1"}
    finally:
        await publisher.aclose()
        server.terminate()
        server.wait(timeout=DEADLINE)
    # Logged once per state change, not once per retry.
    for name in ("r0", "r1"):
        assert caplog.text.count(f"control daemon {name}: Redis unavailable") == 1
        assert caplog.text.count(f"control daemon {name} serving") == 2


async def test_an_answer_that_could_not_be_written_is_written_after_the_outage(
    tmp_path: Path, git_repos: GitRepos
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis_server(tmp_path / "redis", port)
    # Few retries, so the write fails at once while Redis is down (redis-py retries 10 times).
    client = aioredis.Redis.from_url(url, socket_timeout=5, retry=Retry(NoBackoff(), 1))
    publisher = client_for(url)
    fetches, release = upload_pack_gate(tmp_path, git_repos.clone)
    new_head = git_repos.commit_upstream("lands during an outage")
    daemon = make_daemon(client, "h", "outage", pull_targets={"bot": git_repos.clone})
    fields = build_command("pull", [], requested_by="ops", secret=SECRET, prefix="outage")
    try:
        async with serving(daemon):
            await xadd_command(publisher, fields, "outage")
            await wait_until(lambda: lines(fetches), "the fetch to start")
            server.terminate()
            await asyncio.to_thread(server.wait, DEADLINE)
            release.touch()  # the pull completes while Redis is away
            await wait_until(lambda: git_repos.head() == new_head, "the pull")
            await wait_until(lambda: not daemon.serving.is_set(), "the failed write")
            server = await asyncio.to_thread(start_redis_server, tmp_path / "redis", port)
            # The new server is empty, yet the answer arrives: the daemon kept it.
            reader = client_for(url)
            try:
                answer = (await read_results(reader, fields["id"], ["h"], "outage"))["h"]
            finally:
                await reader.aclose()
    finally:
        await publisher.aclose()
        await client.aclose()
        server.terminate()
        server.wait(timeout=DEADLINE)
    assert (answer.ok, answer.ran) == (True, True), answer.summary
    assert answer.summary.startswith("Updated "), answer.summary
    assert len(lines(fetches)) == 1


async def test_status_reports_commits_unit_states_version_and_uptime(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    git_repos: GitRepos,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install_systemctl_stand_in(tmp_path, monkeypatch)
    daemon = make_daemon(
        new_client(),
        "status-host",
        key_prefix,
        pull_targets={"bot": git_repos.clone},
        restart_units=["proxy"],
    )
    async with serving(daemon):
        fleet = await publish(
            redis_client, "status", [], requested_by="ops", secret=SECRET, prefix=key_prefix
        )
    answer = fleet.results["status-host"]
    assert (answer.ok, answer.ran) == (True, True)
    first, targets, units = answer.summary.splitlines()
    assert first.startswith("admin-ops ")
    assert "daemon up " in first
    assert targets == f"targets: bot {git_repos.head()[:7]}"
    assert units == "units: proxy.service active"


async def test_stopping_right_after_an_answer_is_prompt(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
) -> None:
    # Cancelling just as a daemon sends its next read is where Python 3.11's wait_for (inside
    # redis-py) swallows the cancellation; the daemon must still stop at once, every time.
    for attempt in range(20):
        daemon = make_daemon(new_client(), f"quick-{attempt}", key_prefix)
        task = asyncio.create_task(daemon.run())
        try:
            await asyncio.wait_for(daemon.serving.wait(), DEADLINE)
            await publish(
                redis_client, "ping", [], requested_by="t", secret=SECRET, prefix=key_prefix
            )
            for _ in range(attempt % 4):
                await asyncio.sleep(0)  # vary where in its loop the daemon is cancelled
        finally:
            started = time.monotonic()
            task.cancel()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), DEADLINE)
        assert time.monotonic() - started < 1.0, f"attempt {attempt}"
        assert not await redis_client.exists(heartbeat_key(f"quick-{attempt}", key_prefix))


async def test_an_absurd_validity_is_rejected_and_does_not_stall_the_daemon(
    new_client: Callable[..., aioredis.Redis], redis_client: aioredis.Redis, key_prefix: str
) -> None:
    # Validly signed, but valid for ~300 million years: Redis would refuse the marker's expiry,
    # and the entry, retried forever, would stall every command behind it.
    fields = build_command(
        "restart", ["proxy"], requested_by="ops", secret=SECRET, prefix=key_prefix
    )
    fields["expires_at"] = repr(float(fields["issued_at"]) + 1e16)
    fields["sig"] = sign_fields(fields, SECRET, key_prefix)
    daemon = make_daemon(new_client(), "h1", key_prefix, restart_units=["proxy"])
    async with serving(daemon):
        await xadd_command(redis_client, fields, key_prefix)
        answer = (await read_results(redis_client, fields["id"], ["h1"], key_prefix))["h1"]
        assert (answer.ok, answer.ran) == (False, False)
        assert answer.summary.startswith("rejected: malformed command (validity")
        fleet = await publish(
            redis_client, "ping", [], requested_by="ops", secret=SECRET, prefix=key_prefix
        )
        assert fleet.ok, fleet
    with pytest.raises(ValueError, match="ttl"):
        build_command("ping", [], requested_by="ops", secret=SECRET, prefix=key_prefix, ttl=1e16)


async def test_a_new_daemon_never_replays_history(
    new_client: Callable[..., aioredis.Redis], redis_client: aioredis.Redis, key_prefix: str
) -> None:
    old = build_command("ping", [], requested_by="ops", secret=SECRET, prefix=key_prefix)
    await xadd_command(redis_client, old, key_prefix)  # published before the daemon existed
    daemon = make_daemon(new_client(), "newcomer", key_prefix)
    async with serving(daemon):
        fleet = await publish(
            redis_client, "ping", [], requested_by="ops", secret=SECRET, prefix=key_prefix
        )
        assert fleet.ok, fleet
    # The new command was answered (so the daemon did read the stream); the old one never was.
    assert await redis_client.xlen(results_key(old["id"], key_prefix)) == 0


async def test_own_units_grant_nothing(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    daemon = make_daemon(
        new_client(), "h1", key_prefix, restart_units=["proxy"], own_units=["bot.service"]
    )
    async with serving(daemon):
        fleet = await publish(
            redis_client, "restart", ["bot"], requested_by="ops", secret=SECRET, prefix=key_prefix
        )
    assert fleet.results["h1"].summary == NOT_ALLOWED
    assert recorded_calls(record) == []


# ---------------------------------------------------------------------------------------------
# Settings that reach what the daemon runs
# ---------------------------------------------------------------------------------------------


def settings_for(git_repos: GitRepos, prefix: str, **env: str) -> DaemonSettings:
    """A daemon's settings as its environment gives them, for the test's checkout and prefix."""
    return DaemonSettings.from_env(
        {
            "HOME": os.environ["HOME"],
            "OPS_CONTROL_SECRET": SECRET,
            "OPS_IDENTITY": "set-host",
            "OPS_CONTROL_PREFIX": prefix,
            "OPS_REPO_DIR": str(git_repos.clone),
            **env,
        }
    )


async def test_the_pull_timeout_setting_stops_a_slow_pull(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    git_repos: GitRepos,
) -> None:
    # The upload-pack stand-in holds the fetch for up to 30 s; OPS_PULL_TIMEOUT=1 must stop it.
    fetches, _release = upload_pack_gate(tmp_path, git_repos.clone)
    git_repos.commit_upstream("never arrives")
    before = git_repos.head()
    settings = settings_for(git_repos, key_prefix, OPS_PULL_TIMEOUT="1")
    assert settings.pull_timeout == 1.0
    daemon = ControlDaemon.from_settings(new_client(), settings)
    async with serving(daemon):
        started = time.monotonic()
        fleet = await publish(
            redis_client, "pull", [], requested_by="ops", secret=SECRET, prefix=key_prefix
        )
        took = time.monotonic() - started
    answer = fleet.results["set-host"]
    assert (answer.ok, answer.ran) == (False, True)
    assert answer.summary.startswith("git pull timed out after 1s"), answer.summary
    assert took < 1.0 + 2.0 + 3.0  # the timeout, the kill grace, and room for a slow machine
    [gate_pid] = lines(fetches)
    await wait_until(lambda: pid_is_dead(int(gate_pid)), "the stopped fetch to be gone")
    assert git_repos.head() == before


async def test_the_git_env_passthrough_setting_reaches_git(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    git_repos: GitRepos,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OPS_GIT_ENV_PASSTHROUGH (an ssh-agent's socket, say) reaches the git a fleet pull runs;
    # other variables of the daemon's environment still do not.
    seen = tmp_path / "seen-by-upload-pack"
    wrapper = write_script(
        tmp_path / "recording-upload-pack",
        'echo "agent=${SSH_AUTH_SOCK:-unset} other=${OPS_TEST_NOT_PASSED:-unset}"'
        f' >> "{seen}"\n'
        'exec git upload-pack "$@"\n',
    )
    git(git_repos.clone, "config", "remote.origin.uploadpack", str(wrapper))
    monkeypatch.setenv("SSH_AUTH_SOCK", "/run/user/1000/agent.sock")
    monkeypatch.setenv("OPS_TEST_NOT_PASSED", "kept-from-git")
    new_head = git_repos.commit_upstream("through the agent")
    settings = settings_for(git_repos, key_prefix, OPS_GIT_ENV_PASSTHROUGH="SSH_AUTH_SOCK")
    async with serving(ControlDaemon.from_settings(new_client(), settings)):
        fleet = await publish(
            redis_client, "pull", ["bot"], requested_by="ops", secret=SECRET, prefix=key_prefix
        )
    assert fleet.ok, fleet
    assert seen.read_text() == "agent=/run/user/1000/agent.sock other=unset\n"
    assert git_repos.head() == new_head


async def test_daemon_settings_become_the_daemons_allow_list_and_redactions(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    git_repos: GitRepos,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A value named in OPS_REDACT_ENV is redacted from the answers, like the shared secret.
    install_systemctl_stand_in(tmp_path, monkeypatch)
    worker = tmp_path / "worker"
    settings = settings_for(
        git_repos,
        key_prefix,
        OPS_PULL_TARGETS=f"Worker={worker}",
        OPS_RESTART_UNITS="proxy",
        OPS_OWN_UNITS="proxy",
        OPS_REDACT_ENV="API_KEY",
        API_KEY="proxy.service",  # a "secret" that the status answer would show
    )
    daemon = ControlDaemon.from_settings(new_client(), settings)
    assert daemon.pull_targets == {"bot": str(git_repos.clone), "worker": str(worker)}
    assert daemon.restart_units == daemon.own_units == {"proxy.service"}
    async with serving(daemon):
        fleet = await publish(
            redis_client, "status", [], requested_by="ops", secret=SECRET, prefix=key_prefix
        )
    summary = fleet.results["set-host"].summary
    assert summary.endswith("\nunits: *** active"), summary
