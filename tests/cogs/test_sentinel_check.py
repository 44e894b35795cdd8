"""``python bot.py --check`` with ``REDIS_URL=redis+sentinel://…``: which master, does it answer.

Real sentinels and data nodes with passwords (``tests.support.sentinel``); neither password may
show in what ``--check`` prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import bot
from core.settings import Settings
from tests.support.sentinel import SentinelCluster

MASTER_PASSWORD = "check-master-pw-31"
SENTINEL_PASSWORD = "check-sentinel-pw-47"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    started = SentinelCluster.start(
        tmp_path / "redis", password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD
    )
    try:
        yield started
    finally:
        started.stop()


def redis_line(settings: Settings) -> tuple[int, str]:
    printed: list[str] = []
    status = bot.check(settings, print_line=printed.append)
    (line,) = [line for line in printed if "Redis" in line]
    for text in printed:
        assert MASTER_PASSWORD not in text
        assert SENTINEL_PASSWORD not in text
    return status, line


def test_check_names_the_master_the_sentinels_name_and_whether_it_answers(
    cluster: SentinelCluster, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {
            "HOME": str(tmp_path),
            "DISCORD_TOKEN": "check-token-0123456789",
            "REDIS_URL": cluster.url(),
            "OPS_STATE_DIR": str(tmp_path / "state"),
            "OPS_REPO_DIR": str(tmp_path),
        }
    )
    hosts = ",".join(f"127.0.0.1:{port}" for port in cluster.sentinel_ports)
    shown = f"redis+sentinel://***@{hosts}/{cluster.service}/0?sentinel_password=***"

    _status, line = redis_line(settings)
    master = cluster.master()
    assert line.startswith(f"✅ Redis via Sentinel {shown}: ")
    assert f"the sentinels name 127.0.0.1:{master} as master; it answers (" in line

    # Killed, and not yet replaced: the sentinels still name it (it does not answer), or
    # already call it down (none names a master).
    cluster.kill(master)
    status, line = redis_line(settings)
    assert status == 1
    assert line.startswith(f"❌ Redis via Sentinel {shown}: ")
    assert (
        f"127.0.0.1:{master} as master; it does not answer: ConnectionError" in line
        or "no sentinel names a master: MasterNotFoundError" in line
    ), line

    new = cluster.wait_for_failover(master)
    _status, line = redis_line(settings)
    assert f"✅ Redis via Sentinel {shown}: the sentinels name 127.0.0.1:{new} as master" in line

    # No sentinel answers at all.
    cluster.stop()
    status, line = redis_line(settings)
    assert status == 1
    assert line.startswith(f"❌ Redis via Sentinel {shown}: no sentinel names a master: ")
