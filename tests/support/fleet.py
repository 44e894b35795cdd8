"""Helpers for the fleet tests: daemons as tasks or processes, stand-ins that record what ran.

Synchronisation is by events, stream reads and files with bounded deadlines, never by sleeping
for a guessed time: a stand-in ``systemctl`` and an upload-pack wrapper record what ran into
files, and the tests read the result streams the daemons answer on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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

from core.control_ops import (
    ControlDaemon,
    HostResult,
    command_stream_key,
    heartbeat_key,
    hosts_index_key,
    results_key,
)
from core.control_ops.wire import heartbeat_value, result_fields, verify_result
from tests.support import ROOT
from tests.support.git import git
from tests.support.processes import write_script

SECRET = "fleet-test-secret-7f3a"
DEADLINE = 10.0  # generous bound for anything a test waits on; tests finish far sooner
PY = sys.executable


def client_for(url: str) -> aioredis.Redis:
    """A Redis client as a host's daemon would have one."""
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
    """The lines of a record file (none when it does not exist yet)."""
    return path.read_text().splitlines() if path.exists() else []


async def read_results(
    client: aioredis.Redis,
    command_id: str,
    hosts: Iterable[str],
    prefix: str,
    *,
    command_sig: str | None = None,
) -> dict[str, HostResult]:
    """Block on the result stream until every host in ``hosts`` answered (first answer wins).

    Every answer must carry a valid signature (made with the test secret, for ``prefix``); with
    ``command_sig``, each must answer the entry of that signature.
    """
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
                result = verify_result(
                    fields, command_id, SECRET, command_sig=command_sig, prefix=prefix
                )
                got.setdefault(result.host, result)
    return got


async def xadd_command(client: aioredis.Redis, fields: Mapping[str, str], prefix: str) -> None:
    """Put a command entry on the stream as it is, bypassing ``publish``."""
    await client.xadd(command_stream_key(prefix), dict(fields))


async def pending_count(client: aioredis.Redis, identity: str, prefix: str) -> int:
    """How many commands ``identity`` was handed and has not acknowledged."""
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


def recorded_calls(record: Path, *, queries: bool = False) -> list[dict[str, Any]]:
    """What the systemctl stand-in recorded, one dict per call.

    ``systemctl show`` (how a daemon asks when a unit last started) is a query that changes
    nothing: left out unless ``queries``.
    """
    calls = [json.loads(line) for line in lines(record)]
    return [call for call in calls if queries or "show" not in call["argv"]]


# ---------------------------------------------------------------------------------------------
# What a Redis writer (with or without the secret) can put on the board
# ---------------------------------------------------------------------------------------------


def heartbeat_fields(identity: str, *, sent_at: float | None = None) -> dict[str, str]:
    """The fields of a heartbeat for ``identity``, sent at ``sent_at`` (default: now)."""
    return {
        "identity": identity,
        "hostname": "test-host",
        "pid": "1",
        "version": "0",
        "started_at": repr(time.time()),
        "sent_at": repr(time.time() if sent_at is None else sent_at),
        "pull_targets": "[]",
        "restart_units": "[]",
    }


async def plant_heartbeat(
    client: aioredis.Redis, identity: str, prefix: str, value: str | bytes
) -> None:
    """Write ``value`` as ``identity``'s heartbeat and list it in the hosts index."""
    await client.set(heartbeat_key(identity, prefix), value, px=15_000)
    await client.sadd(hosts_index_key(prefix), identity)


async def signed_ghost(
    client: aioredis.Redis, identity: str, prefix: str, *, secret: str = SECRET
) -> None:
    """A validly signed, fresh heartbeat with no daemon behind it: expected, never answers."""
    value = heartbeat_value(heartbeat_fields(identity), secret, prefix)
    await plant_heartbeat(client, identity, prefix, value)


async def plant_answer(
    client: aioredis.Redis,
    command_id: str,
    prefix: str,
    result: HostResult,
    *,
    secret: str | None = SECRET,
    command_sig: str | None = None,
) -> None:
    """Append ``result`` to the command's result stream, signed with ``secret`` (None: unsigned).

    ``command_sig``: the signature of the command entry it answers ("" for a forged entry);
    by default that of the first entry with this id on the command stream, as a daemon would.
    """
    if command_sig is None:
        command_sig = await published_sig(client, command_id, prefix)
    fields = result_fields(
        result, command_id=command_id, secret=secret, command_sig=command_sig, prefix=prefix
    )
    await client.xadd(results_key(command_id, prefix), dict(fields))


async def published_sig(client: aioredis.Redis, command_id: str, prefix: str) -> str:
    """The ``sig`` of the first entry with id ``command_id`` on the command stream ("" if none).

    A test's stream holds a few entries: read whole.
    """
    for _entry, fields in await client.xrange(command_stream_key(prefix)):
        if fields.get(b"id", b"").decode() == command_id:
            return str(fields.get(b"sig", b"").decode())
    return ""


async def next_command_id(client: aioredis.Redis, prefix: str, after: str = "0") -> str:
    """The id of the first command on the stream after entry ``after``, once there is one.

    The default reads from the start: a test's prefix is its own, so that is the one it made.
    """
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        reply = await client.xread({command_stream_key(prefix): after}, count=1, block=1000)
        if reply:
            [(_stream, [(_entry, fields)])] = reply
            return str(fields[b"id"].decode())
    raise AssertionError("no command was published")


def upload_pack_gate(tmp_path: Path, clone: Path, *, body: str = "") -> tuple[Path, Path]:
    """Make the clone's fetch record its PID, then wait for a release file (at most 30 s).

    ``body`` is shell run first (e.g. to record the environment git was given).
    """
    log, release = tmp_path / "upload-pack.log", tmp_path / "release"
    wrapper = write_script(
        tmp_path / "upload-pack-gate.sh",
        f"""{body}
echo "$$" >> '{log}'
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
    """A daemon with the test secret and an empty allow-list unless ``options`` say otherwise."""
    options.setdefault("pull_targets", {})
    options.setdefault("restart_units", ())
    return ControlDaemon(client, identity=identity, secret=SECRET, prefix=prefix, **options)


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
# Daemons and the CLI as real processes
# ---------------------------------------------------------------------------------------------


def start_daemon_process(env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m core.control_ops daemon`` with exactly ``env``; output goes to ``log``."""
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
    """SIGKILL a process this test started, if it still runs."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=DEADLINE)


def kill_orphaned_group(pid: int) -> None:
    """SIGKILL the process group of a process our killed daemon left behind (we started it)."""
    with contextlib.suppress(ProcessLookupError):
        pgid = os.getpgid(pid)
        assert pgid != os.getpgrp()
        os.killpg(pgid, signal.SIGKILL)


async def run_cli(*args: str, env: Mapping[str, str]) -> tuple[int, str]:
    """``python -m core.control_ops ARGS`` with ``env``; its exit status and combined output."""
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
