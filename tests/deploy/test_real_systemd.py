"""``core.ops_exec`` and the shipped ``deploy/`` files against a real systemd 252 (issue 5).

One private systemd runs for the session (see ``systemd_harness``); each test uses its own units.
Our code reaches it through ``OPS_SYSTEMCTL`` (a wrapper doing ``nsenter ... systemctl``), or, for
processes running as units, through the plain ``systemctl`` they find inside the namespace.
"""

from __future__ import annotations

import json
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from core import ops_exec
from tests.deploy.deploy_support import (
    BOT_UNIT,
    CHECKOUT_INSIDE,
    CONTROL_UNIT,
    ETC_INSIDE,
    LIB_INSIDE,
    MOVED_SETTINGS,
    PROBE,
    ROOT,
    SHIPPED_UNITS,
    SLEEPER,
    TEST_SECRETS,
    DeployTree,
    Polkit,
    ShippedUnit,
    as_service_user,
    shipped_unit_text,
)
from tests.deploy.systemd_harness import (
    CONTROL_HOME,
    CONTROL_UID,
    SERVICE_UID,
    PrivateSystemd,
)

pytestmark = pytest.mark.systemd

CAP_SETGID, CAP_SETUID, CAP_AUDIT_WRITE = 6, 7, 29


def events(out: Path) -> list[str]:
    """The probe's event log: one ``<event> <pid>`` per line."""
    return (out / "events.log").read_text().splitlines()


# --- systemctl_restart / deferred_systemctl_restart against the real manager -------------------


async def test_restart_of_a_real_unit_changes_its_main_pid(systemctl_env: PrivateSystemd) -> None:
    systemd = systemctl_env
    systemd.install_unit("demo-proxy.service", SLEEPER.format(description="demo"))
    systemd.systemctl("start", "demo-proxy.service")
    before = systemd.main_pid("demo-proxy.service")

    ok, summary = await ops_exec.systemctl_restart("demo-proxy.service")

    assert (ok, summary) == (True, "restarted demo-proxy.service")
    after = systemd.show("demo-proxy.service", "ActiveState", "MainPID")
    assert after["ActiveState"] == "active"
    assert int(after["MainPID"]) not in (0, before)


async def test_restart_of_a_missing_unit_reports_systemds_message(
    systemctl_env: PrivateSystemd,
) -> None:
    ok, summary = await ops_exec.systemctl_restart("no-such-unit-3f9a.service")

    assert ok is False
    assert "Unit no-such-unit-3f9a.service not found." in summary


async def test_restart_that_fails_is_reported(systemctl_env: PrivateSystemd) -> None:
    systemd = systemctl_env
    flag = systemd.scratch("flaky") / "broken"
    systemd.install_unit(
        "flaky-proxy.service",
        "[Service]\nType=exec\n"
        f"ExecStartPre=/bin/sh -c 'test ! -e {flag}'\n"
        "ExecStart=/bin/sleep infinity\n",
    )
    systemd.systemctl("start", "flaky-proxy.service")
    flag.touch()  # from now on the unit cannot start again

    ok, summary = await ops_exec.systemctl_restart("flaky-proxy.service")

    assert ok is False
    assert "Job for flaky-proxy.service failed" in summary
    assert systemd.show("flaky-proxy.service", "ActiveState")["ActiveState"] == "failed"
    systemd.systemctl("reset-failed", "flaky-proxy.service")


async def test_restart_timeout_is_reported_while_the_job_goes_on(
    systemctl_env: PrivateSystemd,
) -> None:
    systemd = systemctl_env
    systemd.install_unit(
        "slow-proxy.service",
        "[Service]\nType=exec\nTimeoutStartSec=60\n"
        "ExecStartPre=/bin/sleep 30\nExecStart=/bin/sleep infinity\n",
    )
    started = time.monotonic()

    ok, summary = await ops_exec.systemctl_restart("slow-proxy.service", timeout=1.0)

    elapsed = time.monotonic() - started
    assert ok is False
    assert "timed out after 1s" in summary
    assert elapsed < 1.0 + ops_exec.DEFAULT_KILL_GRACE + 1.0
    # Killing systemctl does not cancel the job: the restart is still under way in systemd.
    assert systemd.show("slow-proxy.service", "ActiveState")["ActiveState"] == "activating"
    systemd.systemctl("stop", "slow-proxy.service")


def test_self_restart_replies_before_the_unit_is_stopped(private_systemd: PrivateSystemd) -> None:
    """A unit's own process asks for its restart (like ``!bot_restart``) and comes back."""
    systemd = private_systemd
    out = systemd.scratch("selfrestart")
    unit = "selfrestart-probe.service"
    systemd.install_unit(
        unit,
        "[Unit]\nDescription=admin-ops self-restart probe\n"
        "[Service]\nType=notify\nNotifyAccess=main\n"
        f"WorkingDirectory={ROOT}\n"
        f"Environment=PYTHONPATH={ROOT}\nEnvironment=PYTHONDONTWRITEBYTECODE=1\n"
        f"ExecStart={sys.executable} {PROBE} selfrestart {out} {unit}\n"
        # In ExecStart= and friends a literal $ is written $$.
        f"ExecStopPost=/bin/sh -c 'echo \"stop-post $$SERVICE_RESULT\" >> {out}/events.log'\n",
    )
    (out / "trigger").touch()
    systemd.systemctl("start", unit)  # Type=notify: returns once "started" is recorded
    first = systemd.main_pid(unit)

    state = systemd.wait_for(
        unit,
        lambda s: s["ActiveState"] == "active" and s["MainPID"] not in ("0", str(first)),
        timeout=10,
    )

    second = int(state["MainPID"])
    log = events(out)
    assert log[0] == f"started {first}"
    assert log[1] == f"replied {first}"
    assert log.index(f"replied {first}") < log.index(f"stopped {first}")
    assert log.index(f"stopped {first}") < log.index(f"started {second}")
    assert any(line.startswith("stop-post success") for line in log)
    # If systemctl returned before the stop reached this process, the request was reported ok.
    requested = [line for line in log if line.startswith("requested")]
    assert all("ok=True" in line for line in requested), log
    systemd.systemctl("stop", unit)


# --- the shipped unit files -----------------------------------------------------------------------


def test_shipped_units_load_without_warnings(deploy_tree: DeployTree) -> None:
    systemd = deploy_tree.systemd
    for unit in SHIPPED_UNITS:
        state = systemd.show(unit, "LoadState", "LoadError", "FragmentPath")
        assert state["LoadState"] == "loaded", state
        assert state["LoadError"] == "", state
        assert state["FragmentPath"] == str(systemd.unit_dir / unit)

        # The manager prints a unit file's warnings when it first loads it (a daemon-reload does
        # not repeat them), so load a fresh copy under a new name and read what it printed.
        fresh = f"loadcheck-{uuid.uuid4().hex[:8]}-{unit}"
        systemd.install_unit(fresh, shipped_unit_text(unit), reload=False)
        start = systemd.console_sync()
        assert systemd.show(fresh, "LoadState")["LoadState"] == "loaded"
        end = systemd.console_sync()
        printed = systemd.console()[start:end].splitlines()
        assert [line for line in printed if fresh in line] == []

    verify = systemd.run(
        "systemd-analyze",
        "verify",
        "--man=no",
        *(str(systemd.unit_dir / unit) for unit in SHIPPED_UNITS),
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_UNIT_PATH": str(systemd.unit_dir)},
    )
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")


def test_shipped_units_are_well_hardened(deploy_tree: DeployTree) -> None:
    """``systemd-analyze security`` rates both units "OK" (exposure below 2 of 10)."""
    systemd = deploy_tree.systemd
    for unit in SHIPPED_UNITS:
        result = systemd.run("systemd-analyze", "security", "--no-pager", unit, check=True)
        overall = result.stdout.strip().splitlines()[-1]
        exposure = float(overall.split("exposure level for")[1].split(":")[1].split()[0])
        assert exposure < 2.0, overall


def test_shipped_units_differ_from_the_originals_only_in_the_env_and_credential_paths() -> None:
    for unit in SHIPPED_UNITS:
        original = (ROOT / "deploy" / unit).read_text()
        adjusted = shipped_unit_text(unit)
        changed = [
            (a, b)
            for a, b in zip(original.splitlines(), adjusted.splitlines(), strict=True)
            if a != b
        ]
        assert changed == [
            (line, line.replace("/etc/admin-ops/", f"{ETC_INSIDE}/"))
            for line in original.splitlines()
            if line.startswith(MOVED_SETTINGS)
        ]


@pytest.mark.parametrize(
    ("unit", "uid", "home", "env"),
    [
        (
            BOT_UNIT,
            SERVICE_UID,
            "/srv/admin-ops",
            {"OPS_BOT_SERVICE": BOT_UNIT, "OPS_PROXY_SERVICE": "proxy.service"},
        ),
        (CONTROL_UNIT, CONTROL_UID, CONTROL_HOME, {"OPS_OWN_UNITS": CONTROL_UNIT}),
    ],
)
def test_shipped_unit_sandbox_keeps_git_working(
    shipped_unit: Callable[[str], ShippedUnit],
    deploy_tree: DeployTree,
    unit: str,
    uid: int,
    home: str,
    env: dict[str, str],
) -> None:
    """The hardening as shipped, each unit's user, the env file: a real ``run_git_pull`` works."""
    systemd = deploy_tree.systemd
    service = shipped_unit(unit)
    new_head = deploy_tree.commit_upstream(f"upstream change for {unit}")
    state = "admin-ops" if unit == BOT_UNIT else "admin-ops-control"
    out, out_inside = deploy_tree.out_dir("sandbox", state, uid)
    env_file = f"{ETC_INSIDE}/{'bot' if unit == BOT_UNIT else 'control'}.env"
    with socket.create_server(("127.0.0.1", 0)) as listener:  # Discord and Redis stand-in
        port = str(listener.getsockname()[1])
        service.configure(
            f"Environment=PYTHONPATH={LIB_INSIDE}\n"
            + service.probe_command("sandbox", out_inside, CHECKOUT_INSIDE, env_file, port)
        )
        systemd.systemctl("start", "--wait", unit)  # returns when the probe has exited

    facts = json.loads((out / "sandbox.json").read_text())
    assert facts["pull"]["ran"] is True
    assert facts["pull"]["ok"] is True, facts["pull"]["summary"]
    assert new_head[:7] in facts["pull"]["summary"]
    assert deploy_tree.checkout_head() == new_head
    assert (facts["uid"], facts["euid"]) == (uid, uid)
    assert facts["no_new_privs"] == "1"
    assert int(facts["cap_bounding"], 16) == 0
    assert facts["seccomp"] == "2"
    assert facts["write"] == {
        "checkout": "ok",
        "state_dir": "ok",
        "tmp": "ok",
        "home": "EROFS",
        "usr": "EROFS",
        "etc": "EROFS",
    }
    # The env file is read by systemd (root), never by the service itself.
    assert facts["read"] == {"root_home": "EACCES", "env_file": "EACCES"}
    assert facts["connect"] == "ok"
    assert facts["env"]["STATE_DIRECTORY"] == f"/var/lib/{state}"
    assert facts["env"]["HOME"] == home
    for key, value in env.items():
        assert facts["env"][key] == value
    # The secrets come as credentials, never through the environment.
    assert facts["env"]["CREDENTIALS_DIRECTORY"] == f"/run/credentials/{unit}"
    for key in ("DISCORD_TOKEN", "OPS_CONTROL_SECRET", "REDIS_URL"):
        assert facts["env"][key] is None


@pytest.mark.parametrize("restart_setting", ["", "Restart=no\n"], ids=["as-shipped", "Restart=no"])
def test_shipped_bot_unit_comes_back_after_exit_status_26(
    bot_unit: ShippedUnit, deploy_tree: DeployTree, restart_setting: str
) -> None:
    """``OPS_RESTART_MODE=exit``: the bot exits 26 and systemd starts it again.

    ``Restart=no`` shows that ``RestartForceExitStatus=26`` alone is enough.
    """
    systemd = deploy_tree.systemd
    out, out_inside = deploy_tree.out_dir("exit26")
    (out / "trigger").touch()
    # Only the restart delay is shortened for the test (the shipped 5 s would dominate the run).
    bot_unit.configure(
        "Type=notify\nNotifyAccess=main\nRestartSec=100ms\n"
        + restart_setting
        + bot_unit.probe_command("exit26", out_inside)
    )

    systemd.systemctl("start", BOT_UNIT)
    state = systemd.wait_for(
        BOT_UNIT, lambda s: s["NRestarts"] == "1" and s["ActiveState"] == "active", timeout=10
    )

    log = events(out)
    first = int(log[0].split()[1])
    assert log[:2] == [f"started {first}", f"exit26 {first}"]
    assert log[2:] == [f"started {state['MainPID']}"]
    assert int(state["MainPID"]) != first


def test_sudo_dropin_lifts_no_new_privileges_and_keeps_the_rest(
    bot_unit: ShippedUnit, deploy_tree: DeployTree
) -> None:
    """With deploy/admin-ops-sudo.conf a set-uid sudo can work; the file-system sandbox stays."""
    systemd = deploy_tree.systemd
    out, out_inside = deploy_tree.out_dir("sudo")
    bot_unit.configure(
        f"Environment=PYTHONPATH={LIB_INSIDE}\n"
        + bot_unit.probe_command(
            "sandbox", out_inside, CHECKOUT_INSIDE, f"{ETC_INSIDE}/bot.env", "9"
        ),
        sudo=True,
    )

    systemd.systemctl("start", "--wait", BOT_UNIT)

    facts = json.loads((out / "sandbox.json").read_text())
    # Any setting left that implies NoNewPrivileges= would show as 1 here.
    assert facts["no_new_privs"] == "0"
    wanted = (1 << CAP_SETGID) | (1 << CAP_SETUID) | (1 << CAP_AUDIT_WRITE)
    assert int(facts["cap_bounding"], 16) == wanted
    assert int(facts["cap_effective"], 16) == 0
    assert facts["pull"]["ok"] is True, facts["pull"]["summary"]
    assert facts["write"]["home"] == facts["write"]["usr"] == "EROFS"
    assert facts["read"] == {"root_home": "EACCES", "env_file": "EACCES"}


# --- the polkit rule, with a real D-Bus and polkitd -----------------------------------------------


def test_polkit_rule_lets_the_service_user_restart_an_allowed_unit(polkit: Polkit) -> None:
    systemd = polkit.systemd
    before = systemd.main_pid("proxy.service")

    result = systemd.run(
        *as_service_user(), "systemctl", "--no-ask-password", "restart", "--", "proxy.service"
    )

    assert (result.returncode, result.stderr) == (0, "")
    assert systemd.main_pid("proxy.service") not in (0, before)
    try_restart = systemd.run(
        *as_service_user(), "systemctl", "--no-ask-password", "try-restart", "--", "proxy.service"
    )
    assert (try_restart.returncode, try_restart.stderr) == (0, "")


@pytest.mark.parametrize(
    "args",
    [
        ("stop", "proxy.service"),
        ("start", "proxy.service"),
        ("kill", "proxy.service"),
        ("reload-or-restart", "proxy.service"),
        ("restart", "demo-proxy.service"),
        ("restart", "polkit.service"),
    ],
    ids=lambda args: " ".join(args),
)
def test_polkit_rule_refuses_everything_else(polkit: Polkit, args: tuple[str, str]) -> None:
    systemd = polkit.systemd
    verb, unit = args
    before = systemd.show(unit, "ActiveState", "MainPID")

    result = systemd.run(*as_service_user(), "systemctl", "--no-ask-password", verb, "--", unit)

    assert result.returncode != 0
    assert "Access denied" in result.stderr
    assert systemd.show(unit, "ActiveState", "MainPID") == before


def test_polkit_rule_grants_nothing_to_other_users(polkit: Polkit) -> None:
    systemd = polkit.systemd
    nobody = ("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--")

    result = systemd.run(*nobody, "systemctl", "--no-ask-password", "restart", "proxy.service")

    assert result.returncode != 0
    assert "Interactive authentication required" in result.stderr


def test_sandboxed_bot_restarts_another_unit_through_polkit(
    bot_unit: ShippedUnit, deploy_tree: DeployTree, polkit: Polkit
) -> None:
    """The production path: the hardened bot unit, ``systemctl_restart``, D-Bus, polkit."""
    systemd = deploy_tree.systemd
    results = {}
    for unit in ("proxy.service", "demo-proxy.service"):
        out, out_inside = deploy_tree.out_dir("restart")
        bot_unit.configure(
            f"Environment=PYTHONPATH={LIB_INSIDE}\n"
            + bot_unit.probe_command("restart", out_inside, unit)
        )
        before = systemd.main_pid(unit)
        systemd.systemctl("start", "--wait", BOT_UNIT)
        results[unit] = (json.loads((out / "restart.json").read_text()), before)

    allowed, before = results["proxy.service"]
    assert allowed == {"ok": True, "summary": "restarted proxy.service"}
    assert systemd.main_pid("proxy.service") not in (0, before)
    refused, before = results["demo-proxy.service"]
    assert refused["ok"] is False
    assert "Access denied" in refused["summary"]
    assert systemd.main_pid("demo-proxy.service") == before


def test_sandboxed_bot_restarts_itself_through_polkit(
    bot_unit: ShippedUnit, deploy_tree: DeployTree, polkit: Polkit
) -> None:
    """``!bot_restart`` as deployed: reply, then a ``--no-block`` restart of its own unit."""
    systemd = deploy_tree.systemd
    out, out_inside = deploy_tree.out_dir("selfrestart")
    (out / "trigger").touch()
    bot_unit.configure(
        "Type=notify\nNotifyAccess=main\n"
        f"Environment=PYTHONPATH={LIB_INSIDE}\n"
        + bot_unit.probe_command("selfrestart", out_inside, BOT_UNIT)
    )
    systemd.systemctl("start", BOT_UNIT)
    first = systemd.main_pid(BOT_UNIT)

    state = systemd.wait_for(
        BOT_UNIT,
        lambda s: s["ActiveState"] == "active" and s["MainPID"] not in ("0", str(first)),
        timeout=10,
    )

    second = int(state["MainPID"])
    log = events(out)
    assert log[:2] == [f"started {first}", f"replied {first}"]
    assert log.index(f"replied {first}") < log.index(f"stopped {first}")
    assert log.index(f"stopped {first}") < log.index(f"started {second}")
    requested = [line for line in log if line.startswith("requested")]
    assert all("ok=True" in line for line in requested), log


def test_readme_check_command_runs_like_the_service(
    deploy_tree: DeployTree, system_bus: PrivateSystemd
) -> None:
    """deploy/README.md step 7 (``bot.py --check`` via systemd-run) works as written on systemd 252.

    The command is taken from the README; only the env file path moves, and the program is a
    stand-in that reports what ``bot.py --check`` would see.
    """
    readme = (ROOT / "deploy" / "README.md").read_text()
    section = readme.split("## 7.", 1)[1].split("## 8.", 1)[0]
    command = section.split("```sh\n", 1)[1].split("```", 1)[0]
    program = "/srv/admin-ops/app/.venv/bin/python bot.py --check"
    assert program in command
    report = (
        "import json, os; creds = os.environ.get('CREDENTIALS_DIRECTORY', ''); "
        "print(json.dumps({'uid': os.getuid(), 'cwd': os.getcwd(), "
        "'env': {k: os.environ.get(k) for k in ('OPS_BOT_SERVICE', 'STATE_DIRECTORY', "
        "'DISCORD_TOKEN')}, "
        "'credentials': {n: open(os.path.join(creds, n)).read().strip() "
        "for n in sorted(os.listdir(creds))} if creds else {}}))"
    )
    command = command.replace("/etc/admin-ops/", f"{ETC_INSIDE}/").replace(
        program, f"/srv/admin-ops/app/.venv/bin/python -c {shlex.quote(report)}"
    )

    result = deploy_tree.systemd.run("/bin/sh", "-c", command, check=True)

    seen = json.loads(result.stdout)
    assert seen == {
        "uid": SERVICE_UID,
        "cwd": CHECKOUT_INSIDE,
        "env": {
            "OPS_BOT_SERVICE": BOT_UNIT,
            "STATE_DIRECTORY": "/var/lib/admin-ops",
            "DISCORD_TOKEN": None,
        },
        # What bot.py --check reads through $CREDENTIALS_DIRECTORY, as the service does.
        "credentials": TEST_SECRETS,
    }


async def test_command_starts_and_spare_ones_fit_the_start_limit_and_the_next_is_refused(
    bot_unit: ShippedUnit, deploy_tree: DeployTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start counts against StartLimitBurst=, restarts by commands included.

    One restart per OPS_RESTART_MIN_INTERVAL allows 6 starts in the 5-minute window (the arithmetic
    is test_deploy_files' job): the shipped limit must take those 6 and 4 more (a crash between
    commands, a restart racing another) within one window, and refuse the 11th, so a crash loop
    still ends. The restarts here come back to back, all inside one window.
    """
    systemd = deploy_tree.systemd
    monkeypatch.setenv("OPS_SYSTEMCTL", str(systemd.systemctl_wrapper))
    burst = int(systemd.show(BOT_UNIT, "StartLimitBurst")["StartLimitBurst"])
    assert burst == 10
    bot_unit.configure("ExecStart=\nExecStart=/bin/sleep infinity\n")
    systemd.systemctl("start", BOT_UNIT)
    pid = systemd.main_pid(BOT_UNIT)
    for _ in range(burst - 1):
        ok, summary = await ops_exec.deferred_systemctl_restart(BOT_UNIT, delay=0)
        assert ok, summary
        state = systemd.wait_for(
            BOT_UNIT,
            lambda s, old=pid: (
                s["ActiveState"] in ("active", "failed") and s["MainPID"] not in ("0", str(old))
            ),
        )
        assert state["ActiveState"] == "active", state
        pid = int(state["MainPID"])

    ok, summary = await ops_exec.systemctl_restart(BOT_UNIT)

    assert not ok
    state = systemd.show(BOT_UNIT, "ActiveState", "Result")
    assert state == {"ActiveState": "failed", "Result": "start-limit-hit"}
