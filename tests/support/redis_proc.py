"""A throw-away redis-server on a loopback port, for the tests and the benchmarks.

Standard library only (no pytest), so the benchmarks can import it as well as ``conftest.py``.
The server keeps nothing on disk and writes its log to ``workdir/redis.log``; whoever starts one
stops it again with :func:`stop_redis_server` (by its PID, through ``Popen``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 10.0  # seconds for a fresh server to answer PING; it takes milliseconds
STOP_TIMEOUT = 5.0  # seconds SIGTERM gets before SIGKILL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_text(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except OSError:
        return f"(no log at {log})"


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_for_pong(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited early: {_log_text(log)}")
        if _answers_ping(port):
            return
        # Polling a port that is being opened: there is no event to wait on.
        time.sleep(0.02)
    raise RuntimeError(f"redis-server did not answer on port {port}: {_log_text(log)}")


def start_redis_server(
    workdir: Path, port: int | None = None, *, extra_args: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start a redis-server that keeps nothing on disk and wait until it answers PING.

    It listens on 127.0.0.1 only, on ``port`` (a free one when not given); ``extra_args`` are
    added to its command line. Raises ``RuntimeError`` (with the server's log) when it is not
    installed, exits or does not answer in time; a server it started is stopped again first.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed (apt-get install redis-server; `make test` and "
            "`make bench` do that as root), or set REDIS_URL"
        )
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--logfile", str(log),
        "--daemonize", "no",
        *extra_args,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        _wait_for_pong(port, proc, log)
    except BaseException:
        stop_redis_server(proc)
        raise
    return proc


def stop_redis_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop a redis-server we started: SIGTERM, a bounded wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class RedisServer:
    """Where the test Redis lives, and whether this session owns it."""

    url: str
    owned: bool
    port: int | None = None
    pid: int | None = None
    workdir: Path | None = None
