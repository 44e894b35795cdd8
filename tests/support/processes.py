"""Stand-in scripts and checks on the processes they recorded.

The stand-ins (upload-pack programs, smudge filters, hooks) record their PIDs and process group in
files, so a test can prove afterwards that nothing of a run survived, and kill by PID whatever did.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def write_script(path: Path, body: str, *, interpreter: str = "/bin/sh") -> Path:
    """Write an executable script with a shebang line."""
    path.write_text(f"#!{interpreter}\n{body}")
    path.chmod(0o755)
    return path


def pid_is_dead(pid: int) -> bool:
    """True when ``pid`` no longer exists or is a zombie (dead, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X")


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the non-zombie processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def read_numbers(path: Path) -> list[int]:
    """The integers in ``path``, one per line (none when the file does not exist)."""
    return [int(word) for word in path.read_text().split()] if path.exists() else []


class ProcessLedger:
    """Files where stand-in scripts record PIDs; ``kill_survivors`` SIGKILLs them by PID."""

    def __init__(self, directory: Path) -> None:
        self.pids = directory / "pids"
        self.pgid = directory / "pgid"

    def recorded(self) -> list[int]:
        return read_numbers(self.pids)

    def run_pgid(self) -> int:
        (pgid,) = read_numbers(self.pgid)
        return pgid

    def shell_recording(self) -> str:
        """Sh lines that record this shell's process group and PID."""
        return (
            "read -r _ _ _ _ pgid _ < /proc/$$/stat\n"
            f'echo "$pgid" > {self.pgid}\n'
            f"echo $$ >> {self.pids}\n"
        )

    def shell_hang(self) -> str:
        """Sh lines that ignore SIGTERM and block on a child that ignores it too."""
        return f"trap '' TERM\nsleep 30 &\necho $! >> {self.pids}\nwait\n"

    def kill_survivors(self) -> None:
        for pid in self.recorded():
            if not pid_is_dead(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
