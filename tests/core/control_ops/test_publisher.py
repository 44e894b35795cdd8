"""Publishing: the alive hosts are the expected ones, answers are collected as they arrive."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.control_ops import (
    HostResult,
    Published,
    alive_hosts,
    publish,
)
from tests.support.fleet import (
    DEADLINE,
    SECRET,
    install_systemctl_stand_in,
    make_daemon,
    pending_count,
    recorded_calls,
    serving,
    signed_ghost,
)


async def test_fan_out_each_daemon_runs_once_and_the_publisher_aggregates(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    hosts = [f"host-{i}" for i in range(5)]
    # Five hosts: each its own state dir (one shared dir is one host, which restarts a unit once).
    fleet = [
        make_daemon(
            new_client(), host, key_prefix, restart_units=["proxy"], state_dir=tmp_path / host
        )
        for host in hosts
    ]
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

        # A host that is alive by its (signed) heartbeat but never answers is reported silent.
        await signed_ghost(redis_client, "ghost", key_prefix)
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


async def test_a_failing_callback_is_logged_and_collecting_goes_on(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(_value: object) -> None:
        raise RuntimeError("a bug in the caller's display")

    hosts = ["cb-1", "cb-2"]
    async with serving(*(make_daemon(new_client(), host, key_prefix) for host in hosts)):
        fleet = await publish(
            redis_client,
            "ping",
            [],
            requested_by="test",
            secret=SECRET,
            on_result=broken,
            on_published=broken,
            prefix=key_prefix,
        )
    assert fleet.ok, fleet
    assert set(fleet.results) == set(hosts)
    failures = [r for r in caplog.records if r.getMessage().startswith("result callback")]
    assert len(failures) == 3  # once when published, once per answer
