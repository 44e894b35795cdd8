"""A small program the real-systemd tests run as a unit's main process.

Standard library plus ``core.ops_exec`` only (found through ``PYTHONPATH``), because it runs under
whatever interpreter the unit's user may execute. Each mode appends to ``<out>/events.log`` (one
line per event, ``O_APPEND`` so concurrent writers do not interleave) and signals readiness with
``sd_notify`` when the unit is ``Type=notify``:

- ``selfrestart OUT UNIT``: if ``OUT/trigger`` exists, consume it, record "replied", then await
  ``deferred_systemctl_restart(UNIT)`` like ``!bot_restart`` does; SIGTERM is recorded as "stopped".
- ``exit26 OUT``: the first run (``OUT/trigger`` present) exits with status 26, the restart request
  of ``OPS_RESTART_MODE=exit``; later runs stay up.
- ``sandbox OUT CHECKOUT ENV_FILE PORT``: records what the sandbox allows, including a real
  ``run_git_pull`` of CHECKOUT and a TCP connection to ``localhost:PORT``, as JSON in
  ``OUT/sandbox.json``; then exits 0.
- ``restart OUT UNIT``: ``systemctl_restart(UNIT)``, result as JSON in ``OUT/restart.json``.
- ``credentials OUT``: what the process finds of its secrets (environment,
  ``$CREDENTIALS_DIRECTORY`` through ``core.hardening.with_credentials``; digests, never values) in
  ``OUT/credentials.json``, after making itself undumpable like the bot and the daemon do; then
  stays up (``Type=notify``) so the test can look at the running process.
- ``started-ago OUT UNIT...``: ``unit_started_ago`` of each unit, as JSON in ``OUT/started.json``.
- ``pull OUT CHECKOUT``: ``pull_checkout(CHECKOUT)`` as JSON in ``OUT/pull.json``.
- ``journal OUT UNIT...``: what ``!ops_logs <unit>`` reads of each unit (``core.journal``'s command
  line and ``read_journal``'s result, 50 lines), as JSON in ``OUT/journal.json``.
- ``lock-hold OUT UNIT``: take ``unit_restart_lock(UNIT)`` in the lock dir the settings name
  (``OPS_LOCK_DIR``, read by ``core.env_reader``), reserve a restart, say so in
  ``OUT/lock.json``, then hold it (``Type=notify``) until stopped.
- ``lock-check OUT UNIT TIMEOUT``: wait up to TIMEOUT s for the same lock; in ``OUT/lock.json``
  whether another process held it all along, else the reservation found there and the spacing
  (``OPS_RESTART_MIN_INTERVAL``); then reserve a restart itself; and the mode of the ``locks``
  dir it creates in a fresh shared dir there (sticky under ``RestrictSUIDSGID=``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any


def record(out: Path, event: str) -> None:
    """Append one event line: ``<event> <pid>``."""
    fd = os.open(out / "events.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{event} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def notify_ready() -> None:
    """``sd_notify("READY=1")`` when systemd asked for it (``Type=notify``)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(b"READY=1")


def consume_trigger(out: Path) -> bool:
    """True exactly once per ``trigger`` file the test created."""
    try:
        (out / "trigger").unlink()
    except FileNotFoundError:
        return False
    return True


def wait_forever() -> None:
    while True:
        signal.pause()


def selfrestart(out: Path, unit: str) -> None:
    from core.ops_exec import deferred_systemctl_restart

    def on_sigterm(_signum: int, _frame: object) -> None:
        record(out, "stopped")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    record(out, "started")
    notify_ready()
    if consume_trigger(out):
        # The bot replies in chat first, then asks for its own restart.
        record(out, "replied")
        ok, summary = asyncio.run(deferred_systemctl_restart(unit, delay=0.2))
        record(out, f"requested ok={ok} {summary.replace(' ', '_')}")
    wait_forever()


def exit26(out: Path) -> None:
    record(out, "started")
    notify_ready()
    if consume_trigger(out):
        # What the bot does for !bot_restart in OPS_RESTART_MODE=exit, after replying.
        record(out, "exit26")
        sys.exit(26)
    wait_forever()


def _status_field(name: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def _try_write(directory: str) -> str:
    """``ok``, or the errno name of the failure, for creating a file in ``directory``."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix="probe-", delete=True):
            return "ok"
    except OSError as exc:
        return _errno_name(exc)


def _try_read(path: str) -> str:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            Path(path).read_bytes()
    except OSError as exc:
        return _errno_name(exc)
    return "ok"


def _errno_name(exc: OSError) -> str:
    import errno

    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _try_connect(port: int) -> str:
    """Resolve ``localhost`` the way aiohttp does (``AI_ADDRCONFIG``) and connect over TCP."""
    try:
        infos = socket.getaddrinfo(
            "localhost", port, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG
        )
        host, resolved_port = infos[0][4][:2]
        with socket.create_connection((str(host), int(resolved_port)), timeout=2):
            return "ok"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def sandbox(out: Path, checkout: str, env_file: str, port: int) -> None:
    from core.ops_exec import run_git_pull

    pull = asyncio.run(run_git_pull(checkout, redis=None, timeout=20.0, lock_ttl=60))
    state_dir = os.environ.get("STATE_DIRECTORY", "")
    facts: dict[str, Any] = {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "no_new_privs": _status_field("NoNewPrivs"),
        "cap_bounding": _status_field("CapBnd"),
        "cap_effective": _status_field("CapEff"),
        "seccomp": _status_field("Seccomp"),
        "env": {
            key: os.environ.get(key)
            for key in (
                "CREDENTIALS_DIRECTORY",
                "DISCORD_TOKEN",
                "HOME",
                "OPS_BOT_SERVICE",
                "OPS_CONTROL_SECRET",
                "OPS_OWN_UNITS",
                "OPS_PROXY_SERVICE",
                "OPS_RESTART_MODE",
                "REDIS_URL",
                "STATE_DIRECTORY",
            )
        },
        "pull": {"ran": pull.ran, "ok": pull.ok, "summary": pull.summary},
        "write": {
            "checkout": _try_write(checkout),
            "state_dir": _try_write(state_dir) if state_dir else "unset",
            "home": _try_write(os.path.dirname(checkout)),
            "usr": _try_write("/usr/local"),
            "etc": _try_write("/etc"),
            "tmp": _try_write("/tmp"),
        },
        "read": {"root_home": _try_read("/root"), "env_file": _try_read(env_file)},
        "connect": _try_connect(port),
        "tmp_entries": sorted(os.listdir("/tmp")),
    }
    (out / "sandbox.json").write_text(json.dumps(facts, indent=2, sort_keys=True))
    record(out, "probed")


def restart(out: Path, unit: str) -> None:
    from core.ops_exec import systemctl_restart

    ok, summary = asyncio.run(systemctl_restart(unit, timeout=10.0))
    (out / "restart.json").write_text(json.dumps({"ok": ok, "summary": summary}))
    record(out, "restart-done")


def _digest(value: str | None) -> str | None:
    return None if value is None else hashlib.sha256(value.encode()).hexdigest()


def credentials(out: Path) -> None:
    from core.hardening import CREDENTIALS, is_dumpable, make_undumpable, with_credentials

    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    seen = with_credentials(os.environ)
    facts: dict[str, Any] = {
        "credentials_directory": directory,
        "files": sorted(os.listdir(directory)) if directory else [],
        "in_environment": sorted(name for name in CREDENTIALS if name in os.environ),
        "found": {name: _digest(seen.get(name)) for name in CREDENTIALS},
        "dumpable_before": is_dumpable(),
        "made_undumpable": make_undumpable(),
        "dumpable_after": is_dumpable(),
    }
    (out / "credentials.json").write_text(json.dumps(facts, indent=2, sort_keys=True))
    record(out, "credentials")
    notify_ready()
    wait_forever()


def started_ago(out: Path, units: list[str]) -> None:
    from core.ops_exec import unit_started_ago

    async def ask() -> dict[str, float | None]:
        return {unit: await unit_started_ago(unit) for unit in units}

    (out / "started.json").write_text(json.dumps(asyncio.run(ask())))
    record(out, "started-ago")


def pull(out: Path, checkout: str) -> None:
    from core.ops_exec import pull_checkout

    outcome = asyncio.run(pull_checkout(checkout, timeout=20.0))
    facts = {"ran": outcome.ran, "ok": outcome.ok, "summary": outcome.summary, "uid": os.getuid()}
    (out / "pull.json").write_text(json.dumps(facts))
    record(out, "pulled")


def journal(out: Path, units: list[str]) -> None:
    from core.journal import journal_argv, read_journal

    async def read_all() -> dict[str, Any]:
        return {
            unit: {"argv": journal_argv(unit, 50), **(await read_journal(unit, 50))._asdict()}
            for unit in units
        }

    facts = {"uid": os.getuid(), "read": asyncio.run(read_all())}
    (out / "journal.json").write_text(json.dumps(facts))
    record(out, "journal")


def _lock_settings() -> tuple[str, float]:
    """The lock dir and the restart spacing, as the bot's and the daemon's settings read them."""
    from core.env_reader import EnvReader

    reader = EnvReader(os.environ)
    return str(reader.lock_dir(reader.state_dir())), reader.restart_min_interval()


def lock_hold(out: Path, unit: str) -> None:
    from core.ops_exec import unit_restart_lock

    lock_dir, _interval = _lock_settings()

    async def hold() -> None:
        async with unit_restart_lock(lock_dir, unit) as lock:
            lock.reserve()
            facts = {"uid": os.getuid(), "lock_dir": lock_dir}
            (out / "lock.json").write_text(json.dumps(facts))
            record(out, "lock-held")
            notify_ready()
            wait_forever()

    asyncio.run(hold())


def lock_check(out: Path, unit: str, timeout: float) -> None:
    from core.ops_exec import unit_restart_lock

    lock_dir, interval = _lock_settings()
    facts: dict[str, Any] = {"uid": os.getuid(), "lock_dir": lock_dir, "interval": interval}

    async def check() -> None:
        try:
            async with unit_restart_lock(lock_dir, unit, timeout=timeout) as lock:
                facts["reserved_ago"] = lock.reserved_ago()
                lock.reserve()
        except TimeoutError as exc:
            facts["busy"] = str(exc)

    asyncio.run(check())
    facts["fresh_locks_mode"] = _fresh_locks_mode(lock_dir, unit)
    (out / "lock.json").write_text(json.dumps(facts))
    record(out, "lock-checked")


def _fresh_locks_mode(lock_dir: str, unit: str) -> str:
    """The mode of a ``locks`` dir this process creates in a new shared dir inside ``lock_dir``.

    Under the unit's RestrictSUIDSGID=: the sticky bit must be allowed there.
    """
    from core.ops_exec import unit_restart_lock

    fresh = Path(lock_dir) / f"fresh-{os.getuid()}-{os.getpid()}"
    fresh.mkdir(0o770)  # setgid and the group handed down by lock_dir
    asyncio.run(_enter(unit_restart_lock(fresh, unit)))
    return f"{(fresh / 'locks').stat().st_mode & 0o7777:o}"


async def _enter(lock: Any) -> None:
    async with lock:
        pass


def main(argv: list[str]) -> None:
    mode, out = argv[0], Path(argv[1])
    if mode == "selfrestart":
        selfrestart(out, argv[2])
    elif mode == "exit26":
        exit26(out)
    elif mode == "sandbox":
        sandbox(out, argv[2], argv[3], int(argv[4]))
    elif mode == "restart":
        restart(out, argv[2])
    elif mode == "credentials":
        credentials(out)
    elif mode == "started-ago":
        started_ago(out, argv[2:])
    elif mode == "pull":
        pull(out, argv[2])
    elif mode == "journal":
        journal(out, argv[2:])
    elif mode == "lock-hold":
        lock_hold(out, argv[2])
    elif mode == "lock-check":
        lock_check(out, argv[2], float(argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
