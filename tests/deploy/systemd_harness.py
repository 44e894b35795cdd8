"""A real systemd 252 as PID 1 of private namespaces, for tests against the real service manager.

The recipe is issue 5's, measured on these machines:

1. Create a new sub-cgroup under the cgroup2 mount (``/sys/fs/cgroup/unified`` on hybrid hosts,
   else ``/sys/fs/cgroup``).
2. A small launcher shell moves **itself** into that sub-cgroup, proves it is there by reading
   ``/proc/$$/cgroup``, and only then execs ``unshare --pid --fork --kill-child --mount --cgroup``.
   The pytest process never moves: writing 1 to our ``cgroup.kill`` can never hit pytest.
3. Inside the namespaces a shell builds a private ``/run``, ``/tmp``, ``/dev``, read-only ``/sys``
   and ``/proc/sys``, a cgroup2 mount whose root is our sub-cgroup (cgroup namespace), and execs
   ``/lib/systemd/systemd --system`` with its own unit directory of stub targets, so ordinary unit
   files load and none of the machine's own units start.
4. Callers use ``nsenter --target <pid> --mount --pid -- systemctl ...``; a wrapper script doing
   exactly that is handed to our code through ``OPS_SYSTEMCTL``.
5. Teardown: ``systemctl --force exit``; only for leftovers, 1 to ``cgroup.kill`` of **our own**
   sub-cgroup; then the sub-cgroup is removed.

Safety rule: systemd is never started in the machine's root cgroup (it would move every process on
the machine into its own scope). Only processes we started are ever signalled, and only our subtree
is cleaned up.

Beyond the recipe, the private mount namespace also hides a few host paths the shipped units would
write to (``/tmp`` and ``/var/tmp`` for ``PrivateTmp=``, ``/var/lib`` for ``StateDirectory=``), and
overlays ``/etc/passwd``/``/etc/group`` with copies that add the service users, ``/srv`` with a test
tree, ``/etc/polkit-1/rules.d`` with a test directory and ``/etc/systemd/system.conf`` with test
defaults; its mounts are made shared, as systemd does on a booted host (credentials need it). None
of this is visible outside the namespace.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tty
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD_BINARY = Path("/lib/systemd/systemd")
CGROUP_PREFIX = "admin-ops-test-"
ROOT_TARGET = "admin-ops-test.target"
READY_TIMEOUT = 10.0
REQUIRED_TOOLS = ("unshare", "nsenter", "setpriv", "systemctl", "systemd-analyze", "mount", "mknod")
# The service users the shipped units name (the bot's, the fleet daemon's) and the group through
# which they share the checkout; they exist only in the namespace's /etc/passwd and /etc/group.
SERVICE_USER = "opsbot"
SERVICE_UID = 61_234
CONTROL_USER = "opsctl"
CONTROL_UID = 61_235
CONTROL_HOME = "/srv/admin-ops-control"
SHARED_GROUP = "admin-ops"
SHARED_GID = 61_236
# systemd's default 90 s start/stop timeouts would turn a hung test unit into a hung test run.
SYSTEM_CONF = """\
[Manager]
LogColor=no
ShowStatus=no
DefaultStandardOutput=inherit
DefaultStandardError=inherit
DefaultTimeoutStartSec=10s
DefaultTimeoutStopSec=5s
"""
STUB_UNITS = {
    ROOT_TARGET: "[Unit]\nDescription=admin-ops test root\n",
    "sysinit.target": "[Unit]\nDescription=stub sysinit\n",
    "basic.target": "[Unit]\nDescription=stub basic\n",
    "shutdown.target": "[Unit]\nDescription=stub shutdown\nDefaultDependencies=no\n",
    "default.target": "[Unit]\nDescription=stub default\n",
    "multi-user.target": "[Unit]\nDescription=stub multi-user\n",
    "network.target": "[Unit]\nDescription=stub network\n",
    "network-online.target": "[Unit]\nDescription=stub network-online\n",
    "system.slice": "[Unit]\nDescription=System Slice\nDefaultDependencies=no\n",
}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1bc")


class HarnessError(RuntimeError):
    """The private systemd could not be started or stopped cleanly."""


def cgroup2_mount() -> Path | None:
    """The cgroup2 mount: ``/sys/fs/cgroup/unified`` on hybrid hosts, else ``/sys/fs/cgroup``."""
    mounts: set[str] = set()
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            if after.split(" ", 1)[0] == "cgroup2":
                mounts.add(before.split(" ")[4])
    for candidate in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if candidate in mounts:
            return Path(candidate)
    return None


def unavailable_reason() -> str | None:
    """Why a private systemd cannot run here (None when it can): root, cgroup2 and tools needed."""
    if os.geteuid() != 0:
        return "needs root (a private systemd runs as PID 1 of new namespaces)"
    mount = cgroup2_mount()
    if mount is None:
        return "needs a cgroup2 mount (/sys/fs/cgroup/unified or /sys/fs/cgroup)"
    if not os.access(mount, os.W_OK):
        return f"needs a writable cgroup2 mount ({mount} is read-only here)"
    if not SYSTEMD_BINARY.is_file():
        return f"needs systemd at {SYSTEMD_BINARY}"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} on PATH"
    # Mount points for the namespace's overlays: they must exist; the tests never create them.
    absent = [p for p in ("/srv", "/var/lib", "/etc/systemd/system.conf") if not Path(p).exists()]
    if absent:
        return f"needs {', '.join(absent)} to exist (mount points for the private namespace)"
    return None


def strip_ansi(text: str) -> str:
    """Console text without terminal escape sequences or carriage returns."""
    return _ANSI.sub("", text).replace("\r", "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_cgroups(mount: Path) -> None:
    """Remove empty test cgroups left by earlier sessions that died (their pytest pid is gone).

    rmdir cannot remove a cgroup that still has processes or children, so nothing alive is touched;
    a directory of a session that is still running is skipped by its pid.
    """
    for entry in mount.glob(f"{CGROUP_PREFIX}*"):
        owner = entry.name[len(CGROUP_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or _pid_alive(int(owner)):
            continue
        for dirpath, _dirnames, _files in os.walk(entry, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (this kernel has no /proc/<pid>/task/<pid>/children)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields resume after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(name))
    return found


def _own_cgroup_line(pid: int) -> str:
    """The cgroup2 path of ``pid`` as seen from our (the machine's) cgroup namespace."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


LAUNCHER = """\
#!/bin/sh
# Moves itself into the test's own new cgroup, proves it is there, and only then starts the
# namespaces that run systemd. systemd must never start in the machine's root cgroup: it would move
# every process on the machine into its own scope.
set -eu
cgroup_dir=$1
cgroup_rel=$2
inner=$3
case "$cgroup_rel" in
  /|"") echo "launcher: refusing to run systemd in the root cgroup" >&2; exit 97 ;;
esac
echo $$ > "$cgroup_dir/cgroup.procs"
if ! grep -qxF "0::$cgroup_rel" /proc/$$/cgroup; then
  echo "launcher: not in $cgroup_rel after moving; refusing to start systemd" >&2
  exit 97
fi
# pdeathsig: if pytest dies, unshare dies, and --kill-child takes systemd (and the PID namespace).
exec setpriv --pdeathsig KILL -- unshare --pid --fork --kill-child --mount --propagation private \\
  --uts --cgroup --mount-proc \\
  setpriv --bounding-set -sys_time,-sys_module -- "$inner"
"""

INNER = """\
#!/bin/sh
# PID 1 of the new PID namespace until it execs systemd: builds the private mounts systemd needs.
set -eu
work={work}
ro_bind() {{ mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; }}

mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
# The console is the pty the test reads (our stdout): the manager's own messages land there. It is
# bound now, while the machine's /dev/pts is still visible, and moved into the private /dev below.
touch /run/admin-ops-test-console
mount --bind "$(readlink /proc/$$/fd/1)" /run/admin-ops-test-console
# /tmp and /var/tmp become private (PrivateTmp= directories must not land on the host), but the
# test's work directory, the checkout and its interpreter stay visible at their own paths (CI may
# clone the project under /tmp).
n=0
for keep in {keep}; do
  n=$((n + 1)); mkdir "/run/admin-ops-keep-$n"; mount --bind "$keep" "/run/admin-ops-keep-$n"
done
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
n=0
for keep in {keep}; do
  n=$((n + 1)); mkdir -p "$keep"; mount --move "/run/admin-ops-keep-$n" "$keep"
  rmdir "/run/admin-ops-keep-$n"
done

mount --bind "$work/srv" /srv
mount --bind "$work/var-lib" /var/lib
if [ -d /etc/polkit-1/rules.d ]; then mount --bind "$work/polkit-rules.d" /etc/polkit-1/rules.d; fi
ro_bind "$work/etc/passwd" /etc/passwd
ro_bind "$work/etc/group" /etc/group
ro_bind "$work/etc/system.conf" /etc/systemd/system.conf
ro_bind /etc/machine-id /etc/machine-id

ro_bind /sys /sys
# Thanks to the cgroup namespace the root of this mount is the test's own sub-cgroup.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ro_bind /proc/sys /proc/sys

mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
for node in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
  set -- $node
  mknod -m 666 "/dev/$1" c "$2" "$3"
done
mkdir -m 0755 /dev/pts
mkdir -m 1777 /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
touch /dev/console
mount --move /run/admin-ops-test-console /dev/console
rm /run/admin-ops-test-console
# As on a booted host, where systemd makes / shared itself (it leaves that to the container
# manager here): credentials (LoadCredential=) are prepared in a helper's own mount namespace and
# moved into /run/credentials, which only reaches the manager through shared propagation. The
# peer groups are new ones of this namespace: nothing propagates back to the machine's mounts.
mount --make-rshared /

exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
  container=admin-ops-test \\
  SYSTEMD_UNIT_PATH={unit_dir} \\
  SYSTEMD_GENERATOR_PATH={empty_dir} \\
  SYSTEMD_ENVIRONMENT_GENERATOR_PATH={empty_dir} \\
  {systemd} --system --unit={root_target} --log-target=console --log-level=info
"""

WRAPPER = """\
#!/bin/sh
# systemctl of the private test systemd (issue 5): given to our code through OPS_SYSTEMCTL.
exec nsenter --target {pid} --mount --pid -- systemctl "$@"
"""


class _ConsoleReader(threading.Thread):
    """Copies the manager's console (a pty) into memory and a log file until it is closed."""

    def __init__(self, master_fd: int, log_path: Path) -> None:
        super().__init__(name="private-systemd-console", daemon=True)
        self.master_fd = master_fd
        self.log_path = log_path
        self.data = bytearray()
        self.changed = threading.Condition()
        self.closed = False

    def run(self) -> None:
        with open(self.log_path, "ab") as log:
            while True:
                try:
                    chunk = os.read(self.master_fd, 65536)
                except OSError:  # EIO: the last writer closed the pty (systemd exited)
                    chunk = b""
                with self.changed:
                    if not chunk:
                        self.closed = True
                        self.changed.notify_all()
                        return
                    self.data += chunk
                    self.changed.notify_all()
                log.write(chunk)
                log.flush()

    def wait_for(self, needle: bytes, timeout: float) -> bool:
        """Block until ``needle`` has been read from the console (or it closed, or timeout)."""
        with self.changed:
            self.changed.wait_for(lambda: needle in self.data or self.closed, timeout)
            return needle in self.data

    def text(self) -> str:
        with self.changed:
            return bytes(self.data).decode(errors="replace")


@dataclass
class PrivateSystemd:
    """A running private systemd and the means to talk to it."""

    workdir: Path
    unit_dir: Path
    cgroup_dir: Path
    cgroup_mount: Path
    launcher: subprocess.Popen[bytes]
    pid: int
    systemctl_wrapper: Path
    console_log: Path
    srv: Path
    var_lib: Path
    polkit_rules: Path
    startup_seconds: float
    _reader: _ConsoleReader
    _master_fd: int
    _stopped: bool = field(default=False)

    # --- talking to it -------------------------------------------------------------------------

    def in_namespace(self, *argv: str) -> list[str]:
        """``argv`` prefixed so it runs inside the manager's mount and PID namespaces."""
        return ["nsenter", "--target", str(self.pid), "--mount", "--pid", "--", *argv]

    def run(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a program inside the namespaces and capture its output."""
        result = subprocess.run(
            self.in_namespace(*argv),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"{shlex.join(argv)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``systemctl`` against the private manager."""
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        args = ["show", unit]
        for prop in props:
            args += ["-p", prop]
        out = self.systemctl(*args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        """The unit's MainPID (0 when it has none)."""
        return int(self.show(unit, "MainPID")["MainPID"])

    def wait_for(
        self,
        unit: str,
        predicate: Callable[[dict[str, str]], bool],
        props: Iterable[str] = ("ActiveState", "SubState", "MainPID", "NRestarts", "Result"),
        timeout: float = 5.0,
    ) -> dict[str, str]:
        """Poll the unit's properties until ``predicate`` holds; raise with the last state if not.

        The service manager offers nothing to block on from here (no D-Bus client in the tests),
        so this polls ``systemctl show`` every 20 ms, bounded by ``timeout``.
        """
        props = tuple(props)
        deadline = time.monotonic() + timeout
        while True:
            state = self.show(unit, *props)
            if predicate(state):
                return state
            if time.monotonic() >= deadline:
                raise HarnessError(f"{unit} not in the expected state after {timeout}s: {state}")
            time.sleep(0.02)

    def install_unit(self, name: str, text: str, *, reload: bool = True) -> Path:
        """Write a unit file (or ``name.d/x.conf`` drop-in) into the manager's unit path."""
        path = self.unit_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if reload:
            self.systemctl("daemon-reload")
        return path

    def scratch(self, name: str) -> Path:
        """A fresh directory under the work directory (visible inside and outside the namespace)."""
        path = self.workdir / "scratch" / f"{name}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def console(self) -> str:
        """Everything the manager (and services with inherited output) wrote to its console."""
        return strip_ansi(self._reader.text())

    def console_sync(self, timeout: float = 5.0) -> int:
        """Wait until everything written to the console so far has been read.

        Returns the position in ``console()`` just after the marker used for this.

        A unique marker goes through the same pty after whatever the manager wrote before this
        call (e.g. warnings printed while loading a unit for a ``systemctl`` call that has
        returned), so once the marker is read, so is all of that.
        """
        marker = f"console-sync-{uuid.uuid4().hex}"
        self.run("/bin/sh", "-c", f"echo {marker} > /dev/console", check=True)
        if not self._reader.wait_for(marker.encode(), timeout):
            raise HarnessError("console marker not seen: is the console reader stuck?")
        text = self.console()
        return text.index(marker) + len(marker)

    # --- stopping ------------------------------------------------------------------------------

    def _kill_our_cgroup(self) -> None:
        """SIGKILL every process in OUR sub-cgroup (descendants of our launcher), nothing else."""
        assert self.cgroup_dir.parent == self.cgroup_mount
        assert self.cgroup_dir.name.startswith(CGROUP_PREFIX)
        kill_file = self.cgroup_dir / "cgroup.kill"
        if kill_file.exists():
            kill_file.write_text("1\n")
        else:  # kernels before 5.14: SIGKILL the processes listed in our subtree, one by one
            for procs in self.cgroup_dir.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)

    def _wait_unpopulated(self, timeout: float) -> bool:
        """Wait until our subtree holds no process; ``cgroup.events`` signals POLLPRI on change."""
        events = self.cgroup_dir / "cgroup.events"
        deadline = time.monotonic() + timeout
        with open(events, "rb", buffering=0) as handle:
            poller = select.poll()
            poller.register(handle, select.POLLPRI | select.POLLERR)
            while True:
                handle.seek(0)
                if b"populated 0" in handle.read():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                poller.poll(max(1, int(remaining * 1000)))

    def stop(self) -> None:
        """``systemctl --force exit``; leftovers are killed through our own ``cgroup.kill``."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.launcher.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    subprocess.run(
                        self.in_namespace("systemctl", "--force", "exit"),
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        timeout=5,
                        check=False,
                    )
            try:
                self.launcher.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill_our_cgroup()
                self.launcher.wait(timeout=5)
            if not self._wait_unpopulated(0.5):
                self._kill_our_cgroup()
                if not self._wait_unpopulated(5):
                    raise HarnessError(f"{self.cgroup_dir} still has processes after cgroup.kill")
        finally:
            self._reader.join(timeout=5)
            with contextlib.suppress(OSError):
                os.close(self._master_fd)
            for dirpath, _dirnames, _files in os.walk(self.cgroup_dir, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)


def _prepare_workdir(workdir: Path) -> dict[str, Path]:
    paths = {
        "unit_dir": workdir / "units",
        "empty_dir": workdir / "empty",
        "srv": workdir / "srv",
        "var_lib": workdir / "var-lib",
        "polkit_rules": workdir / "polkit-rules.d",
        "etc": workdir / "etc",
    }
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    for name, text in STUB_UNITS.items():
        (paths["unit_dir"] / name).write_text(text)
    (paths["etc"] / "system.conf").write_text(SYSTEM_CONF)
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    users = (
        f"{SERVICE_USER}:x:{SERVICE_UID}:{SERVICE_UID}:admin-ops:/srv/admin-ops:/usr/sbin/nologin\n"
        f"{CONTROL_USER}:x:{CONTROL_UID}:{CONTROL_UID}:admin-ops fleet daemon:{CONTROL_HOME}:"
        "/usr/sbin/nologin\n"
    )
    groups = (
        f"{SERVICE_USER}:x:{SERVICE_UID}:\n{CONTROL_USER}:x:{CONTROL_UID}:\n"
        f"{SHARED_GROUP}:x:{SHARED_GID}:{SERVICE_USER},{CONTROL_USER}\n"
    )
    (paths["etc"] / "passwd").write_text(passwd.rstrip("\n") + "\n" + users)
    (paths["etc"] / "group").write_text(group.rstrip("\n") + "\n" + groups)
    # polkitd reads its rules directory as its own user.
    with contextlib.suppress(LookupError, OSError):
        shutil.chown(paths["polkit_rules"], user="polkitd")
    paths["polkit_rules"].chmod(0o700)
    return paths


def _paths_to_keep(workdir: Path) -> list[Path]:
    """Directories under /tmp or /var/tmp that must stay visible inside the namespaces.

    The work directory, the checkout (units run its code) and the interpreter's prefix (a venv
    inside a checkout cloned under /tmp); nested ones are covered by their parent.
    """
    checkout = Path(__file__).resolve().parents[2]
    candidates = [workdir, checkout, Path(sys.prefix), Path(sys.executable).resolve().parent]
    private = (Path("/tmp"), Path("/var/tmp"))
    wanted = sorted(
        {p.resolve() for p in candidates if any(p.resolve().is_relative_to(t) for t in private)}
    )
    return [p for p in wanted if not any(p != q and p.is_relative_to(q) for q in wanted)]


def start_private_systemd(workdir: Path) -> PrivateSystemd:
    """Start a private systemd in a new sub-cgroup of our own; raise HarnessError on failure."""
    mount = cgroup2_mount()
    if mount is None:
        raise HarnessError("no cgroup2 mount")
    started = time.monotonic()
    workdir = workdir.resolve()
    paths = _prepare_workdir(workdir)
    _remove_stale_cgroups(mount)
    cgroup_dir = mount / f"{CGROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cgroup_rel = "/" + cgroup_dir.relative_to(mount).as_posix()
    if cgroup_dir.parent != mount or cgroup_rel == "/":
        raise HarnessError(f"refusing cgroup {cgroup_dir}")
    cgroup_dir.mkdir()

    launcher_path = workdir / "launcher.sh"
    inner_path = workdir / "inner.sh"
    launcher_path.write_text(LAUNCHER)
    inner_path.write_text(
        INNER.format(
            work=shlex.quote(str(workdir)),
            keep=" ".join(shlex.quote(str(p)) for p in _paths_to_keep(workdir)),
            unit_dir=shlex.quote(str(paths["unit_dir"])),
            empty_dir=shlex.quote(str(paths["empty_dir"])),
            systemd=shlex.quote(str(SYSTEMD_BINARY)),
            root_target=ROOT_TARGET,
        )
    )
    launcher_path.chmod(0o755)
    inner_path.chmod(0o755)
    console_log = workdir / "console.log"

    master_fd, slave_fd = os.openpty()
    tty.setraw(slave_fd)
    try:
        launcher = subprocess.Popen(
            ["/bin/sh", str(launcher_path), str(cgroup_dir), cgroup_rel, str(inner_path)],
            stdin=subprocess.DEVNULL,
            stdout=slave_fd,
            stderr=slave_fd,
            start_new_session=True,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    except BaseException:
        os.close(master_fd)
        cgroup_dir.rmdir()
        raise
    finally:
        os.close(slave_fd)
    reader = _ConsoleReader(master_fd, console_log)
    reader.start()

    harness = PrivateSystemd(
        workdir=workdir,
        unit_dir=paths["unit_dir"],
        cgroup_dir=cgroup_dir,
        cgroup_mount=mount,
        launcher=launcher,
        pid=0,
        systemctl_wrapper=workdir / "systemctl-in-namespace",
        console_log=console_log,
        srv=paths["srv"],
        var_lib=paths["var_lib"],
        polkit_rules=paths["polkit_rules"],
        startup_seconds=0.0,
        _reader=reader,
        _master_fd=master_fd,
    )
    try:
        harness.pid = _wait_for_systemd(harness, cgroup_rel)
        harness.systemctl_wrapper.write_text(WRAPPER.format(pid=harness.pid))
        harness.systemctl_wrapper.chmod(0o755)
        _wait_until_running(harness)
    except BaseException:
        harness.stop()
        raise
    harness.startup_seconds = time.monotonic() - started
    return harness


def _wait_for_systemd(harness: PrivateSystemd, cgroup_rel: str) -> int:
    """The PID of systemd (unshare's child) once it has exec'd, after checking its cgroup."""
    launcher = harness.launcher
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            harness._reader.wait_for(b"\0", timeout=2)  # until the pty closes: all output read
            raise HarnessError(f"launcher exited {launcher.returncode}: {harness.console()}")
        for pid in _children_of(launcher.pid):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cgroup = _own_cgroup_line(pid)
            except OSError:
                continue
            if comm != "systemd":
                continue
            if cgroup != cgroup_rel and not cgroup.startswith(cgroup_rel + "/"):
                raise HarnessError(f"systemd runs in {cgroup!r}, not in our {cgroup_rel!r}")
            return pid
        # Waiting for an exec chain in another process: there is no event to wait on.
        time.sleep(0.005)
    raise HarnessError("systemd did not start in time")


def _wait_until_running(harness: PrivateSystemd) -> None:
    """Poll ``systemctl is-system-running`` until it prints ``running`` (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        if harness.launcher.poll() is not None:
            harness._reader.wait_for(b"\0", timeout=2)
            raise HarnessError(f"systemd exited early: {harness.console()}")
        state = harness.run("systemctl", "is-system-running", timeout=5).stdout.strip()
        if state == "running":
            return
        if state == "degraded":
            failed = harness.run("systemctl", "--failed", "--no-pager").stdout
            raise HarnessError(f"private systemd is degraded:\n{failed}")
        # The manager is still coming up; its private socket offers nothing to block on yet.
        time.sleep(0.01)
    raise HarnessError(f"private systemd not running after {READY_TIMEOUT}s (last: {state!r})")
