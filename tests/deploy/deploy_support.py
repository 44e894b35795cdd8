"""Helpers for the deployment tests: the /srv test tree, the shipped units, D-Bus and polkit.

Inside the private namespaces (see ``systemd_harness``):

- ``/srv`` is the session's test tree: ``/srv/admin-ops`` (home of the service user ``opsbot``),
  ``/srv/admin-ops/app`` (a git checkout of ``/srv/origin.git``, with ``.venv/bin/python``, shared
  with ``opsctl`` through the group ``admin-ops`` by deploy/README.md's own commands),
  ``/srv/admin-ops-control`` (home of the daemon's user ``opsctl``), ``/srv/etc-admin-ops``
  standing in for ``/etc/admin-ops`` (env files and credential files), and
  ``/srv/admin-ops-test-lib`` holding the unit probe and a copy of ``core/`` any user may read;
- ``opsbot``, ``opsctl`` and ``admin-ops`` exist (``/etc/passwd`` and ``/etc/group`` overlays),
  ``/var/lib`` is the test's ``var-lib`` directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.systemd_harness import (
    CONTROL_HOME,
    CONTROL_UID,
    SERVICE_UID,
    SHARED_GID,
    PrivateSystemd,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROBE = Path(__file__).resolve().parent / "unit_probe.py"
#: Creates /run/admin-ops, the restart locks shared by the bot's and the daemon's users.
LOCKS_TMPFILES = DEPLOY / "tmpfiles.d" / "admin-ops-locks.conf"
REQUIRE_ENV = "ADMIN_OPS_REQUIRE_SYSTEMD"
BOT_UNIT = "admin-ops-bot.service"
CONTROL_UNIT = "admin-ops-control.service"
SHIPPED_UNITS = (BOT_UNIT, CONTROL_UNIT)
#: The bot unit's OnFailure=: a oneshot, installed with the others.
ROLLBACK_UNIT = "admin-ops-rollback.service"
# Inside the namespace: the stand-in for /etc/admin-ops, and what any user may read and run.
ETC_INSIDE = "/srv/etc-admin-ops"
LIB_INSIDE = "/srv/admin-ops-test-lib"
CHECKOUT_INSIDE = "/srv/admin-ops/app"
# The secrets the test tree's credential files hold (deploy/README.md step 3).
TEST_SECRETS = {
    "discord-token": "test-token-not-real",
    "control-secret": "test-control-secret-not-real-0123456789",
    "redis-url": "redis://:test-redis-password@127.0.0.1:6379/0",
}
# What a unit's process needs to run as a user (inside the namespace): setpriv drops every
# capability once the uid is not 0.
PLAIN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason``, or fail when ``ADMIN_OPS_REQUIRE_SYSTEMD=1`` says these must run."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the real-systemd tests cannot run: {reason}")
    pytest.skip(reason)


def git(cwd: Path, *args: str, config: Path | None = None) -> str:
    """Run git for fixture set-up, isolated from any real user or system configuration.

    ``config`` is used as the global configuration; the tree's one trusts every directory, because
    the test repositories belong to the service user and root pushes into them (git's local
    transport drops ``-c`` options, so ``safe.directory`` must come from a file).
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "GIT_CONFIG_GLOBAL": str(config) if config else "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "LC_ALL": "C",
    }
    base = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.invalid"]
    out = subprocess.run(
        [*base, *args],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {out.stderr.strip()}")
    return out.stdout.strip()


def chown_tree(path: Path, uid: int) -> None:
    """``chown -R uid:uid path`` without following symlinks."""
    os.chown(path, uid, uid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def service_user_python(systemd: PrivateSystemd) -> str | None:
    """An interpreter (3.11+) the service user can run under ``ProtectHome=``/``PrivateTmp=``."""
    hidden = ("/root/", "/home/", "/run/user/", "/tmp/", "/var/tmp/")
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not candidate:
            continue
        real = os.path.realpath(candidate)
        if real.startswith(hidden) or not os.path.isfile(real):
            continue
        check = systemd.run(
            *as_service_user(),
            real,
            "-c",
            "import sys; sys.exit(sys.version_info < (3, 11))",
        )
        if check.returncode == 0:
            return real
    return None


def as_service_user() -> tuple[str, ...]:
    """Prefix that runs a program as the service user (inside the namespace)."""
    uid = str(SERVICE_UID)
    return ("setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "--")


def as_user(uid: int) -> tuple[str, ...]:
    """Prefix that runs a program as ``uid`` with the groups its unit gives it (admin-ops)."""
    ids = str(uid)
    return ("setpriv", "--reuid", ids, "--regid", ids, "--groups", str(SHARED_GID), "--")


def readme_block(containing: str) -> str:
    """The one ``sh`` block of deploy/README.md that contains ``containing``."""
    blocks = re.findall(r"```sh\n(.*?)```", (DEPLOY / "README.md").read_text(), re.DOTALL)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} sh blocks of deploy/README.md contain {containing!r}"
    return found[0]


@dataclass(frozen=True)
class DeployTree:
    """The shipped units installed in the private systemd, and the test tree they run in."""

    systemd: PrivateSystemd
    python: str
    checkout: Path
    upstream: Path
    etc: Path
    gitconfig: Path

    def commit_upstream(self, subject: str) -> str:
        """Push a new commit to ``/srv/origin.git``; return its hash."""
        name = f"f-{uuid.uuid4().hex[:8]}.txt"
        (self.upstream / name).write_text(subject + "\n")
        git(self.upstream, "add", name, config=self.gitconfig)
        git(self.upstream, "commit", "-q", "-m", subject, config=self.gitconfig)
        git(self.upstream, "push", "-q", "origin", "HEAD:main", config=self.gitconfig)
        return git(self.upstream, "rev-parse", "HEAD", config=self.gitconfig)

    def checkout_head(self) -> str:
        return git(self.checkout, "rev-parse", "HEAD", config=self.gitconfig)

    def out_dir(
        self, name: str, state: str = "admin-ops", uid: int = SERVICE_UID
    ) -> tuple[Path, str]:
        """A fresh directory in a unit's ``StateDirectory=``: (path outside, path inside).

        That is the only place besides the checkout where a shipped unit may write; ``uid`` is the
        unit's user, who owns its state directory.
        """
        leaf = f"{name}-{uuid.uuid4().hex[:8]}"
        outside = self.systemd.var_lib / state / leaf
        outside.mkdir(parents=True)
        chown_tree(outside.parent, uid)
        return outside, f"/var/lib/{state}/{leaf}"

    def run_readme(self, containing: str) -> None:
        """Run deploy/README.md's ``sh`` block containing ``containing`` as root, as written.

        The paths it names are the test tree's own inside the namespace; only the environment is
        a clean one, as in a root shell.
        """
        script = readme_block(containing)
        self.systemd.run("/bin/sh", "-euc", script, env=PLAIN_ENV, check=True, timeout=30)


#: The only settings whose paths the test moves: out of /etc, which the namespace shares.
MOVED_SETTINGS = ("EnvironmentFile=", "LoadCredential=")


def shipped_unit_text(name: str) -> str:
    """A shipped unit, adjusted for the test: only the env and credential files move out of /etc."""
    lines = (DEPLOY / name).read_text().splitlines(keepends=True)
    return "".join(
        line.replace("/etc/admin-ops/", f"{ETC_INSIDE}/")
        if line.startswith(MOVED_SETTINGS)
        else line
        for line in lines
    )


def build_deploy_tree(systemd: PrivateSystemd) -> DeployTree:
    """Build the /srv test tree and install the shipped units (adjusted) into the manager."""
    python = service_user_python(systemd)
    if python is None:
        skip_or_fail("no Python 3.11+ outside /root, /home and /tmp for the service user to run")
    assert python is not None
    srv = systemd.srv
    gitconfig = systemd.workdir / "gitconfig"
    gitconfig.write_text("[safe]\n\tdirectory = *\n")

    home = srv / "admin-ops"
    home.mkdir(mode=0o750)
    control_home = systemd.srv / Path(CONTROL_HOME).relative_to("/srv")
    control_home.mkdir(mode=0o700)
    os.chown(control_home, CONTROL_UID, CONTROL_UID)
    origin = srv / "origin.git"
    git(srv, "init", "-q", "--bare", "-b", "main", str(origin))
    upstream = systemd.scratch("upstream")
    git(upstream, "init", "-q", "-b", "main")
    (upstream / "README").write_text("admin-ops test checkout\n")
    (upstream / ".gitignore").write_text(".venv/\n")
    git(upstream, "add", "README", ".gitignore")
    git(upstream, "commit", "-q", "-m", "initial commit")
    git(upstream, "remote", "add", "origin", str(origin))
    git(upstream, "push", "-q", "origin", "HEAD:main")
    checkout = home / "app"
    git(srv, "clone", "-q", str(origin), str(checkout))
    # The remote as the bot sees it from inside the namespace.
    git(checkout, "remote", "set-url", "origin", "/srv/origin.git")
    venv_bin = checkout / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(python)
    chown_tree(home, SERVICE_UID)
    chown_tree(origin, SERVICE_UID)

    lib = srv / "admin-ops-test-lib"
    (lib / "core").mkdir(parents=True)
    shutil.copy(PROBE, lib / PROBE.name)
    lib_modules = ("__init__.py", "ops_exec.py", "hardening.py", "journal.py", "env_reader.py")
    for name in (*lib_modules, "names.py"):
        shutil.copy(ROOT / "core" / name, lib / "core" / name)
    for path in (lib, lib / "core"):
        path.chmod(0o755)
    for path in lib.rglob("*.py"):
        path.chmod(0o644)

    etc = srv / "etc-admin-ops"
    etc.mkdir(mode=0o700)
    # As shipped: the env files hold no secrets, the credential files do (README step 3).
    shutil.copy(DEPLOY / "admin-ops.env.example", etc / "bot.env")
    shutil.copy(DEPLOY / "admin-ops-control.env.example", etc / "control.env")
    for name, value in TEST_SECRETS.items():
        (etc / name).write_text(value + "\n")
    for path in etc.iterdir():
        path.chmod(0o600)

    # deploy/README.md step 4: the restart locks' directory, which the units' ReadWritePaths= need.
    locks = systemd.run("systemd-tmpfiles", "--create", str(LOCKS_TMPFILES), env=PLAIN_ENV)
    assert (locks.returncode, locks.stderr) == (0, ""), locks.stderr
    for name in (*SHIPPED_UNITS, ROLLBACK_UNIT):
        systemd.install_unit(name, shipped_unit_text(name), reload=False)
    systemd.systemctl("daemon-reload")
    tree = DeployTree(
        systemd=systemd,
        python=python,
        checkout=checkout,
        upstream=upstream,
        etc=etc,
        gitconfig=gitconfig,
    )
    # The checkout shared with opsctl, and opsctl trusting it: deploy/README.md's commands.
    tree.run_readme("core.sharedRepository")
    tree.run_readme("safe.directory")
    # The stand-in remote is a local repository owned by opsbot, which git run by opsctl would
    # refuse just the same; a real remote is reached over ssh and owned by nobody on this host.
    systemd.run(
        "runuser", "-u", "opsctl", "--", "git", "config", "--global", "--add", "safe.directory",
        "/srv/origin.git", env=PLAIN_ENV, check=True,
    )  # fmt: skip
    return tree


@dataclass
class ShippedUnit:
    """A shipped unit with a test drop-in that changes what it runs, never its hardening."""

    tree: DeployTree
    name: str

    @property
    def dropin_dir(self) -> Path:
        return self.tree.systemd.unit_dir / f"{self.name}.d"

    def configure(self, service_lines: str, *, sudo: bool = False) -> None:
        """Replace the unit's test drop-in; ``sudo`` also installs deploy/admin-ops-sudo.conf."""
        shutil.rmtree(self.dropin_dir, ignore_errors=True)
        self.dropin_dir.mkdir()
        (self.dropin_dir / "50-test.conf").write_text(f"[Service]\n{service_lines}")
        if sudo:
            shutil.copy(DEPLOY / "admin-ops-sudo.conf", self.dropin_dir / "60-sudo.conf")
        systemd = self.tree.systemd
        systemd.systemctl("daemon-reload")
        # Several tests start this unit: keep its StartLimitBurst= from refusing a later one.
        systemd.systemctl("reset-failed", self.name, check=False)

    def probe_command(self, *args: str) -> str:
        """An ``ExecStart=`` running the unit probe as the service user's Python."""
        command = " ".join((self.tree.python, f"{LIB_INSIDE}/unit_probe.py", *args))
        return f"ExecStart=\nExecStart={command}\n"

    def reset(self) -> None:
        systemd = self.tree.systemd
        systemd.systemctl("stop", self.name, check=False)
        shutil.rmtree(self.dropin_dir, ignore_errors=True)
        systemd.systemctl("daemon-reload")
        systemd.systemctl("reset-failed", self.name, check=False)


POLKITD_CANDIDATES = ("/usr/lib/polkit-1/polkitd", "/usr/libexec/polkitd")
DBUS_SOCKET = """\
[Unit]
Description=D-Bus System Message Bus Socket
[Socket]
ListenStream=/run/dbus/system_bus_socket
"""
DBUS_SERVICE = """\
[Unit]
Description=D-Bus System Message Bus
Requires=dbus.socket
[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/dbus-daemon --system --address=systemd: --nofork --nopidfile \\
  --systemd-activation --syslog-only
"""
POLKIT_SERVICE = """\
[Unit]
Description=Authorization Manager
[Service]
Type=dbus
BusName=org.freedesktop.PolicyKit1
ExecStart={polkitd} --no-debug
"""
SLEEPER = """\
[Unit]
Description={description}
[Service]
Type=exec
ExecStart=/bin/sleep infinity
"""


@dataclass(frozen=True)
class Polkit:
    """D-Bus and polkitd running in the private systemd with the shipped rule installed."""

    systemd: PrivateSystemd


def start_system_bus(systemd: PrivateSystemd) -> None:
    """A D-Bus system bus in the private systemd (``systemctl start --wait`` and polkit need it)."""
    if not os.path.exists("/usr/bin/dbus-daemon"):
        skip_or_fail("these tests need dbus-daemon installed")
    systemd.install_unit("dbus.socket", DBUS_SOCKET, reload=False)
    systemd.install_unit("dbus.service", DBUS_SERVICE)
    systemd.systemctl("start", "dbus.socket")


def start_polkit(systemd: PrivateSystemd) -> Polkit:
    """Start polkitd on the system bus, with deploy/polkit/50-admin-ops.rules installed."""
    polkitd = next((p for p in POLKITD_CANDIDATES if os.path.exists(p)), None)
    if polkitd is None:
        skip_or_fail("the polkit tests need polkitd installed")
    rules = systemd.polkit_rules / "50-admin-ops.rules"
    shutil.copy(DEPLOY / "polkit" / "50-admin-ops.rules", rules)
    rules.chmod(0o644)
    systemd.install_unit("polkit.service", POLKIT_SERVICE.format(polkitd=polkitd), reload=False)
    # proxy.service is in the shipped rule's allow-list; demo-proxy.service is not.
    systemd.install_unit("proxy.service", SLEEPER.format(description="allow-listed"), reload=False)
    systemd.install_unit("demo-proxy.service", SLEEPER.format(description="demo"), reload=False)
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", "polkit.service", "proxy.service", "demo-proxy.service")
    return Polkit(systemd=systemd)
