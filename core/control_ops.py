"""Fleet-wide control over Redis Streams: the per-host daemon and the publisher.

One chat command (or ``python -m core.control_ops publish ...``) reaches every host that runs the
daemon; each host acts with the hardened primitives of :mod:`core.ops_exec` and answers on a
per-command result stream, so the caller can show results live as they arrive.

Wire format (a contract: other tools may publish to the fleet)
----------------------------------------------------------------
Keys, with ``prefix`` defaulting to ``sg:control``:

``{prefix}:commands``
    The command stream. Each command is one entry with exactly these string fields:

    - ``id``: a hex uuid (``uuid.uuid4().hex``); at most 64 characters of ``[0-9A-Za-z_-]``.
    - ``op``: ``ping``, ``status``, ``pull`` or ``restart``.
    - ``args``: a JSON array of strings, e.g. ``["bot"]`` (``[]`` for none).
    - ``requested_by``: free text naming the operator, e.g. ``discord:1234 (alice)``.
    - ``issued_at`` and ``expires_at``: Unix seconds from ``time.time()`` as decimal strings.
    - ``sig``: lower-case hex HMAC-SHA256, keyed with the shared secret (``OPS_CONTROL_SECRET``,
      UTF-8), over the canonical JSON of the six fields above, i.e. the UTF-8 bytes of
      ``json.dumps({six fields}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``,
      where every value is the exact string stored in the entry.

``{prefix}:results:{id}``
    One entry per answering host (expires an hour after the last write) with the fields ``host``,
    ``ok`` and ``ran`` (``"1"``/``"0"``), ``summary`` (text, possibly several lines),
    and ``duration`` (seconds, decimal).

``{prefix}:hosts:{identity}`` and the set ``{prefix}:hosts``
    Heartbeats: a key per daemon with a ~15 s TTL (its value is a small JSON description), and
    an index set of identities so a publisher need not SCAN the keyspace. A daemon whose key
    exists is alive and is expected to answer. A clean stop deletes both.

``{prefix}:ran:{identity}:{id}``
    A per-host marker set (``SET NX``) before a command runs, so a command id runs at most once
    per host even when it is redelivered, replayed or the daemon restarts mid-way.

Each daemon identity owns one consumer group, named after it, on the command stream, so every
daemon sees every command. A new group starts at ``$``: a new daemon never replays history. A
command is acknowledged only in the same Lua script that writes its result.

Trust: whoever can write to this Redis can read commands, forge results and delay or drop
commands, but cannot make a daemon run anything without the secret. Keep Redis private.

Results: ``ok``/``ran`` mean what :class:`core.ops_exec.PullResult` says: ``ran=False, ok=True``
is a clean skip (another service on the host is already pulling that checkout). Commands that did
not run start with ``rejected:`` (bad signature, expired, malformed) or ``refused:`` (not allowed
on this host, unknown op, bad arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import hmac
import importlib.metadata
import inspect
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from json.encoder import encode_basestring_ascii as _json_string
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from core.ops_exec import (
    deferred_systemctl_restart,
    git_head,
    redact,
    run_git_pull,
    systemctl_is_active,
    systemctl_restart,
    validate_unit_name,
)

__all__ = [
    "DEFAULT_PREFIX",
    "INTERRUPTED",
    "NOT_ALLOWED",
    "OPS",
    "SIGNED_FIELDS",
    "CommandRejected",
    "ConfigError",
    "ControlDaemon",
    "DaemonSettings",
    "FleetResult",
    "HostResult",
    "Published",
    "SignedCommand",
    "alive_hosts",
    "backoff_delay",
    "build_command",
    "canonical_payload",
    "command_stream_key",
    "daemon_settings_from_env",
    "default_identity",
    "heartbeat_key",
    "hosts_index_key",
    "main",
    "parse_result_fields",
    "publish",
    "ran_marker_key",
    "results_key",
    "sign_fields",
    "verify_command",
    "verify_signature",
]

# A fixed name: under `python -m core.control_ops` __name__ would be "__main__".
log = logging.getLogger("admin_ops.control_ops")

T = TypeVar("T")

DEFAULT_PREFIX: Final = "sg:control"
SIGNED_FIELDS: Final = ("id", "op", "args", "requested_by", "issued_at", "expires_at")
# Plain ASCII identifiers: JSON-encoded as themselves in quotes.
_SORTED_SIGNED_FIELDS: Final = tuple(sorted(SIGNED_FIELDS))
OPS: Final = ("ping", "status", "pull", "restart")
# Ops without side effects: answered in one script that also claims the command id.
_READ_ONLY_OPS: Final = frozenset({"ping", "status"})
DEFAULT_PULL_TARGET: Final = "bot"
NOT_ALLOWED: Final = "refused: not allowed on this host"
INTERRUPTED: Final = "interrupted; not run again"

HEARTBEAT_TTL: Final = 15.0
RESULT_TTL_SECONDS: Final = 3600
# Commands are rare; the cap only keeps a forgotten stream from growing for ever. A daemon that was
# away for more than this many commands sees the trimmed ones as empty entries and drops them.
COMMAND_STREAM_MAXLEN: Final = 10_000
# The marker must outlive the command's validity, else a replay after the marker lapsed but before
# expiry could run twice; a day on top also covers clock skew between hosts.
MARKER_GRACE_SECONDS: Final = 86_400
#: The longest validity a command may carry. A longer one is malformed: it would outlive every
#: marker that keeps it from running twice, and Redis refuses absurd expiry times outright.
MAX_COMMAND_TTL: Final = 86_400.0
BACKOFF_BASE: Final = 0.1
BACKOFF_CAP: Final = 30.0
# XREADGROUP BLOCK must stay below the client's socket timeout, or redis-py reports a timeout on a
# perfectly healthy idle connection (redis-py does not stretch the read timeout for stream reads).
MAX_BLOCK_SECONDS: Final = 5.0
SUMMARY_LIMIT: Final = 4000

_COMMAND_ID_RE: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")
_IDENTITY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_TARGET_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Terminal output of the CLI: summaries come from other hosts, so escape sequences are dropped.
_UNPRINTABLE_RE: Final = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e]"
)

# Write one host's result, then acknowledge the command: one script, so a command is never
# acknowledged without its result, and a failure to write leaves it pending.
# KEYS: results stream, ran marker, command stream.
# ARGV: identity (the group, and the result's host), entry id, marker mode, marker ttl (ms),
# then the result's ok, ran, summary and duration (field names are spelt here: fewer
# arguments to encode on every answer).
# Marker modes: "claim" takes the marker now (SET NX) and writes nothing if it was taken, for
# ops whose answer is computed without side effects; "done" finishes a marker taken before the
# op ran; "none" leaves it alone (a forged command must not be able to burn a real id).
# Returns {1} when written, or {0, marker value} when the claim lost.
_FINISH_LUA: Final = f"""
local mode = ARGV[3]
if mode == 'claim' then
  if not redis.call('SET', KEYS[2], 'done', 'NX', 'PX', ARGV[4]) then
    return {{0, redis.call('GET', KEYS[2]) or ''}}
  end
elseif mode == 'done' then
  redis.call('SET', KEYS[2], 'done', 'XX', 'KEEPTTL')
end
redis.call('XADD', KEYS[1], '*', 'host', ARGV[1], 'ok', ARGV[5], 'ran', ARGV[6],
  'summary', ARGV[7], 'duration', ARGV[8])
redis.call('EXPIRE', KEYS[1], {RESULT_TTL_SECONDS})
redis.pcall('XACK', KEYS[3], ARGV[1], ARGV[2])
return {{1}}
"""

# The identities whose heartbeat key exists, in one round trip; members whose key is gone are
# dropped from the index in the same step, so a daemon that has just come back and re-added
# itself is never removed by a publisher that saw it missing a moment earlier. The heartbeat
# keys are derived from the members, so these scripts need a standalone Redis (not a cluster).
# KEYS: the index set; ARGV: the heartbeat key prefix ("{prefix}:hosts:").
_ALIVE_LUA_BODY: Final = """
local alive = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. member) == 1 then
    alive[#alive + 1] = member
  else
    redis.call('SREM', KEYS[1], member)
  end
end
"""
_ALIVE_LUA: Final = _ALIVE_LUA_BODY + "return alive\n"

# Publishing: read the alive hosts and XADD the command in one atomic step, so no daemon can
# come or go between the two and the expected set is exactly the set that will see the command
# (a heartbeat exists only once its consumer group does). One round trip, too.
# KEYS: the index set, the command stream; ARGV: heartbeat key prefix, maxlen, field/value pairs.
_PUBLISH_LUA: Final = (
    _ALIVE_LUA_BODY
    + """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return alive
"""
)


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def command_stream_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The stream every command is published to."""
    return f"{prefix}:commands"


def results_key(command_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The per-command stream hosts answer on."""
    return f"{prefix}:results:{command_id}"


def heartbeat_key(identity: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The key whose existence says a daemon is alive."""
    return f"{prefix}:hosts:{identity}"


def hosts_index_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The set of identities that have ever heartbeated (pruned lazily by publishers)."""
    return f"{prefix}:hosts"


def ran_marker_key(identity: str, command_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The marker that makes a command id run at most once on one daemon."""
    return f"{prefix}:ran:{identity}:{command_id}"


def default_identity(service: str | None = None) -> str:
    """This host's name, plus ``:service`` when several daemons share a host."""
    host = socket.gethostname() or "localhost"
    return f"{host}:{service}" if service else host


# ---------------------------------------------------------------------------------------------
# Signing
# ---------------------------------------------------------------------------------------------


class CommandRejected(Exception):
    """A command that must not run; ``str(exc)`` is the summary the host answers with."""


class SignedCommand(NamedTuple):
    """A command whose signature checked out, with its fields parsed."""

    id: str
    op: str
    args: tuple[str, ...]
    requested_by: str
    issued_at: float
    expires_at: float


def canonical_payload(fields: Mapping[str, str]) -> bytes:
    """The exact bytes the signature covers: canonical JSON of the six signed fields."""
    signed = {name: fields[name] for name in SIGNED_FIELDS}
    if all(isinstance(value, str) for value in signed.values()):
        # Byte for byte what the json.dumps below gives for string values (the same C string
        # encoder, the keys in sorted order, no spaces), without its generic machinery: every
        # daemon computes this for every command.
        return _canonical_strings(signed)
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _canonical_strings(signed: Mapping[str, str]) -> bytes:
    body = ",".join([f'"{name}":{_json_string(signed[name])}' for name in _SORTED_SIGNED_FIELDS])
    return ("{" + body + "}").encode()


def sign_fields(fields: Mapping[str, str], secret: str) -> str:
    """Hex HMAC-SHA256 of :func:`canonical_payload` with the shared secret."""
    # hmac.digest: the one-shot (C) form of hmac.new(...).digest(), same bytes, less overhead.
    return hmac.digest(secret.encode(), canonical_payload(fields), "sha256").hex()


def build_command(
    op: str,
    args: Sequence[str],
    *,
    requested_by: str,
    secret: str,
    ttl: float = 120.0,
    now: float | None = None,
    command_id: str | None = None,
) -> dict[str, str]:
    """A complete signed command entry, valid for ``ttl`` seconds from ``now``."""
    if not secret:
        raise ValueError("a shared secret is required to sign commands")
    if isinstance(args, str) or not all(isinstance(arg, str) for arg in args):
        raise TypeError("args must be a sequence of str")
    if not 0 < ttl <= MAX_COMMAND_TTL:
        raise ValueError(f"ttl must be more than 0 and at most {MAX_COMMAND_TTL:g} seconds")
    issued = time.time() if now is None else now
    fields = {
        "id": command_id or uuid.uuid4().hex,
        "op": op,
        "args": json.dumps(list(args), separators=(",", ":")),
        "requested_by": requested_by,
        "issued_at": repr(issued),
        "expires_at": repr(issued + ttl),
    }
    fields["sig"] = sign_fields(fields, secret)
    return fields


def verify_signature(fields: Mapping[str, str], secret: str) -> SignedCommand:
    """Check the signature (constant time) and parse the fields; raise CommandRejected."""
    if any(name not in fields for name in SIGNED_FIELDS) or "sig" not in fields:
        raise CommandRejected("rejected: bad signature")
    expected = sign_fields(fields, secret)
    given = fields["sig"]
    # Compare bytes: compare_digest refuses non-ASCII str, and the given value is untrusted.
    if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
        raise CommandRejected("rejected: bad signature")
    # Past this point the fields come from a holder of the secret; a parse error is a tool bug.
    try:
        args = json.loads(fields["args"])
        issued_at = float(fields["issued_at"])
        expires_at = float(fields["expires_at"])
    except ValueError as exc:
        raise CommandRejected(f"rejected: malformed command ({exc})") from None
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise CommandRejected("rejected: malformed command (args is not a JSON array of strings)")
    if not (math.isfinite(issued_at) and math.isfinite(expires_at)):
        raise CommandRejected("rejected: malformed command (non-finite timestamp)")
    if not 0 <= expires_at - issued_at <= MAX_COMMAND_TTL:
        raise CommandRejected(
            f"rejected: malformed command (validity must be 0 to {MAX_COMMAND_TTL:g} s)"
        )
    return SignedCommand(
        id=fields["id"],
        op=fields["op"],
        args=tuple(args),
        requested_by=fields["requested_by"],
        issued_at=issued_at,
        expires_at=expires_at,
    )


def verify_command(
    fields: Mapping[str, str], secret: str, *, now: float | None = None
) -> SignedCommand:
    """:func:`verify_signature` plus the expiry check, for tools that consume commands."""
    command = verify_signature(fields, secret)
    if (time.time() if now is None else now) > command.expires_at:
        raise CommandRejected("rejected: expired")
    return command


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


class HostResult(NamedTuple):
    """One host's answer to one command."""

    host: str
    ok: bool
    ran: bool
    summary: str
    duration: float


class Published(NamedTuple):
    """What :func:`publish` tells ``on_published`` right after the command went out."""

    command_id: str
    op: str
    args: tuple[str, ...]
    expected: frozenset[str]


@dataclass(frozen=True)
class FleetResult:
    """The fleet's answers to one command."""

    command_id: str
    results: dict[str, HostResult]
    silent: frozenset[str]
    expected: frozenset[str] = field(default_factory=frozenset)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """At least one host was expected, every expected host answered ok, and no host failed.

        A host that came up after publishing and answered counts only against ``ok`` when it
        failed: an operator must see a failure wherever it happened.
        """
        if not self.expected or self.silent:
            return False
        if any(host not in self.results or not self.results[host].ok for host in self.expected):
            return False
        return all(result.ok for result in self.results.values())


def _result_fields(result: HostResult) -> dict[str, str]:
    return {
        "host": result.host,
        "ok": "1" if result.ok else "0",
        "ran": "1" if result.ran else "0",
        "summary": result.summary,
        "duration": f"{result.duration:.3f}",
    }


def parse_result_fields(fields: Mapping[str, str]) -> HostResult | None:
    """A result entry as a HostResult; None when it is not one (so a stray entry is skipped)."""
    host = fields.get("host")
    if not host:
        return None
    try:
        duration = float(fields.get("duration", "0"))
    except ValueError:
        duration = 0.0
    return HostResult(
        host=host,
        ok=fields.get("ok") == "1",
        ran=fields.get("ran") == "1",
        summary=fields.get("summary", ""),
        duration=duration,
    )


# ---------------------------------------------------------------------------------------------
# Small Redis helpers
# ---------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """Decode what redis-py returns whether or not the client decodes responses."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _entries_per_stream(response: Any) -> Iterable[Any]:
    """Each stream's entry list: RESP2 replies are ``[[stream, entries], ...]``, RESP3 a dict."""
    if not response:
        return ()
    if isinstance(response, dict):
        return response.values()
    return (entries for _stream, entries in response)


def _stream_entries(response: Any) -> list[tuple[str, dict[str, str]]]:
    """Flatten an XREAD/XREADGROUP reply into ``(entry id, fields)``.

    redis-py returns a list of ``[stream, entries]`` with RESP2 and a dict with RESP3 (where
    each value may be wrapped in one more list); the client is the caller's, so accept both.
    A trimmed entry that is still pending comes back with no fields.
    """
    flat: list[tuple[str, dict[str, str]]] = []
    for entries in _entries_per_stream(response):
        if entries and isinstance(entries[0], list):
            entries = [entry for group in entries for entry in group]
        for entry_id, raw in entries or ():
            fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
            flat.append((_text(entry_id), fields))
    return flat


def _raw_stream_entries(response: Any) -> list[tuple[str, dict[str, str]]]:
    """Flatten a raw XREADGROUP reply (no redis-py response callback applied).

    RESP2: ``[[stream, [[id, [field, value, ...]], ...]], ...]``; RESP3: ``{stream: [...]}``.
    A deleted entry that is still pending comes back with nil instead of the field list.
    """
    flat: list[tuple[str, dict[str, str]]] = []
    for entries in _entries_per_stream(response):
        for entry_id, pairs in entries or ():
            values = [_text(item) for item in pairs or ()]
            flat.append((_text(entry_id), dict(zip(values[::2], values[1::2], strict=False))))
    return flat


def _socket_timeout(client: aioredis.Redis) -> float | None:
    """The read timeout the client's connections use, including redis-py's own default.

    ``connection_kwargs`` holds only what the caller passed, so the default (5 s in redis-py 8)
    is read from the connection class, where it lives.
    """
    pool = client.connection_pool
    if "socket_timeout" in pool.connection_kwargs:
        value = pool.connection_kwargs["socket_timeout"]
        return None if value is None else float(value)
    for cls in pool.connection_class.__mro__:
        init = vars(cls).get("__init__")
        if init is None:
            continue
        param = inspect.signature(init).parameters.get("socket_timeout")
        if param is not None and param.default is not inspect.Parameter.empty:
            return None if param.default is None else float(param.default)
    return 1.0  # unknown client: assume a short timeout rather than risk a spurious one


def _read_block_seconds(client: aioredis.Redis) -> float:
    """How long a blocking stream read may wait without tripping the client's socket timeout."""
    timeout = _socket_timeout(client)
    if not timeout:
        return MAX_BLOCK_SECONDS
    return max(0.01, min(MAX_BLOCK_SECONDS, timeout / 2))


def _reraise_swallowed_cancel() -> None:
    """Raise CancelledError if this task was cancelled but something swallowed it.

    Python 3.11's ``asyncio.wait_for``, which redis-py uses to send every command, returns the
    result instead of raising when a cancellation arrives just as the send completes (CPython
    gh-86296, fixed in 3.12); the task still counts the request. Without this check a cancelled
    daemon would keep serving, and stopping it would hang.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _stop(task: asyncio.Task[Any], *, again: Callable[[], bool]) -> None:
    """Cancel ``task`` and wait until it has finished.

    If the cancellation was swallowed (see _reraise_swallowed_cancel) while the task goes on to
    block, it is repeated, but only while ``again()`` says the task is merely waiting: a task
    that is cleaning up after a cancellation (run_exec killing a process group) is left to
    finish its cleanup undisturbed.
    """
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=0.05)
        if not task.done() and again():
            task.cancel()


async def _bounded(awaitable: Awaitable[T], seconds: float) -> T:
    """Await one Redis call for at most ``seconds``; a cancelled call drops its connection."""
    async with asyncio.timeout(seconds):
        result = await awaitable
    _reraise_swallowed_cancel()
    return result


async def _call_back(callback: Callable[[Any], Any] | None, value: Any) -> None:
    """Call a sync or async callback; its failure is logged, never allowed to stop collecting."""
    if callback is None:
        return
    try:
        outcome = callback(value)
        if inspect.isawaitable(outcome):
            await outcome
    except Exception:
        log.exception("result callback %r failed", callback)


def backoff_delay(
    attempt: int,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    rng: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with equal jitter: between half and all of ``base * 2**attempt``.

    The jitter spreads a fleet's reconnects after a Redis restart; half the step is kept so a
    retry never comes immediately; ``cap`` bounds how long a daemon stays away.
    """
    step = min(cap, base * 2.0 ** min(attempt, 32))
    return step / 2 + rng() * step / 2


async def alive_hosts(redis: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX) -> frozenset[str]:
    """Identities whose heartbeat key exists right now."""
    script = redis.register_script(_ALIVE_LUA)
    members = await script(keys=[hosts_index_key(prefix)], args=[heartbeat_key("", prefix)])
    return frozenset(_text(member) for member in members)


# ---------------------------------------------------------------------------------------------
# Publisher
# ---------------------------------------------------------------------------------------------


async def publish(
    redis: aioredis.Redis,
    op: str,
    args: Sequence[str],
    *,
    requested_by: str,
    secret: str,
    timeout: float = 30.0,
    ttl: float = 120.0,
    on_result: Callable[[HostResult], Any] | None = None,
    on_published: Callable[[Published], Any] | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> FleetResult:
    """Publish a signed command and collect the fleet's answers.

    Returns as soon as every host alive at publish time has answered, or when ``timeout``
    passes. ``on_result`` (a function or coroutine function) is called once per host as its
    answer arrives; ``on_published`` once, with the hosts expected to answer, before the first.
    """
    started = time.monotonic()
    fields = build_command(op, args, requested_by=requested_by, secret=secret, ttl=ttl)
    command_id = fields["id"]
    script = redis.register_script(_PUBLISH_LUA)
    script_args: list[str] = [heartbeat_key("", prefix), str(COMMAND_STREAM_MAXLEN)]
    for name, value in fields.items():
        script_args += (name, value)
    members = await script(
        keys=[hosts_index_key(prefix), command_stream_key(prefix)], args=script_args
    )
    expected = frozenset(_text(member) for member in members)
    log.info("published %s %s %s for %d host(s)", command_id, op, fields["args"], len(expected))
    await _call_back(on_published, Published(command_id, op, tuple(args), expected))
    results = await _collect_results(
        redis,
        results_key(command_id, prefix),
        expected,
        deadline=started + timeout,
        on_result=on_result,
    )
    return FleetResult(
        command_id=command_id,
        results=results,
        silent=frozenset(expected - results.keys()),
        expected=expected,
        elapsed=time.monotonic() - started,
    )


async def _collect_results(
    redis: aioredis.Redis,
    key: str,
    expected: frozenset[str],
    *,
    deadline: float,
    on_result: Callable[[HostResult], Any] | None,
) -> dict[str, HostResult]:
    """Read the result stream until every expected host answered or the deadline passed."""
    results: dict[str, HostResult] = {}
    last_id = "0"
    block_cap = _read_block_seconds(redis)
    while not expected <= results.keys():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        block_ms = max(1, int(min(remaining, block_cap) * 1000))
        response = await redis.xread({key: last_id}, count=1000, block=block_ms)
        _reraise_swallowed_cancel()
        for entry_id, raw in _stream_entries(response):
            last_id = entry_id
            result = parse_result_fields(raw)
            # The first answer per host counts; a later duplicate (a redelivery) is ignored.
            if result is None or result.host in results:
                continue
            results[result.host] = result
            await _call_back(on_result, result)
    return results


# ---------------------------------------------------------------------------------------------
# Daemon
# ---------------------------------------------------------------------------------------------


class _Outcome(NamedTuple):
    """What an op handler decided; ``after`` runs only once the result is written and acked."""

    ok: bool
    ran: bool
    summary: str
    after: Callable[[], Awaitable[None]] | None = None


class _Finish(NamedTuple):
    """A result to write (kept in memory across a Redis outage until it is written)."""

    entry_id: str
    command_id: str
    result: HostResult
    marker: str  # "claim", "done" or "none": see _FINISH_LUA
    marker_ttl_ms: int
    after: Callable[[], Awaitable[None]] | None = None


class _Refused(Exception):
    """An op handler's way to answer without running anything."""


@cache
def _project_version() -> str:
    """admin-ops' version: installed metadata, else the checkout's pyproject.toml."""
    try:
        return importlib.metadata.version("admin-ops")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _format_span(seconds: float) -> str:
    """A compact duration for status lines: 42s, 5m12s, 2h03m, 3d04h."""
    total = int(max(0.0, seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _host_uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class ControlDaemon:
    """Serve fleet commands for one identity until cancelled.

    ``pull_targets`` maps target names to checkout paths, ``restart_units`` lists the units this
    host may restart, and ``own_units`` those among them that are restarted deferred (this
    daemon's own unit or its co-located bot's): it grants nothing by itself. Cancelling
    :meth:`run` is a clean stop: the heartbeat is deleted and nothing unfinished is acknowledged.
    ``serving`` is an :class:`asyncio.Event` set while connected to Redis and answering (a bot
    hosting a daemon in-process can say it joined the fleet).

    Every Redis call is bounded by ``call_timeout``; blocking reads wait at most half the
    client's socket timeout (redis-py does not lengthen it for XREADGROUP BLOCK).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        identity: str,
        secret: str,
        pull_targets: Mapping[str, str | os.PathLike[str]],
        restart_units: Iterable[str],
        own_units: Iterable[str] = (),
        prefix: str = DEFAULT_PREFIX,
        heartbeat_ttl: float = HEARTBEAT_TTL,
        deferred_restart_delay: float = 1.0,
        call_timeout: float = 5.0,
    ) -> None:
        if not secret:
            raise ValueError("a shared secret is required (OPS_CONTROL_SECRET)")
        if not _IDENTITY_RE.fullmatch(identity):
            raise ValueError(f"invalid daemon identity {identity!r}")
        for name in pull_targets:
            if not _TARGET_RE.fullmatch(name):
                raise ValueError(f"invalid pull target name {name!r}")
        self._redis = redis
        self.identity = identity
        self._secret = secret
        self._prefix = prefix
        self.pull_targets: dict[str, str] = {
            name: os.path.abspath(path) for name, path in pull_targets.items()
        }
        # Normalised once, so "bot" in the allowlist matches a request for "bot.service".
        self.restart_units: frozenset[str] = frozenset(map(validate_unit_name, restart_units))
        self.own_units: frozenset[str] = frozenset(map(validate_unit_name, own_units))
        self._heartbeat_ttl = heartbeat_ttl
        self._deferred_restart_delay = deferred_restart_delay
        self._call_timeout = call_timeout
        self._block_seconds = _read_block_seconds(redis)
        self._stream = command_stream_key(prefix)
        # One group per identity, so every daemon sees every command; one consumer in it.
        self._group = identity
        # A per-run token in the "started" marker: if our own SET NX reached Redis but its reply
        # was lost, reading the marker back tells us it is ours and not a previous run's.
        self._session = uuid.uuid4().hex
        self._started_at = time.time()
        self._finish_script = redis.register_script(_FINISH_LUA)
        # The per-command path (XREADGROUP and the finish script) runs on one connection this
        # daemon keeps from the client's pool while it serves, bypassing redis-py's per-command
        # pool checkout, retry wrapper and response callbacks: at fleet scale that overhead is
        # most of a daemon's CPU per command. Every error or cancellation in a send or read makes
        # redis-py drop that connection (it reconnects on the next use), so no stale reply is
        # ever read. A single-connection client, or a pool too small to spare a connection
        # (the heartbeat needs one too), keeps the ordinary client calls.
        pool = redis.connection_pool
        self._own_connection = (
            not getattr(redis, "single_connection_client", False)
            and getattr(pool, "max_connections", 0) >= 3
        )
        self._conn: Any = None
        self._read_new_packed: list[bytes] | None = None
        self._unwritten: list[_Finish] = []
        self._redis_up: bool | None = None
        self._waiting_for_work = False
        self.serving = asyncio.Event()
        self._ops: dict[str, Callable[[tuple[str, ...]], Awaitable[_Outcome]]] = {
            "ping": self._op_ping,
            "status": self._op_status,
            "pull": self._op_pull,
            "restart": self._op_restart,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve commands until cancelled; Redis outages are retried, never fatal."""
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat {self.identity}")
        serve = asyncio.create_task(self._serve_forever(), name=f"serve {self.identity}")
        try:
            # wait() rather than awaiting the task: a cancellation of run() must reach this
            # frame even if the serving task swallows its own (see _stop).
            await asyncio.wait({serve})
            serve.result()
        finally:
            self.serving.clear()
            await _stop(serve, again=lambda: self._waiting_for_work)
            await _stop(heartbeat, again=lambda: True)
            await self._remove_heartbeat()
            await self._release_connection()
            log.info("control daemon %s stopped", self.identity)

    async def _serve_forever(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect()
                self._note_redis(up=True)
                attempt = 0
                # Set before the pending entries: a pending pull may take a minute, and the
                # heartbeat (which only refreshes while serving) must not lapse meanwhile.
                self.serving.set()
                await self._handle_own_pending()
                await self._consume_new()
            except (RedisError, OSError) as exc:
                # OSError covers asyncio's TimeoutError from _bounded as well as socket errors.
                _reraise_swallowed_cancel()
                self._note_redis(up=False, reason=exc)
            except Exception:
                # A bug must not turn into a crash loop under systemd; log it and come back.
                _reraise_swallowed_cancel()
                log.exception("control daemon %s: unexpected error; retrying", self.identity)
            self.serving.clear()
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1

    def _note_redis(self, *, up: bool, reason: BaseException | None = None) -> None:
        """Log a Redis state change once, not once per retry."""
        if self._redis_up == up:
            return
        if up:
            log.info(
                "control daemon %s serving %s (group %s)", self.identity, self._stream, self._group
            )
        else:
            log.warning(
                "control daemon %s: Redis unavailable (%s); retrying with backoff up to %.0fs",
                self.identity,
                redact(str(reason) or type(reason).__name__),
                BACKOFF_CAP,
            )
        self._redis_up = up

    async def _connect(self) -> None:
        """Set up (again) after a start or an outage, in the order the guarantees need.

        The group must exist before the heartbeat says this host will answer; results kept
        through an outage are written before anything else is answered.
        """
        if self._own_connection:
            # Take the own connection first, so the calls below (and the heartbeat) set up the
            # pool's second one now rather than in the middle of serving a command later.
            await self._call(self._own_conn())
        await self._ensure_group()
        await self._flush_unwritten()
        await self._write_heartbeat()

    async def _ensure_group(self) -> None:
        try:
            # "$" with MKSTREAM: a new identity never replays history, and needs no stream yet.
            await self._call(
                self._redis.xgroup_create(self._stream, self._group, id="$", mkstream=True)
            )
        except RedisError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _handle_own_pending(self) -> None:
        """Answer what this identity was handed but never acknowledged (e.g. before a crash)."""
        last_id = "0"
        while True:
            response = await self._call(
                self._redis.xreadgroup(
                    self._group, self.identity, {self._stream: last_id}, count=100
                )
            )
            entries = _stream_entries(response)
            if not entries:
                return
            for entry_id, fields in entries:
                await self._handle_entry_or_drop(entry_id, fields)
                last_id = entry_id

    async def _consume_new(self) -> None:
        block_ms = int(self._block_seconds * 1000)
        read_timeout = self._block_seconds + self._call_timeout
        while True:
            self._waiting_for_work = True
            try:
                if self._own_connection:
                    raw = await self._call(self._own_read_new(block_ms), timeout=read_timeout)
                    entries = _raw_stream_entries(raw)
                else:
                    response = await self._call(
                        self._redis.xreadgroup(
                            self._group,
                            self.identity,
                            {self._stream: ">"},
                            count=16,
                            block=block_ms,
                        ),
                        timeout=read_timeout,
                    )
                    entries = _stream_entries(response)
            finally:
                self._waiting_for_work = False
            for entry_id, fields in entries:
                await self._handle_entry_or_drop(entry_id, fields)

    async def _call(self, awaitable: Awaitable[T], timeout: float | None = None) -> T:
        return await _bounded(awaitable, timeout or self._call_timeout)

    async def _own_command(self, *args: Any) -> Any:
        """Send one command on the daemon's own connection; its raw reply (no callback).

        A server error reply is raised as the ResponseError redis-py maps it to. Any other
        failure, or a cancellation (``_call``'s bound), leaves redis-py's connection closed.
        """
        conn = await self._own_conn()
        await conn.send_command(*args)
        return await conn.read_response()

    async def _own_read_new(self, block_ms: int) -> Any:
        """XREADGROUP ``>`` on the own connection: the same bytes every time, packed once."""
        conn = await self._own_conn()
        if self._read_new_packed is None:
            self._read_new_packed = conn.pack_command(
                "XREADGROUP", "GROUP", self._group, self.identity,
                "COUNT", 16, "BLOCK", block_ms, "STREAMS", self._stream, ">",
            )  # fmt: skip
        await conn.send_packed_command(self._read_new_packed)
        return await conn.read_response()

    async def _own_conn(self) -> Any:
        conn = self._conn
        if conn is None:
            pool = self._redis.connection_pool
            conn = self._conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        return conn

    async def _release_connection(self) -> None:
        """Give the daemon's own connection back to the pool (run() is ending).

        Only once the serving task has finished: nothing can be using it any more. One that
        was dropped mid-command is closed already; the pool reconnects it when it is reused.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # A pool that was reset meanwhile (the client closed, a fork) no longer knows it.
        with contextlib.suppress(KeyError, ValueError):
            await self._redis.connection_pool.release(conn)

    # -- heartbeat ------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = max(0.05, self._heartbeat_ttl / 3)
        while True:
            # A period, not synchronisation: refresh well inside the TTL.
            await asyncio.sleep(interval)
            if not self.serving.is_set():
                continue
            try:
                await self._write_heartbeat()
            except (RedisError, OSError) as exc:
                # The serve loop notices and logs the outage; this only keeps trying.
                log.debug("heartbeat of %s failed: %s", self.identity, exc)

    async def _write_heartbeat(self) -> None:
        description = json.dumps(
            {
                "identity": self.identity,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "version": _project_version(),
                "started_at": self._started_at,
                "pull_targets": sorted(self.pull_targets),
                "restart_units": sorted(self.restart_units),
            },
            separators=(",", ":"),
        )
        pipe = self._redis.pipeline(transaction=False)
        # The group first: after a Redis restart the heartbeat may come back before the serve
        # loop notices, and a publisher that sees the heartbeat relies on the group existing.
        pipe.xgroup_create(self._stream, self._group, id="$", mkstream=True)
        pipe.set(
            heartbeat_key(self.identity, self._prefix),
            description,
            px=int(self._heartbeat_ttl * 1000),
        )
        pipe.sadd(hosts_index_key(self._prefix), self.identity)
        replies = await self._call(pipe.execute(raise_on_error=False))
        for reply in replies:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply

    async def _remove_heartbeat(self) -> None:
        """A clean stop: publishers stop expecting this host at once."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(heartbeat_key(self.identity, self._prefix))
            pipe.srem(hosts_index_key(self._prefix), self.identity)
            # Not _bounded: this runs while the task is being cancelled, on purpose.
            async with asyncio.timeout(2.0):
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not delete the heartbeat of %s: %s", self.identity, exc)

    # -- one command ----------------------------------------------------------------------------

    async def _handle_entry_or_drop(self, entry_id: str, fields: dict[str, str]) -> None:
        """Handle one entry; one that Redis itself refuses to process is dropped, not retried.

        A ResponseError is the server's deterministic "no" (a wrong type at a key, an argument
        out of range): retrying it would stall every later command behind it forever.
        """
        try:
            await self._handle_entry(entry_id, fields)
        except ResponseError as exc:
            log.error("dropping stream entry %s: Redis refused to process it (%s)", entry_id, exc)
            self._unwritten = [f for f in self._unwritten if f.entry_id != entry_id]
            await self._call(self._redis.xack(self._stream, self._group, entry_id))

    async def _handle_entry(self, entry_id: str, fields: dict[str, str]) -> None:
        started = time.monotonic()
        command_id = fields.get("id", "")
        if not _COMMAND_ID_RE.fullmatch(command_id):
            # Nowhere to answer: a trimmed entry, or junk someone wrote to the stream.
            log.warning("dropping stream entry %s: no valid command id", entry_id)
            await self._call(self._redis.xack(self._stream, self._group, entry_id))
            return
        try:
            command = verify_signature(fields, self._secret)
        except CommandRejected as exc:
            self._log_rejection(command_id, fields, str(exc))
            result = self._result(False, False, str(exc), started)
            await self._finish(_Finish(entry_id, command_id, result, "none", 0))
            return
        ttl_ms = _marker_ttl_ms(command)
        outcome = self._precheck(command)
        if outcome is None and command.op in _READ_ONLY_OPS:
            # No side effects: compute the answer first, then claim the id and answer in one
            # script. A redelivered read-only op may be computed again but answers once.
            outcome = await self._execute(command)
        if outcome is not None:
            result = self._result(outcome.ok, outcome.ran, outcome.summary, started)
            await self._finish(_Finish(entry_id, command_id, result, "claim", ttl_ms))
            return
        # Side effects: the marker is taken before anything runs, so an interruption (a crash,
        # SIGKILL, a Redis outage) can never lead to a second run of this id on this host.
        claim = await self._claim(command, ttl_ms)
        if claim != "new":
            await self._answer_again(entry_id, command_id, claim, started)
            return
        outcome = await self._execute(command)
        result = self._result(outcome.ok, outcome.ran, outcome.summary, started)
        await self._finish(_Finish(entry_id, command_id, result, "done", ttl_ms, outcome.after))

    def _precheck(self, command: SignedCommand) -> _Outcome | None:
        """The answer for a command that must not run at all, else None."""
        if time.time() > command.expires_at:
            self._log_rejection(command.id, _command_fields(command), "rejected: expired")
            return _Outcome(False, False, "rejected: expired")
        if command.op not in self._ops:
            log.warning("command %s: unknown op %r", command.id, command.op[:40])
            return _Outcome(False, False, f"refused: unknown op {command.op[:40]!r}")
        return None

    def _log_rejection(self, command_id: str, fields: Mapping[str, str], summary: str) -> None:
        log.warning(
            "%s: command %s op=%r args=%r requested_by=%r",
            summary,
            command_id,
            fields.get("op", "")[:64],
            fields.get("args", "")[:200],
            fields.get("requested_by", "")[:200],
        )

    async def _claim(self, command: SignedCommand, ttl_ms: int) -> str:
        """Mark the command started on this host: "new", "started" (by an earlier run) or "done"."""
        key = ran_marker_key(self.identity, command.id, self._prefix)
        token = f"started:{self._session}"
        if await self._call(self._redis.set(key, token, nx=True, px=ttl_ms)):
            return "new"
        current = await self._call(self._redis.get(key))
        state = _text(current) if current is not None else ""
        if state == token:
            return "new"  # our own SET reached Redis but its reply was lost before a reconnect
        return "done" if state == "done" else "started"

    async def _answer_again(
        self, entry_id: str, command_id: str, state: str, started: float
    ) -> None:
        """Answer a command id this host already started or answered, without running it."""
        summary = INTERRUPTED if state.startswith("started") else "already handled; not run again"
        log.warning("command %s delivered again: %s", command_id, summary)
        result = self._result(False, state.startswith("started"), summary, started)
        await self._finish(_Finish(entry_id, command_id, result, "done", 0))

    async def _execute(self, command: SignedCommand) -> _Outcome:
        handler = self._ops[command.op]
        log.info(
            "running command %s: %s %s (requested by %s)",
            command.id,
            command.op,
            " ".join(command.args),
            command.requested_by,
        )
        try:
            return await handler(command.args)
        except _Refused as exc:
            log.warning("command %s %s refused: %s", command.id, command.op, exc)
            return _Outcome(False, False, str(exc))
        except Exception as exc:
            log.exception("command %s %s failed", command.id, command.op)
            return _Outcome(False, True, f"failed: internal error ({type(exc).__name__}: {exc})")

    def _result(self, ok: bool, ran: bool, summary: str, started: float) -> HostResult:
        text = redact(summary, (self._secret,))
        if len(text) > SUMMARY_LIMIT:
            text = text[:SUMMARY_LIMIT] + " […]"
        return HostResult(self.identity, ok, ran, text, time.monotonic() - started)

    async def _finish(self, finish: _Finish) -> None:
        """Write the result and acknowledge, then run what must come after the answer."""
        try:
            written, marker = await self._write_and_ack(finish)
        except ResponseError:
            raise  # deterministic: keeping it would fail the same way on every reconnect
        except BaseException:
            # Kept for the next connection, so a completed op's answer survives a Redis outage
            # (a daemon that dies meanwhile answers "interrupted" after it restarts instead).
            self._unwritten.append(finish)
            raise
        if not written:
            # The claim lost: this id was started or answered here before (a replayed entry,
            # or our own earlier attempt whose reply was lost).
            await self._answer_again(finish.entry_id, finish.command_id, marker, time.monotonic())
        elif finish.after is not None:
            await finish.after()

    async def _write_and_ack(self, finish: _Finish) -> tuple[bool, str]:
        keys = [
            results_key(finish.command_id, self._prefix),
            ran_marker_key(self.identity, finish.command_id, self._prefix),
            self._stream,
        ]
        # The group is named after the identity, which is also the result's host.
        fields = _result_fields(finish.result)
        args = [self._group, finish.entry_id, finish.marker, str(finish.marker_ttl_ms)]
        args += [fields[name] for name in ("ok", "ran", "summary", "duration")]
        if self._own_connection:
            reply = await self._call(self._own_finish(keys, args))
        else:
            reply = await self._call(self._finish_script(keys=keys, args=args))
        if int(reply[0]) == 1:
            return True, ""
        return False, _text(reply[1])

    async def _own_finish(self, keys: list[str], args: list[str]) -> Any:
        """EVALSHA the finish script on the own connection, loading it first if Redis lost it."""
        sha = self._finish_script.sha
        try:
            return await self._own_command("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            # Nothing ran (a restarted or flushed Redis): load the script and run it once more.
            await self._own_command("SCRIPT", "LOAD", _FINISH_LUA)
            return await self._own_command("EVALSHA", sha, len(keys), *keys, *args)

    async def _flush_unwritten(self) -> None:
        while self._unwritten:
            finish = self._unwritten.pop(0)
            await self._finish(finish)

    # -- ops ------------------------------------------------------------------------------------

    async def _op_ping(self, args: tuple[str, ...]) -> _Outcome:
        if args:
            raise _Refused("refused: bad arguments (ping takes none)")
        return _Outcome(True, True, "pong")

    async def _op_status(self, args: tuple[str, ...]) -> _Outcome:
        if args:
            raise _Refused("refused: bad arguments (status takes none)")
        heads = await asyncio.gather(*(git_head(path) for path in self.pull_targets.values()))
        units = sorted(self.restart_units)
        states = await asyncio.gather(*(systemctl_is_active(unit) for unit in units))
        host_up = _host_uptime()
        uptime = _format_span(time.time() - self._started_at)
        first = f"admin-ops {_project_version()}, daemon up {uptime}"
        if host_up is not None:
            first += f", host up {_format_span(host_up)}"
        lines = [first]
        if self.pull_targets:
            commits = (
                f"{name} {head or '(no commit)'}"
                for name, head in zip(self.pull_targets, heads, strict=True)
            )
            lines.append("targets: " + ", ".join(commits))
        if units:
            # is-active says one word; when systemctl fails the reason can be long: keep a line.
            shown = (
                f"{unit} {(state.splitlines() or ['unknown'])[0][:80]}"
                for unit, state in zip(units, states, strict=True)
            )
            lines.append("units: " + ", ".join(shown))
        return _Outcome(True, True, "\n".join(lines))

    async def _op_pull(self, args: tuple[str, ...]) -> _Outcome:
        if len(args) > 1:
            raise _Refused("refused: bad arguments (pull takes one target)")
        target = args[0] if args else DEFAULT_PULL_TARGET
        path = self.pull_targets.get(target)
        if path is None:
            raise _Refused(NOT_ALLOWED)
        # The identity names the holder in the dedupe lock, so a co-located daemon's skip
        # message says who is pulling.
        pulled = await run_git_pull(path, redis=self._redis, dedupe=True, instance_id=self.identity)
        return _Outcome(pulled.ok, pulled.ran, pulled.summary)

    async def _op_restart(self, args: tuple[str, ...]) -> _Outcome:
        if len(args) != 1:
            raise _Refused("refused: bad arguments (restart takes one unit)")
        try:
            unit = validate_unit_name(args[0])
        except ValueError:
            raise _Refused(NOT_ALLOWED) from None
        if unit not in self.restart_units:
            raise _Refused(NOT_ALLOWED)
        if unit in self.own_units:
            # Restarting our own unit synchronously would deadlock (systemd waits for us to stop
            # while we wait for systemctl), and once it happens nobody is left to answer:
            # answer first, then ask systemd for a non-blocking restart.
            return _Outcome(
                True,
                True,
                f"restarting {unit} (this host's own unit: deferred until after this answer)",
                after=lambda: self._deferred_restart(unit),
            )
        ok, summary = await systemctl_restart(unit)
        return _Outcome(ok, True, summary)

    async def _deferred_restart(self, unit: str) -> None:
        ok, summary = await deferred_systemctl_restart(unit, delay=self._deferred_restart_delay)
        if ok:
            log.info("deferred restart of %s requested: %s", unit, summary)
        else:
            log.error("deferred restart of %s failed: %s", unit, summary)


def _marker_ttl_ms(command: SignedCommand) -> int:
    """How long the at-most-once marker lives: the command's remaining validity plus a day."""
    remaining = min(max(0.0, command.expires_at - time.time()), MAX_COMMAND_TTL)
    return int((remaining + MARKER_GRACE_SECONDS) * 1000)


def _command_fields(command: SignedCommand) -> dict[str, str]:
    """The loggable fields of a verified command."""
    return {
        "op": command.op,
        "args": json.dumps(list(command.args)),
        "requested_by": command.requested_by,
    }


# ---------------------------------------------------------------------------------------------
# Command line: `python -m core.control_ops daemon | publish OP [ARGS...]`
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad environment setting; the message is one line naming the variable."""


@dataclass(frozen=True)
class DaemonSettings:
    """What the daemon CLI reads from the environment."""

    redis_url: str
    secret: str
    identity: str
    pull_targets: dict[str, str]
    restart_units: tuple[str, ...]
    own_units: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX


def _split_list(value: str) -> list[str]:
    return [item for item in re.split(r"[,\s]+", value) if item]


def _parse_pull_targets(value: str) -> dict[str, str]:
    targets: dict[str, str] = {}
    for item in _split_list(value):
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"OPS_PULL_TARGETS: {item!r} is not name=/path")
        if not _TARGET_RE.fullmatch(name):
            raise ConfigError(f"OPS_PULL_TARGETS: invalid target name {name!r}")
        if name in targets:
            raise ConfigError(f"OPS_PULL_TARGETS: target {name!r} is listed twice")
        targets[name] = os.path.abspath(path)
    return targets


def _parse_units(variable: str, value: str) -> tuple[str, ...]:
    try:
        return tuple(validate_unit_name(unit) for unit in _split_list(value))
    except ValueError as exc:
        raise ConfigError(f"{variable}: {exc}") from None


def _secret_from_env(env: Mapping[str, str]) -> str:
    secret = env.get("OPS_CONTROL_SECRET", "")
    if not secret.strip():
        raise ConfigError("OPS_CONTROL_SECRET is not set: the fleet's shared HMAC secret")
    return secret


def daemon_settings_from_env(env: Mapping[str, str]) -> DaemonSettings:
    """Read and validate the daemon's settings; raise ConfigError naming the bad variable."""
    secret = _secret_from_env(env)
    identity = env.get("OPS_IDENTITY", "").strip() or default_identity()
    if not _IDENTITY_RE.fullmatch(identity):
        raise ConfigError(f"OPS_IDENTITY: invalid identity {identity!r}")
    return DaemonSettings(
        redis_url=env.get("REDIS_URL", "").strip() or "redis://127.0.0.1:6379/0",
        secret=secret,
        identity=identity,
        pull_targets=_parse_pull_targets(env.get("OPS_PULL_TARGETS", "")),
        restart_units=_parse_units("OPS_RESTART_UNITS", env.get("OPS_RESTART_UNITS", "")),
        own_units=_parse_units("OPS_OWN_UNITS", env.get("OPS_OWN_UNITS", "")),
        prefix=env.get("OPS_CONTROL_PREFIX", "").strip() or DEFAULT_PREFIX,
    )


def _redis_client(url: str) -> aioredis.Redis:
    # Bounded sockets: a half-open connection must fail, not hang the daemon for ever.
    return aioredis.Redis.from_url(
        url, socket_timeout=15.0, socket_connect_timeout=5.0, health_check_interval=30
    )


async def _run_until_signalled(main_coro: Awaitable[T]) -> T:
    """Run ``main_coro`` as a task that SIGTERM/SIGINT cancel (a clean stop, not a kill)."""
    task: asyncio.Future[T] = asyncio.ensure_future(main_coro)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _daemon_main(settings: DaemonSettings) -> None:
    client = _redis_client(settings.redis_url)
    try:
        daemon = ControlDaemon(
            client,
            identity=settings.identity,
            secret=settings.secret,
            pull_targets=settings.pull_targets,
            restart_units=settings.restart_units,
            own_units=settings.own_units,
            prefix=settings.prefix,
        )
        log.info(
            "control daemon %s starting (redis %s, targets %s, units %s, own %s)",
            settings.identity,
            redact(settings.redis_url),
            ",".join(sorted(settings.pull_targets)) or "-",
            ",".join(settings.restart_units) or "-",
            ",".join(settings.own_units) or "-",
        )
        await daemon.run()
    finally:
        await client.aclose()


def _cmd_daemon(env: Mapping[str, str]) -> int:
    try:
        settings = daemon_settings_from_env(env)
    except ConfigError as exc:
        print(f"control daemon not started: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(_run_until_signalled(_daemon_main(settings)))
    return 0


def _printable(text: str) -> str:
    return _UNPRINTABLE_RE.sub("", text)


def _status_word(result: HostResult) -> str:
    if not result.ok:
        return "FAILED"
    return "ok" if result.ran else "skipped"


class _LiveTable:
    """Rows printed as hosts answer, so a slow host does not hold back the others."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self._width = 24

    def header(self, published: Published) -> None:
        self._width = max([self._width, *(len(host) for host in published.expected)])
        hosts = ", ".join(sorted(published.expected)) or "none"
        self._print(f"command {published.command_id}: {published.op} {' '.join(published.args)}")
        self._print(f"expecting {len(published.expected)} host(s): {hosts}")
        self._print(f"{'HOST':<{self._width}}  {'STATUS':<8}  {'DURATION':>8}  SUMMARY")

    def row(self, result: HostResult) -> None:
        lines = _printable(result.summary).splitlines() or [""]
        duration = f"{result.duration:.2f}s"
        self._print(
            f"{_printable(result.host):<{self._width}}  {_status_word(result):<8}  "
            f"{duration:>8}  {lines[0]}"
        )
        for line in lines[1:]:
            self._print(f"{'':<{self._width}}  {'':<8}  {'':>8}  {line}")

    def footer(self, fleet: FleetResult) -> None:
        for host in sorted(fleet.silent):
            self._print(f"{host:<{self._width}}  {'SILENT':<8}  {'-':>8}  no answer")
        answered_ok = sum(1 for result in fleet.results.values() if result.ok)
        failed = sorted(host for host, result in fleet.results.items() if not result.ok)
        if not fleet.expected:
            self._print("no hosts alive: no daemon heartbeat found")
        line = f"{answered_ok}/{len(fleet.expected)} hosts ok in {fleet.elapsed:.1f}s"
        if failed:
            line += f"; failed: {', '.join(failed)}"
        if fleet.silent:
            line += f"; silent: {', '.join(sorted(fleet.silent))}"
        self._print(line)

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)


def _default_requester() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


async def _publish_main(
    args: argparse.Namespace, env: Mapping[str, str], table: _LiveTable
) -> FleetResult:
    client = _redis_client(env.get("REDIS_URL", "").strip() or "redis://127.0.0.1:6379/0")
    try:
        return await publish(
            client,
            args.op,
            args.args,
            requested_by=args.requested_by or _default_requester(),
            secret=_secret_from_env(env),
            timeout=args.timeout,
            ttl=args.ttl,
            on_result=table.row,
            on_published=table.header,
            prefix=env.get("OPS_CONTROL_PREFIX", "").strip() or DEFAULT_PREFIX,
        )
    finally:
        await client.aclose()


def _cmd_publish(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    table = _LiveTable(sys.stdout)
    try:
        fleet = asyncio.run(_publish_main(args, env, table))
    except ConfigError as exc:
        print(f"not published: {exc}", file=sys.stderr)
        return 2
    except (RedisError, OSError) as exc:
        print(f"not published: Redis unavailable ({redact(str(exc))})", file=sys.stderr)
        return 1
    table.footer(fleet)
    return 0 if fleet.ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.control_ops",
        description="Fleet control over Redis: run the per-host daemon, or publish a command.",
        epilog="Environment: REDIS_URL, OPS_CONTROL_SECRET, OPS_CONTROL_PREFIX; the daemon also "
        "reads OPS_IDENTITY, OPS_PULL_TARGETS (name=/path,...), OPS_RESTART_UNITS, "
        "OPS_OWN_UNITS.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("daemon", help="serve fleet commands on this host until SIGTERM")
    pub = sub.add_parser("publish", help="publish a command and show each host's answer")
    pub.add_argument("op", choices=OPS)
    pub.add_argument("args", nargs="*", help="e.g. the pull target or the unit to restart")
    pub.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for answers")
    pub.add_argument("--ttl", type=float, default=120.0, help="seconds the command stays valid")
    pub.add_argument("--requested-by", default="", help="who asks (default: cli:user@host)")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point of ``python -m core.control_ops``; returns the exit status."""
    args = _parser().parse_args(argv)
    environ = os.environ if env is None else env
    level = logging.getLevelName(environ.get("OPS_LOG_LEVEL", "INFO").strip().upper())
    logging.basicConfig(
        level=level if isinstance(level, int) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "daemon":
        return _cmd_daemon(environ)
    return _cmd_publish(args, environ)


if __name__ == "__main__":
    sys.exit(main())
