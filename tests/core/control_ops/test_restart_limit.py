"""A daemon restarts one unit at most once per OPS_RESTART_MIN_INTERVAL, whoever asks.

Every fleet command passes its own signature and ledger checks; the limit is about distinct
commands (two operators, two chat servers, a script) that together would drive a unit into its
start limit. systemd's own start time counts (every start, whoever caused it), and so does the
daemon's record of its own restarts, deferred ones included.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.control_ops import ControlDaemon, build_command
from core.control_ops.host_ops import Refused
from core.settings import DaemonSettings
from tests.support.fleet import (
    SECRET,
    install_systemctl_stand_in,
    make_daemon,
    read_results,
    recorded_calls,
    serving,
    wait_until,
    xadd_command,
)

HOST = "limited"


async def restart(redis: aioredis.Redis, unit: str, prefix: str) -> str:
    """Publish a fresh signed restart of ``unit`` straight to the stream; the host's summary."""
    fields = build_command("restart", [unit], requested_by="ops", secret=SECRET, prefix=prefix)
    await xadd_command(redis, fields, prefix)
    answer = (await read_results(redis, fields["id"], [HOST], prefix))[HOST]
    if answer.summary.startswith("refused:"):
        assert (answer.ok, answer.ran) == (False, False)
    return answer.summary


def restarts(record: Path) -> list[list[str]]:
    return [call["argv"] for call in recorded_calls(record) if "restart" in call["argv"]]


async def test_a_unit_is_not_restarted_twice_within_the_interval(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    daemon = make_daemon(new_client(), HOST, key_prefix, restart_units=["proxy", "worker"])
    assert daemon.ops.restart_min_interval == 60  # the default
    async with serving(daemon):
        assert await restart(redis_client, "proxy", key_prefix) == "restarted proxy.service"
        assert await restart(redis_client, "proxy", key_prefix) == "refused: restarted 0 s ago"
        # Another unit has its own interval.
        assert await restart(redis_client, "worker", key_prefix) == "restarted worker.service"
    assert [argv[-1] for argv in restarts(record)] == ["proxy.service", "worker.service"]


async def test_systemd_counts_every_start_of_the_unit_whoever_caused_it(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The unit became active 12 s ago (a chat restart, a crash and its automatic restart…):
    # systemd says so through ActiveEnterTimestampMonotonic, on the same monotonic clock.
    probe = """
if "show" in sys.argv:
    print(int((time.monotonic() - 12) * 1e6))
"""
    record = install_systemctl_stand_in(tmp_path, monkeypatch, probe)
    async with serving(make_daemon(new_client(), HOST, key_prefix, restart_units=["proxy"])):
        summary = await restart(redis_client, "proxy", key_prefix)
    assert re.fullmatch(r"refused: restarted 1[23] s ago", summary), summary
    assert restarts(record) == []
    [query] = recorded_calls(record, queries=True)
    assert "ActiveEnterTimestampMonotonic" in " ".join(query["argv"])


async def test_a_deferred_own_unit_restart_counts_and_is_remembered_across_restarts(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    options = {
        "restart_units": ["bot"],
        "own_units": ["bot"],
        "deferred_restart_delay": 0.0,
        "state_dir": tmp_path / "state",
    }
    async with serving(make_daemon(new_client(), HOST, key_prefix, **options)):
        first = await restart(redis_client, "bot", key_prefix)
        assert first.startswith("restarting bot.service (this host's own unit: deferred")
        await wait_until(lambda: restarts(record), "the deferred restart")
        # Not carried out yet by systemd, or carried out: either way it counts.
        assert await restart(redis_client, "bot", key_prefix) == "refused: restarted 0 s ago"
    # The daemon's own process comes back (as its restart does): the record is on disk.
    async with serving(make_daemon(new_client(), HOST, key_prefix, **options)):
        summary = await restart(redis_client, "bot", key_prefix)
    assert re.fullmatch(r"refused: restarted [01] s ago", summary), summary
    assert len(restarts(record)) == 1


async def test_the_interval_and_the_state_dir_come_from_the_settings(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    settings = DaemonSettings.from_env(
        {
            "HOME": str(tmp_path),
            "OPS_CONTROL_SECRET": SECRET,
            "OPS_IDENTITY": HOST,
            "OPS_CONTROL_PREFIX": key_prefix,
            "OPS_RESTART_UNITS": "proxy",
            "OPS_RESTART_MIN_INTERVAL": "0",
            "OPS_STATE_DIR": str(tmp_path / "configured"),
        }
    )
    daemon = ControlDaemon.from_settings(new_client(), settings)
    assert daemon.ops.restart_min_interval == 0
    assert daemon.state_dir == tmp_path / "configured" / "fleet" / HOST
    async with serving(daemon):
        for _ in range(2):  # 0 turns the limit off
            assert await restart(redis_client, "proxy", key_prefix) == "restarted proxy.service"
    assert len(restarts(record)) == 2
    assert (daemon.state_dir / "commands.log").exists()
    assert not (tmp_path / ".local").exists()  # nothing went to the default state dir


async def test_the_lock_dir_comes_from_the_settings_and_an_unsafe_lock_refuses_the_restart(
    new_client: Callable[..., aioredis.Redis], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OPS_LOCK_DIR (deployed: /run/admin-ops, shared with the bot's user) holds the locks.

    A symlink planted where the lock file goes is neither followed nor worked around: the
    restart is refused, as for any lock this daemon cannot take.
    """
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    env = {
        "HOME": str(tmp_path),
        "OPS_CONTROL_SECRET": SECRET,
        "OPS_IDENTITY": HOST,
        "OPS_RESTART_UNITS": "proxy",
        "OPS_STATE_DIR": str(tmp_path / "state"),
    }
    default = ControlDaemon.from_settings(new_client(), DaemonSettings.from_env(env))
    assert default.ops.lock_dir == tmp_path / "state"
    shared = tmp_path / "run-admin-ops"
    settings = DaemonSettings.from_env({**env, "OPS_LOCK_DIR": str(shared)})
    daemon = ControlDaemon.from_settings(new_client(), settings)
    assert daemon.ops.lock_dir == shared
    victim = tmp_path / "state" / "precious"
    victim.parent.mkdir()
    victim.write_text("precious")
    (shared / "locks").mkdir(parents=True)
    (shared / "locks" / "restart-proxy.service.lock").symlink_to(victim)

    with pytest.raises(Refused) as refused:
        await daemon.ops.run("restart", ("proxy",))

    assert str(refused.value) == (
        "failed: cannot take the restart lock on this host "
        "(unsafe restart lock path: a symbolic link or not a directory)"
    )
    assert restarts(record) == []
    assert victim.read_text() == "precious"
