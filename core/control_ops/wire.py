"""The fleet's wire format: keys, signed commands and result entries.

The contract other tools publish against is ``docs/fleet-protocol.md``; this module is its
implementation, and every rule the document states lives here once: the signed fields and
their canonical bytes, the limits a daemon enforces, the encoding of a result, and how a
stream reply is read.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

# Signing primitives and reading stream replies have modules of their own; their names stay
# importable from here.
from core.control_ops.signing import canonical_json, hmac_hex, json_string, same_signature
from core.control_ops.streams import (
    MAX_BLOCK_SECONDS,
    read_block_seconds,
    stream_entries,
    stream_pairs,
)
from core.names import DEFAULT_KEY_PREFIX, IDENTITY, Keys

__all__ = [
    "ALREADY_HANDLED",
    "COMMAND_ENTRY_LIMIT",
    "COMMAND_STREAM_MAXLEN",
    "DEFAULT_COMMAND_TTL",
    "DEFAULT_PREFIX",
    "HEARTBEAT_FIELDS",
    "HEARTBEAT_TTL",
    "HEARTBEAT_VALUE_LIMIT",
    "INTERRUPTED",
    "MARKER_GRACE_SECONDS",
    "MAX_BLOCK_SECONDS",
    "MAX_CLOCK_SKEW",
    "MAX_COMMAND_TTL",
    "MAX_FLEET_HOSTS",
    "NOT_ALLOWED",
    "OPS",
    "READ_ONLY_OPS",
    "RESULT_ENTRY_LIMIT",
    "RESULT_FIELDS",
    "RESULT_SIGNED_FIELDS",
    "RESULT_TTL_SECONDS",
    "SIGNED_FIELDS",
    "SUMMARY_LIMIT",
    "CommandRejected",
    "FleetResult",
    "HostResult",
    "Published",
    "SignedCommand",
    "Untrusted",
    "build_command",
    "canonical_json",
    "canonical_payload",
    "check_fresh",
    "check_time",
    "command_stream_key",
    "cut_summary",
    "heartbeat_key",
    "heartbeat_value",
    "hosts_index_key",
    "parse_result_fields",
    "ran_marker_key",
    "read_block_seconds",
    "result_fields",
    "result_payload",
    "results_key",
    "sign_fields",
    "sign_result",
    "stream_entries",
    "stream_pairs",
    "verify_command",
    "verify_heartbeat",
    "verify_result",
    "verify_signature",
]

#: The key prefix when ``OPS_CONTROL_PREFIX`` is not set.
DEFAULT_PREFIX: Final = DEFAULT_KEY_PREFIX
#: The fields of a command entry the signature covers, in the order a command lists them. The
#: signature also covers the key prefix the command is published under (not a field: the stream's
#: key says it), so a command signed for one fleet never runs on another that shares the secret.
SIGNED_FIELDS: Final = ("id", "op", "args", "requested_by", "issued_at", "expires_at")
#: The ops a daemon knows.
OPS: Final = ("ping", "status", "pull", "restart")
#: Ops without side effects: answered in one step that also claims the command id.
READ_ONLY_OPS: Final = frozenset({"ping", "status"})
#: The fields of a result entry, in the order a daemon writes them. ``command_sig`` is the ``sig``
#: of the command entry answered, when that signature verified, else empty: the answer belongs to
#: that exact command, and an answer to a forged entry that reuses a real id belongs to none.
RESULT_FIELDS: Final = ("host", "ok", "ran", "summary", "duration", "command_sig", "sig")
#: What a result's signature covers: the command's id and the key prefix (both from the stream's
#: key) and every field but ``sig``.
RESULT_SIGNED_FIELDS: Final = ("command_id", "prefix", *RESULT_FIELDS[:-1])
#: The fields of a heartbeat's value, all signed (plus ``sig``): who, where, what it may do, when.
HEARTBEAT_FIELDS: Final = (
    *("identity", "hostname", "pid", "version", "started_at", "sent_at"),
    *("pull_targets", "restart_units"),
)

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
#: The longest summary a daemon writes, in characters (a longer one is cut, marked `` […]``).
SUMMARY_LIMIT: Final = 4000
#: How far apart two hosts' clocks may be, in seconds. A command issued further than this in
#: the future is refused (so a host never has to remember a command id for longer than a
#: validity), a host remembers the ids it ran this long past their expiry, and a heartbeat
#: this far from the reader's clock is not fresh. The chat's validity slack is this value.
MAX_CLOCK_SKEW: Final = 30.0
#: The most hosts one publisher considers: the hosts index is read at most this many members
#: at a time, so a flooded index costs a bounded reply.
MAX_FLEET_HOSTS: Final = 1000
#: The largest heartbeat value a publisher parses, in bytes (a daemon's is well under 4 KiB).
HEARTBEAT_VALUE_LIMIT: Final = 4096
#: The largest result entry a publisher accepts, in bytes of field names and values: a summary
#: of SUMMARY_LIMIT characters of up to 4 bytes each in UTF-8, its cut marker and the short fields.
RESULT_ENTRY_LIMIT: Final = 4 * SUMMARY_LIMIT + 1024
#: The largest command entry a daemon looks at, in bytes of field names and values. A real
#: command is a few hundred bytes; a larger entry is answered "malformed" before its signature
#: is computed, so forged megabytes cost a daemon next to nothing.
COMMAND_ENTRY_LIMIT: Final = 64 * 1024
# What a summary cut to SUMMARY_LIMIT ends with.
_CUT_MARK: Final = " […]"


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
    """A command whose signature checked out, with its fields parsed; ``sig`` is that signature."""

    id: str
    op: str
    args: tuple[str, ...]
    requested_by: str
    issued_at: float
    expires_at: float
    sig: str = ""


def canonical_payload(fields: Mapping[str, str], prefix: str = DEFAULT_PREFIX) -> bytes:
    """The exact bytes a command's signature covers: the six signed fields and ``prefix``."""
    try:
        # canonical_json spelt out for the one fixed key set (in code point order): every
        # daemon checks every command. The encoder refuses a value that is not a str.
        return (
            f'{{"args":{json_string(fields["args"])},'
            f'"expires_at":{json_string(fields["expires_at"])},'
            f'"id":{json_string(fields["id"])},'
            f'"issued_at":{json_string(fields["issued_at"])},'
            f'"op":{json_string(fields["op"])},'
            f'"prefix":{json_string(prefix)},'
            f'"requested_by":{json_string(fields["requested_by"])}}}'
        ).encode()
    except TypeError:
        signed = {name: fields[name] for name in SIGNED_FIELDS}
        return canonical_json({**signed, "prefix": prefix})


def sign_fields(fields: Mapping[str, str], secret: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Lower-case hex HMAC-SHA256 of :func:`canonical_payload`, keyed with the shared secret."""
    return hmac_hex(secret, canonical_payload(fields, prefix))


def build_command(
    op: str,
    args: Sequence[str],
    *,
    requested_by: str,
    secret: str,
    ttl: float = DEFAULT_COMMAND_TTL,
    now: float | None = None,
    command_id: str | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> dict[str, str]:
    """A complete signed command entry for the fleet under ``prefix``, valid ``ttl`` seconds."""
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
    fields["sig"] = sign_fields(fields, secret, prefix)
    return fields


def verify_signature(
    fields: Mapping[str, str], secret: str, prefix: str = DEFAULT_PREFIX
) -> SignedCommand:
    """Check the signature (constant time) for the fleet under ``prefix``; raise CommandRejected."""
    if any(name not in fields for name in SIGNED_FIELDS) or "sig" not in fields:
        raise CommandRejected("rejected: bad signature")
    if not same_signature(sign_fields(fields, secret, prefix), fields["sig"]):
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
        sig=fields["sig"],
    )


def check_time(command: SignedCommand, now: float) -> None:
    """Raise CommandRejected unless ``command`` may run at ``now`` (this host's clock).

    Expired: past ``expires_at``. Issued more than MAX_CLOCK_SKEW in the future: refused, so
    that no host ever has to remember a command for longer than its validity plus the skew.
    """
    if now > command.expires_at:
        raise CommandRejected("rejected: expired")
    if command.issued_at > now + MAX_CLOCK_SKEW:
        raise CommandRejected("rejected: issued in the future")


def verify_command(
    fields: Mapping[str, str],
    secret: str,
    *,
    now: float | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> SignedCommand:
    """:func:`verify_signature` plus :func:`check_time`, for tools that consume commands."""
    command = verify_signature(fields, secret, prefix)
    check_time(command, time.time() if now is None else now)
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
    """What ``publish`` tells ``on_published`` right after the command went out.

    ``replicated``: whether at least one replica confirmed it holds the command (``WAIT``); a
    failover promotes the replica with the most data, so then it keeps the command. None when
    the master had no replica connected (nothing to confirm); False when none confirmed in time.
    """

    command_id: str
    op: str
    args: tuple[str, ...]
    expected: frozenset[str]
    replicated: bool | None = None


@dataclass(frozen=True)
class FleetResult:
    """The fleet's answers to one command.

    ``results`` holds the first verified answer of each expected host; ``ignored`` counts the
    heartbeats and result entries the publisher did not believe, by reason (``bad signature``,
    ``not expected``…): forged, stale, oversized or malformed. ``replicated`` is
    :attr:`Published.replicated`.
    """

    command_id: str
    results: dict[str, HostResult]
    silent: frozenset[str]
    expected: frozenset[str] = field(default_factory=frozenset)
    elapsed: float = 0.0
    ignored: Mapping[str, int] = field(default_factory=dict)
    replicated: bool | None = None

    @property
    def ok(self) -> bool:
        """At least one host was expected, every expected host answered ok, and no host failed."""
        if not self.expected or self.silent:
            return False
        if any(host not in self.results or not self.results[host].ok for host in self.expected):
            return False
        return all(result.ok for result in self.results.values())


class Untrusted(Exception):
    """An entry a reader must not believe; ``str(exc)`` is the reason, a short phrase."""


def cut_summary(summary: str) -> str:
    """``summary`` cut to SUMMARY_LIMIT characters, marked `` […]``; cutting twice changes nothing.

    Daemons cut what they write; readers cut what they read before anything else looks at it.
    """
    if len(summary) <= SUMMARY_LIMIT:
        return summary
    return summary[:SUMMARY_LIMIT] + _CUT_MARK


def result_fields(
    result: HostResult,
    *,
    command_id: str | None = None,
    secret: str | None = None,
    command_sig: str = "",
    prefix: str = DEFAULT_PREFIX,
) -> dict[str, str]:
    """A result as the string fields of its stream entry; signed when given the secret.

    ``command_sig`` is the signature of the command entry it answers (empty when that entry's
    signature did not verify); ``prefix`` the fleet's key prefix.
    """
    fields = {
        "host": result.host,
        "ok": "1" if result.ok else "0",
        "ran": "1" if result.ran else "0",
        "summary": result.summary,
        "duration": f"{result.duration:.3f}",
        "command_sig": command_sig,
    }
    if secret is not None and command_id is not None:
        fields["sig"] = sign_result(command_id, fields, secret, prefix)
    return fields


def result_payload(
    command_id: str, fields: Mapping[str, str], prefix: str = DEFAULT_PREFIX
) -> bytes:
    """The bytes a result's signature covers: canonical JSON of RESULT_SIGNED_FIELDS."""
    try:
        # canonical_json spelt out, keys in code point order: every daemon signs and every
        # publisher checks each answer. The encoder refuses a value that is not a str.
        return (
            f'{{"command_id":{json_string(command_id)},'
            f'"command_sig":{json_string(fields["command_sig"])},'
            f'"duration":{json_string(fields["duration"])},'
            f'"host":{json_string(fields["host"])},'
            f'"ok":{json_string(fields["ok"])},'
            f'"prefix":{json_string(prefix)},'
            f'"ran":{json_string(fields["ran"])},'
            f'"summary":{json_string(fields["summary"])}}}'
        ).encode()
    except TypeError:
        signed = {"command_id": command_id, "prefix": prefix}
        signed.update((name, fields[name]) for name in RESULT_SIGNED_FIELDS[2:])
        return canonical_json(signed)


def sign_result(
    command_id: str, fields: Mapping[str, str], secret: str, prefix: str = DEFAULT_PREFIX
) -> str:
    """The signature of one host's answer to ``command_id``: over the id, prefix, every field."""
    return hmac_hex(secret, result_payload(command_id, fields, prefix))


def _result(fields: Mapping[str, str], host: str) -> HostResult:
    try:
        duration = float(fields.get("duration", "0")[:32])
    except ValueError:
        duration = 0.0
    return HostResult(
        host=host,
        ok=fields.get("ok") == "1",
        ran=fields.get("ran") == "1",
        summary=cut_summary(fields.get("summary", "")),
        duration=duration if math.isfinite(duration) else 0.0,
    )


def verify_result(
    fields: Mapping[str, str],
    command_id: str,
    secret: str,
    *,
    command_sig: str | None,
    prefix: str = DEFAULT_PREFIX,
    host_checked: bool = False,
) -> HostResult:
    """A result entry whose signature checks out, as a HostResult; else raise Untrusted.

    ``command_sig`` is the ``sig`` of the command this reader published: an answer to any other
    entry with the same id (a forged one reusing the id) is not an answer to it. None only for a
    reader that published nothing and merely looks. The host name must be an identity (so at
    most 64 characters) before anything else looks at the entry (``host_checked``: the caller
    found it among the identities it expects); the summary is cut to SUMMARY_LIMIT before the
    caller sees it.
    """
    host = fields.get("host", "")
    if not host_checked and not IDENTITY.fullmatch(host):
        raise Untrusted("bad host name")
    if not fields.get("sig"):
        raise Untrusted("unsigned")
    if not same_signature(sign_result(command_id, fields, secret, prefix), fields["sig"]):
        raise Untrusted("bad signature")
    answered = fields.get("command_sig", "")
    if command_sig is not None and answered != command_sig:
        # Signed by a host, but not an answer to this command entry: its answer to a forged
        # entry that reused the id (empty), or to another entry with the same id.
        raise Untrusted("answer to a forged command" if not answered else "answer to another entry")
    return _result(fields, host)


def parse_result_fields(fields: Mapping[str, str]) -> HostResult | None:
    """A result entry as a HostResult, unverified; None when it is not one (a stray entry).

    For tools that only look; a publisher believes :func:`verify_result` alone.
    """
    host = fields.get("host", "")
    if not IDENTITY.fullmatch(host):
        return None
    return _result(fields, host)


# ---------------------------------------------------------------------------------------------
# Heartbeats
# ---------------------------------------------------------------------------------------------


def _heartbeat_payload(signed: Mapping[str, str], prefix: str) -> bytes:
    """The bytes a heartbeat's signature covers: its signed fields and the fleet's prefix."""
    return canonical_json({**signed, "prefix": prefix})


def heartbeat_value(fields: Mapping[str, str], secret: str, prefix: str = DEFAULT_PREFIX) -> str:
    """A heartbeat's value: the HEARTBEAT_FIELDS of ``fields`` and their signature, as JSON.

    The signature also covers ``prefix``: a heartbeat copied into another fleet's keys fails.
    """
    signed = {name: fields[name] for name in HEARTBEAT_FIELDS}
    value = {**signed, "sig": hmac_hex(secret, _heartbeat_payload(signed, prefix))}
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def _heartbeat_fields(value: str | bytes | None) -> dict[str, str]:
    """The fields of a heartbeat value, size-checked before it is parsed; raise Untrusted."""
    if value is None or len(value) > HEARTBEAT_VALUE_LIMIT:
        raise Untrusted("oversized heartbeat")
    try:
        fields = json.loads(value)
    except ValueError:  # UnicodeDecodeError too
        raise Untrusted("malformed heartbeat") from None
    if not isinstance(fields, dict) or not all(
        isinstance(fields.get(name), str) for name in (*HEARTBEAT_FIELDS, "sig")
    ):
        raise Untrusted("malformed heartbeat")
    return fields


def verify_heartbeat(
    identity: str,
    value: str | bytes | None,
    secret: str,
    *,
    now: float | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> dict[str, str]:
    """The fields of ``identity``'s heartbeat if it is signed, its own and fresh; else Untrusted.

    Fresh: sent at most HEARTBEAT_TTL plus MAX_CLOCK_SKEW ago by the reader's clock, and not
    more than MAX_CLOCK_SKEW ahead of it; so a copied old heartbeat stops counting.
    """
    if not IDENTITY.fullmatch(identity):
        raise Untrusted("bad host name")
    fields = _heartbeat_fields(value)
    if fields["identity"] != identity:
        raise Untrusted("heartbeat of another host")
    signed = {name: fields[name] for name in HEARTBEAT_FIELDS}
    if not same_signature(hmac_hex(secret, _heartbeat_payload(signed, prefix)), fields["sig"]):
        raise Untrusted("bad signature")
    try:
        sent_at = float(fields["sent_at"][:32])
    except ValueError:
        raise Untrusted("malformed heartbeat") from None
    check_fresh(sent_at, time.time() if now is None else now)
    return signed


def check_fresh(sent_at: float, now: float) -> None:
    """Raise Untrusted unless a heartbeat sent at ``sent_at`` is fresh at ``now`` (see above)."""
    if not now - HEARTBEAT_TTL - MAX_CLOCK_SKEW <= sent_at <= now + MAX_CLOCK_SKEW:
        raise Untrusted("stale heartbeat")  # NaN fails both comparisons
