"""``!ops_logs``' journal access as deploy/README.md installs it, against a real systemd 252.

The bot's user reads the journal namespace ``admin-ops`` only: the units ``!ops_logs`` may read log
there (``deploy/admin-ops-journal.conf``, ``LogNamespace=``), and ``deploy/tmpfiles.d/
admin-ops-journal.conf`` gives ``opsbot`` read access to that namespace's journal files. Here the
distribution's own journald units run in the session's private systemd (the default namespace and
``systemd-journald@admin-ops``), over a private ``/var/log`` set up as Debian's package leaves it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.journal import journal_argv
from tests.deploy.deploy_support import (
    BOT_UNIT,
    DEPLOY,
    LIB_INSIDE,
    PLAIN_ENV,
    DeployTree,
    ShippedUnit,
    as_service_user,
)
from tests.deploy.systemd_harness import SERVICE_UID, PrivateSystemd

pytestmark = pytest.mark.systemd

NAMESPACE = "admin-ops"
DROPIN = DEPLOY / "admin-ops-journal.conf"
TMPFILES = DEPLOY / "tmpfiles.d" / "admin-ops-journal.conf"
#: The journalctl program of the bot's settings (deploy/admin-ops.env.example, copied into bot.env).
_SETTING = re.search(r"^OPS_JOURNALCTL=(.*)$", (DEPLOY / "admin-ops.env.example").read_text(), re.M)
BOT_ENV = {"OPS_JOURNALCTL": _SETTING[1] if _SETTING else ""}
SYSTEM_UNITS = Path("/lib/systemd/system")
#: systemd's own units for journald: the default namespace and the template of the others.
JOURNALD_UNITS = (
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-journald-audit.socket",
    "systemd-journald@.service",
    "systemd-journald@.socket",
    "systemd-journald-varlink@.socket",
)
#: The private systemd's default is StandardOutput=inherit (its console); a host's is journal.
WRITER = """\
[Service]
Type=oneshot
StandardOutput=journal
ExecStart=/bin/sh -c 'echo "{marker} first"; echo "{marker} second"'
"""


#: Seconds a ``journalctl --sync`` may keep being refused while journald starts.
SYNC_TIMEOUT = 10.0


@dataclass(frozen=True)
class Journal:
    """journald running in the private systemd, with the shipped tmpfiles.d file applied."""

    systemd: PrivateSystemd
    #: The private ``/var/log``, outside the namespaces.
    var_log: Path
    #: The units ``write`` installed, removed with journald after the module.
    written: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        """The namespace's journal directory (``/var/log/journal/<machine-id>.admin-ops``)."""
        machine_id = Path("/etc/machine-id").read_text().strip()
        return self.var_log / "journal" / f"{machine_id}.{NAMESPACE}"

    def write(self, *, readable: bool) -> tuple[str, str]:
        """A oneshot unit that wrote two lines, done and synced: (unit, the lines' marker).

        ``readable``: the unit has the shipped drop-in, as deploy/README.md installs it for the
        units ``!ops_logs`` may read.
        """
        unit = f"journal-{'readable' if readable else 'other'}-{uuid.uuid4().hex[:8]}.service"
        marker = f"marker-{uuid.uuid4().hex}"
        self.written.append(unit)
        self.systemd.install_unit(unit, WRITER.format(marker=marker), reload=not readable)
        if readable:
            self.systemd.install_unit(f"{unit}.d/admin-ops-journal.conf", DROPIN.read_text())
        self.systemd.systemctl("start", unit)  # a oneshot: returns once it has exited
        self.sync()
        return unit, marker

    def sync(self) -> None:
        """Until journald has written everything it was sent, in both namespaces.

        The namespace's journald is started on demand by its sockets; its varlink socket was
        seen to refuse a connection at first under load (a start-up race inside systemd, not
        something ``!ops_logs`` uses), so a refused ``--sync`` is asked again, within a bound.
        """
        for namespace in ((), (f"--namespace={NAMESPACE}",)):
            deadline = time.monotonic() + SYNC_TIMEOUT
            while True:
                done = self.systemd.run("journalctl", *namespace, "--sync")
                if done.returncode == 0:
                    break
                assert time.monotonic() < deadline, f"journalctl --sync: {done.stderr}"
                time.sleep(0.1)  # a retry period, bounded by the deadline

    def as_root(self, *args: str) -> str:
        return self.systemd.run("journalctl", "--no-pager", *args, check=True).stdout


@pytest.fixture(scope="module")
def journal(deploy_tree: DeployTree) -> Iterator[Journal]:
    """The journal daemons in the session's private systemd, for this module only."""
    systemd = deploy_tree.systemd
    # The namespace's /var/log is the test's: nothing reaches the machine's own journal.
    var_log = systemd.scratch("var-log")
    systemd.run("mount", "--bind", str(var_log), "/var/log", check=True)
    # /var/log/journal as Debian's systemd package leaves it (2755 root:systemd-journal, ACLs).
    systemd.run("mkdir", "/var/log/journal", check=True)
    systemd.run("systemd-tmpfiles", "--create", "--prefix=/var/log/journal", check=True)
    # deploy/README.md: the shipped tmpfiles.d file, applied once.
    applied = systemd.run("systemd-tmpfiles", "--create", str(TMPFILES), env=PLAIN_ENV)
    assert (applied.returncode, applied.stderr) == (0, ""), applied.stderr
    for name in JOURNALD_UNITS:
        shutil.copy(SYSTEM_UNITS / name, systemd.unit_dir / name)
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", "systemd-journald.service")
    journal = Journal(systemd, var_log)
    try:
        yield journal
    finally:
        units = [f"systemd-journald@{NAMESPACE}.service", "systemd-journald.service"]
        units += [
            f"{kind}@{NAMESPACE}.socket"
            for kind in ("systemd-journald", "systemd-journald-varlink")
        ]
        units += ["systemd-journald.socket", "systemd-journald-dev-log.socket"]
        systemd.systemctl("stop", *units, check=False)
        for name in JOURNALD_UNITS:
            (systemd.unit_dir / name).unlink()
        for unit in journal.written:
            (systemd.unit_dir / unit).unlink()
            shutil.rmtree(systemd.unit_dir / f"{unit}.d", ignore_errors=True)
        systemd.systemctl("daemon-reload")


def read_as_bot(bot_unit: ShippedUnit, tree: DeployTree, *units: str) -> dict[str, object]:
    """What ``!ops_logs`` reads of ``units``, run as the shipped bot unit with its journal drop-in.

    ``core.journal.read_journal`` runs as the unit's main process (the unit probe), under the
    unit's user and hardening, with the settings of bot.env (the shipped env example).
    """
    out, out_inside = tree.out_dir("journal")
    bot_unit.configure(
        f"Environment=PYTHONPATH={LIB_INSIDE}\n"
        + bot_unit.probe_command("journal", out_inside, *units)
    )
    shutil.copy(DROPIN, bot_unit.dropin_dir / "admin-ops-journal.conf")
    tree.systemd.systemctl("daemon-reload")
    assert tree.systemd.show(BOT_UNIT, "LogNamespace") == {"LogNamespace": NAMESPACE}

    tree.systemd.systemctl("start", "--wait", BOT_UNIT)

    facts: dict[str, object] = json.loads((out / "journal.json").read_text())
    assert facts["uid"] == SERVICE_UID
    return facts


def test_the_bots_user_reads_the_readable_units_lines_and_nothing_of_another_unit(
    journal: Journal, bot_unit: ShippedUnit, deploy_tree: DeployTree
) -> None:
    readable, shown = journal.write(readable=True)
    other, hidden = journal.write(readable=False)
    # Both units' lines are in the journal (root reads either namespace).
    assert f"{hidden} first" in journal.as_root("-u", other)
    assert f"{shown} first" in journal.as_root(f"--namespace={NAMESPACE}", "-u", readable)

    facts = read_as_bot(bot_unit, deploy_tree, readable, other)

    read = facts["read"]
    assert isinstance(read, dict)
    expected = ["journalctl", f"--namespace={NAMESPACE}", "-u", readable, "-n", "50"]
    assert read[readable]["argv"] == [*expected, "--no-pager", "-o", "short-iso"]
    assert (read[readable]["ok"], read[readable]["summary"]) == (True, "2 lines"), read
    lines = read[readable]["text"].splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [f"{shown} first", f"{shown} second"]
    # The same command line for the other unit finds nothing: its lines are not in the namespace.
    assert (read[other]["ok"], read[other]["summary"]) == (True, f"no journal lines for {other}")
    assert hidden not in json.dumps(read)


def test_the_bots_user_cannot_open_the_rest_of_the_journal(journal: Journal) -> None:
    """Plain journalctl (the default namespace, every other unit's lines) is refused to opsbot."""
    other, hidden = journal.write(readable=False)
    argv = journal_argv(other, 50, environ={})

    result = journal.systemd.run(*as_service_user(), *argv, env=PLAIN_ENV)

    assert hidden not in result.stdout
    assert "No journal files were opened due to insufficient permissions." in result.stderr


def test_the_bots_user_still_reads_the_namespace_after_a_rotation_and_a_journald_restart(
    journal: Journal,
) -> None:
    """Files journald creates later inherit opsbot's read access (the directory's default ACL)."""
    systemd = journal.systemd
    archived, old = journal.write(readable=True)
    systemd.run("journalctl", f"--namespace={NAMESPACE}", "--rotate", check=True)
    systemd.systemctl("restart", f"systemd-journald@{NAMESPACE}.service")
    fresh, new = journal.write(readable=True)
    # The lines before the rotation are in an archived file, the new ones in a file created since.
    assert len(list(journal.directory.glob("system@*.journal"))) >= 1
    assert (journal.directory / "system.journal").exists()

    for unit, marker in ((archived, old), (fresh, new)):
        argv = journal_argv(unit, 50, environ=BOT_ENV)
        result = systemd.run(*as_service_user(), *argv, env=PLAIN_ENV)

        assert result.returncode == 0, result.stderr
        assert f"{marker} second" in result.stdout, (unit, result.stdout, result.stderr)
