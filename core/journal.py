"""The last lines of a unit's journal: ``journalctl -u <unit> -n <lines> --no-pager -o short-iso``.

Standard library only (like :mod:`core.ops_exec`, whose runner it uses): no shell, an empty
stdin, an environment of its own, output capped while it is read. The program is
``$OPS_JOURNALCTL`` (split like a shell would, e.g. ``journalctl --namespace=admin-ops``), else
``journalctl`` from ``PATH``; it is read at each call, like ``OPS_SYSTEMCTL``.

Which units may be read is the caller's decision (the cog allows its own unit, the proxy's and
``OPS_LOG_UNITS``); this module only insists on a valid unit name and a bounded line count.
What it returns is not redacted: the chat layer redacts everything it shows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Final, NamedTuple

from core.ops_exec import ExecResult, program_argv, run_exec, validate_unit_name

__all__ = [
    "DEFAULT_LINES",
    "JOURNAL_TIMEOUT",
    "MAX_LINES",
    "MAX_OUTPUT",
    "JournalTail",
    "journal_argv",
    "journalctl_argv",
    "read_journal",
]

#: Lines shown when the command names none.
DEFAULT_LINES: Final = 50
#: The most lines one command shows.
MAX_LINES: Final = 2000
#: Seconds journalctl may take (a large journal on a slow disk) before it is stopped.
JOURNAL_TIMEOUT: Final = 15.0
#: Bytes of output kept: 2000 lines of a few hundred bytes each, with room to spare.
MAX_OUTPUT: Final = 1 << 20
# journalctl reads the journal files itself: it needs no HOME and no bus, only a PATH to find
# its helpers and a fixed language for its own messages. Colours and pagers are off anyway
# (its output is a pipe, and --no-pager), set here so no inherited setting can change that.
_ENV_FIXED: Final = {"LC_ALL": "C", "LANG": "C", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
_DEFAULT_PATH: Final = "/usr/local/bin:/usr/bin:/bin"


def journalctl_argv(environ: Mapping[str, str] | None = None) -> list[str]:
    """The journalctl program: ``$OPS_JOURNALCTL`` or ``journalctl``.

    Read from ``environ`` (default ``os.environ``) at each call. Raises ValueError with a
    one-line reason when ``$OPS_JOURNALCTL`` cannot be split.
    """
    return program_argv("OPS_JOURNALCTL", "journalctl", environ)


def journal_argv(unit: str, lines: int, environ: Mapping[str, str] | None = None) -> list[str]:
    """The whole command line for the last ``lines`` lines of ``unit``.

    Raises ValueError for an invalid unit name or a line count outside 1 to :data:`MAX_LINES`.
    ``-u`` takes the next word as its value whatever it starts with, and the name is validated
    anyway, so nothing typed can become an option.
    """
    name = validate_unit_name(unit)
    if not 1 <= lines <= MAX_LINES:
        raise ValueError(f"lines must be between 1 and {MAX_LINES}, got {lines}")
    program = journalctl_argv(environ)
    return [*program, "-u", name, "-n", str(lines), "--no-pager", "-o", "short-iso"]


def _journal_env(source: Mapping[str, str] | None = None) -> dict[str, str]:
    src = os.environ if source is None else source
    return {"PATH": src.get("PATH") or _DEFAULT_PATH, **_ENV_FIXED}


class JournalTail(NamedTuple):
    """What journalctl printed for one unit, typed."""

    #: journalctl ran and exited 0.
    ok: bool
    #: Its output: the journal lines (or, when it failed, what it said on stderr).
    text: str
    #: One line: how many lines were read, or why nothing was.
    summary: str
    #: Fewer lines than asked for are shown: all of them were longer than :data:`MAX_OUTPUT`.
    truncated: bool = False


#: Reads of one tail at most: asked for, then fewer lines while the newest ones do not fit.
_ATTEMPTS: Final = 3


async def read_journal(unit: str, lines: int, *, timeout: float = JOURNAL_TIMEOUT) -> JournalTail:
    """The last ``lines`` journal lines of ``unit``; never raises for a failed run.

    The runner keeps the first :data:`MAX_OUTPUT` bytes, and the newest lines are the ones that
    matter (a crash's traceback is at the end), so when they do not fit journalctl is asked
    again for as many lines as did fit: what is shown is always the newest lines, complete.
    Raises ValueError only for an invalid unit name, line count or ``OPS_JOURNALCTL``.
    """
    asked = lines
    deadline = time.monotonic() + timeout
    for _attempt in range(_ATTEMPTS):
        argv = journal_argv(unit, lines)
        remaining = max(0.1, deadline - time.monotonic())
        result = await run_exec(argv, env=_journal_env(), timeout=remaining, max_output=MAX_OUTPUT)
        if not result.truncated or result.timed_out or result.returncode != 0:
            break
        lines = max(1, min(lines - 1, _complete_entries(result.stdout)))
    return _tail(unit, result, timeout, cut=lines < asked)


def _complete_entries(cut: str) -> int:
    """Journal entries wholly inside output cut at MAX_OUTPUT.

    ``-n`` counts entries, and an entry of several lines prints its later lines indented, so
    only lines that start an entry count; the last one started may be cut, so it does not.
    """
    body = cut.rsplit("\n[… ", 1)[0]
    return max(0, sum(1 for line in body.splitlines() if _starts_entry(line)) - 1)


def _starts_entry(line: str) -> bool:
    """Whether ``line`` of short-iso output begins an entry (not a continuation, not "-- …")."""
    return bool(line) and not line[0].isspace() and not line.startswith("-- ")


def _tail(unit: str, result: ExecResult, timeout: float, *, cut: bool) -> JournalTail:
    """The tail as read; ``cut``: journalctl was asked for fewer lines than the command was."""
    if result.timed_out:
        return JournalTail(False, result.stdout, f"journalctl timed out after {timeout:g} s")
    if result.returncode is None:
        return JournalTail(False, "", result.stderr)
    if result.returncode != 0:
        said = result.stderr.strip() or result.stdout.strip() or "no output"
        return JournalTail(False, said, f"journalctl failed (exit {result.returncode})")
    shown = [line for line in result.stdout.splitlines() if line.strip()]
    # journalctl exits 0 and prints "-- No entries --" when it may read nothing of the unit,
    # and only a hint on stderr when it may not read the system journal at all.
    entries = [line for line in shown if _starts_entry(line)]
    hint = result.stderr.strip()
    if not entries:
        summary = f"no journal lines for {validate_unit_name(unit)}"
        return JournalTail(True, "\n".join([*shown, hint]).strip(), summary, result.truncated)
    count = f"{len(entries)} line" + ("" if len(entries) == 1 else "s")
    return JournalTail(True, "\n".join(shown), count, cut or result.truncated)
