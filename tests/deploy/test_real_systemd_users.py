"""Secrets, users and start limits of the shipped units, against a real systemd 252.

The bot runs as ``opsbot`` and the fleet daemon as ``opsctl``; their secrets arrive as systemd
credentials; they share only the checkout (group ``admin-ops``, set up by deploy/README.md's own
commands). See ``systemd_harness`` and ``deploy_support`` for the private systemd and the tree.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable

import pytest

from tests.deploy.deploy_support import (
    BOT_UNIT,
    CHECKOUT_INSIDE,
    CONTROL_UNIT,
    ETC_INSIDE,
    LIB_INSIDE,
    SLEEPER,
    TEST_SECRETS,
    DeployTree,
    Polkit,
    ShippedUnit,
    as_user,
    git,
)
from tests.deploy.systemd_harness import (
    CONTROL_UID,
    SERVICE_UID,
    SHARED_GID,
    PrivateSystemd,
)

pytestmark = pytest.mark.systemd

#: unit -> (its user, its state directory, the credentials it loads)
UNITS = {
    BOT_UNIT: (SERVICE_UID, "admin-ops", ("discord-token", "control-secret", "redis-url")),
    CONTROL_UNIT: (CONTROL_UID, "admin-ops-control", ("control-secret", "redis-url")),
}
#: credential name -> the variable it stands in for (core.hardening.CREDENTIALS)
VARIABLES = {
    "discord-token": "DISCORD_TOKEN",
    "control-secret": "OPS_CONTROL_SECRET",
    "redis-url": "REDIS_URL",
}


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def probe(service: ShippedUnit, *args: str, notify: bool = False) -> None:
    """Run the unit probe as the shipped unit's main process (only ExecStart= and Type= change)."""
    kind = "Type=notify\nNotifyAccess=main\n" if notify else ""
    service.configure(
        kind + f"Environment=PYTHONPATH={LIB_INSIDE}\n" + service.probe_command(*args)
    )


@pytest.fixture
def running_probes(
    shipped_unit: Callable[[str], ShippedUnit], deploy_tree: DeployTree
) -> dict[str, tuple[int, dict[str, object]]]:
    """Both shipped units running the ``credentials`` probe: unit -> (main PID, what it found).

    ``shipped_unit`` stops them after the test.
    """
    found = {}
    for unit, (uid, state, _names) in UNITS.items():
        out, out_inside = deploy_tree.out_dir("credentials", state, uid)
        probe(shipped_unit(unit), "credentials", out_inside, notify=True)
        deploy_tree.systemd.systemctl("start", unit)  # Type=notify: the probe has written
        facts = json.loads((out / "credentials.json").read_text())
        found[unit] = (deploy_tree.systemd.main_pid(unit), facts)
    return found


# --- secrets: credentials, never the environment ------------------------------------------------


def test_secrets_arrive_as_credentials_and_are_in_no_processs_environment(
    running_probes: dict[str, tuple[int, dict[str, object]]], deploy_tree: DeployTree
) -> None:
    systemd = deploy_tree.systemd
    for unit, (pid, facts) in running_probes.items():
        names = UNITS[unit][2]
        assert facts["credentials_directory"] == f"/run/credentials/{unit}"
        assert facts["files"] == sorted(names)
        assert facts["in_environment"] == []
        # core.hardening.with_credentials (what EnvReader uses) finds each secret in its file.
        assert facts["found"] == {
            VARIABLES[name]: digest(TEST_SECRETS[name]) if name in names else None
            for name in VARIABLES
        }
        assert (facts["dumpable_before"], facts["made_undumpable"]) == (True, True)
        assert facts["dumpable_after"] is False
        # Root may read any environment: the main process's holds none of the secrets.
        environ = systemd.run("cat", f"/proc/{pid}/environ", check=True).stdout
        variables = [entry.split("=", 1)[0] for entry in environ.split("\0")]
        assert not set(VARIABLES.values()) & set(variables), variables
        for value in TEST_SECRETS.values():
            assert value not in environ


def denied(systemd: PrivateSystemd, uid: int, path: str) -> bool:
    """Whether ``uid`` (with its unit's groups) is refused reading ``path`` (file or directory)."""
    read = f"if [ -d {path} ]; then ls {path}; else cat {path}; fi"
    result = systemd.run(*as_user(uid), "/bin/sh", "-c", read)
    return result.returncode != 0 and "Permission denied" in result.stderr


def test_neither_user_can_read_the_others_secrets_state_or_process(
    running_probes: dict[str, tuple[int, dict[str, object]]], deploy_tree: DeployTree
) -> None:
    """The bot's processes (a git hook, say) and the daemon's keep out of each other's way."""
    systemd = deploy_tree.systemd
    for unit, (pid, _facts) in running_probes.items():
        owner, state, names = UNITS[unit]
        other = CONTROL_UID if owner == SERVICE_UID else SERVICE_UID
        # The other user: no credential, no state, nothing of the process.
        for name in names:
            assert denied(systemd, other, f"/run/credentials/{unit}/{name}"), (unit, name)
        assert denied(systemd, other, f"/var/lib/{state}")
        for entry in ("environ", "mem", "fd"):
            assert denied(systemd, other, f"/proc/{pid}/{entry}"), (unit, entry)
        # Its own user, in another process (a hook the service runs walking up to it): the
        # undumpable main process hides its memory and environment even from that.
        for entry in ("environ", "mem", "fd"):
            assert denied(systemd, owner, f"/proc/{pid}/{entry}"), (unit, entry)
    # Nor does either user read the files systemd copies the credentials from.
    for uid in (SERVICE_UID, CONTROL_UID):
        for name in TEST_SECRETS:
            assert denied(systemd, uid, f"{ETC_INSIDE}/{name}")


# --- the shared checkout ------------------------------------------------------------------------


def pull_as(tree: DeployTree, service: ShippedUnit, uid: int, state: str) -> dict[str, object]:
    out, out_inside = tree.out_dir("pull", state, uid)
    probe(service, "pull", out_inside, CHECKOUT_INSIDE)
    tree.systemd.systemctl("start", "--wait", service.name)
    result: dict[str, object] = json.loads((out / "pull.json").read_text())
    return result


def test_the_daemons_user_pulls_the_bots_checkout_and_the_bots_user_pulls_after_it(
    shipped_unit: Callable[[str], ShippedUnit], deploy_tree: DeployTree
) -> None:
    """deploy/README.md's shared checkout: opsctl and opsbot take turns at pulling it.

    Each replaces files the other wrote; git stays clean and the files group-writable throughout.
    """
    bot, control = shipped_unit(BOT_UNIT), shipped_unit(CONTROL_UNIT)
    turns = [
        (control, CONTROL_UID, "admin-ops-control"),
        (bot, SERVICE_UID, "admin-ops"),
        (control, CONTROL_UID, "admin-ops-control"),
    ]
    for service, uid, state in turns:
        head = deploy_tree.commit_upstream(f"a change pulled by uid {uid}")

        pulled = pull_as(deploy_tree, service, uid, state)

        assert (pulled["ran"], pulled["ok"], pulled["uid"]) == (True, True, uid), pulled
        assert head[:7] in str(pulled["summary"])
        assert deploy_tree.checkout_head() == head
    status = git(deploy_tree.checkout, "status", "--porcelain", config=deploy_tree.gitconfig)
    assert status == ""
    # Whoever wrote them, the checkout's files stay the group's and writable by it (but for
    # git's own configuration and hooks, which are root's).
    git_dir = deploy_tree.checkout / ".git"
    roots = (git_dir / "config", git_dir / "hooks")
    for path in (deploy_tree.checkout, *deploy_tree.checkout.rglob("*")):
        if path.is_symlink() or ".venv" in path.parts:
            continue
        if any(path == root or root in path.parents for root in roots):
            assert path.stat().st_uid == 0, path
            continue
        mode = path.stat()
        assert mode.st_gid == SHARED_GID, path
        assert mode.st_mode & 0o060 == 0o060 or ".git/objects/" in str(path), path


@pytest.mark.parametrize("uid", [SERVICE_UID, CONTROL_UID])
@pytest.mark.parametrize("path", [".git/hooks/post-merge", ".git/config", ".git/hooks/pre-push"])
def test_neither_user_can_plant_a_command_for_the_others_next_pull(
    deploy_tree: DeployTree, uid: int, path: str
) -> None:
    """Hooks and ``.git/config`` (core.fsmonitor, core.sshCommand...) run for whoever pulls."""
    target = f"{CHECKOUT_INSIDE}/{path}"
    plant = f"echo '#!/bin/sh' >> {target}"

    result = deploy_tree.systemd.run(*as_user(uid), "/bin/sh", "-c", plant)

    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert not (deploy_tree.checkout / path).exists() or path == ".git/config"


# --- one restart lock for both users (OPS_LOCK_DIR=/run/admin-ops) -----------------------------


def lock_probe(
    tree: DeployTree, service: ShippedUnit, *args: str, hold: bool = False
) -> dict[str, object]:
    """Run a lock mode of the probe as ``service``'s main process; what it wrote.

    ``hold``: a ``Type=notify`` unit that is started (READY once it holds the lock) and left
    running; else a ``start --wait`` until it exits.
    """
    uid, state, _names = UNITS[service.name]
    out, out_inside = tree.out_dir("lock", state, uid)
    probe(service, args[0], out_inside, *args[1:], notify=hold)
    tree.systemd.systemctl("start", *(() if hold else ("--wait",)), service.name)
    facts: dict[str, object] = json.loads((out / "lock.json").read_text())
    assert (facts["uid"], facts["lock_dir"]) == (uid, "/run/admin-ops"), facts
    return facts


def test_the_bot_and_the_daemon_take_one_restart_lock_in_the_shared_directory(
    shipped_unit: Callable[[str], ShippedUnit], deploy_tree: DeployTree
) -> None:
    """As shipped: tmpfiles.d's /run/admin-ops, OPS_LOCK_DIR from the examples, the hardening.

    The daemon's check waits while the bot holds the lock on a unit, then sees the restart the
    bot reserved there (its own record and systemd's know nothing of it); and the bot sees the
    daemon's in turn.
    """
    systemd = deploy_tree.systemd
    bot, control = shipped_unit(BOT_UNIT), shipped_unit(CONTROL_UNIT)
    unit = f"lock-{uuid.uuid4().hex[:8]}.service"
    before = time.monotonic()
    lock_probe(deploy_tree, bot, "lock-hold", unit, hold=True)

    busy = lock_probe(deploy_tree, control, "lock-check", unit, "0.2")

    assert busy["busy"] == f"another process on this host is restarting {unit}"
    systemd.systemctl("stop", BOT_UNIT)  # its process exits, and the lock goes with it
    seen = lock_probe(deploy_tree, control, "lock-check", unit, "10")
    ago, bound = seen["reserved_ago"], time.monotonic() - before
    assert isinstance(ago, float)
    assert isinstance(seen["interval"], float)
    assert 0.0 <= ago <= min(bound, seen["interval"]), (seen, bound)  # "restarted 0 s ago"
    # Created by the daemon under RestrictSUIDSGID=yes: setgid handed down, sticky allowed.
    assert seen["fresh_locks_mode"] == "3770", seen
    back = lock_probe(deploy_tree, bot, "lock-check", unit, "10")
    assert isinstance(back["reserved_ago"], float)
    assert 0.0 <= back["reserved_ago"] <= time.monotonic() - before
    # The bot's user created the file; the group admin-ops (the daemon's user) may use it, and
    # (sticky, root's dir) may not remove it.
    locks = "/run/admin-ops/locks"
    shown = systemd.run("stat", "-c", "%a %U %G %F", locks, f"{locks}/restart-{unit}.lock")
    assert shown.stdout.splitlines() == [
        "3770 root admin-ops directory",
        "660 opsbot admin-ops regular file",
    ]
    assert systemd.run("stat", "-c", "%a %U %G", "/run/admin-ops").stdout == "3770 root admin-ops\n"
    as_opsctl = ("setpriv", "--reuid=opsctl", "--regid=opsctl", "--init-groups")
    # Sticky: the daemon's user may not remove the lock file the bot's user created.
    removed = systemd.run(*as_opsctl, "rm", "-f", f"{locks}/restart-{unit}.lock")
    assert removed.returncode != 0
    assert removed.stderr.startswith("rm: cannot remove"), removed.stderr
    assert "Operation not permitted" in removed.stderr


# --- unit_started_ago as each service user ------------------------------------------------------


@pytest.mark.parametrize("unit", [BOT_UNIT, CONTROL_UNIT])
def test_unit_started_ago_works_as_each_service_user_under_the_hardening(
    shipped_unit: Callable[[str], ShippedUnit], deploy_tree: DeployTree, unit: str
) -> None:
    """``systemctl show`` is a property read: polkit needs no rule for it."""
    systemd = deploy_tree.systemd
    target, never = "started-target.service", "never-started.service"
    systemd.install_unit(target, SLEEPER.format(description="started"), reload=False)
    systemd.install_unit(never, SLEEPER.format(description="never started"))
    uid, state, _names = UNITS[unit]
    out, out_inside = deploy_tree.out_dir("started", state, uid)
    service = shipped_unit(unit)
    probe(service, "started-ago", out_inside, target, unit, never, notify=False)
    before = time.monotonic()
    systemd.systemctl("restart", target)

    systemd.systemctl("start", "--wait", unit)

    bound = time.monotonic() - before
    ago = json.loads((out / "started.json").read_text())
    assert ago[never] is None
    assert ago[target] is not None
    assert 0.0 <= ago[target] <= bound, (ago, bound)
    # The probe asked about its own unit while running: it had just become active.
    assert ago[unit] is not None
    assert 0.0 <= ago[unit] <= ago[target], ago
    systemd.systemctl("stop", target)


# --- start limits -------------------------------------------------------------------------------


def test_a_crash_looping_bot_ends_failed_after_the_burst(
    bot_unit: ShippedUnit, deploy_tree: DeployTree
) -> None:
    """Restart=on-failure keeps restarting a bot that crashes at start until StartLimitBurst=.

    Only the delay is shortened for the test (the shipped 5 s, times 10 starts, is the "about
    50 s" deploy/README.md quotes).
    """
    systemd = deploy_tree.systemd
    bot_unit.configure("RestartSec=100ms\nExecStart=\nExecStart=/bin/false\n")
    start = systemd.console_sync()

    systemd.systemctl("start", BOT_UNIT, check=False)
    state = systemd.wait_for(BOT_UNIT, lambda s: s["ActiveState"] == "failed", timeout=15)

    burst = int(systemd.show(BOT_UNIT, "StartLimitBurst")["StartLimitBurst"])
    # The first start and burst - 1 automatic restarts ran; the next restart was refused.
    assert int(state["NRestarts"]) == burst
    end = systemd.console_sync()
    said = systemd.console()[start:end]
    assert f"{BOT_UNIT}: Start request repeated too quickly." in said
    assert said.count(f"{BOT_UNIT}: Main process exited") == burst


# --- the polkit rule, per user ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "unit", "allowed"),
    [
        (CONTROL_UID, CONTROL_UNIT, True),
        (CONTROL_UID, BOT_UNIT, True),
        (CONTROL_UID, "proxy.service", True),
        (CONTROL_UID, "demo-proxy.service", False),
        (SERVICE_UID, BOT_UNIT, True),
        (SERVICE_UID, "proxy.service", True),
        (SERVICE_UID, CONTROL_UNIT, False),
    ],
    ids=lambda value: str(value),
)
def test_polkit_rule_gives_each_user_exactly_its_own_units(
    polkit: Polkit, uid: int, unit: str, allowed: bool
) -> None:
    # try-restart: authorised like restart, and it starts nothing that is not already running.
    result = polkit.systemd.run(
        *as_user(uid), "systemctl", "--no-ask-password", "try-restart", "--", unit
    )

    if allowed:
        assert (result.returncode, result.stderr) == (0, "")
    else:
        assert result.returncode != 0
        assert "Access denied" in result.stderr


@pytest.mark.parametrize("uid", [SERVICE_UID, CONTROL_UID])
@pytest.mark.parametrize(
    "args",
    [
        ("daemon-reload",),
        ("set-environment", "FOO=bar"),
        ("enable", "proxy.service"),
        ("stop", "proxy.service"),
    ],
    ids=lambda args: " ".join(args),
)
def test_polkit_rule_refuses_these_users_anything_else_of_systemd(
    polkit: Polkit, uid: int, args: tuple[str, ...]
) -> None:
    """Refused by the rule itself ("Access denied"), not merely for want of a password."""
    result = polkit.systemd.run(*as_user(uid), "systemctl", "--no-ask-password", *args)

    assert result.returncode != 0
    assert "Access denied" in result.stderr, result.stderr
