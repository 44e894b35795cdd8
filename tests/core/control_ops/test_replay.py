"""Replays: nothing anyone writes to Redis makes a host run a signed command a second time.

Each attack is one a Redis writer without the secret can mount against a command it has seen
on the stream: delete the ran marker and re-add the entry, roll its consumer group back,
re-create the group from the start of the stream, or wait for the daemon to restart. The host's
own ledger (on its disk, fsynced before the op runs) is what keeps the command from running
twice; Redis only carries the answer "already handled" or "interrupted".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.control_ops import (
    INTERRUPTED,
    MAX_CLOCK_SKEW,
    ControlDaemon,
    build_command,
    command_stream_key,
    ran_marker_key,
    results_key,
    sign_fields,
)
from core.control_ops.wire import ALREADY_HANDLED
from tests.support.fleet import (
    DEADLINE,
    SECRET,
    install_systemctl_stand_in,
    lines,
    make_daemon,
    read_results,
    recorded_calls,
    serving,
    upload_pack_gate,
    wait_until,
    xadd_command,
)
from tests.support.git import GitRepos

HOST = "replayed"


async def forget(redis: aioredis.Redis, command_id: str, prefix: str) -> None:
    """What a Redis writer deletes first: the ran marker and the answers (to read the next)."""
    await redis.delete(ran_marker_key(HOST, command_id, prefix), results_key(command_id, prefix))


async def readd(redis: aioredis.Redis, fields: dict[str, str], prefix: str) -> None:
    """The same signed fields as a new entry (a new entry id)."""
    await forget(redis, fields["id"], prefix)
    await xadd_command(redis, fields, prefix)


async def roll_group_back(redis: aioredis.Redis, fields: dict[str, str], prefix: str) -> None:
    """The group's position set back to the start: the original entry is delivered again."""
    await forget(redis, fields["id"], prefix)
    await redis.xgroup_setid(command_stream_key(prefix), HOST, "0")
    # A blocked XREADGROUP wakes for a new entry only: one without an id (dropped unanswered)
    # ends the daemon's wait now rather than at its block timeout.
    await redis.xadd(command_stream_key(prefix), {"wake": "1"})


async def recreate_group(redis: aioredis.Redis, fields: dict[str, str], prefix: str) -> None:
    """The group destroyed and created again at the start of the stream, history and all."""
    await forget(redis, fields["id"], prefix)
    stream = command_stream_key(prefix)
    await redis.xgroup_destroy(stream, HOST)
    await redis.xgroup_create(stream, HOST, id="0")


ATTACKS: dict[str, Callable[[aioredis.Redis, dict[str, str], str], object]] = {
    "marker deleted, entry re-added": readd,
    "marker deleted, group rolled back": roll_group_back,
    "marker deleted, group re-created from the start": recreate_group,
}


@pytest.mark.parametrize("attack", ATTACKS)
async def test_a_restart_runs_once_whatever_redis_is_made_to_say(
    attack: str,
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    fields = build_command(
        "restart", ["proxy"], requested_by="ops", secret=SECRET, prefix=key_prefix
    )
    # No restart limit here: that is another guard, and this test is about the ledger alone.
    daemon = make_daemon(new_client(), HOST, key_prefix, restart_units=["proxy"])
    daemon.ops.restart_min_interval = 0
    async with serving(daemon):
        await xadd_command(redis_client, fields, key_prefix)
        first = (await read_results(redis_client, fields["id"], [HOST], key_prefix))[HOST]
        assert (first.ok, first.summary) == (True, "restarted proxy.service")
        for _ in range(3):  # the same attack, again and again
            await ATTACKS[attack](redis_client, fields, key_prefix)  # type: ignore[misc]
            again = (await read_results(redis_client, fields["id"], [HOST], key_prefix))[HOST]
            assert (again.ok, again.ran, again.summary) == (False, False, ALREADY_HANDLED)
    assert len(recorded_calls(record)) == 1


async def test_a_pull_runs_once_across_a_daemon_restart(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    git_repos: GitRepos,
) -> None:
    fetches, release = upload_pack_gate(tmp_path, git_repos.clone)
    release.touch()
    git_repos.commit_upstream("deployed once")
    fields = build_command("pull", [], requested_by="ops", secret=SECRET, prefix=key_prefix)
    targets = {"bot": git_repos.clone}
    async with serving(make_daemon(new_client(), HOST, key_prefix, pull_targets=targets)):
        await xadd_command(redis_client, fields, key_prefix)
        first = (await read_results(redis_client, fields["id"], [HOST], key_prefix))[HOST]
        assert first.summary.startswith("Updated "), first.summary
    git_repos.commit_upstream("must not arrive through a replay")
    await readd(redis_client, fields, key_prefix)
    # A new process of the same daemon: a new per-run token, nothing in memory.
    async with serving(make_daemon(new_client(), HOST, key_prefix, pull_targets=targets)):
        again = (await read_results(redis_client, fields["id"], [HOST], key_prefix))[HOST]
    assert again.summary == ALREADY_HANDLED
    assert len(lines(fetches)) == 1


async def test_an_interrupted_pull_is_not_rerun_when_its_marker_is_deleted(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    git_repos: GitRepos,
) -> None:
    fetches, release = upload_pack_gate(tmp_path, git_repos.clone)
    git_repos.commit_upstream("interrupted")
    fields = build_command("pull", [], requested_by="ops", secret=SECRET, prefix=key_prefix)
    targets = {"bot": git_repos.clone}
    daemon = make_daemon(new_client(), HOST, key_prefix, pull_targets=targets)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.serving.wait(), DEADLINE)
        await xadd_command(redis_client, fields, key_prefix)
        await wait_until(lambda: lines(fetches), "the fetch to start")
    finally:
        task.cancel()  # stopped mid-pull: the command stays pending, never answered
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), DEADLINE)
    release.touch()
    await forget(redis_client, fields["id"], key_prefix)
    async with serving(make_daemon(new_client(), HOST, key_prefix, pull_targets=targets)):
        answer = (await read_results(redis_client, fields["id"], [HOST], key_prefix))[HOST]
    assert (answer.ok, answer.summary) == (False, INTERRUPTED)
    assert len(lines(fetches)) == 1


async def test_the_ledger_is_on_disk_before_the_op_runs(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = tmp_path / "state"
    daemon = make_daemon(new_client(), HOST, key_prefix, restart_units=["proxy"], state_dir=state)
    ledger = daemon.ledger.path
    assert ledger == state / "fleet" / HOST / "commands.log"
    # The stand-in reads the ledger the moment systemctl is asked to restart.
    probe = f"""
if "restart" in sys.argv:
    entry["ledger"] = open({str(ledger)!r}).read()
"""
    record = install_systemctl_stand_in(tmp_path, monkeypatch, probe)
    fields = build_command(
        "restart", ["proxy"], requested_by="ops", secret=SECRET, prefix=key_prefix
    )
    async with serving(daemon):
        await xadd_command(redis_client, fields, key_prefix)
        await read_results(redis_client, fields["id"], [HOST], key_prefix)
    [call] = recorded_calls(record)
    [line] = call["ledger"].splitlines()
    state_flag, keep_until, command_id = line.split(" ")
    assert (state_flag, command_id) == ("S", fields["id"])
    assert float(keep_until) == pytest.approx(float(fields["expires_at"]) + MAX_CLOCK_SKEW)
    assert ledger.read_text().splitlines()[-1].startswith(f"D {keep_until} ")  # then done


async def test_a_command_issued_in_the_future_is_refused(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Validly signed but issued past the skew allowance: a host would have to remember it for
    # longer than any validity. Within the allowance (a host whose clock is behind) it runs.
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    now = time.time()
    future = build_command(
        "restart",
        ["proxy"],
        requested_by="ops",
        secret=SECRET,
        prefix=key_prefix,
        now=now + 3600,
        ttl=60,
    )
    soon = build_command(
        "restart",
        ["proxy"],
        requested_by="ops",
        secret=SECRET,
        prefix=key_prefix,
        now=now + MAX_CLOCK_SKEW - 10,
    )
    async with serving(make_daemon(new_client(), HOST, key_prefix, restart_units=["proxy"])):
        for fields in (future, soon):
            await xadd_command(redis_client, fields, key_prefix)
        answers = {
            name: (await read_results(redis_client, fields["id"], [HOST], key_prefix))[HOST]
            for name, fields in (("future", future), ("soon", soon))
        }
    assert (answers["future"].ok, answers["future"].summary) == (
        False,
        "rejected: issued in the future",
    )
    assert answers["soon"].summary == "restarted proxy.service"
    assert len(recorded_calls(record)) == 1


async def test_an_unrecordable_command_does_not_run(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A state dir that cannot be written: without the record, the op could run twice later.
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the state dir should be")
    daemon = make_daemon(new_client(), HOST, key_prefix, restart_units=["proxy"], state_dir=blocked)
    daemon.ops.restart_min_interval = 0
    fields = build_command(
        "restart", ["proxy"], requested_by="ops", secret=SECRET, prefix=key_prefix
    )
    async with serving(daemon):
        await xadd_command(redis_client, fields, key_prefix)
        answer = (await read_results(redis_client, fields["id"], [HOST], key_prefix))[HOST]
    assert (answer.ok, answer.ran) == (False, False)
    assert answer.summary.startswith("failed: cannot record the command on this host ("), answer
    assert recorded_calls(record) == []


async def test_a_full_ledger_refuses_new_commands_rather_than_forget_old_ones(
    new_client: Callable[..., aioredis.Redis],
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = install_systemctl_stand_in(tmp_path, monkeypatch)
    daemon = make_daemon(new_client(), HOST, key_prefix, restart_units=["proxy"])
    daemon.ops.restart_min_interval = 0
    daemon.ledger._capacity = 2  # a small ledger, to fill it
    commands = [
        build_command("restart", ["proxy"], requested_by="ops", secret=SECRET, prefix=key_prefix)
        for _ in range(3)
    ]
    async with serving(daemon):
        summaries = []
        for fields in commands:
            await xadd_command(redis_client, fields, key_prefix)
            answer = (await read_results(redis_client, fields["id"], [HOST], key_prefix))[HOST]
            summaries.append(answer.summary)
    assert summaries[:2] == ["restarted proxy.service"] * 2
    assert summaries[2].startswith("refused: too many recent commands on this host")
    assert len(recorded_calls(record)) == 2


def test_the_daemon_keeps_its_records_in_its_state_dir(tmp_path: Path) -> None:
    client = aioredis.Redis()  # never used
    daemon = ControlDaemon(
        client,
        identity="web-1:bot",
        secret=SECRET,
        pull_targets={},
        restart_units=(),
        state_dir=tmp_path,
    )
    assert daemon.state_dir == tmp_path / "fleet" / "web-1:bot"
    assert daemon.ledger.path.parent == daemon.state_dir
    assert not daemon.state_dir.exists()  # nothing is written before it serves
    # A signed command's fields cannot be changed to dodge the ledger: the id is signed.
    fields = build_command("restart", ["proxy"], requested_by="ops", secret=SECRET)
    assert sign_fields({**fields, "id": "other"}, SECRET) != fields["sig"]
