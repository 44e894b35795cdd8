"""A Redis master, one replica and three sentinels on loopback, for the failover tests and benches.

Standard library only (no pytest, no redis-py), like :mod:`tests.support.redis_proc`, so the
benchmarks use it too. Every process is a ``redis-server`` (``--sentinel`` for the sentinels: the
Debian ``redis-server`` package has no separate ``redis-sentinel`` binary to rely on), listens on
127.0.0.1 on a free port, lives in its own directory under the caller's ``workdir`` and is
stopped by its PID (``Popen``). Failover is kept short: ``down-after-milliseconds`` 1000 and a
``failover-timeout`` of 2000, so a SIGKILLed master is replaced in about two seconds.

Waiting is polling a cheap condition (a sentinel's answer, a node's ROLE) against a deadline:
processes being started or a failover being decided offer no event to wait on.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.redis_proc import start_redis_server, stop_redis_server

#: The master's name in the sentinels' configuration.
SERVICE = "admin-ops"
#: How long a sentinel waits before it calls an unanswering master down.
DOWN_AFTER_MS = 1000
#: Sentinel's failover timeout (a failed attempt is retried after twice this).
FAILOVER_TIMEOUT_MS = 2000
#: Generous bound for anything the cluster is waited for; a failover takes about 2 s.
CLUSTER_DEADLINE = 30.0
_POLL = 0.02  # a poll interval, not a guess at how long anything takes
# Diskless replication with no delay: a replica is in sync in milliseconds, not after 5 s.
# An append-only file, so a node restarted after SIGKILL comes back with its old data, as a
# real old master would (appendfsync no: what the process wrote survives its SIGKILL).
_NODE_ARGS = (
    "--repl-diskless-sync", "yes",
    "--repl-diskless-sync-delay", "0",
    "--appendonly", "yes",
    "--appendfsync", "no",
)  # fmt: skip


class RespError(Exception):
    """An error reply (``-ERR …``) from a server."""


class _Died(RuntimeError):
    """A process of the cluster exited while it was being started."""


def _encode(args: Sequence[object]) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out += [f"${len(data)}\r\n".encode(), data, b"\r\n"]
    return b"".join(out)


def _parse(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_parse(reader) for _ in range(size)]
    raise ConnectionError(f"unexpected reply {line[:40]!r}")


def command(port: int, *args: object, timeout: float = 1.0, password: str | None = None) -> Any:
    """Send one command to the server on 127.0.0.1:``port`` and return its decoded reply.

    With ``password``, AUTH first. Raises :class:`RespError` for an error reply,
    OSError/ConnectionError when nobody answers.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if password is not None:
            sock.sendall(_encode(("AUTH", password)))
        sock.sendall(_encode(args))
        with sock.makefile("rb") as reader:
            auth = _parse(reader) if password is not None else None
            reply = _parse(reader)
    for answer in (auth, reply):
        if isinstance(answer, RespError):
            raise answer
    return reply


def info(port: int, section: str = "replication", password: str | None = None) -> dict[str, str]:
    """``INFO section`` as a dict."""
    text = command(port, "INFO", section, password=password)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value for key, value in pairs}


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def listen_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    Outgoing connections (the sentinels make many while the others start) take their local
    ports from that range: a port chosen there could be taken between choosing and binding.
    """
    floor = _ephemeral_floor()
    for _ in range(200):
        port = random.randrange(10_000, max(10_001, floor))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def wait_for(what: str, check: Callable[[], Any], deadline: float = CLUSTER_DEADLINE) -> Any:
    """Poll ``check`` until it returns something true (an error counts as not yet)."""
    end = time.monotonic() + deadline
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            value = check()
        except (OSError, RespError) as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(_POLL)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


@dataclass
class SentinelCluster:
    """A master, a replica and three sentinels; ``stop()`` ends every process it started."""

    workdir: Path
    service: str = SERVICE
    #: The data nodes' password (``requirepass``, and ``masterauth`` between them), if any.
    password: str | None = None
    #: The sentinels' own password (``requirepass`` on each sentinel), if any.
    sentinel_password: str | None = None
    #: The data nodes by port (the master and the replica at first; failovers swap them).
    nodes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    sentinels: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    _node_extra: dict[int, tuple[str, ...]] = field(default_factory=dict)

    # -- start and stop

    @classmethod
    def start(
        cls, workdir: Path, *, password: str | None = None, sentinel_password: str | None = None
    ) -> SentinelCluster:
        """Start everything and wait until the sentinels could fail the master over."""
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        for attempt in range(1, 4):
            cluster = cls(
                workdir / f"attempt-{attempt}",
                password=password,
                sentinel_password=sentinel_password,
            )
            try:
                cluster._start_nodes()
                cluster._start_sentinels()
            except _Died:
                cluster.stop()
                if attempt == 3:
                    raise
                continue  # a port taken after all: again, on other ports
            except BaseException:
                cluster.stop()
                raise
            return cluster
        raise AssertionError("unreachable")

    def _check_alive(self) -> None:
        """Raise _Died (with its log) if a process this cluster started has exited."""
        for port, proc in [*self.nodes.items(), *self.sentinels.items()]:
            if proc.poll() is not None:
                logs = sorted(self.workdir.glob(f"*-{port}/*.log"))
                text = logs[0].read_text(errors="replace")[-2000:] if logs else "(no log)"
                raise _Died(f"the process on port {port} exited ({proc.returncode}): {text}")

    def node(self, port: int, *args: object) -> Any:
        """One command to a data node (authenticated when the nodes have a password)."""
        return command(port, *args, password=self.password)

    def ask(self, port: int, *args: object) -> Any:
        """One command to a sentinel (authenticated when the sentinels have a password)."""
        return command(port, *args, password=self.sentinel_password)

    def _start_node(self, port: int, extra: Sequence[str] = ()) -> None:
        self._node_extra.setdefault(port, tuple(extra))
        if not self.password:
            args = (*_NODE_ARGS, *self._node_extra[port])
            workdir = self.workdir / f"node-{port}"
            try:
                self.nodes[port] = start_redis_server(workdir, port, extra_args=args)
            except RuntimeError as exc:  # it exited, or never answered: its port, likely
                raise _Died(str(exc)) from exc
            return
        # start_redis_server checks that a plain PING answers, which a password forbids: start
        # it here and check with AUTH.
        directory = self.workdir / f"node-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server") or "redis-server"
        self.nodes[port] = subprocess.Popen(
            [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(directory), "--logfile", str(directory / "redis.log"),
                "--requirepass", self.password, "--masterauth", self.password,
                *_NODE_ARGS, *self._node_extra[port],
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(f"node {port} to answer", lambda: self._check_alive() or self.node(port, "PING"))

    def _start_nodes(self) -> None:
        master, replica = listen_port(), listen_port()
        self._start_node(master)
        self._start_node(replica, ("--replicaof", "127.0.0.1", str(master)))
        wait_for("the replica to sync", lambda: self._linked(replica))

    def _linked(self, replica: int) -> bool:
        self._check_alive()
        return info(replica, password=self.password).get("master_link_status") == "up"

    def _start_sentinels(self) -> None:
        master = next(iter(self.nodes))
        replica = next(port for port in self.nodes if port != master)
        ports = [listen_port() for _ in range(3)]
        # Each sentinel is told its own id and its peers' (a config line sentinels write
        # themselves), so they need not discover each other first: ready in milliseconds.
        ids = {port: os.urandom(20).hex() for port in ports}
        for port in ports:
            directory = self.workdir / f"sentinel-{port}"
            directory.mkdir(parents=True)
            peers = "".join(
                f"sentinel known-sentinel {self.service} 127.0.0.1 {p} {ids[p]}\n"
                for p in ports
                if p != port
            )
            auth = ""
            if self.password:
                auth += f"sentinel auth-pass {self.service} {self.password}\n"
            if self.sentinel_password:
                auth += f"requirepass {self.sentinel_password}\n"
                auth += f"sentinel sentinel-pass {self.sentinel_password}\n"
            config = directory / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {directory}\n"
                f"logfile {directory / 'sentinel.log'}\n"
                f"sentinel myid {ids[port]}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {self.service} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.service} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
                f"sentinel known-replica {self.service} 127.0.0.1 {replica}\n{peers}{auth}"
            )
            binary = shutil.which("redis-server") or "redis-server"
            self.sentinels[port] = subprocess.Popen(
                [binary, str(config), "--sentinel"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        wait_for("the sentinels to be ready", self._sentinels_ready)

    def _sentinels_ready(self) -> bool:
        self._check_alive()
        for port in self.sentinels:
            state = _pairs(self.ask(port, "SENTINEL", "MASTER", self.service))
            if state["flags"] != "master" or int(state["num-other-sentinels"]) != 2:
                return False
            replicas = [_pairs(r) for r in self.ask(port, "SENTINEL", "REPLICAS", self.service)]
            if not any(r["flags"] == "slave" for r in replicas):
                return False
        return True

    def stop(self) -> None:
        """Stop every process this cluster started (SIGTERM, a bounded wait, SIGKILL)."""
        for proc in [*self.sentinels.values(), *self.nodes.values()]:
            stop_redis_server(proc)

    # -- where things are

    @property
    def sentinel_ports(self) -> list[int]:
        """The sentinels' ports, in the order they were started."""
        return list(self.sentinels)

    def url(self, *, db: int = 0) -> str:
        """The ``redis+sentinel://`` URL of this cluster, with its passwords."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        userinfo = f":{self.password}@" if self.password else ""
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis+sentinel://{userinfo}{hosts}/{self.service}/{db}{query}"

    def named_master(self, sentinel: int | None = None) -> int:
        """The master's port as one sentinel (default: the first) names it."""
        port = sentinel or self.sentinel_ports[0]
        _host, master = self.ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(master)

    def master(self) -> int:
        """The port of the node that is master now, by its own ROLE, as the sentinels name it."""
        port = self.named_master()
        assert self.node(port, "ROLE")[0] == "master"
        return port

    def replica(self) -> int:
        """The port of the (one) live node that is not the master."""
        master = self.named_master()
        return next(p for p, proc in self.nodes.items() if p != master and proc.poll() is None)

    # -- failures

    def kill(self, port: int) -> None:
        """SIGKILL the data node on ``port`` (and reap it)."""
        proc = self.nodes[port]
        proc.kill()
        proc.wait(timeout=5)

    def kill_master(self) -> tuple[int, float]:
        """SIGKILL the master; its port and the monotonic time of the kill."""
        port = self.master()
        self.kill(port)
        return port, time.monotonic()

    def wait_for_failover(self, old: int, deadline: float = CLUSTER_DEADLINE) -> int:
        """Wait until every sentinel names a new master that says it is one; its port."""

        def promoted() -> int | None:
            named = {self.named_master(port) for port in self.sentinels}
            if len(named) != 1 or old in named:
                return None
            (new,) = named
            return new if self.node(new, "ROLE")[0] == "master" else None

        port: int = wait_for(f"a master other than {old}", promoted, deadline)
        return port

    def restart(self, port: int) -> None:
        """Start the node on ``port`` again, as it was configured (its data reloaded)."""
        self._start_node(port)

    def rejoin(self, port: int) -> None:
        """Start the node on ``port`` again as a replica of the current master; wait till usable.

        Usable: in sync, and counted by every sentinel (so another failover can promote it).
        What a node brought back by hand or by configuration management does; a node that
        comes back as a master is turned into a replica by the sentinels only after about 10 s
        (:meth:`restart`, then :meth:`wait_until_replica`).
        """
        self._node_extra[port] = ("--replicaof", "127.0.0.1", str(self.named_master()))
        self._start_node(port)
        self.wait_until_replica(port)

        def counted() -> bool:
            for sentinel in self.sentinels:
                replicas = self.ask(sentinel, "SENTINEL", "REPLICAS", self.service)
                states = {int(_pairs(r)["port"]): _pairs(r)["flags"] for r in replicas}
                if states.get(port) != "slave":
                    return False
            return True

        wait_for(f"every sentinel to count node {port} as a replica", counted)

    def wait_until_replica(self, port: int, deadline: float = CLUSTER_DEADLINE) -> None:
        """Wait until the node on ``port`` replicates the current master and is in sync."""

        def replicating() -> bool:
            state = info(port, password=self.password)
            return (
                state.get("role") == "slave"
                and state.get("master_port") == str(self.named_master())
                and state.get("master_link_status") == "up"
            )

        wait_for(f"node {port} to be an up-to-date replica", replicating, deadline)

    def cut_replication(self) -> int:
        """Keep the replica from replicating (it can still be promoted); its port.

        The replica is given a master password the master does not have, then its link is
        dropped: it retries every second and fails, and whatever the master writes from now on
        is what a failover loses.
        """
        master, replica = self.master(), self.replica()
        self.node(replica, "CONFIG", "SET", "masterauth", "not-the-password")
        self.node(master, "CLIENT", "KILL", "TYPE", "replica")
        wait_for("the replica's link to drop", lambda: not self._linked(replica))
        return replica

    def has_key(self, port: int, key: str) -> bool:
        """Whether the node on ``port`` holds ``key`` (a replica answers reads)."""
        return bool(self.node(port, "EXISTS", key))


# ---------------------------------------------------------------------------------------------
# Daemons as real processes, with a systemctl that records what each host ran
# ---------------------------------------------------------------------------------------------

#: How long a gated stand-in restart waits for its gate at most (it always ends by itself).
GATE_LIMIT = 15.0
# A systemctl for one host: "restart <unit>" appends a "start" line to the host's record, waits
# for the file gates/<unit> when the unit's name starts with "gated-", then appends "end".
# Queries (is-active, show) change nothing and are not recorded.
_SYSTEMCTL = """import json, os, sys, time
args = sys.argv[1:]
if "is-active" in args:
    print("active")
    sys.exit(0)
if "restart" not in args:
    sys.exit(0)
unit = args[-1]
def note(phase):
    with open({record!r}, "a") as out:
        out.write(json.dumps({{"phase": phase, "unit": unit, "t": time.time()}}) + "\\n")
note("start")
if unit.startswith("gated-"):
    gate = os.path.join({gates!r}, unit)
    end = time.monotonic() + {limit!r}
    while not os.path.exists(gate) and time.monotonic() < end:
        time.sleep(0.02)
note("end")
"""


@dataclass
class DaemonFleet:
    """``count`` control daemon processes (``python -m core.control_ops daemon``), one per host.

    Host ``host-N`` may restart ``units``; its stand-in systemctl records each restart in
    ``workdir/host-N/runs.jsonl``. ``stop()`` sends SIGTERM, then SIGKILL, by PID.
    """

    workdir: Path
    hosts: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        redis_url: str,
        secret: str,
        prefix: str,
        units: Sequence[str],
        count: int = 5,
        python: str,
        cwd: Path,
    ) -> DaemonFleet:
        """Start the daemons (not waiting for them: see :meth:`wait_serving` in the tests)."""
        fleet = cls(workdir)
        (workdir / "gates").mkdir(parents=True, exist_ok=True)
        try:
            for n in range(1, count + 1):
                fleet._start_one(f"host-{n}", redis_url, secret, prefix, units, python, cwd)
        except BaseException:
            fleet.stop()
            raise
        return fleet

    def _start_one(
        self,
        host: str,
        redis_url: str,
        secret: str,
        prefix: str,
        units: Sequence[str],
        python: str,
        cwd: Path,
    ) -> None:
        home = self.workdir / host
        home.mkdir(parents=True)
        systemctl = home / "systemctl"
        systemctl.write_text(
            f"#!{python}\n"
            + _SYSTEMCTL.format(
                record=str(home / "runs.jsonl"),
                gates=str(self.workdir / "gates"),
                limit=GATE_LIMIT,
            )
        )
        systemctl.chmod(0o755)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "REDIS_URL": redis_url,
            "OPS_CONTROL_SECRET": secret,
            "OPS_CONTROL_PREFIX": prefix,
            "OPS_IDENTITY": host,
            "OPS_STATE_DIR": str(home / "state"),
            "OPS_REPO_DIR": str(cwd),
            "OPS_RESTART_UNITS": ",".join(units),
            "OPS_RESTART_MIN_INTERVAL": "0",
            "OPS_SYSTEMCTL": str(systemctl),
        }
        with (home / "daemon.log").open("ab") as log:
            self.hosts[host] = subprocess.Popen(
                [python, "-m", "core.control_ops", "daemon"],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def runs(self, host: str, unit: str | None = None) -> list[str]:
        """The units ``host`` started restarting, in order (one entry per run)."""
        record = self.workdir / host / "runs.jsonl"
        if not record.exists():
            return []
        entries = [line for line in record.read_text().splitlines() if line.strip()]
        started = [e for e in map(json.loads, entries) if e["phase"] == "start"]
        return [e["unit"] for e in started if unit is None or e["unit"] == unit]

    def started_everywhere(self, unit: str) -> bool:
        """Whether every host has started restarting ``unit``."""
        return all(self.runs(host, unit) for host in self.hosts)

    def release(self, unit: str) -> None:
        """Let every host's gated restart of ``unit`` finish."""
        (self.workdir / "gates" / unit).touch()

    def log(self, host: str) -> str:
        """What ``host``'s daemon logged so far."""
        return (self.workdir / host / "daemon.log").read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM every daemon (a clean stop), SIGKILL any that does not exit in time."""
        for proc in self.hosts.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.hosts.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
