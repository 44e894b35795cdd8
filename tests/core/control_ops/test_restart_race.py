"""Two processes on one host that may restart the same unit restart it once, not twice.

Two control daemons (real processes, one state dir) both receive one fleet restart: each checks
the spacing and restarts. Their own records are per identity and systemd's timestamp (here a
stand-in that knows no start time) moves only once the unit is back, so only the host-wide lock
and its reservation keep the second from restarting the unit again. The bot takes the same
lock (tests/cogs/test_restart_limits.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import redis.asyncio as aioredis

from core.control_ops import alive_hosts, publish
from tests.support.fleet import (
    DEADLINE,
    SECRET,
    recorded_calls,
    start_daemon_process,
    stop_process,
    systemctl_stand_in,
    wait_until,
)
from tests.support.redis_proc import RedisServer


async def test_two_daemons_on_one_host_restart_a_unit_once(
    redis_server: RedisServer, redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    stand_in, record = systemctl_stand_in(tmp_path)
    hosts = ["host:bot", "host:ctl"]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ["HOME"],
        "REDIS_URL": redis_server.url,
        "OPS_CONTROL_SECRET": SECRET,
        "OPS_CONTROL_PREFIX": key_prefix,
        "OPS_RESTART_UNITS": "proxy",
        "OPS_SYSTEMCTL": str(stand_in),
        "OPS_STATE_DIR": str(tmp_path / "state"),
    }
    daemons = [
        start_daemon_process({**env, "OPS_IDENTITY": host}, tmp_path / f"{n}.log")
        for n, host in enumerate(hosts)
    ]
    try:

        async def both_alive() -> bool:
            return len(await alive_hosts(redis_client, prefix=key_prefix, secret=SECRET)) == 2

        await wait_until(both_alive, "both daemons' heartbeats")
        fleet = await publish(
            redis_client, "restart", ["proxy"], requested_by="t", secret=SECRET,
            prefix=key_prefix, timeout=DEADLINE,
        )  # fmt: skip
    finally:
        for daemon in daemons:
            stop_process(daemon)
    summaries = sorted(result.summary for result in fleet.results.values())
    assert summaries == ["refused: restarted 0 s ago", "restarted proxy.service"], fleet
    restarts = [call for call in recorded_calls(record) if "restart" in call["argv"]]
    assert len(restarts) == 1
