"""The fleet's wire format: keys, signed commands and result entries.

The contract other tools publish against is ``docs/fleet-protocol.md``; this module is its
implementation, and every rule the document states lives here once: the signed fields and
their canonical bytes, the limits a daemon enforces, the encoding of a result, and how a
stream reply is read.
"""

from __future__ import annotations

import hmac
import inspect
import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_string
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from core.names import DEFAULT_KEY_PREFIX, Keys
from core.ops_exec import as_text

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "ALREADY_HANDLED",
    "COMMAND_STREAM_MAXLEN",
    "DEFAULT_COMMAND_TTL",
    "DEFAULT_PREFIX",
    "HEARTBEAT_TTL",
    "INTERRUPTED",
    "MARKER_GRACE_SECONDS",
    "MAX_BLOCK_SECONDS",
    "MAX_COMMAND_TTL",
    "NOT_ALLOWED",
    "OPS",
    "READ_ONLY_OPS",
    "RESULT_FIELDS",
    "RESULT_TTL_SECONDS",
    "SIGNED_FIELDS",
    "SUMMARY_LIMIT",
    "CommandRejected",
    "FleetResult",
    "HostResult",
    "Published",
    "SignedCommand",
    "build_command",
    "canonical_payload",
    "command_stream_key",
    "heartbeat_key",
    "hosts_index_key",
    "parse_result_fields",
    "ran_marker_key",
    "read_block_seconds",
    "result_fields",
    "results_key",
    "sign_fields",
    "stream_entries",
    "verify_command",
    "verify_signature",
]

#: The key prefix when ``OPS_CONTROL_PREFIX`` is not set.
DEFAULT_PREFIX: Final = DEFAULT_KEY_PREFIX
#: The fields the signature covers, in the order a command lists them.
SIGNED_FIELDS: Final = ("id", "op", "args", "requested_by", "issued_at", "expires_at")
# Plain ASCII identifiers: JSON-encoded as themselves in quotes.
_SORTED_SIGNED_FIELDS: Final = tuple(sorted(SIGNED_FIELDS))
#: The ops a daemon knows.
OPS: Final = ("ping", "status", "pull", "restart")
#: Ops without side effects: answered in one step that also claims the command id.
READ_ONLY_OPS: Final = frozenset({"ping", "status"})
#: The fields of a result entry, in the order a daemon writes them.
RESULT_FIELDS: Final = ("host", "ok", "ran", "summary", "duration")

#: The summary of a command this host does not run (its allow-list does not name the target).
NOT_ALLOWED: Final = "refused: not allowed on this host"
#: The summary of a command that was started here before and never finished.
INTERRUPTED: Final = "interrupted; not run again"
#: The summary of a command id this host already answered.
ALREADY_HANDLED: Final = "already handled; not run again"

#: Seconds a heartbeat key lives; a daemon refreshes it every third of that.
HEARTBEAT_TTL: Final = 15.0
#: Seconds a result stream lives after its last write.
RESULT_TTL_SECONDS: Final = 3600
#: The approximate cap on the command stream (``XADD MAXLEN ~``). Commands are rare; the cap only
#: keeps a forgotten stream from growing for ever. A daemon that was away for more than this many
#: commands sees the trimmed ones as empty entries and drops them.
COMMAND_STREAM_MAXLEN: Final = 10_000
#: How long a ran marker outlives its command's validity. The marker must outlive the validity,
#: else a replay after the marker lapsed but before expiry could run twice; a day on top also
#: covers clock skew between hosts.
MARKER_GRACE_SECONDS: Final = 86_400
#: The longest validity a command may carry. A longer one is malformed: it would outlive every
#: marker that keeps it from running twice, and Redis refuses absurd expiry times outright.
MAX_COMMAND_TTL: Final = 86_400.0
#: How long a command published without an explicit ``ttl`` stays valid.
DEFAULT_COMMAND_TTL: Final = 120.0
#: The longest blocking stream read. XREADGROUP BLOCK must stay below the client's socket
#: timeout, or redis-py reports a timeout on a healthy idle connection (redis-py does not
#: stretch the read timeout for stream reads).
MAX_BLOCK_SECONDS: Final = 5.0
#: The longest summary a daemon writes, in characters (a longer one is cut, marked `` […]``).
SUMMARY_LIMIT: Final = 4000


# ---------------------------------------------------------------------------------------------
# Keys: the layout itself lives in core.names.Keys
# ---------------------------------------------------------------------------------------------


def command_stream_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The stream every command is published to."""
    return Keys(prefix).commands


def results_key(command_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The per-command stream hosts answer on."""
    return Keys(prefix).results(command_id)


def heartbeat_key(identity: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The key whose existence says a daemon is alive."""
    return Keys(prefix).heartbeat(identity)


def hosts_index_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The set of identities that have heartbeated (pruned lazily by publishers)."""
    return Keys(prefix).hosts_index


def ran_marker_key(identity: str, command_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The marker that makes a command id run at most once on one daemon."""
    return Keys(prefix).ran_marker(identity, command_id)


# ---------------------------------------------------------------------------------------------
# Signed commands
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
        # A list, not a generator: join() builds one from a generator first anyway.
        body = ",".join(
            [f'"{name}":{_json_string(signed[name])}' for name in _SORTED_SIGNED_FIELDS]
        )
        return ("{" + body + "}").encode()
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_fields(fields: Mapping[str, str], secret: str) -> str:
    """Lower-case hex HMAC-SHA256 of :func:`canonical_payload`, keyed with the shared secret."""
    # hmac.digest: the one-shot (C) form of hmac.new(...).digest(), same bytes, less overhead.
    return hmac.digest(secret.encode(), canonical_payload(fields), "sha256").hex()


def build_command(
    op: str,
    args: Sequence[str],
    *,
    requested_by: str,
    secret: str,
    ttl: float = DEFAULT_COMMAND_TTL,
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
    # Compare bytes: compare_digest refuses non-ASCII str, and the given value is untrusted.
    if not hmac.compare_digest(expected.encode(), fields["sig"].encode("utf-8", "replace")):
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
    """What ``publish`` tells ``on_published`` right after the command went out."""

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


def result_fields(result: HostResult) -> dict[str, str]:
    """A result as the string fields of its stream entry."""
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
# Reading streams
# ---------------------------------------------------------------------------------------------


def _entries_per_stream(response: Any) -> Iterable[Any]:
    """Each stream's entry list: RESP2 replies are ``[[stream, entries], ...]``, RESP3 a dict."""
    if not response:
        return ()
    if isinstance(response, dict):
        return response.values()
    return (entries for _stream, entries in response)


def stream_entries(response: Any) -> list[tuple[str, dict[str, str]]]:
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
            fields = {as_text(k): as_text(v) for k, v in (raw or {}).items()}
            flat.append((as_text(entry_id), fields))
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


def read_block_seconds(client: aioredis.Redis) -> float:
    """How long a blocking stream read may wait: half the socket timeout, at most 5 s."""
    timeout = _socket_timeout(client)
    if not timeout:
        return MAX_BLOCK_SECONDS
    return max(0.01, min(MAX_BLOCK_SECONDS, timeout / 2))
