"""The wire format: canonical bytes, signatures, limits, result entries; and its document."""

from __future__ import annotations

import hashlib
import hmac
import json
import re

import pytest
import redis.asyncio as aioredis

from core.control_ops import (
    DEFAULT_PREFIX,
    NOT_ALLOWED,
    CommandRejected,
    FleetResult,
    HostResult,
    Untrusted,
    build_command,
    canonical_payload,
    command_stream_key,
    heartbeat_key,
    hosts_index_key,
    parse_result_fields,
    ran_marker_key,
    results_key,
    sign_fields,
    verify_command,
)
from core.control_ops.wire import (
    HEARTBEAT_FIELDS,
    HEARTBEAT_VALUE_LIMIT,
    MAX_BLOCK_SECONDS,
    MAX_CLOCK_SKEW,
    RESULT_SIGNED_FIELDS,
    canonical_json,
    heartbeat_value,
    read_block_seconds,
    result_fields,
    sign_result,
    stream_entries,
    verify_heartbeat,
    verify_result,
)
from core.names import Keys
from core.ops_exec import DEFAULT_KEY_PREFIX
from tests.support import ROOT
from tests.support.fleet import SECRET

PROTOCOL = ROOT / "docs" / "fleet-protocol.md"


def test_wire_format_is_hmac_sha256_over_canonical_json() -> None:
    fields = {
        "id": "0123456789abcdef0123456789abcdef",
        "op": "restart",
        "args": '["proxy"]',
        "requested_by": "discord:42 (alice)",
        "issued_at": "1700000000.5",
        "expires_at": "1700000120.5",
    }
    # Written out by hand: this is what another tool has to produce, byte for byte.
    expected = (
        b'{"args":"[\\"proxy\\"]","expires_at":"1700000120.5","id":"0123456789abcdef0123456789abcdef",'
        b'"issued_at":"1700000000.5","op":"restart","prefix":"sg:control",'
        b'"requested_by":"discord:42 (alice)"}'
    )
    assert canonical_payload(fields) == expected  # the default prefix
    sig = hmac.new(SECRET.encode(), expected, hashlib.sha256).hexdigest()
    command = verify_command({**fields, "sig": sig}, SECRET, now=1700000001.0)
    assert command.args == ("proxy",)
    assert command.expires_at == 1700000120.5
    with pytest.raises(CommandRejected, match=r"^rejected: expired$"):
        verify_command({**fields, "sig": sig}, SECRET, now=1700000121.0)
    for forged in (
        {**fields, "sig": sig, "args": '["sshd"]'},  # tampered after signing
        {**fields, "sig": hmac.new(b"wrong", expected, hashlib.sha256).hexdigest()},
        dict(fields),  # unsigned
        {**fields, "sig": "é" * 64},  # junk (non-ASCII must not crash compare_digest)
    ):
        with pytest.raises(CommandRejected, match=r"^rejected: bad signature$"):
            verify_command(forged, SECRET, now=1700000001.0)


def test_build_command_signs_and_validates() -> None:
    fields = build_command("pull", ["bot"], requested_by="me", secret=SECRET, ttl=60, now=1000.0)
    assert set(fields) == {"id", "op", "args", "requested_by", "issued_at", "expires_at", "sig"}
    assert len(fields["id"]) == 32
    assert json.loads(fields["args"]) == ["bot"]
    assert float(fields["expires_at"]) == 1060.0
    assert verify_command(fields, SECRET, now=1001.0).op == "pull"
    with pytest.raises(TypeError):
        build_command("pull", "bot", requested_by="me", secret=SECRET)
    with pytest.raises(ValueError, match="secret"):
        build_command("pull", [], requested_by="me", secret="")


def test_fleet_ok_needs_an_expected_host_and_every_answer_ok() -> None:
    good = HostResult("a", True, True, "pong", 0.1)
    bad = HostResult("b", False, False, NOT_ALLOWED, 0.0)
    skip = HostResult("b", True, False, "Skipped: a is pulling", 0.0)
    assert not FleetResult("x", {}, frozenset(), frozenset()).ok
    assert FleetResult("x", {"a": good, "b": skip}, frozenset(), frozenset({"a", "b"})).ok
    assert not FleetResult("x", {"a": good, "b": bad}, frozenset(), frozenset({"a", "b"})).ok
    assert not FleetResult("x", {"a": good}, frozenset({"b"}), frozenset({"a", "b"})).ok


def test_the_key_layout_has_one_home() -> None:
    assert DEFAULT_PREFIX == DEFAULT_KEY_PREFIX
    keys = Keys("p")
    assert command_stream_key("p") == keys.commands == "p:commands"
    assert results_key("c1", "p") == keys.results("c1") == "p:results:c1"
    assert heartbeat_key("web-1", "p") == keys.heartbeat("web-1") == "p:hosts:web-1"
    assert hosts_index_key("p") == keys.hosts_index == "p:hosts"
    assert ran_marker_key("web-1", "c1", "p") == keys.ran_marker("web-1", "c1")
    assert ran_marker_key("web-1", "c1", "p") == "p:ran:web-1:c1"


def test_result_entries_round_trip_and_strays_are_skipped() -> None:
    result = HostResult("web-1", False, True, "line one\nline two", 1.23456)
    fields = result_fields(result)
    assert fields == {
        "host": "web-1",
        "ok": "0",
        "ran": "1",
        "summary": "line one\nline two",
        "duration": "1.235",
        "command_sig": "",
    }
    assert parse_result_fields(fields) == result._replace(duration=1.235)
    assert parse_result_fields({"ok": "1"}) is None
    assert parse_result_fields({"host": "h", "duration": "soon"}) == HostResult(
        "h", False, False, "", 0.0
    )


def test_stream_replies_of_both_protocols_are_read_alike() -> None:
    resp2 = [[b"s", [(b"1-0", {b"id": b"c1"}), (b"2-0", None)]]]
    resp3 = {b"s": [[(b"1-0", {b"id": b"c1"}), (b"2-0", None)]]}
    expected = [("1-0", {"id": "c1"}), ("2-0", {})]
    assert stream_entries(resp2) == expected
    assert stream_entries(resp3) == expected
    assert stream_entries(None) == []


def test_blocking_reads_stay_below_the_socket_timeout() -> None:
    assert read_block_seconds(aioredis.Redis(socket_timeout=4)) == 2.0
    assert read_block_seconds(aioredis.Redis(socket_timeout=60)) == MAX_BLOCK_SECONDS
    assert read_block_seconds(aioredis.Redis(socket_timeout=None)) == MAX_BLOCK_SECONDS


def found(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.S)
    assert match is not None, pattern
    return match.group(1)


def test_the_protocol_documents_worked_example_is_what_our_code_computes() -> None:
    text = PROTOCOL.read_text(encoding="utf-8")
    example = text[text.index("<!-- worked example -->") :]
    fields = json.loads(found(r"```json\n(.*?)\n```", example))
    secret = found(r"secret `([^`]+)`", example)
    prefix = found(r"prefix `([^`]+)`", example)
    payload = found(r"```text\n(.*?)\n```", example)
    signature = found(r"\b([0-9a-f]{64})\b", example)
    assert canonical_payload(fields, prefix).decode() == payload
    assert f"{len(payload.encode())} bytes" in example
    assert sign_fields(fields, secret, prefix) == signature
    signed = {**fields, "sig": signature}
    assert verify_command(signed, secret, now=float(fields["issued_at"]), prefix=prefix)
    with pytest.raises(CommandRejected, match=r"^rejected: bad signature$"):
        verify_command(signed, secret, now=float(fields["issued_at"]), prefix="other:fleet")


def section(text: str, marker: str) -> str:
    """The document from ``marker`` to the next worked example (or the end)."""
    start = text.index(marker)
    end = text.find("<!-- worked example", start + len(marker))
    return text[start : end if end != -1 else len(text)]


def test_the_protocol_documents_result_example_is_what_our_code_computes() -> None:
    text = PROTOCOL.read_text(encoding="utf-8")
    example = section(text, "<!-- worked example: result -->")
    secret = found(r"secret `([^`]+)`", example)
    prefix = found(r"prefix `([^`]+)`", example)
    command_id = found(r"to command\s+`([0-9a-f]{32})`", example)
    payload = found(r"```text\n(.*?)\n```", example)
    signature = found(r"`sig` is `([0-9a-f]{64})`", example)
    signed = json.loads(payload)
    assert (signed["command_id"], signed["prefix"]) == (command_id, prefix)
    # It answers the command of the worked example of §3.
    command_example = section(text, "<!-- worked example -->")
    assert signed["command_sig"] == found(r"`sig` is `([0-9a-f]{64})`", command_example)
    fields = {name: signed[name] for name in RESULT_SIGNED_FIELDS[2:]}
    for name in ("ok", "ran", "summary", "duration"):
        assert re.search(rf"`{name}`\s+`?{re.escape(fields[name])}", example), name
    assert canonical_json(signed).decode() == payload
    assert f"payload\nof {len(payload.encode())} bytes" in example
    assert sign_result(command_id, fields, secret, prefix) == signature
    result = verify_result(
        {**fields, "sig": signature},
        command_id,
        secret,
        command_sig=signed["command_sig"],
        prefix=prefix,
    )
    assert result == HostResult("web-1", True, True, "restarted proxy.service", 0.042)


def test_the_protocol_documents_heartbeat_example_is_what_our_code_computes() -> None:
    text = PROTOCOL.read_text(encoding="utf-8")
    example = section(text, "<!-- worked example: heartbeat -->")
    secret = found(r"secret `([^`]+)`", example)
    prefix = found(r"prefix `([^`]+)`", example)
    value = found(r"```json\n(.*?)\n```", example)
    fields = json.loads(value)
    assert heartbeat_value(fields, secret, prefix) == value
    sent_at = float(fields["sent_at"])
    with pytest.raises(Untrusted, match=r"^bad signature$"):
        verify_heartbeat("web-1", value, secret, now=sent_at, prefix="other:fleet")
    assert verify_heartbeat("web-1", value, secret, now=sent_at, prefix=prefix) == {
        name: fields[name] for name in HEARTBEAT_FIELDS
    }
    assert len(value.encode()) <= HEARTBEAT_VALUE_LIMIT


def test_commands_issued_beyond_the_skew_allowance_are_refused() -> None:
    fields = build_command("pull", [], requested_by="me", secret=SECRET, now=1000.0, ttl=60)
    assert verify_command(fields, SECRET, now=1000.0 - MAX_CLOCK_SKEW)  # our clock is behind
    with pytest.raises(CommandRejected, match=r"^rejected: issued in the future$"):
        verify_command(fields, SECRET, now=1000.0 - MAX_CLOCK_SKEW - 0.5)


def test_the_clock_skew_allowance_has_one_home() -> None:
    from core.chat import fleet_action

    # The chat's validity slack is the protocol's skew allowance.
    assert fleet_action.FLEET_TTL_SLACK == MAX_CLOCK_SKEW


def test_the_protocol_document_states_the_limits_our_code_enforces() -> None:
    from core.control_ops import collect, host_state, wire

    text = PROTOCOL.read_text(encoding="utf-8")
    limits = {
        "COMMAND_ENTRY_LIMIT": wire.COMMAND_ENTRY_LIMIT,
        "MAX_CLOCK_SKEW": wire.MAX_CLOCK_SKEW,
        "MAX_FLEET_HOSTS": wire.MAX_FLEET_HOSTS,
        "HEARTBEAT_VALUE_LIMIT": wire.HEARTBEAT_VALUE_LIMIT,
        "RESULT_ENTRY_LIMIT": wire.RESULT_ENTRY_LIMIT,
        "WAKE_COUNT": collect.WAKE_COUNT,
        "RESULT_READ_COUNT": collect.RESULT_READ_COUNT,
        "LEDGER_CAPACITY": host_state.LEDGER_CAPACITY,
        "SUMMARY_LIMIT": wire.SUMMARY_LIMIT,
    }
    for name, value in limits.items():
        # As the document writes numbers: 4000, 17 024.
        spelt = f"{int(value):,}".replace(",", " ") if value >= 10_000 else str(int(value))
        assert f"`{name}` = {spelt}" in text, (name, spelt)
    assert "`RESULT_READ_BYTES` = 256 KiB" in text
    assert collect.RESULT_READ_BYTES == 256 * 1024
