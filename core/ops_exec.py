"""Hardened, stdlib-only primitives for running operations: processes, git, systemctl, cooldowns.

Everything a chat command or the fleet daemon does to the host goes through here:

* ``run_exec`` runs an argv (never a shell) in its own process group with empty stdin, drains
  stdout and stderr concurrently with a byte cap applied while reading, and on timeout or
  cancellation stops the *whole group*: SIGTERM, a grace period, SIGKILL, bounded waits.
* ``git_env`` builds git's environment from an allowlist, so bot tokens never reach git hooks.
* ``run_git_pull`` fast-forwards a checkout under a host-local ``flock`` and, when a Redis client
  is passed in, a fleet-wide ``SET NX PX`` dedupe lock.
* ``systemctl_restart`` / ``deferred_systemctl_restart`` restart validated unit names.
* ``Cooldown`` is a per-key cooldown backed by Redis, a JSON state file, or memory.

This module must import nothing but the standard library: a Redis client is always passed in,
never imported, so the module loads on a host that has neither discord.py nor redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_KILL_GRACE",
    "GIT_ENV_ALLOWLIST",
    "GIT_ENV_FIXED",
    "MIN_SECRET_LENGTH",
    "REDIS_CALL_TIMEOUT",
    "SYSTEMCTL_TIMED_OUT",
    "UNIT_SUFFIXES",
    "CheckoutRefusal",
    "Cooldown",
    "ExecResult",
    "HeldCheckout",
    "PullOutcome",
    "PullResult",
    "UnitRestartLock",
    "UnitResult",
    "UnitState",
    "UnsafeLockError",
    "as_text",
    "atomic_write_json",
    "bounded",
    "clean_text",
    "deferred_systemctl_restart",
    "git_commit",
    "git_env",
    "git_failure_summary",
    "git_head",
    "git_read",
    "git_upstream",
    "locked_checkout",
    "program_argv",
    "pull_checkout",
    "pull_lock_key",
    "pull_lock_ttl",
    "raise_if_cancelling",
    "read_json_file",
    "redact",
    "redis_errors",
    "request_restart",
    "reset_failed_unit",
    "restart_unit",
    "run_checkout_git",
    "run_exec",
    "run_git_pull",
    "sanitize_output",
    "ssh_batch_command",
    "stale_index_lock",
    "start_unit",
    "systemctl_argv",
    "systemctl_is_active",
    "systemctl_restart",
    "unit_restart_count",
    "unit_restart_lock",
    "unit_started_ago",
    "unit_state",
    "validate_unit_name",
]

log = logging.getLogger("admin_ops.ops_exec")

T = TypeVar("T")

DEFAULT_KILL_GRACE = 2.0
#: The prefix of every Redis key admin-ops writes (``OPS_CONTROL_PREFIX`` overrides it).
DEFAULT_KEY_PREFIX = "sg:control"
#: Every call to a Redis server passed in is bounded by this many seconds.
REDIS_CALL_TIMEOUT = 2.0
#: After a Redis failure, cooldowns use their local store for this many seconds.
REDIS_RETRY_AFTER = 15.0
#: Pipes are enlarged to this size so a chatty child needs fewer wake-ups to drain.
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: After the direct child exits, how long to wait for its pipes to reach end-of-file.
_DRAIN_WINDOW = 0.1
#: After SIGKILL, how long to wait for the group to disappear before giving up.
_KILL_WAIT = 0.4
#: How much of a failing command's stderr a summary quotes.
_SUMMARY_STDERR_CHARS = 1500


# --------------------------------------------------------------------------------------------
# Output sanitising and redaction
# --------------------------------------------------------------------------------------------

_ANSI_ESCAPE = re.compile(
    r"""
    \x1b\[[0-?]*[ -/]*[@-~]               # CSI sequences: colours, cursor movement
    | \x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)  # OSC sequences: titles, hyperlinks
    | \x1b[PX^_][^\x1b\n]*\x1b\\          # DCS / SOS / PM / APC strings
    # An unterminated one loses only its introducer (below), never the text after it.
    | \x1b[ -/]*[0-~]?                    # any other escape (two-character and lone ESC)
    """,
    re.VERBOSE,
)
# C0 controls except tab and newline, DEL, C1 controls, and the bidi controls that can make
# displayed text read differently from what it is ("Trojan Source").
_UNSAFE_CHARS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def sanitize_output(data: bytes) -> str:
    """Decode a child's output for display: UTF-8 with replacement, no escapes or controls."""
    return clean_text(data.decode("utf-8", errors="replace"))


def clean_text(text: str) -> str:
    """``text`` without terminal escape sequences and control characters (tab and newline stay).

    For anything shown in a terminal or a chat message that came from elsewhere (a child, git,
    another host through Redis): an escape sequence could retitle a terminal or write the
    operator's clipboard (OSC 52).
    """
    return _UNSAFE_CHARS.sub("", _ANSI_ESCAPE.sub("", text))


# URL credentials are found by scanning, not by a pattern: ``scheme://…@`` with an unbounded
# scheme and userinfo, retried at every position, costs quadratic time on adversarial text
# (``a.a.a…`` or ``x://x://…``), and redaction runs on text that other hosts wrote to Redis.
# Words are split on the characters a URL cannot contain unquoted.
_URL_WORD_BREAKS = re.compile(r"([\s'\"<>]+)")
# Credentials passed as URL query parameters (redis-py accepts ``?password=``).
_QUERY_CREDENTIALS = re.compile(
    r"(?i)(?P<key>[?&](?:password|passwd|pass|pwd|token|access_token|secret)=)[^&\s'\"<>]+"
)
_TOKEN_SHAPES = (
    # Discord bot tokens: base64 user id, timestamp, HMAC.
    re.compile(r"\b[A-Za-z0-9_\-]{23,28}\.[A-Za-z0-9_\-]{6,7}\.[A-Za-z0-9_\-]{27,}"),
    # GitHub personal, OAuth, user-to-server, server-to-server and refresh tokens.
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    # AWS access key ids (long-term and temporary).
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
)
#: Secrets shorter than this are not replaced verbatim: a two-letter "secret" would shred text.
MIN_SECRET_LENGTH = 4
REDACTED = "***"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove URL credentials, well-known token shapes and the exact ``secrets`` from ``text``."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len)[::-1]:
        text = text.replace(secret, REDACTED)
    text = _strip_url_credentials(text)
    text = _QUERY_CREDENTIALS.sub(lambda m: f"{m.group('key')}{REDACTED}", text)
    for shape in _TOKEN_SHAPES:
        text = shape.sub(REDACTED, text)
    return text


def _strip_url_credentials(text: str) -> str:
    """Replace what lies between ``://`` and a word's last ``@`` with ``***``, in linear time.

    Up to the *last* '@' of the word: passwords may contain '@' and '/' when not
    percent-encoded, and over-redacting a path that contains '@' is the lesser evil.
    """
    if "://" not in text:
        return text
    parts = _URL_WORD_BREAKS.split(text)
    # split() with a group alternates words and the breaks between them.
    for index in range(0, len(parts), 2):
        word = parts[index]
        start = word.find("://")
        if start < 0:
            continue
        at = word.rfind("@")
        if at >= start + 3:
            parts[index] = f"{word[: start + 3]}{REDACTED}{word[at:]}"
    return "".join(parts)


def _cap(text: str, limit: int = _SUMMARY_STDERR_CHARS) -> str:
    """Keep the head of ``text``, saying how much was cut."""
    text = text.strip()
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[… {len(text) - limit} characters cut]"


# --------------------------------------------------------------------------------------------
# The process runner
# --------------------------------------------------------------------------------------------


class ExecResult(NamedTuple):
    """Everything that is known about one finished run of a program."""

    argv: tuple[str, ...]
    #: The exit status; negative for a signal; None when the program could not be started.
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    #: Wall-clock seconds from spawn to return.
    duration: float

    @property
    def ok(self) -> bool:
        """True when the program ran to completion and exited 0."""
        return self.returncode == 0 and not self.timed_out


class _CappedBuffer:
    """Keeps the first ``limit`` bytes written to it and counts the rest."""

    __slots__ = ("_data", "discarded", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data = bytearray()
        self.discarded = 0

    def feed(self, chunk: bytes) -> None:
        room = self.limit - len(self._data)
        if room >= len(chunk):
            self._data += chunk
            return
        if room > 0:
            self._data += chunk[:room]
        self.discarded += len(chunk) - max(room, 0)

    def text(self) -> str:
        text = sanitize_output(bytes(self._data))
        if self.discarded:
            text += f"\n[… {self.discarded} bytes truncated]"
        return text


class _RunProtocol(asyncio.SubprocessProtocol):
    """Drains both pipes at the protocol level (no StreamReader copies) into capped buffers."""

    def __init__(self, max_output: int) -> None:
        loop = asyncio.get_running_loop()
        self.buffers = {1: _CappedBuffer(max_output), 2: _CappedBuffer(max_output)}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self._open_pipes = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        self.buffers[fd].feed(data if isinstance(data, bytes) else data.encode())

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open_pipes.discard(fd)
        if not self._open_pipes and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def _enlarge_pipes(transport: asyncio.SubprocessTransport) -> None:
    for fd in (1, 2):
        pipe = transport.get_pipe_transport(fd)
        fileobj = pipe.get_extra_info("pipe") if pipe is not None else None
        if fileobj is None:
            continue
        # Only a speed-up: a kernel that refuses (pipe-max-size) still works at the default
        # size, and a fast child may already have closed the pipe (ValueError on fileno()).
        with contextlib.suppress(OSError, ValueError):
            fcntl.fcntl(fileobj.fileno(), _F_SETPIPE_SZ, _PIPE_SIZE)


def _is_live_member(pid: int, pgid: int) -> bool:
    """Whether ``pid`` is a process of group ``pgid`` that is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return False
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")


def _group_member_pids(pgid: int) -> list[int] | None:
    """The live (non-zombie) members of group ``pgid``; None when that cannot be told.

    ``killpg(pgid, 0)`` also succeeds for zombies waiting for init to reap them, which are
    already dead for our purposes, so /proc is consulted to tell the two apart.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        return None
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    return [int(e) for e in entries if e.isdigit() and _is_live_member(int(e), pgid)]


def _live_group_members(pgid: int) -> bool:
    """Whether any non-zombie process is in process group ``pgid``."""
    return _group_member_pids(pgid) != []


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_group_gone(pgid: int, seconds: float) -> bool:
    """Poll until no live process is left in the group, for at most ``seconds``.

    There is no event for "a process that is not our child has died", so this polls.
    """
    deadline = time.monotonic() + seconds
    known: list[int] = []
    while True:
        # While a member found by the last full scan lives, the group is not gone: checking
        # those few PIDs costs microseconds; a full /proc scan costs about a millisecond.
        known = [pid for pid in known if _is_live_member(pid, pgid)]
        if not known:
            members = _group_member_pids(pgid)
            if members == []:
                return True
            known = members or []
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(0.01, remaining))


async def _stop_group(pgid: int, kill_grace: float) -> None:
    """SIGTERM the group, give it ``kill_grace`` seconds, then SIGKILL whatever is left.

    SIGTERM comes first because git (and most well-behaved programs) clean up on it: git
    removes its ``index.lock``; SIGKILL would leave it behind.
    """
    _signal_group(pgid, signal.SIGTERM)
    if await _wait_group_gone(pgid, kill_grace):
        return
    _signal_group(pgid, signal.SIGKILL)
    if not await _wait_group_gone(pgid, _KILL_WAIT):
        log.warning("process group %d still has live members after SIGKILL", pgid)


async def _wait_first(future: asyncio.Future[None], timeout: float) -> bool:
    """Wait for ``future`` for at most ``timeout`` seconds without cancelling it."""
    if not future.done():
        await asyncio.wait({future}, timeout=max(timeout, 0))
    return future.done()


async def _supervise(
    transport: asyncio.SubprocessTransport,
    protocol: _RunProtocol,
    timeout: float,
    kill_grace: float,
) -> bool:
    """Wait for the child, then make sure nothing of its group survives; True on a timeout."""
    pgid = transport.get_pid()
    timed_out = False
    try:
        _enlarge_pipes(transport)
        if not await _wait_first(protocol.exited, timeout):
            timed_out = True
            await _stop_group(pgid, kill_grace)
            await _wait_first(protocol.exited, _KILL_WAIT)
        elif _live_group_members(pgid):
            await _stop_group(pgid, kill_grace)
        await _wait_first(protocol.pipes_closed, _DRAIN_WINDOW)
    except asyncio.CancelledError:
        # Shielded so that a second cancellation cannot leave the group running.
        await asyncio.shield(_stop_group(pgid, kill_grace))
        raise
    return timed_out


def _spawn_failure(
    argv: tuple[str, ...], cwd: str | None, exc: OSError, started: float
) -> ExecResult:
    if cwd is not None and not os.path.isdir(cwd):
        reason = f"cannot run {argv[0]!r}: working directory {cwd!r} does not exist"
    elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
        reason = f"cannot run {argv[0]!r}: program not found"
    elif exc.errno == errno.EACCES:
        reason = f"cannot run {argv[0]!r}: permission denied (not executable?)"
    else:
        reason = f"cannot run {argv[0]!r}: {exc.strerror or exc}"
    return ExecResult(argv, None, "", reason, False, False, time.monotonic() - started)


def _check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list or tuple of str, not a single string (no shell)")
    args = tuple(argv)
    if not args:
        raise ValueError("argv must not be empty")
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"argv items must be str, got {type(arg).__name__}")
    return args


async def run_exec(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    max_output: int = 65536,
    kill_grace: float = DEFAULT_KILL_GRACE,
) -> ExecResult:
    """Run ``argv`` without a shell and return what happened; never raises for a failed run.

    The child gets ``/dev/null`` as stdin and a new session (its own process group). Each of
    stdout and stderr keeps its first ``max_output`` bytes; the rest is read and discarded, so
    memory stays flat. On timeout or cancellation the whole group is stopped (SIGTERM, grace,
    SIGKILL). Once the direct child exits, leftover group members are stopped the same way and
    the call returns even if an escaped descendant still holds a pipe open.
    """
    args = _check_argv(argv)
    workdir = os.fspath(cwd) if cwd is not None else None
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    protocol = _RunProtocol(max_output)
    try:
        transport, _ = await loop.subprocess_exec(
            lambda: protocol,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=workdir,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except OSError as exc:
        return _spawn_failure(args, workdir, exc, started)
    except ValueError as exc:  # an embedded NUL byte: no program can receive it
        return ExecResult(args, None, "", f"cannot run {args[0]!r}: {exc}", False, False, 0.0)

    try:
        remaining = timeout - (time.monotonic() - started)
        timed_out = await _supervise(transport, protocol, remaining, kill_grace)
    finally:
        transport.close()
    returncode = transport.get_returncode()
    out, err = protocol.buffers[1], protocol.buffers[2]
    return ExecResult(
        argv=args,
        returncode=returncode,
        stdout=out.text(),
        stderr=err.text(),
        timed_out=timed_out,
        truncated=bool(out.discarded or err.discarded),
        duration=time.monotonic() - started,
    )


# --------------------------------------------------------------------------------------------
# Git's environment
# --------------------------------------------------------------------------------------------

#: Keys copied from the source environment; everything else is dropped.
GIT_ENV_ALLOWLIST: tuple[str, ...] = ("PATH", "HOME")
# What makes ssh fail instead of asking: no passphrase or host-key prompt, no shared master
# connection left behind, and a bounded connect.
_SSH_BATCH_OPTIONS = "-o BatchMode=yes -o ControlMaster=no -o ConnectTimeout=10"
#: Keys always set, whatever the source says: no prompts, no system config, stable messages.
GIT_ENV_FIXED: Mapping[str, str] = {
    "LC_ALL": "C",
    "LANG": "C",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GCM_INTERACTIVE": "never",
    "GIT_MERGE_AUTOEDIT": "no",
    "GIT_SSH_COMMAND": f"ssh {_SSH_BATCH_OPTIONS}",
}
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def git_env(
    source: Mapping[str, str] | None = None, *, passthrough: Iterable[str] = ()
) -> dict[str, str]:
    """Build git's environment from an allowlist: ``PATH`` and ``HOME`` plus fixed settings.

    ``passthrough`` names extra keys an operator chose to pass (say ``SSH_AUTH_SOCK`` or
    ``https_proxy``); it can never override the fixed settings.
    """
    src = os.environ if source is None else source
    env = {key: src[key] for key in (*GIT_ENV_ALLOWLIST, *passthrough) if key in src}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.update(GIT_ENV_FIXED)
    return env


def _service_env(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for systemctl: enough to find it and reach a user manager, no secrets."""
    src = os.environ if source is None else source
    keep = ("PATH", "HOME", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")
    env = {key: src[key] for key in keep if key in src}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.update({"LC_ALL": "C", "LANG": "C", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""})
    return env


async def _git(repo_dir: str, *args: str, timeout: float = 10.0) -> ExecResult:
    return await run_exec(["git", *args], cwd=repo_dir, env=git_env(), timeout=timeout)


async def git_head(repo_dir: str | os.PathLike[str]) -> str | None:
    """The short hash of HEAD in ``repo_dir``, or None when it is not a git checkout."""
    result = await _git(os.fspath(repo_dir), "rev-parse", "--short", "HEAD")
    return (result.stdout.strip() or None) if result.ok else None


async def git_upstream(repo_dir: str | os.PathLike[str]) -> str | None:
    """The upstream of the current branch (e.g. ``origin/main``), or None when there is none."""
    result = await _git(
        os.fspath(repo_dir), "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}"
    )
    return (result.stdout.strip() or None) if result.ok else None


async def git_commit(repo_dir: str | os.PathLike[str], rev: str = "HEAD") -> str | None:
    """The full hash of the commit ``rev`` names in ``repo_dir``, or None when there is none."""
    if rev.startswith("-"):
        return None  # an option, not a revision
    result = await _git(
        os.fspath(repo_dir), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"
    )
    return (result.stdout.strip() or None) if result.ok else None


# --------------------------------------------------------------------------------------------
# Unit names and systemctl
# --------------------------------------------------------------------------------------------

UNIT_SUFFIXES = (
    ".service", ".socket", ".device", ".mount", ".automount", ".swap",
    ".target", ".path", ".timer", ".slice", ".scope",
)  # fmt: skip
#: systemd's UNIT_NAME_MAX is 256 including the terminating NUL.
_UNIT_NAME_MAX = 255
_UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.\\@-]+")


def _describe(name: str) -> str:
    # Redacted before it is cut short, so that a token pasted as a unit name is still matched.
    shown = repr(redact(name))
    return shown if len(shown) <= 60 else shown[:57] + "…'"


def validate_unit_name(name: str) -> str:
    """Return ``name`` as a full unit name (``.service`` added when it has no suffix).

    Raises ValueError with a one-line reason for anything outside systemd's unit name grammar,
    so option injection (``-H``), globs, paths and shell metacharacters never reach systemctl.
    """
    if not isinstance(name, str):
        raise ValueError(f"unit name must be a string, not {type(name).__name__}")
    if not name:
        raise ValueError("unit name is empty")
    full = name if name.endswith(UNIT_SUFFIXES) else f"{name}.service"
    reason = _unit_characters_problem(name) or _unit_shape_problem(full)
    if reason:
        raise ValueError(f"invalid unit name {_describe(name)}: {reason}")
    return full


def _unit_characters_problem(name: str) -> str:
    """Why ``name`` has characters no unit name may have; empty when it has none."""
    if name.startswith("-"):
        return "must not start with '-'"
    if not name.isascii():
        return "only ASCII characters are allowed"
    if any(c in name for c in "*?["):
        return "globs are not allowed"
    if "/" in name:
        return "'/' is not allowed"
    if not _UNIT_CHARS.fullmatch(name):
        return "only letters, digits and ':_.-\\@' are allowed"
    return ""


def _unit_shape_problem(full: str) -> str:
    """Why the full unit name ``full`` breaks systemd's grammar; empty when it does not."""
    stem = full[: full.rfind(".")]
    if not stem or stem.startswith("."):
        return "the name before the suffix is empty"
    if full.count("@") > 1:
        return "at most one '@' is allowed"
    if "@" in stem:
        prefix, instance = stem.split("@")
        if not prefix:
            return "nothing before '@'"
        if not instance:
            return "a template needs an instance after '@'"
    if len(full) > _UNIT_NAME_MAX:
        return f"longer than {_UNIT_NAME_MAX} characters"
    return ""


def program_argv(
    variable: str, default: str, environ: Mapping[str, str] | None = None
) -> list[str]:
    """A program named by a setting (``$OPS_SYSTEMCTL``…), split like a shell would, or ``default``.

    Read from ``environ`` (default ``os.environ``) at each call. Raises ValueError with a
    one-line reason when the value cannot be split.
    """
    configured = (os.environ if environ is None else environ).get(variable, "").strip()
    try:
        argv = shlex.split(configured) if configured else [default]
    except ValueError as exc:
        raise ValueError(f"{variable} cannot be split like a shell would: {exc}") from None
    return argv or [default]


def systemctl_argv(environ: Mapping[str, str] | None = None) -> list[str]:
    """The systemctl program: ``$OPS_SYSTEMCTL`` (e.g. ``sudo -n systemctl``) or ``systemctl``.

    Read from ``environ`` (default ``os.environ``) at each call. Raises ValueError with a
    one-line reason when ``$OPS_SYSTEMCTL`` cannot be split.
    """
    return program_argv("OPS_SYSTEMCTL", "systemctl", environ)


#: Every systemctl summary for a timed-out call contains this: the job may still complete, so a
#: caller must not treat a timeout as "nothing happened". Decide by ``UnitResult.timed_out``;
#: this is kept for the seed's callers that only have the summary.
SYSTEMCTL_TIMED_OUT = "timed out after"
_SYSTEMCTL_BOILERPLATE = re.compile(r"^See system logs and 'systemctl status .*$", re.MULTILINE)
_PERMISSION_WORDS = ("Access denied", "Interactive authentication required", "a password is")


def _systemctl_failure(
    unit: str, verb: str, result: ExecResult, timeout: float, secrets: Sequence[str] = ()
) -> str:
    if result.timed_out:
        # systemd keeps the job after its client is gone: say so rather than claim it failed.
        text = (
            f"systemctl {verb} {unit} {SYSTEMCTL_TIMED_OUT} {timeout:g}s; the job may still "
            f"complete (check `systemctl status {unit}`)"
        )
    elif result.returncode is None:
        text = f"could not run systemctl: {result.stderr}"
    else:
        output = _SYSTEMCTL_BOILERPLATE.sub("", result.stderr or result.stdout)
        # Redacted before it is cut short: a secret straddling the cut would no longer match.
        detail = " ".join(_cap(redact(output, secrets)).split()) or "no output"
        text = f"systemctl {verb} {unit} failed (exit {result.returncode}): {detail}"
        if any(word in output for word in _PERMISSION_WORDS):
            text += " (is this unit allowed by the polkit rule or sudoers entry?)"
    return redact(text, secrets)


class UnitResult(NamedTuple):
    """What a systemctl request did, typed: callers never read the summary to decide."""

    ok: bool
    #: One line, redacted, in systemctl's own words where it had any.
    summary: str
    #: systemctl did not answer in time: systemd keeps the job, so it may still complete.
    timed_out: bool = False

    @property
    def acted(self) -> bool:
        """Whether the unit may have been touched (done, or timed out with the job queued)."""
        return self.ok or self.timed_out


class UnitState(NamedTuple):
    """``systemctl is-active`` for one unit: its state, or why systemctl could not tell."""

    #: ``active``, ``inactive``, ``failed``, ``activating``…; None when systemctl could not tell.
    state: str | None
    #: Why the state is unknown (empty when it is known).
    detail: str = ""

    def __str__(self) -> str:
        """The state word, or ``unknown (why)``."""
        return self.state if self.state is not None else f"unknown ({self.detail})"


async def restart_unit(
    service: str, timeout: float = 20.0, *, secrets: Iterable[str] = ()
) -> UnitResult:
    """Restart another unit and wait for the job.

    Never use this for the unit the calling process runs in: a synchronous restart of one's
    own unit deadlocks (systemd issue 15775). Use ``request_restart`` for that.
    """
    try:
        unit = validate_unit_name(service)
        program = systemctl_argv()
    except ValueError as exc:
        return UnitResult(False, str(exc))
    argv = [*program, "--no-ask-password", "restart", "--", unit]
    result = await run_exec(argv, env=_service_env(), timeout=timeout)
    if result.ok:
        return UnitResult(True, redact(f"restarted {unit}"))
    summary = _systemctl_failure(unit, "restart", result, timeout, tuple(secrets))
    return UnitResult(False, summary, timed_out=result.timed_out)


async def systemctl_restart(
    service: str, timeout: float = 20.0, *, secrets: Iterable[str] = ()
) -> tuple[bool, str]:
    """Restart another unit and wait for the job; returns ``(ok, one-line summary)``.

    The seed's interface to :func:`restart_unit`, which also says whether systemctl timed out.
    """
    result = await restart_unit(service, timeout, secrets=secrets)
    return result.ok, result.summary


async def request_restart(
    service: str, *, delay: float = 1.0, secrets: Iterable[str] = ()
) -> UnitResult:
    """Ask systemd to restart the caller's own unit after ``delay`` seconds, without waiting.

    ``--no-block`` queues the job and returns, so systemd can stop this process afterwards. The
    caller replies to the user first, then awaits this.
    """
    try:
        unit = validate_unit_name(service)
        program = systemctl_argv()
    except ValueError as exc:
        return UnitResult(False, str(exc))
    await asyncio.sleep(delay)
    argv = [*program, "--no-block", "--no-ask-password", "restart", "--", unit]
    timeout = 10.0
    result = await run_exec(argv, env=_service_env(), timeout=timeout)
    if result.ok:
        return UnitResult(True, redact(f"restart of {unit} requested"))
    summary = _systemctl_failure(unit, "restart", result, timeout, tuple(secrets))
    return UnitResult(False, summary, timed_out=result.timed_out)


async def deferred_systemctl_restart(
    service: str, *, delay: float = 1.0, secrets: Iterable[str] = ()
) -> tuple[bool, str]:
    """:func:`request_restart` as the seed's ``(ok, one-line summary)``."""
    result = await request_restart(service, delay=delay, secrets=secrets)
    return result.ok, result.summary


async def unit_state(unit: str, timeout: float = 5.0) -> UnitState:
    """``systemctl is-active`` for one unit, typed."""
    try:
        name = validate_unit_name(unit)
        program = systemctl_argv()
    except ValueError as exc:
        return UnitState(None, str(exc))
    argv = [*program, "--no-ask-password", "is-active", "--", name]
    result = await run_exec(argv, env=_service_env(), timeout=timeout)
    state = result.stdout.strip().splitlines()
    if state and state[0]:
        return UnitState(state[0])
    return UnitState(None, _systemctl_failure(name, "is-active", result, timeout))


async def unit_started_ago(unit: str, timeout: float = 5.0) -> float | None:
    """Seconds since ``unit`` last became active, from systemd; None when it cannot tell.

    Host-wide: it counts every start, whoever caused it (a chat command, a fleet command, a
    crash and its automatic restart), which is what a unit's start limit counts too.
    """
    try:
        name = validate_unit_name(unit)
        program = systemctl_argv()
    except ValueError:
        return None
    argv = [*program, "--no-ask-password", "show", "--property=ActiveEnterTimestampMonotonic"]
    result = await run_exec([*argv, "--value", "--", name], env=_service_env(), timeout=timeout)
    text = result.stdout.strip()
    if not result.ok or not text.isascii() or not text.isdigit() or int(text) == 0:
        return None
    # systemd's monotonic timestamps are CLOCK_MONOTONIC microseconds, as time.monotonic().
    return max(time.monotonic() - int(text) / 1e6, 0.0)


#: How long a restart waits for another process on this host to finish deciding about the same
#: unit (:func:`unit_restart_lock`); it holds the lock for a ``systemctl show`` or two.
RESTART_LOCK_TIMEOUT = 15.0
# How often a waiting process tries the lock again: flock has no asynchronous wait, and a
# blocking flock in a thread could not be cancelled.
_LOCK_POLL = 0.01
# The most of a lock file's content ever read: a wall-clock time as repr(float). Another user
# may write the file (a shared lock dir): more than this is not a time.
_LOCK_READ_BYTES = 64
# What a reservation looks like (repr of time.time()); anything else is ignored.
_RESERVATION = re.compile(rb"[0-9]{1,16}(?:\.[0-9]{1,17})?")
# A reservation this far in the future is ignored (the clock was stepped back).
_LOCK_FUTURE_SLACK = 30.0
# Modes of what unit_restart_lock creates: private to the process's user, or, in a
# group-shared lock dir (setgid, group-writable), shared with its group. Sticky: one user of the
# group cannot remove or replace a lock file the other created (and may be holding).
_PRIVATE_DIR, _PRIVATE_FILE = 0o700, 0o600
_SHARED_DIR, _SHARED_FILE = 0o3770, 0o660
# A file name longer than this is refused by the file system (NAME_MAX): a unit name may be 255
# characters, so a long one is cut and told apart by a hash (see _lock_file_name).
_NAME_MAX = 255
_LOCK_NAME_KEEP = 200
# How often a lock file found removed or replaced once locked is opened again before the lock
# is refused: each time someone removed it while this process waited for it.
_LOCK_REOPENS = 3
# What an open of a lock path fails with when something other than what it must be is there.
_UNSAFE_OPEN = {
    errno.ELOOP: "a symbolic link or not a directory",
    errno.ENOTDIR: "a symbolic link or not a directory",
    errno.EISDIR: "not a regular file (a directory)",
    errno.ENXIO: "not a regular file (a socket or a device)",
}


class UnsafeLockError(OSError):
    """A restart lock path that must not be used; the restart is refused rather than unlocked.

    Not a directory (or a regular file with one link), a symlink, or writable by others: anyone
    could then redirect what this process writes, or hold or forge reservations.
    """


class UnitRestartLock:
    """The host-wide lock on restarting one unit, held: and when a restart was last reserved.

    The file holds the wall-clock time of the last reservation, so a restart requested
    without waiting (``--no-block``: systemd's own timestamp moves only once the unit is back)
    counts for every process from the moment it was decided. In a shared lock dir another
    user writes it too: what is read is bounded and must look like a time.
    """

    def __init__(self, fd: int, clock: Callable[[], float], path: str = "") -> None:
        """Wrap an open, locked lock file (``path``: its name, for the log)."""
        self._fd = fd
        self._clock = clock
        self._path = path
        found = self._read()
        self._found = b"" if found is None else found

    def reserved_ago(self) -> float | None:
        """Seconds since a process on this host last reserved a restart of the unit, or None."""
        found = self._read()
        if found is None:
            log.warning("restart lock %s holds no time: ignored", self._path)
            return None
        if not found:
            return None
        ago = self._clock() - float(found)
        if not math.isfinite(ago) or ago < -_LOCK_FUTURE_SLACK:
            return None  # not a time, or in the future: the clock was stepped back
        return max(ago, 0.0)

    def reserve(self) -> None:
        """Record that this process restarts the unit now (before it asks systemd)."""
        self._write(repr(self._clock()).encode())

    def withdraw(self) -> None:
        """Take back this holder's reservation: the restart did not happen after all."""
        self._write(self._found)

    def _read(self) -> bytes | None:
        """The reservation as written (``b""``: none), or None when it is not a time."""
        raw = os.pread(self._fd, _LOCK_READ_BYTES + 1, 0)
        text = raw.strip()
        if not text:
            return b""
        if len(raw) > _LOCK_READ_BYTES or _RESERVATION.fullmatch(text) is None:
            return None
        return text

    def _write(self, data: bytes) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)


def _unsafe(path: Path, why: str) -> UnsafeLockError:
    return UnsafeLockError(errno.EPERM, f"unsafe restart lock path: {why}", str(path))


def _check_safe(fd: int, path: Path, *, directory: bool) -> os.stat_result:
    """Refuse what is not a directory (or a regular file with one link), or is o+w."""
    info = os.fstat(fd)
    if directory and not stat.S_ISDIR(info.st_mode):
        raise _unsafe(path, "not a directory")
    if not directory and (not stat.S_ISREG(info.st_mode) or info.st_nlink != 1):
        # A hard link would make this process write the linked file's content.
        raise _unsafe(path, "not a regular file with a single link")
    if info.st_mode & stat.S_IWOTH:
        raise _unsafe(path, "writable by others")
    return info


def _open_nofollow(path: Path, name: str, flags: int, dir_fd: int) -> int:
    """``openat`` that never follows a symlink in ``name``.

    The one place that says which failures mean something else is there (a symlink, a
    directory, a socket: _UNSAFE_OPEN): they raise UnsafeLockError.
    """
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        why = _UNSAFE_OPEN.get(exc.errno or 0)
        if why is not None:
            raise _unsafe(path / name, why) from None
        raise


def _open_locks_dir(top: int, path: Path, shared: bool) -> int:
    """``locks`` in the lock dir: created private, or in a shared dir 3770 (the dir's group)."""
    try:
        # Never asked for with the setgid bit: a unit with RestrictSUIDSGID= may not set it
        # (EPERM). In a shared dir the kernel hands the bit down with the group anyway. The
        # sticky bit is allowed there (tests/deploy/test_real_systemd_users.py creates one so).
        os.mkdir("locks", _SHARED_DIR & 0o1777 if shared else _PRIVATE_DIR, dir_fd=top)
        created = True
    except FileExistsError:
        created = False
    fd = _open_nofollow(path, "locks", os.O_RDONLY | os.O_DIRECTORY, top)
    try:
        if created and shared and stat.S_IMODE(os.fstat(fd).st_mode) != _SHARED_DIR:
            os.fchmod(fd, _SHARED_DIR)  # the umask took the group's bits
        _check_safe(fd, path / "locks", directory=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_lock_file(locks: int, path: Path, name: str, shared: bool) -> int:
    """The lock file, created 0600 (0660 when shared); only a regular file is opened."""
    # O_NONBLOCK: a FIFO planted in its place is opened without waiting, then refused.
    flags = os.O_RDWR | os.O_NONBLOCK
    try:
        fd = os.open(
            name,
            flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            _SHARED_FILE if shared else _PRIVATE_FILE,
            dir_fd=locks,
        )
        created = True
    except FileExistsError:
        fd, created = _open_nofollow(path, name, flags, locks), False
    try:
        if created and shared:
            os.fchmod(fd, _SHARED_FILE)  # the umask may have taken the group's bits
        _check_safe(fd, path / name, directory=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_shared(info: os.stat_result) -> bool:
    """A lock dir that hands its group down (setgid) and lets the group write."""
    return bool(info.st_mode & stat.S_ISGID) and info.st_mode & 0o070 == 0o070


def _open_locks(lock_dir: Path) -> tuple[int, bool]:
    """The ``locks`` dir in ``lock_dir`` (created if missing), and whether it is shared."""
    lock_dir.mkdir(parents=True, exist_ok=True, mode=_PRIVATE_DIR)
    top = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        shared = _is_shared(_check_safe(top, lock_dir, directory=True))
        return _open_locks_dir(top, lock_dir, shared), shared
    finally:
        os.close(top)


def _lock_file_name(unit: str) -> str:
    """``restart-<unit>.lock``; a name too long for the file system cut and told apart by a hash.

    '+' is in no unit name, so a cut name never equals another unit's whole one.
    """
    name = f"restart-{unit}.lock"
    if len(name) <= _NAME_MAX:
        return name
    digest = hashlib.sha256(unit.encode()).hexdigest()[:32]
    return f"restart-{unit[:_LOCK_NAME_KEEP]}+{digest}.lock"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _still_named(locks: int, name: str, fd: int) -> bool:
    """Whether ``name`` in ``locks`` is still the file open as ``fd`` (not removed or replaced).

    A lock on a file removed from the dir locks nothing: the next process creates and locks a
    new file under the name.
    """
    try:
        named = os.stat(name, dir_fd=locks, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


async def _lock_fd(lock_dir: Path, name: str, unit: str, timeout: float) -> int:
    """The lock file open and locked, once it is still the file under its name."""
    locks, shared = await asyncio.to_thread(_open_locks, lock_dir)
    path, fd = lock_dir / "locks" / name, -1
    try:
        deadline = time.monotonic() + timeout
        for _attempt in range(_LOCK_REOPENS + 1):
            fd = await asyncio.to_thread(_open_lock_file, locks, path.parent, name, shared)
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process on this host is restarting {unit}")
                await asyncio.sleep(_LOCK_POLL)  # a poll period (see _LOCK_POLL)
            if _still_named(locks, name, fd):
                locked, fd = fd, -1
                return locked
            log.warning("restart lock %s was removed or replaced: opened again", path)
            os.close(fd)
            fd = -1
        raise _unsafe(path, "removed or replaced again and again while locked")
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(locks)


@contextlib.asynccontextmanager
async def unit_restart_lock(
    lock_dir: str | os.PathLike[str],
    unit: str,
    *,
    timeout: float = RESTART_LOCK_TIMEOUT,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[UnitRestartLock]:
    """Hold the host-local lock on restarts of ``unit``: ``flock`` on a file in ``lock_dir``.

    Every process that restarts units on this host (the bot, each control daemon) checks the
    restart spacing and reserves the restart under this lock, so two of them can never both
    pass the check for one unit: the second waits, then sees the first one's reservation.
    The file is ``lock_dir/locks/restart-<unit>.lock`` (a name too long for the file system is
    cut and ends in a hash); the lock goes with the descriptor, so a process that dies holding
    it frees it. A file found removed or replaced once locked is let go and opened again.
    Raises ``TimeoutError`` when another process holds it for ``timeout`` seconds, and
    ``ValueError`` for a name that is not a unit.

    ``lock_dir`` may be shared by two users of one group (``OPS_LOCK_DIR``, deployed as
    ``/run/admin-ops``, mode 3770): when it is setgid and group-writable, ``locks`` is created
    3770 (sticky: neither user can remove the other's lock files) and the lock files 0660, so
    the other user can lock them too. ``locks`` and the file are opened relative to the
    directory, never through a symlink; a path that is not a directory or a regular file, or is
    writable by others (``lock_dir`` included), raises :class:`UnsafeLockError`. Any OSError
    here means no lock: the callers refuse the restart rather than run it unlocked.
    """
    name = validate_unit_name(unit)
    file = _lock_file_name(name)
    fd = await _lock_fd(Path(lock_dir), file, name, timeout)
    try:
        yield UnitRestartLock(fd, clock, str(Path(lock_dir) / "locks" / file))
    finally:
        os.close(fd)  # closing the descriptor releases the lock


async def systemctl_is_active(unit: str, timeout: float = 5.0) -> str:
    """``systemctl is-active`` for one unit: ``active``, ``inactive``, ``unknown (why)``…."""
    return str(await unit_state(unit, timeout))


async def _unit_job(
    verb: str, service: str, timeout: float, secrets: Iterable[str], done: str
) -> UnitResult:
    """``systemctl <verb> -- <unit>``, waiting for the job; ``done`` words the success."""
    try:
        unit = validate_unit_name(service)
        program = systemctl_argv()
    except ValueError as exc:
        return UnitResult(False, str(exc))
    argv = [*program, "--no-ask-password", verb, "--", unit]
    result = await run_exec(argv, env=_service_env(), timeout=timeout)
    if result.ok:
        return UnitResult(True, redact(f"{done} {unit}"))
    summary = _systemctl_failure(unit, verb, result, timeout, tuple(secrets))
    return UnitResult(False, summary, timed_out=result.timed_out)


async def start_unit(
    service: str, timeout: float = 20.0, *, secrets: Iterable[str] = ()
) -> UnitResult:
    """Start a unit and wait for the job (the crash-loop guard starts the bot it rolled back)."""
    return await _unit_job("start", service, timeout, secrets, "started")


async def reset_failed_unit(
    service: str, timeout: float = 10.0, *, secrets: Iterable[str] = ()
) -> UnitResult:
    """Clear a unit's failed state and its start-limit count (``systemctl reset-failed``).

    A unit that hit its start limit refuses every start until this is done.
    """
    return await _unit_job("reset-failed", service, timeout, secrets, "reset the failed state of")


async def unit_restart_count(unit: str, timeout: float = 5.0) -> int | None:
    """How often systemd restarted ``unit`` on its own since it was last started on request.

    systemd's ``NRestarts``; None when systemctl cannot tell.
    """
    try:
        name = validate_unit_name(unit)
        program = systemctl_argv()
    except ValueError:
        return None
    argv = [*program, "--no-ask-password", "show", "--property=NRestarts", "--value", "--", name]
    result = await run_exec(argv, env=_service_env(), timeout=timeout)
    text = result.stdout.strip()
    if not result.ok or not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    return int(text)


# --------------------------------------------------------------------------------------------
# Small JSON state files
# --------------------------------------------------------------------------------------------


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON so readers see the old file or the new one, never half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp_file:
            json.dump(data, tmp_file, sort_keys=True)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: State files are small; a larger one is not ours and is not parsed.
MAX_STATE_FILE_BYTES = 1 << 20


def read_json_file(path: str | os.PathLike[str]) -> Any | None:
    """The JSON in ``path``, or None when it is missing, unreadable, too large or too deep.

    Only a regular file counts: a symlink (as the last component) or a FIFO planted in its
    place is not followed, and opening never blocks.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
        with open(fd, encoding="utf-8") as state:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                log.warning("%s is not a regular file; ignored", path)
                return None
            text = state.read(MAX_STATE_FILE_BYTES + 1)
        if len(text) > MAX_STATE_FILE_BYTES:
            log.warning("%s is larger than %d bytes; ignored", path, MAX_STATE_FILE_BYTES)
            return None
        return json.loads(text)
    except (OSError, ValueError, RecursionError):
        return None


# --------------------------------------------------------------------------------------------
# Bounded Redis calls (the client is passed in; this module never imports redis)
# --------------------------------------------------------------------------------------------


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a failed call on a Redis client passed in raises, caught by type.

    This module never imports redis-py; a client passed in means it is loaded, so its base
    error is taken from there. Socket errors and timeouts (``bounded``) are OSError/TimeoutError.
    """
    errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
    module = sys.modules.get("redis.exceptions")
    base = getattr(module, "RedisError", None)
    if isinstance(base, type) and issubclass(base, BaseException):
        errors += (base,)
    return errors


def raise_if_cancelling() -> None:
    """Raise CancelledError if this task was cancelled but something swallowed it.

    Python 3.11's ``asyncio.wait_for``, which redis-py uses to send every command, returns the
    result instead of raising when a cancellation arrives just as the send completes (CPython
    gh-86296, fixed in 3.12); the task still counts the request. Without this check a cancelled
    task could go on as if nothing happened, and whoever waits for it to stop would hang.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def bounded(call: Awaitable[T], seconds: float = REDIS_CALL_TIMEOUT) -> T:
    """Await one call to a server (Redis) for at most ``seconds``; TimeoutError after that."""
    async with asyncio.timeout(seconds):
        result = await call
    raise_if_cancelling()
    return result


def as_text(value: Any) -> str:
    """What a Redis client returned, as text, whether or not it decodes responses."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return f"no answer within {REDIS_CALL_TIMEOUT:g}s"
    detail = redact(str(exc)).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


# Delete the key only if it still holds our token: a lapsed lock taken by someone else stays.
_RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


# --------------------------------------------------------------------------------------------
# git pull with dedupe
# --------------------------------------------------------------------------------------------


class PullResult(NamedTuple):
    """What ``run_git_pull`` did.

    ``ran=False, ok=True``: skipped, someone else is pulling this checkout.
    ``ran=False, ok=False``: nothing ran because of a problem.
    ``ran=True``: git ran; ``ok`` says whether the pull succeeded.
    """

    ran: bool
    ok: bool
    summary: str


class PullOutcome(NamedTuple):
    """What :func:`pull_checkout` did: a :class:`PullResult` plus the commits it moved between."""

    ran: bool
    ok: bool
    summary: str
    #: The full commit hash of HEAD before and after git ran (None when unknown or not run).
    head_before: str | None = None
    head_after: str | None = None

    @property
    def updated(self) -> bool:
        """Whether the pull moved HEAD."""
        return self.ok and self.head_after is not None and self.head_before != self.head_after

    @property
    def result(self) -> PullResult:
        """The seed's three fields."""
        return PullResult(self.ran, self.ok, self.summary)


def pull_lock_key(
    repo_dir: str | os.PathLike[str],
    hostname: str | None = None,
    prefix: str = DEFAULT_KEY_PREFIX,
) -> str:
    """The Redis key that dedupes pulls of one checkout on one host."""
    host = hostname if hostname is not None else socket.gethostname()
    return f"{prefix}:pull:{host}:{os.path.realpath(repo_dir)}"


#: What every git run in a checkout gets, a pull's or not.
_GIT_HARDENING = (
    # No credential helper or askpass program may run: an unattended git must fail, not wait.
    "-c", "credential.helper=",
    "-c", "core.askPass=",
    "-c", "color.ui=never",
    # Submodules are not ours to update from chat.
    "-c", "submodule.recurse=false",
)  # fmt: skip
_PULL_ARGV = (
    "git", *_GIT_HARDENING, "pull", "--ff-only", "--no-rebase", "--no-stat", "--no-edit",
)  # fmt: skip
_MAX_LISTED_COMMITS = 10
_LOCK_FILE_NAME = "admin-ops-pull.lock"

# git's messages under LC_ALL=C, mapped to what happened in plain words.
_PULL_FAILURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("Not possible to fast-forward", "diverging branches", "have diverged"),
        "Not pulled: the branch has diverged from its upstream. Nothing was merged; "
        "HEAD is unchanged.",
    ),
    (
        ("would be overwritten", "Please commit your changes or stash them", "unstaged changes"),
        "Not pulled: local changes in the checkout block the fast-forward. "
        "Commit, stash or discard them first.",
    ),
    (
        ("no tracking information", "not currently on a branch", "no such ref was fetched"),
        "Not pulled: the current branch has no upstream to pull from "
        "(set one with `git branch --set-upstream-to`).",
    ),
    (
        (
            "Authentication failed",
            "could not read Username",
            "could not read Password",
            "terminal prompts disabled",
            "Permission denied (publickey",
            "Host key verification failed",
        ),
        "Not pulled: the remote requires authentication that is not available "
        "(git never prompts here).",
    ),
    (
        (
            "Could not resolve host",
            "unable to access",
            "Connection refused",
            "Connection timed out",
            "Could not read from remote repository",
            "does not appear to be a git repository",
            "unable to connect",
        ),
        "Not pulled: the remote is unreachable.",
    ),
    (
        ("dubious ownership",),
        "Not pulled: git refuses this checkout because another user owns it (safe.directory).",
    ),
    (
        ("index.lock",),
        "Not pulled: git could not lock the index (another git process is running, "
        "or one crashed and left .git/index.lock behind).",
    ),
)


def _classify_pull_failure(
    stderr: str, returncode: int | None, *, refused: str = "Not pulled", what: str = "git pull"
) -> str:
    for needles, headline in _PULL_FAILURES:
        if any(needle in stderr for needle in needles):
            return _reprefixed(headline, refused)
    return f"{what} failed (exit {returncode})."


def _reprefixed(text: str, refused: str) -> str:
    """A pull's sentence said of another git operation (``Not fetched: …``)."""
    return refused + text.removeprefix("Not pulled") if text.startswith("Not pulled") else text


def git_failure_summary(
    result: ExecResult,
    *,
    timeout: float,
    refused: str = "Not pulled",
    what: str = "git",
    secrets: Sequence[str] = (),
) -> str:
    """What went wrong in a git run of :func:`run_checkout_git`, in the words a pull uses.

    ``refused`` starts the sentence when git refused (``Not fetched``), ``what`` names the
    operation when git just failed or timed out (``git fetch``).
    """
    if result.timed_out:
        return _with_detail(
            f"{what} timed out after {timeout:g}s; stopped.", result.stderr, secrets
        )
    if result.returncode is None:
        return f"{refused}: {result.stderr}"
    headline = _classify_pull_failure(result.stderr, result.returncode, refused=refused, what=what)
    return _with_detail(headline, result.stderr, secrets)


def _with_detail(headline: str, detail: str, secrets: Sequence[str] = ()) -> str:
    # Redacted before it is cut short: a secret straddling the cut would no longer match.
    detail = _cap(redact(detail, secrets))
    return f"{headline}\n{detail}" if detail else headline


# Who holds a lock is shown to people, and a lock can be written by others (the lock file by any
# process of the service's user, the Redis key by any Redis writer): only a name of this grammar
# is ever shown, and a Redis lock whose value is not "<name>:<32 hex>" was not taken by a service.
_HOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_HOLDER_UNSAFE = re.compile(r"[^A-Za-z0-9._:@-]")
_LOCK_TOKEN = re.compile(r"(?P<holder>[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}):[0-9a-f]{32}")
#: A lock token is at most this long; more is read from Redis only to see that it is not one.
_LOCK_TOKEN_MAX = 161


def _holder_name(holder: str) -> str:
    """``holder`` in the grammar every shown lock holder must match (unsafe characters → ``-``)."""
    name = _HOLDER_UNSAFE.sub("-", holder)[:128].lstrip("._:@-")
    return name or "unknown"


def _read_holder(lock_fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(lock_fd, _LOCK_TOKEN_MAX, 0).decode("ascii", errors="replace").strip()
        return text if _HOLDER.fullmatch(text) else ""
    return ""


def _try_flock(lock_path: str, holder: str) -> tuple[int | None, str]:
    """Take the host-local pull lock without blocking: ``(fd, "")`` or ``(None, holder)``."""
    # Group-writable as far as the umask allows: services of different users that share a
    # checkout through a group must all be able to open the same lock. It holds no secret.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _read_holder(fd)
        os.close(fd)
        return None, other
    except BaseException:
        os.close(fd)
        raise
    # Who holds it, for the skip message of whoever comes next. Only a courtesy: a full disk
    # must not turn into a lock that is never released.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
    return fd, ""


def _release_flock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the last descriptor of the open file releases the flock


class _RepoInfo(NamedTuple):
    git_dir: str
    head: str | None


async def _inspect_checkout(repo_dir: str, refused: str = "Not pulled") -> _RepoInfo | str:
    """The checkout's git dir and HEAD, or a sentence saying why it is not a usable checkout."""
    if not os.path.isdir(repo_dir):
        return f"{refused}: {repo_dir} does not exist or is not a directory."
    # One git process for the work-tree test, the git dir and HEAD; with an unborn HEAD it
    # exits 1 after printing the first two.
    result = await _git(
        repo_dir, "rev-parse", "--is-inside-work-tree", "--absolute-git-dir",
        "--verify", "--quiet", "HEAD",
    )  # fmt: skip
    # One value per line: a path may contain spaces ("/srv/my app/.git").
    lines = result.stdout.splitlines()
    if result.returncode not in (0, 1) or len(lines) < 2 or lines[0] != "true":
        if "dubious ownership" in result.stderr:
            headline = _classify_pull_failure(result.stderr, None, refused=refused)
            return _with_detail(headline, result.stderr)
        return f"{refused}: {repo_dir} is not a git checkout."
    head = lines[2].strip() if result.returncode == 0 and len(lines) > 2 else None
    return _RepoInfo(git_dir=lines[1], head=head or None)


def _quick_git_dir(path: str) -> str | None:
    """The git dir of a checkout whose top level is ``path``, found without running git."""
    dot_git = os.path.join(path, ".git")
    try:
        st = os.stat(dot_git)
    except OSError:
        return None
    if st.st_uid != os.geteuid():
        return None  # let git judge ownership (safe.directory) before we create anything there
    if os.path.isdir(dot_git):
        return os.path.realpath(dot_git)
    try:  # linked worktrees and submodules have a file: "gitdir: <path>"
        with open(dot_git, encoding="utf-8") as gitfile:
            line = gitfile.readline().strip()
    except OSError:
        return None
    if not line.startswith("gitdir: "):
        return None
    return os.path.realpath(os.path.join(path, line.removeprefix("gitdir: ")))


async def _describe_update(repo_dir: str, old: str | None, new: str | None) -> str:
    if new is None:
        return "git pull succeeded, but HEAD cannot be read."
    if old == new:
        return f"Already up to date at {new[:7]}."
    if old is None:
        return f"Updated to {new[:7]}."
    span = f"{old}..{new}"
    count, stat, listing = await asyncio.gather(
        _git(repo_dir, "rev-list", "--count", span),
        _git(repo_dir, "diff", "--shortstat", old, new),
        _git(
            repo_dir,
            "log",
            "--no-color",
            f"--max-count={_MAX_LISTED_COMMITS}",
            "--format=%h %s",
            span,
        ),
    )
    commits = int(count.stdout.strip() or 0) if count.ok else 0
    files = stat.stdout.strip().split(" ", 1)[0] if stat.ok and stat.stdout.strip() else "0"
    noun = "commit" if commits == 1 else "commits"
    file_noun = "file" if files == "1" else "files"
    lines = [f"Updated {old[:7]} → {new[:7]} ({commits} {noun}, {files} {file_noun} changed)"]
    lines += listing.stdout.splitlines()[:_MAX_LISTED_COMMITS]
    if commits > _MAX_LISTED_COMMITS:
        lines.append(f"… and {commits - _MAX_LISTED_COMMITS} more")
    return "\n".join(lines)


def _index_lock_mtime(git_dir: str) -> float | None:
    try:
        return os.stat(os.path.join(git_dir, "index.lock")).st_mtime
    except FileNotFoundError:
        return None


def _stale_lock_message(git_dir: str, refused: str = "Not pulled") -> str:
    lock = os.path.join(git_dir, "index.lock")
    return (
        f"{refused}: {lock} exists, so git cannot update the checkout. Another git process "
        "may be running; if none is (check with `pgrep -a git`), a crashed one left it: "
        f"remove it with `rm {shlex.quote(lock)}` and pull again."
    )


def _other_process_inside(path: str) -> bool:
    """Whether a process other than this one has its working directory inside ``path``.

    Such a process may be a git of someone else's (an operator's ``git commit`` waiting in its
    editor) that owns the index.lock we are looking at.
    """
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # cannot tell: assume the worst, leave the lock alone
    prefix = path.rstrip("/") + "/"
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == path or cwd.startswith(prefix):
            return True
    return False


def _clean_index_lock_after_kill(
    path: str, git_dir: str, run_started: float, result: ExecResult
) -> str:
    """Remove an index.lock that the git we killed left behind, and say what was done.

    git removes its own lock on SIGTERM, so a lock is ours to remove only when git needed
    SIGKILL, the lock appeared during the run, and no other process works in the checkout.
    """
    mtime = _index_lock_mtime(git_dir)
    if mtime is None:
        return ""
    ours = (
        result.returncode == -signal.SIGKILL
        and mtime + 1.0 >= run_started
        and not _other_process_inside(path)
    )
    if not ours:
        return "\n" + _stale_lock_message(git_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(git_dir, "index.lock"))
    return "\nRemoved the index.lock that the killed git left behind."


def pull_lock_ttl(timeout: float) -> float:
    """The dedupe lock's lifetime for pulls of at most ``timeout`` seconds.

    Every service uses this, so a lock that lives longer than it can only have been written by
    someone else (``_RedisLock`` then takes it over).
    """
    return max(90.0, timeout + 30.0)


class _RedisLock:
    """A fleet-wide pull lock: ``SET NX PX`` with a token, released by compare-and-delete."""

    def __init__(self, redis: Any, key: str, token: str, ttl_ms: int) -> None:
        self.redis, self.key, self.token, self.ttl_ms = redis, key, token, ttl_ms
        self.held = False

    async def acquire(self) -> str | None:
        """None when acquired; else who holds it. Redis errors propagate."""
        # Counted as held before the reply: a SET whose reply is lost may still have landed,
        # and release() only ever deletes our own token.
        self.held = True
        if await bounded(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms)):
            return None
        self.held = False
        holder = await self._holder()
        if holder is None or await self._forged():
            # Not a lock another service holds: take it over rather than skip every pull.
            self.held = True
            await bounded(self.redis.set(self.key, self.token, px=self.ttl_ms))
            return None
        return holder

    async def _holder(self) -> str | None:
        """Who holds the lock, from a token only a service writes; None for anything else.

        Read with a bound: the value can be anything a Redis writer put there, of any size.
        """
        value = as_text(await bounded(self.redis.getrange(self.key, 0, _LOCK_TOKEN_MAX)))
        match = _LOCK_TOKEN.fullmatch(value)
        if match is None:
            if value:  # an empty value: it expired between our calls; SET NX gets it next time
                log.warning("pull lock %s holds no service's token; taking it over", self.key)
                return None
            return "another service"
        return match["holder"]

    async def _forged(self) -> bool:
        """Whether the key holds no lock a service took: none has no expiry or a longer one."""
        left = int(await bounded(self.redis.pttl(self.key)))
        if left == -1 or left > self.ttl_ms:
            shown = "no expiry" if left == -1 else f"{left / 1000:.0f} s left"
            log.warning(
                "pull lock %s has %s, more than any pull may take (%g s): not a lock another "
                "service holds; taking it over",
                self.key,
                shown,
                self.ttl_ms / 1000,
            )
            return True
        return False

    async def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            await bounded(self.redis.eval(_RELEASE_SCRIPT, 1, self.key, self.token))
        except redis_errors() as exc:  # the TTL frees it anyway; a release must never fail a pull
            log.warning("could not release pull lock %s: %s", self.key, _describe_error(exc))


async def run_git_pull(
    repo_dir: str | os.PathLike[str],
    *,
    redis: Any = None,
    dedupe: bool = True,
    lock_ttl: float = 90,
    instance_id: str = "",
    timeout: float = 60.0,
    env_passthrough: Iterable[str] = (),
    secrets: Iterable[str] = (),
) -> PullResult:
    """Fast-forward the checkout at ``repo_dir`` from its upstream, at most once at a time.

    A non-blocking ``flock`` in the checkout's git dir always guards the pull on this host;
    with ``redis`` and ``dedupe`` a ``SET NX PX`` lock dedupes across services too. If Redis
    is down the pull goes ahead under the flock and the summary says so. :func:`pull_checkout`
    does the same and also says which commits HEAD moved between.
    """
    outcome = await pull_checkout(
        repo_dir, redis=redis, dedupe=dedupe, lock_ttl=lock_ttl, instance_id=instance_id,
        timeout=timeout, env_passthrough=env_passthrough, secrets=secrets,
    )  # fmt: skip
    return outcome.result


async def pull_checkout(
    repo_dir: str | os.PathLike[str],
    *,
    redis: Any = None,
    dedupe: bool = True,
    lock_ttl: float = 90,
    instance_id: str = "",
    timeout: float = 60.0,
    env_passthrough: Iterable[str] = (),
    secrets: Iterable[str] = (),
) -> PullOutcome:
    """:func:`run_git_pull`, typed: the outcome also carries HEAD before and after."""
    secrets = tuple(secrets)
    if lock_ttl <= timeout + DEFAULT_KILL_GRACE:
        raise ValueError(
            f"lock_ttl ({lock_ttl:g}s) must exceed timeout plus the kill grace "
            f"({timeout:g}s + {DEFAULT_KILL_GRACE:g}s), or the lock could lapse mid-pull"
        )
    result = await _pull_checkout(
        repo_dir, redis=redis if dedupe else None, lock_ttl=lock_ttl, instance_id=instance_id,
        timeout=timeout, env_passthrough=tuple(env_passthrough), secrets=tuple(secrets),
    )  # fmt: skip
    # Redacted once more here so that no summary escapes it, including those that echo the
    # caller's path (an operator may paste a clone URL with a token where a path belongs).
    return result._replace(summary=redact(result.summary, secrets))


class HeldCheckout(NamedTuple):
    """A checkout whose host-local lock this process holds (see :func:`locked_checkout`)."""

    #: The real path of the checkout's top level.
    path: str
    git_dir: str
    #: The full hash of HEAD when the lock was taken (None on an unborn branch).
    head: str | None


class CheckoutRefusal(NamedTuple):
    """Why :func:`locked_checkout` holds no lock: another process holds it, or a problem."""

    #: One sentence (empty when ``busy``: the caller words that).
    summary: str
    #: Another process on this host holds the lock; ``holder`` says who, when it said.
    busy: bool = False
    holder: str = ""


@contextlib.asynccontextmanager
async def locked_checkout(
    repo_dir: str | os.PathLike[str], *, holder: str = "", refused: str = "Not pulled"
) -> AsyncIterator[HeldCheckout | CheckoutRefusal]:
    """Hold the checkout's host-local lock, the one every pull takes, for the block.

    Yields a :class:`HeldCheckout`, or a :class:`CheckoutRefusal` when the lock is taken or the
    path is not a usable checkout (``refused`` starts that sentence: ``Not fetched``). Fetches
    and rollbacks take it as pulls do, so no two of them work in one checkout at once on this
    host, whichever service asked. The lock is never waited for.
    """
    if "\x00" in os.fspath(repo_dir):
        yield CheckoutRefusal(f"{refused}: the path contains a NUL byte.")
        return
    path = os.path.realpath(repo_dir)
    who = _holder_name(holder or f"{socket.gethostname()}:{os.getpid()}")
    # Take the lock before running any git when the git dir is evident: a caller that loses
    # costs an open() and a flock(), not a git process.
    info: _RepoInfo | str | None = None
    git_dir = _quick_git_dir(path)
    if git_dir is None:
        info = await _inspect_checkout(path, refused)
        if isinstance(info, str):
            yield CheckoutRefusal(info)
            return
        git_dir = os.path.realpath(info.git_dir)
    lock_path = os.path.join(git_dir, _LOCK_FILE_NAME)
    try:
        lock_fd, other = _try_flock(lock_path, who)
    except OSError as exc:  # a read-only mount, a foreign owner, something else in its place
        reason = exc.strerror or exc
        yield CheckoutRefusal(f"{refused}: cannot open the pull lock {lock_path}: {reason}.")
        return
    if lock_fd is None:
        yield CheckoutRefusal("", busy=True, holder=other)
        return
    try:
        if info is None:
            info = await _inspect_checkout(path, refused)
        if isinstance(info, str):
            yield CheckoutRefusal(info)
        else:
            yield HeldCheckout(path, info.git_dir, info.head)
    finally:
        _release_flock(lock_fd)


async def run_checkout_git(
    held: HeldCheckout,
    *args: str,
    timeout: float = 60.0,
    env_passthrough: Iterable[str] = (),
    network: bool = False,
) -> ExecResult:
    """Run git with a pull's hardening in a checkout whose lock this process holds.

    No credential helper, askpass program, colour or submodule recursion; the environment
    from the allowlist. ``network``: the command talks to the remote (a fetch), so it gets a
    pull's ssh command too (the checkout's own, unable to prompt). A run stopped at its
    timeout that left an index.lock behind has it removed as after a pull, when it is ours.
    """
    passthrough = tuple(env_passthrough)
    env = await _pull_env(held.path, passthrough) if network else git_env(passthrough=passthrough)
    started = time.time()
    argv = ["git", *_GIT_HARDENING, *args]
    result = await run_exec(argv, cwd=held.path, env=env, timeout=timeout)
    if result.timed_out:
        note = _clean_index_lock_after_kill(held.path, held.git_dir, started, result)
        if note:
            result = result._replace(stderr=f"{result.stderr}{note}")
    return result


async def git_read(
    repo_dir: str | os.PathLike[str], *args: str, timeout: float = 30.0
) -> ExecResult:
    """Run a git command that only reads (log, diff, rev-list) in ``repo_dir``, hardened.

    No lock: reading never gets in the way of a pull. The environment is the allowlist's.
    """
    argv = ["git", *_GIT_HARDENING, *args]
    return await run_exec(argv, cwd=os.fspath(repo_dir), env=git_env(), timeout=timeout)


def stale_index_lock(held: HeldCheckout, refused: str = "Not pulled") -> str | None:
    """Why git cannot change the checkout's index now (an index.lock exists), or None."""
    if _index_lock_mtime(held.git_dir) is None:
        return None
    return _stale_lock_message(held.git_dir, refused)


async def _pull_checkout(
    repo_dir: str | os.PathLike[str],
    *,
    redis: Any,
    lock_ttl: float,
    instance_id: str,
    timeout: float,
    env_passthrough: tuple[str, ...],
    secrets: tuple[str, ...],
) -> PullOutcome:
    holder = _holder_name(instance_id or f"{socket.gethostname()}:{os.getpid()}")
    async with locked_checkout(repo_dir, holder=holder) as held:
        if isinstance(held, CheckoutRefusal):
            if not held.busy:
                return PullOutcome(ran=False, ok=False, summary=held.summary)
            who = f" ({held.holder})" if held.holder else ""
            path = os.path.realpath(repo_dir)
            return PullOutcome(
                ran=False,
                ok=True,
                summary=f"Skipped: another process on this host{who} is already pulling {path}.",
            )
        return await _pull_under_flock(
            held.path, _RepoInfo(held.git_dir, held.head), redis=redis, lock_ttl=lock_ttl,
            holder=holder, timeout=timeout, env_passthrough=env_passthrough, secrets=secrets,
        )  # fmt: skip


async def _pull_under_flock(
    path: str,
    info: _RepoInfo,
    *,
    redis: Any,
    lock_ttl: float,
    holder: str,
    timeout: float,
    env_passthrough: tuple[str, ...],
    secrets: tuple[str, ...],
) -> PullOutcome:
    lock_error = ""
    lock: _RedisLock | None = None
    if redis is not None:
        token = f"{holder}:{uuid.uuid4().hex}"
        lock = _RedisLock(redis, pull_lock_key(path), token, int(lock_ttl * 1000))
        try:
            other = await lock.acquire()
        except redis_errors() as exc:
            lock_error = _describe_error(exc)
        else:
            if other is not None:
                return PullOutcome(
                    ran=False,
                    ok=True,
                    summary=f"Skipped: {other} is already pulling {path}.",
                )
    try:
        result = await _run_pull(path, info, timeout, env_passthrough, secrets)
    finally:
        if lock is not None:
            await lock.release()
    if not lock_error:
        return result
    outcome = "pulled with the host-local lock only" if result.ran else "nothing was pulled"
    return result._replace(
        summary=f"{result.summary}\n(dedupe lock unavailable ({lock_error}); {outcome})"
    )


async def _pull_env(path: str, passthrough: tuple[str, ...]) -> dict[str, str]:
    """The environment for git fetching into the checkout at ``path``.

    A checkout may name its own ssh command (``core.sshCommand``: git's way to give each
    repository its own deploy key). ``GIT_SSH_COMMAND`` would silently override it, so that
    command is used instead, with the batch options added so ssh still never prompts.
    """
    env = git_env(passthrough=passthrough)
    configured = await _git(path, "config", "--get", "core.sshCommand")
    own = configured.stdout.strip() if configured.ok else ""
    if own:
        env["GIT_SSH_COMMAND"] = ssh_batch_command(own)
    return env


def ssh_batch_command(command: str) -> str:
    """A checkout's ``core.sshCommand`` made unable to prompt.

    OpenSSH takes the first value given for an option, so the checkout's own options (its key)
    still win; batch options are added only to an ``ssh`` program, since other programs (plink)
    would not understand them. Either way the child has no terminal to prompt on.
    """
    try:
        program = shlex.split(command)[0]
    except (ValueError, IndexError):
        return command
    if os.path.basename(program) != "ssh":
        return command
    return f"{command} {_SSH_BATCH_OPTIONS}"


async def _run_pull(
    path: str,
    info: _RepoInfo,
    timeout: float,
    env_passthrough: tuple[str, ...],
    secrets: tuple[str, ...],
) -> PullOutcome:
    if _index_lock_mtime(info.git_dir) is not None:
        return PullOutcome(ran=False, ok=False, summary=_stale_lock_message(info.git_dir))
    env = await _pull_env(path, env_passthrough)
    run_started = time.time()
    result = await run_exec(_PULL_ARGV, cwd=path, env=env, timeout=timeout)
    if result.returncode is None and not result.timed_out:
        return PullOutcome(ran=False, ok=False, summary=f"Not pulled: {result.stderr}")
    if result.timed_out:
        cleanup = _clean_index_lock_after_kill(path, info.git_dir, run_started, result)
        headline = f"git pull timed out after {timeout:g}s; stopped."
        return PullOutcome(
            ran=True, ok=False, summary=_with_detail(headline + cleanup, result.stderr, secrets)
        )
    if result.returncode != 0:
        headline = _classify_pull_failure(result.stderr, result.returncode)
        return PullOutcome(
            ran=True, ok=False, summary=_with_detail(headline, result.stderr, secrets)
        )
    new_head = (await _git(path, "rev-parse", "--verify", "--quiet", "HEAD")).stdout.strip()
    summary = await _describe_update(path, info.head, new_head or None)
    return PullOutcome(
        ran=True,
        ok=True,
        summary=redact(summary),
        head_before=info.head,
        head_after=new_head or None,
    )


# --------------------------------------------------------------------------------------------
# Cooldowns
# --------------------------------------------------------------------------------------------


#: How long a cooldown waits for another process's hold on the state file before using memory.
_STATE_LOCK_WAIT = 2.0


class _LocalStore:
    """Cooldown expiry times (wall clock) in memory or in a JSON file shared by processes."""

    def __init__(self, state_file: str | os.PathLike[str] | None) -> None:
        self.state_file = Path(state_file) if state_file is not None else None
        self.memory: dict[str, float] = {}

    def transact(self, update: Callable[[dict[str, float]], T]) -> T:
        """Apply ``update`` to the stored mapping atomically (also across processes).

        Raises OSError when the state file cannot be used, TimeoutError when another process
        holds it for longer than ``_STATE_LOCK_WAIT`` (a stopped or stuck peer).
        """
        if self.state_file is None:
            return update(self.memory)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_file.with_name(self.state_file.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _flock_with_deadline(fd, _STATE_LOCK_WAIT)
            raw = read_json_file(self.state_file)
            data = {
                str(k): float(v)
                for k, v in (raw.items() if isinstance(raw, dict) else ())
                if isinstance(v, (int, float))
            }
            before = dict(data)
            outcome = update(data)
            if data != before:
                atomic_write_json(self.state_file, data)
            return outcome
        finally:
            os.close(fd)


def _flock_with_deadline(fd: int, seconds: float) -> None:
    """Take an exclusive flock, polling (this runs in a worker thread) for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"state file lock held for over {seconds:g}s") from None
            time.sleep(0.005)


class Cooldown:
    """A per-key cooldown: after a use is recorded, the key is refused for ``seconds``.

    Every use is recorded in the local store: a JSON ``state_file`` (survives restarts on one
    host) or memory. With a Redis client the use is also claimed with ``SET NX PX`` (atomic,
    shared by every process, survives restarts). A key is refused if either store refuses it,
    so a use recorded while Redis was down still counts once it is back, and a use seen in
    Redis still counts if it goes down. If Redis errors or does not answer within about 2 s,
    the local store decides alone and a warning is logged: an outage must never block an
    operator during an incident.
    """

    def __init__(
        self,
        seconds: float,
        *,
        redis: Any = None,
        state_file: str | os.PathLike[str] | None = None,
        prefix: str = f"{DEFAULT_KEY_PREFIX}:cooldown",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """A cooldown of ``seconds``; keys live under ``prefix`` in Redis."""
        if seconds < 0:
            raise ValueError("cooldown seconds must not be negative")
        self.seconds = seconds
        self.redis = redis
        self.prefix = prefix
        self._clock = clock
        self._store = _LocalStore(state_file)
        # Serialises this process's own callers; the file lock serialises other processes.
        self._lock = asyncio.Lock()
        # After a Redis failure, skip Redis for a while so every command during an outage does
        # not pay the full call timeout again.
        self._redis_skip_until = 0.0

    async def try_acquire(self, key: str) -> float:
        """0.0 when ``key`` may be used now (and the use is recorded), else seconds remaining."""
        if self.seconds == 0:
            return 0.0
        left = await self._local(self._local_acquire(key))
        if left or not self._use_redis():
            return left
        try:
            left, trusted = await bounded(self._redis_acquire(key))
        except redis_errors() as exc:
            self._warn_fallback("try_acquire", exc)
            return 0.0
        if left and trusted:
            # Another process holds it: remember its expiry here too, for outages to come.
            until = self._clock() + left
            await self._local(lambda data: data.__setitem__(key, until))
        return left

    async def remaining(self, key: str) -> float:
        """Seconds until ``key`` may be used again (0.0: now); records nothing."""
        now = self._clock()
        expires: float = await self._local(lambda data: data.get(key, 0.0))
        left = min(max(expires - now, 0.0), self.seconds)
        if self._use_redis():
            try:
                ttl_ms = int(await bounded(self.redis.pttl(self._key(key))))
            except redis_errors() as exc:
                self._warn_fallback("remaining", exc)
            else:
                if ttl_ms > self.seconds * 1000:
                    self._warn_tampered(self._key(key), ttl_ms)
                left = max(left, min(ttl_ms / 1000, self.seconds))
        return left

    async def release(self, key: str) -> None:
        """Forget the recorded use of ``key``: for a run that failed without acting."""
        await self._local(lambda data: data.pop(key, None))
        if self._use_redis():
            try:
                await bounded(self.redis.delete(self._key(key)))
            except redis_errors() as exc:
                self._warn_fallback("release", exc)

    def _use_redis(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._redis_skip_until

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    async def _local(self, update: Callable[[dict[str, float]], T]) -> T:
        async with self._lock:
            try:
                return await asyncio.to_thread(self._store.transact, update)
            except (OSError, TimeoutError) as exc:
                log.warning("cooldown state file unusable (%s); using memory", exc)
                return update(self._store.memory)

    async def _redis_acquire(self, key: str) -> tuple[float, bool]:
        """Claim ``key`` in Redis: ``(0.0, True)``, or the seconds left and whether to trust them.

        Only we write these keys, always with the configured TTL: a longer one, or none, was
        written by someone else. Such a key counts as the configured cooldown at most, is cut
        back to it, and is never copied to the local store (where it would outlive Redis).
        """
        name = self._key(key)
        ttl_ms = max(int(self.seconds * 1000), 1)
        for _ in range(3):
            if await bounded(self.redis.set(name, str(self._clock()), nx=True, px=ttl_ms)):
                return 0.0, True
            left = int(await bounded(self.redis.pttl(name)))
            if 0 < left <= ttl_ms:
                return left / 1000, True
            if left == -1 or left > ttl_ms:
                self._warn_tampered(name, left)
                await bounded(self.redis.pexpire(name, ttl_ms))
                return self.seconds, False
            # -2: it expired between our two calls; try again.
        return self.seconds, False

    def _warn_tampered(self, name: str, ttl_ms: int) -> None:
        shown = "no expiry" if ttl_ms < 0 else f"{ttl_ms / 1000:.0f} s left"
        log.warning(
            "cooldown %s in Redis has %s, more than the configured %g s: written by someone "
            "else (or the setting was lowered); counted as %g s at most",
            name,
            shown,
            self.seconds,
            self.seconds,
        )

    def _local_acquire(self, key: str) -> Callable[[dict[str, float]], float]:
        now = self._clock()

        def update(data: dict[str, float]) -> float:
            for stale in [k for k, expires in data.items() if expires <= now]:
                del data[stale]
            if key in data:
                # A state file edited by hand (or a lowered setting) counts as the setting.
                return min(data[key] - now, self.seconds)
            data[key] = now + self.seconds
            return 0.0

        return update

    def _warn_fallback(self, what: str, exc: BaseException) -> None:
        self._redis_skip_until = time.monotonic() + REDIS_RETRY_AFTER
        store = "the state file" if self._store.state_file is not None else "memory"
        log.warning(
            "cooldown %s: Redis unavailable (%s); using %s", what, _describe_error(exc), store
        )
