"""Fleet control over Redis Streams: real Redis, real git, real processes (one daemon a subprocess).

Synchronisation is by events, stream reads and files with bounded deadlines, never by sleeping
for a guessed time: a stand-in ``systemctl`` and an upload-pack wrapper record what ran into
files, and the tests read the result streams the daemons answer on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from core.control_ops import (
    INTERRUPTED,
    NOT_ALLOWED,
    CommandRejected,
    ConfigError,
    ControlDaemon,
    FleetResult,
    HostResult,
    Published,
    alive_hosts,
    backoff_delay,
    build_command,
    canonical_payload,
    command_stream_key,
    daemon_settings_from_env,
    heartbeat_key,
    hosts_index_key,
    main,
    parse_result_fields,
    publish,
    ran_marker_key,
    results_key,
    sign_fields,
    verify_command,
)
from tests.support.git import GitRepos, git
from tests.support.processes import pid_is_dead, write_script
from tests.support.redis_proc import RedisServer, free_port, start_redis_server

ROOT = Path(__file__).resolve().parent.parent.parent
SECRET = "fleet-test-secret-7f3a"
DEADLINE = 10.0  # generous bound for anything a test waits on; tests finish far sooner
PY = sys.executable


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def client_for(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_timeout=5)


async def wait_until(predicate: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    """Poll a cheap condition (a file, a key) until it holds; fail with ``what`` at the deadline."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # a poll interval, not a guess at how long something takes


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def read_results(
    client: aioredis.Redis, command_id: str, hosts: Iterable[str], prefix: str
) -> dict[str, HostResult]:
    """Block on the result stream until every host in ``hosts`` answered (first answer wins)."""
    wanted = set(hosts)
    got: dict[str, HostResult] = {}
    last = "0"
    end = time.monotonic() + DEADLINE
    while not wanted <= got.keys():
        assert time.monotonic() < end, f"no answer from {sorted(wanted - got.keys())}"
        reply = await client.xread({results_key(command_id, prefix): last}, block=1000)
        for _stream, entries in reply or ():
            for entry_id, raw in entries:
                last = entry_id
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                result = parse_result_fields(fields)
                assert result is not None
                got.setdefault(result.host, result)
    return got


async def xadd_command(client: aioredis.Redis, fields: Mapping[str, str], prefix: str) -> None:
    await client.xadd(command_stream_key(prefix), dict(fields))


async def pending_count(client: aioredis.Redis, identity: str, prefix: str) -> int:
    summary = await client.xpending(command_stream_key(prefix), identity)
    return int(summary["pending"])


def systemctl_stand_in(tmp_path: Path, probe: str = "") -> tuple[Path, Path]:
    """A ``systemctl`` that records argv and time (plus ``probe``'s output) as JSON lines."""
    record = tmp_path / "systemctl.jsonl"
    script = write_script(
        tmp_path / "systemctl",
        f"""import json, sys, time
entry = {{"argv": sys.argv[1:], "t": time.time()}}
{probe}
with open({str(record)!r}, "a") as out:
    out.write(json.dumps(entry) + "\\n")
if "is-active" in sys.argv:
    print("active")
""",
        interpreter=PY,
    )
    return script, record


def install_systemctl_stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probe: str = ""
) -> Path:
    """Make in-process daemons run the stand-in as ``systemctl``; return its record file."""
    stand_in, record = systemctl_stand_in(tmp_path, probe)
    monkeypatch.setenv("OPS_SYSTEMCTL", str(stand_in))
    return record


def recorded_calls(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(record)]


def upload_pack_gate(tmp_path: Path, clone: Path) -> tuple[Path, Path]:
    """Make the clone's fetch record its PID, then wait for a release file (at most 30 s)."""
    log, release = tmp_path / "upload-pack.log", tmp_path / "release"
    wrapper = write_script(
        tmp_path / "upload-pack-gate.sh",
        f"""echo "$$" >> '{log}'
i=0
while [ ! -e '{release}' ] && [ "$i" -lt 1500 ]; do sleep 0.02; i=$((i + 1)); done
exec git upload-pack "$@"
""",
    )
    git(clone, "config", "remote.origin.uploadpack", str(wrapper))
    return log, release


def make_daemon(
    client: aioredis.Redis, identity: str, prefix: str, **options: Any
) -> ControlDaemon:
    options.setdefault("pull_targets", {})
    options.setdefault("restart_units", ())
    return ControlDaemon(client, identity=identity, secret=SECRET, prefix=prefix, **options)


@pytest.fixture
async def new_client(redis_server: RedisServer) -> AsyncIterator[Callable[..., aioredis.Redis]]:
    """Make Redis clients (one per daemon, as on real hosts); all are closed after the test."""
    made: list[aioredis.Redis] = []

    def make(url: str | None = None) -> aioredis.Redis:
        made.append(client_for(url or redis_server.url))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


@contextlib.asynccontextmanager
async def serving(*daemons: ControlDaemon) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run daemons as tasks until the block ends; then stop them cleanly (cancellation)."""
    tasks = [asyncio.create_task(daemon.run()) for daemon in daemons]
    try:
        waits = (asyncio.wait_for(d.serving.wait(), DEADLINE) for d in daemons)
        await asyncio.gather(*waits)
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE)


# ---------------------------------------------------------------------------------------------
# Wire format and pure helpers
# ---------------------------------------------------------------------------------------------


def test_wire_format_is_hmac_sha256_over_canonical_json() -> None:
    fields = {
        "id": "0123456789abcdef0123456789abcdef",
        "op": "restart",
        "args": '["proxy"]',
        "requested_by": "discord:42 (alice)",
        "issued_at": "1700000000.5",
        "expires_at": "1700000120.5",
    }
    # Written out by hand: this is what another tool has to produce, byte for byte.
    expected = (
        b'{"args":"[\\"proxy\\"]","expires_at":"1700000120.5","id":"0123456789abcdef0123456789abcdef",'
        b'"issued_at":"1700000000.5","op":"restart","requested_by":"discord:42 (alice)"}'
    )
    assert canonical_payload(fields) == expected
    sig = hmac.new(SECRET.encode(), expected, hashlib.sha256).hexdigest()
    command = verify_command({**fields, "sig": sig}, SECRET, now=1700000001.0)
    assert command.args == ("proxy",)
    assert command.expires_at == 1700000120.5
    with pytest.raises(CommandRejected, match=r"^rejected: expired$"):
        verify_command({**fields, "sig": sig}, SECRET, now=1700000121.0)
    for forged in (
        {**fields, "sig": sig, "args": '["sshd"]'},  # tampered after signing
        {**fields, "sig": hmac.new(b"wrong", expected, hashlib.sha256).hexdigest()},
        dict(fields),  # unsigned
        {**fields, "sig": "é" * 64},  # junk (non-ASCII must not crash compare_digest)
    ):
        with pytest.raises(CommandRejected, match=r"^rejected: bad signature$"):
            verify_command(forged, SECRET, now=1700000001.0)


def test_build_command_signs_and_validates() -> None:
    fields = build_command("pull", ["bot"], requested_by="me", secret=SECRET, ttl=60, now=1000.0)
    assert set(fields) == {"id", "op", "args", "requested_by", "issued_at", "expires_at", "sig"}
    assert len(fields["id"]) == 32
    assert json.loads(fields["args"]) == ["bot"]
    assert float(fields["expires_at"]) == 1060.0
    assert verify_command(fields, SECRET, now=1001.0).op == "pull"
    with pytest.raises(TypeError):
        build_command("pull", "bot", requested_by="me", secret=SECRET)
    with pytest.raises(ValueError, match="secret"):
        build_command("pull", [], requested_by="me", secret="")


def test_backoff_is_jittered_exponential_and_capped_at_30s() -> None:
    assert backoff_delay(0, rng=lambda: 0.0) == pytest.approx(0.05)
    assert backoff_delay(0, rng=lambda: 1.0) == pytest.approx(0.1)
    assert backoff_delay(3, rng=lambda: 1.0) == pytest.approx(0.8)
    assert backoff_delay(200, rng=lambda: 1.0) == 30.0
    assert 15.0 <= backoff_delay(200) <= 30.0


def test_daemon_settings_from_env() -> None:
    settings = daemon_settings_from_env(
        {
            "OPS_CONTROL_SECRET": SECRET,
            "OPS_IDENTITY": "web-1:bot",
            "OPS_PULL_TARGETS": "bot=/srv/bot, site=/srv/site",
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
        ({"OPS_CONTROL_SECRET": SECRET, "OPS_IDENTITY": "a b"}, "OPS_IDENTITY"),
    ):
        with pytest.raises(ConfigError, match=variable):
            daemon_settings_from_env(env)


def test_cli_refuses_to_start_without_secret_or_with_a_bad_unit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["daemon"], env={"OPS_RESTART_UNITS": "proxy"}) == 2
    assert "OPS_CONTROL_SECRET" in capsys.readouterr().err
    assert main(["daemon"], env={"OPS_CONTROL_SECRET": SECRET, "OPS_RESTART_UNITS": "a*"}) == 2
    assert "OPS_RESTART_UNITS" in capsys.readouterr().err


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


def test_fleet_ok_needs_an_expected_host_and_every_answer_ok() -> None:
    good = HostResult("a", True, True, "pong", 0.1)
    bad = HostResult("b", False, False, NOT_ALLOWED, 0.0)
    skip = HostResult("b", True, False, "Skipped: a is pulling", 0.0)
    assert not FleetResult("x", {}, frozenset(), frozenset()).ok
    assert FleetResult("x", {"a": good, "b": skip}, frozenset(), frozenset({"a", "b"})).ok
    assert not FleetResult("x", {"a": good, "b": bad}, frozenset(), frozenset({"a", "b"})).ok
    assert not FleetResult("x", {"a": good}, frozenset({"b"}), frozenset({"a", "b"})).ok


# ---------------------------------------------------------------------------------------------
# In-process daemons against the session's real Redis
# ---------------------------------------------------------------------------------------------


async def test_fan_out_each_daemon_runs_once_and_the_publisher_aggregates(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    hosts = [f"host-{i}" for i in range(5)]
    fleet = [make_daemon(new_client(), host, key_prefix, restart_units=["proxy"]) for host in hosts]
    async with serving(*fleet):
        assert await alive_hosts(redis_client, prefix=key_prefix) == set(hosts)
        arrived: list[HostResult] = []
        announced: list[Published] = []

        async def on_result(result: HostResult) -> None:  # a coroutine function works
            arrived.append(result)

        result = await publish(
            redis_client,
            "restart",
            ["proxy"],
            requested_by="test",
            secret=SECRET,
            timeout=DEADLINE,
            on_result=on_result,
            on_published=announced.append,  # and so does a plain function
            prefix=key_prefix,
        )
        assert result.ok, result
        assert result.silent == frozenset()
        assert set(result.results) == set(hosts) == result.expected
        assert all(r.ok and r.ran and r.summary == "restarted proxy.service" for r in arrived)
        assert sorted(r.host for r in arrived) == hosts  # on_result once per host
        assert [(p.op, p.args, p.expected) for p in announced] == [
            ("restart", ("proxy",), frozenset(hosts))
        ]
        calls = recorded_calls(record)
        assert len(calls) == len(hosts)  # each host ran it exactly once
        assert {tuple(c["argv"]) for c in calls} == {
            ("--no-ask-password", "restart", "--", "proxy.service")
        }
        # Nothing left pending: every daemon acknowledged after answering.
        for host in hosts:
            assert await pending_count(redis_client, host, key_prefix) == 0

        # A host that is alive by its heartbeat but never answers is reported silent.
        await redis_client.set(heartbeat_key("ghost", key_prefix), "{}", px=15_000)
        await redis_client.sadd(hosts_index_key(key_prefix), "ghost")
        started = time.monotonic()
        pinged = await publish(
            redis_client,
            "ping",
            [],
            requested_by="test",
            secret=SECRET,
            timeout=0.5,
            prefix=key_prefix,
        )
        assert time.monotonic() - started < 0.5 + 1.0
        assert pinged.silent == {"ghost"}
        assert not pinged.ok
        assert {r.summary for r in pinged.results.values()} == {"pong"}
        assert len(pinged.results) == len(hosts)

    # A clean stop deletes the heartbeats: publishers stop expecting these hosts at once.
    assert await alive_hosts(redis_client, prefix=key_prefix) == {"ghost"}
    nobody = await publish(
        redis_client, "ping", [], requested_by="t", secret=SECRET, prefix=f"{key_prefix}-nobody"
    )
    assert not nobody.ok
    assert nobody.expected == frozenset()
    assert nobody.elapsed < 1.0  # nothing to wait for


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
    valid = build_command("restart", ["proxy"], requested_by="mallory", secret=SECRET)
    cases: dict[str, tuple[dict[str, str], str]] = {
        "forged": (
            build_command("restart", ["proxy"], requested_by="mallory", secret="not-the-secret"),
            "rejected: bad signature",
        ),
        "tampered": ({**valid, "args": '["sshd"]'}, "rejected: bad signature"),
        "unsigned": (
            {k: v for k, v in build_command("pull", [], requested_by="m", secret=SECRET).items()
             if k != "sig"},
            "rejected: bad signature",
        ),
        "expired": (
            build_command(
                "restart", ["proxy"], requested_by="m", secret=SECRET, now=time.time() - 300, ttl=60
            ),
            "rejected: expired",
        ),
        "unit not allowed": (
            build_command("restart", ["sshd"], requested_by="m", secret=SECRET),
            NOT_ALLOWED,
        ),
        "invalid unit": (
            build_command("restart", ["-H evil"], requested_by="m", secret=SECRET),
            NOT_ALLOWED,
        ),
        "target not allowed": (
            build_command("pull", ["other"], requested_by="m", secret=SECRET),
            NOT_ALLOWED,
        ),
        "unknown op": (
            build_command("shell", ["rm -rf /"], requested_by="m", secret=SECRET),
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
    fields = build_command("pull", ["bot"], requested_by="ops", secret=SECRET)
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


# ---------------------------------------------------------------------------------------------
# Redis restarted under running daemons
# ---------------------------------------------------------------------------------------------


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
    fields = build_command("pull", [], requested_by="ops", secret=SECRET)
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


# ---------------------------------------------------------------------------------------------
# A real daemon process: SIGKILL mid-command, restart, SIGTERM
# ---------------------------------------------------------------------------------------------


def start_daemon_process(env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [PY, "-m", "core.control_ops", "daemon"],
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=DEADLINE)


def kill_orphaned_group(pid: int) -> None:
    """SIGKILL the process group of a process our killed daemon left behind (we started it)."""
    with contextlib.suppress(ProcessLookupError):
        pgid = os.getpgid(pid)
        assert pgid != os.getpgrp()
        os.killpg(pgid, signal.SIGKILL)


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
        "OPS_PULL_TARGETS": f"bot={git_repos.clone}",
        "OPS_RESTART_UNITS": "a.service,b.service",
        "OPS_SYSTEMCTL": str(stand_in),
    }
    log = tmp_path / "daemon.log"
    heartbeat = heartbeat_key(identity, key_prefix)
    pull = build_command("pull", ["bot"], requested_by="ops", secret=SECRET)

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
    valid = build_command("restart", ["a"], requested_by="ops", secret=SECRET, ttl=120)
    stale = build_command(
        "restart", ["b"], requested_by="ops", secret=SECRET, now=time.time() - 100, ttl=60
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


# ---------------------------------------------------------------------------------------------
# The publish CLI
# ---------------------------------------------------------------------------------------------


async def run_cli(*args: str, env: Mapping[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        PY,
        "-m",
        "core.control_ops",
        *args,
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


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
    fields = build_command("restart", ["proxy"], requested_by="ops", secret=SECRET)
    fields["expires_at"] = repr(float(fields["issued_at"]) + 1e16)
    fields["sig"] = sign_fields(fields, SECRET)
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
        build_command("ping", [], requested_by="ops", secret=SECRET, ttl=1e16)


async def test_a_new_daemon_never_replays_history(
    new_client: Callable[..., aioredis.Redis], redis_client: aioredis.Redis, key_prefix: str
) -> None:
    old = build_command("ping", [], requested_by="ops", secret=SECRET)
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
