"""Fleet-wide control over Redis Streams: the per-host daemon and the publisher.

One chat command (or ``python -m core.control_ops publish ...``) reaches every host that runs the
daemon; each host acts with the hardened primitives of :mod:`core.ops_exec` and answers on a
per-command result stream, so the caller can show results live as they arrive.

The wire format is a contract other tools may publish against: ``docs/fleet-protocol.md``.
The package, one job per module:

- :mod:`~core.control_ops.wire`: keys, signing (commands, answers, heartbeats), the limits,
  with :mod:`~core.control_ops.signing` (canonical JSON, HMAC) and :mod:`~core.control_ops.streams`;
- :mod:`~core.control_ops.publisher`: ``publish`` and ``alive_hosts``;
- :mod:`~core.control_ops.collect`: bounded, verified reading of a command's answers;
- :mod:`~core.control_ops.daemon`: ``ControlDaemon``, serving one identity, with
  :mod:`~core.control_ops.claims` (at most once), :mod:`~core.control_ops.presence`
  (heartbeats), :mod:`~core.control_ops.command_reader` (bounded reads of its group) and
  :mod:`~core.control_ops.lifecycle` (reconnects, stopping);
- :mod:`~core.control_ops.host_ops`: what ping, status, pull and restart do on the host;
- :mod:`~core.control_ops.host_state`: what a host remembers on its own disk;
- :mod:`~core.control_ops.report`: how a command stands, for the terminal and the chat alike;
- :mod:`~core.control_ops.cli`: ``python -m core.control_ops daemon | publish``.
"""

from __future__ import annotations

from core.control_ops.cli import ConfigError, daemon_settings_from_env, main
from core.control_ops.daemon import ControlDaemon, backoff_delay
from core.control_ops.publisher import alive_hosts, publish
from core.control_ops.report import FleetTally, HostStatus, host_status
from core.control_ops.wire import (
    DEFAULT_PREFIX,
    INTERRUPTED,
    MAX_CLOCK_SKEW,
    MAX_COMMAND_TTL,
    NOT_ALLOWED,
    OPS,
    SIGNED_FIELDS,
    SUMMARY_LIMIT,
    CommandRejected,
    FleetResult,
    HostResult,
    Published,
    SignedCommand,
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
    sign_result,
    verify_command,
    verify_heartbeat,
    verify_result,
    verify_signature,
)
from core.names import default_identity
from core.settings import DaemonSettings

__all__ = [
    "DEFAULT_PREFIX",
    "INTERRUPTED",
    "MAX_CLOCK_SKEW",
    "MAX_COMMAND_TTL",
    "NOT_ALLOWED",
    "OPS",
    "SIGNED_FIELDS",
    "SUMMARY_LIMIT",
    "CommandRejected",
    "ConfigError",
    "ControlDaemon",
    "DaemonSettings",
    "FleetResult",
    "FleetTally",
    "HostResult",
    "HostStatus",
    "Published",
    "SignedCommand",
    "Untrusted",
    "alive_hosts",
    "backoff_delay",
    "build_command",
    "canonical_payload",
    "command_stream_key",
    "daemon_settings_from_env",
    "default_identity",
    "heartbeat_key",
    "host_status",
    "hosts_index_key",
    "main",
    "parse_result_fields",
    "publish",
    "ran_marker_key",
    "results_key",
    "sign_fields",
    "sign_result",
    "verify_command",
    "verify_heartbeat",
    "verify_result",
    "verify_signature",
]
