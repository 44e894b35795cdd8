"""The per-host control daemon: serve signed fleet commands from Redis, at most once each.

One consumer group per identity on the command stream, so every daemon sees every command; a
ran marker per command id and identity, taken before anything with side effects runs; each
answer written and the command acknowledged in one script. ``docs/fleet-protocol.md`` is the
contract; :mod:`core.control_ops.host_ops` is what the ops do on the host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from redis.exceptions import ResponseError

from core.control_ops.claims import (
    FINISH_LUA,
    MARKER_READ_BYTES,
    STARTED_PREFIX,
    Claim,
    Finish,
    Marker,
    keep_until,
    marker_ttl_ms,
)
from core.control_ops.command_reader import CommandReader
from core.control_ops.host_ops import (
    DEFAULT_PULL_TIMEOUT,
    HostOps,
    Outcome,
    Refused,
    project_version,
)
from core.control_ops.host_state import (
    CommandLedger,
    LedgerFull,
    RestartRecord,
    host_state_dir,
)
from core.control_ops.lifecycle import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    SENTINEL_BACKOFF_CAP,
    backoff_delay,
    stop_task,
)
from core.control_ops.presence import Presence, describe
from core.control_ops.wire import (
    ALREADY_HANDLED,
    COMMAND_ENTRY_LIMIT,
    DEFAULT_PREFIX,
    HEARTBEAT_TTL,
    INTERRUPTED,
    READ_ONLY_OPS,
    CommandRejected,
    HostResult,
    SignedCommand,
    check_time,
    cut_summary,
    read_block_seconds,
    result_fields,
    verify_signature,
)
from core.env_reader import DEFAULT_RESTART_MIN_INTERVAL, default_state_dir
from core.names import COMMAND_ID, IDENTITY, Keys
from core.ops_exec import as_text, bounded, raise_if_cancelling, redact, redis_errors
from core.redis_client import uses_sentinel

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from core.settings import DaemonSettings

__all__ = ["BACKOFF_BASE", "BACKOFF_CAP", "Claim", "ControlDaemon", "backoff_delay"]

# A fixed name: under `python -m core.control_ops` __name__ would be "__main__".
log = logging.getLogger("admin_ops.control_ops")

T = TypeVar("T")


class ControlDaemon:
    """Serve fleet commands for one identity until cancelled.

    ``pull_targets`` maps target names to checkout paths, ``restart_units`` lists the units this
    host may restart, and ``own_units`` those among them that are restarted deferred (this
    daemon's own unit or its co-located bot's): it grants nothing by itself. Pulls stop after
    ``pull_timeout`` seconds and hand git the variables named in ``env_passthrough``; ``secrets``
    are redacted from every answer. Cancelling :meth:`run` is a clean stop: the heartbeat is
    deleted and nothing unfinished is acknowledged. ``serving`` is an :class:`asyncio.Event` set
    while connected to Redis and answering (a bot hosting a daemon can say it joined the fleet).

    What must survive anything Redis can be made to say lives in ``state_dir`` (default: the
    state directory of ``core.env_reader.default_state_dir``), under ``fleet/<identity>/``: the
    ids of the commands with side effects this host started (recorded, fsynced, before the op
    runs, so no copy of a command ever runs twice here) and when it last restarted each unit
    (a unit is not restarted again within ``restart_min_interval`` seconds). The host-wide
    restart locks it shares with the bot live in ``lock_dir`` (``OPS_LOCK_DIR``; default the
    state directory itself).

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
        pull_timeout: float = DEFAULT_PULL_TIMEOUT,
        env_passthrough: Iterable[str] = (),
        secrets: Iterable[str] = (),
        state_dir: str | os.PathLike[str] | None = None,
        restart_min_interval: float = DEFAULT_RESTART_MIN_INTERVAL,
        lock_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Validate the identity and the allow-list; no I/O happens before :meth:`run`."""
        if not secret:
            raise ValueError("a shared secret is required (OPS_CONTROL_SECRET)")
        if not IDENTITY.fullmatch(identity):
            raise ValueError(f"invalid daemon identity {identity!r}")
        self._redis, self.identity, self._secret = redis, identity, secret
        self._secrets = (secret, *secrets)
        self._keys = Keys(prefix)
        base = Path(state_dir) if state_dir is not None else default_state_dir(os.environ)
        #: Where this daemon keeps its host-local records.
        self.state_dir = host_state_dir(base, identity)
        self.ledger = CommandLedger(self.state_dir)
        self._call_timeout = call_timeout
        self.presence = Presence(
            redis, self._keys, identity, ttl=heartbeat_ttl, call_timeout=call_timeout,
            description=self._describe, secret=secret,
        )  # fmt: skip
        self.ops = HostOps(
            identity=identity, redis=redis, pull_targets=pull_targets,
            restart_units=restart_units, own_units=own_units, pull_timeout=pull_timeout,
            env_passthrough=env_passthrough, restart_delay=deferred_restart_delay,
            restart_min_interval=restart_min_interval, restarts=RestartRecord(self.state_dir),
            secrets=self._secrets, lock_dir=base if lock_dir is None else lock_dir,
        )  # fmt: skip
        self._block_seconds = read_block_seconds(redis)
        # Behind Sentinel a reconnect asks the sentinels first: retrying often is cheap, and
        # it is what brings the daemon back soon after a failover (see SENTINEL_BACKOFF_CAP).
        self._backoff_cap = SENTINEL_BACKOFF_CAP if uses_sentinel(redis) else BACKOFF_CAP
        # One group per identity, so every daemon sees every command; one consumer in it.
        self._stream, self._group = self._keys.commands, identity
        # A per-run token in the "started" marker: if our own SET NX reached Redis but its reply
        # was lost, reading the marker back tells us it is ours and not a previous run's.
        self._token = f"{STARTED_PREFIX}{uuid.uuid4().hex}"
        self._finish_script = redis.register_script(FINISH_LUA)
        # Kept across reconnects: once it saw an oversized entry, it polls (command_reader).
        self._reader = CommandReader(redis, self._stream, group=self._group, consumer=identity)
        self._unwritten: list[Finish] = []
        self._redis_up: bool | None = None
        self._waiting_for_work = False
        self.serving = asyncio.Event()

    @classmethod
    def from_settings(cls, redis: aioredis.Redis, settings: DaemonSettings) -> ControlDaemon:
        """A daemon configured by ``DaemonSettings`` (the CLI's, or the bot's in-process one)."""
        return cls(
            redis,
            identity=settings.identity,
            secret=settings.secret,
            pull_targets=settings.pull_targets,
            restart_units=settings.restart_units,
            own_units=settings.own_units,
            prefix=settings.prefix,
            deferred_restart_delay=settings.restart_delay,
            pull_timeout=settings.pull_timeout,
            env_passthrough=settings.env_passthrough,
            secrets=settings.secrets,
            state_dir=settings.state_dir,
            restart_min_interval=settings.restart_min_interval,
            lock_dir=settings.lock_dir,
        )

    @property
    def pull_targets(self) -> dict[str, str]:
        """Target name → absolute checkout path: what this host may pull."""
        return self.ops.pull_targets

    @property
    def restart_units(self) -> frozenset[str]:
        """The units this host may restart (normalised names)."""
        return self.ops.restart_units

    @property
    def own_units(self) -> frozenset[str]:
        """The allowed units that are restarted deferred, after the answer."""
        return self.ops.own_units

    def _describe(self) -> dict[str, str]:
        return describe(
            self.identity,
            version=project_version(),
            started_at=self.ops.started_at,
            pull_targets=self.pull_targets,
            restart_units=self.restart_units,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve commands until cancelled; Redis outages are retried, never fatal."""
        heartbeat = asyncio.create_task(
            self.presence.keep_beating(self.serving), name=f"heartbeat {self.identity}"
        )
        serve = asyncio.create_task(self._serve_forever(), name=f"serve {self.identity}")
        try:
            # wait() rather than awaiting the task: a cancellation of run() must reach this
            # frame even if the serving task swallows its own (see _stop).
            await asyncio.wait({serve})
            serve.result()
        finally:
            self.serving.clear()
            await stop_task(serve, again=lambda: self._waiting_for_work)
            await stop_task(heartbeat, again=lambda: True)
            await self.presence.leave()
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
            except redis_errors() as exc:
                raise_if_cancelling()
                self._note_redis(up=False, reason=exc)
            # The supervisor of this host's daemon: a bug must not turn into a crash loop under
            # systemd (or end a bot's in-process daemon); it is logged and serving resumes.
            except Exception:
                raise_if_cancelling()
                log.exception("control daemon %s: unexpected error; retrying", self.identity)
            self.serving.clear()
            await asyncio.sleep(backoff_delay(attempt, cap=self._backoff_cap))
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
                redact(str(reason) or type(reason).__name__, self._secrets),
                self._backoff_cap,
            )
        self._redis_up = up

    async def _connect(self) -> None:
        """Set up (again) after a start or an outage, in the order the guarantees need.

        The group must exist before the heartbeat says this host will answer; results kept
        through an outage are written before anything else is answered.
        """
        await self.presence.ensure_group()
        await self._flush_unwritten()
        await self.presence.beat()

    async def _handle_own_pending(self) -> None:
        """Answer what this identity was handed but never acknowledged (e.g. before a crash)."""
        last_id = "0"
        while entries := await self._call(self._reader.pending(last_id)):
            for entry_id, fields in entries:
                await self._handle_entry_or_drop(entry_id, fields)
                last_id = entry_id

    async def _consume_new(self) -> None:
        block_ms = int(self._block_seconds * 1000)
        read_timeout = self._block_seconds + self._call_timeout
        while True:
            self._waiting_for_work = True
            try:
                entries = await self._call(self._reader.new(block_ms), timeout=read_timeout)
            finally:
                self._waiting_for_work = False
            for entry_id, fields in entries:
                await self._handle_entry_or_drop(entry_id, fields)

    async def _call(self, awaitable: Awaitable[T], timeout: float | None = None) -> T:
        return await bounded(awaitable, timeout or self._call_timeout)

    # -- one command ----------------------------------------------------------------------------

    async def _handle_entry_or_drop(self, entry_id: str, fields: dict[str, str] | None) -> None:
        """Handle one entry; one that Redis itself refuses to process is dropped, not retried.

        ``fields`` is None for an entry larger than COMMAND_ENTRY_LIMIT: it was never read, only
        its id field (if short) is. A ResponseError is the server's deterministic "no" (a wrong
        type at a key, an argument out of range): retrying it would stall every later command
        behind it forever.
        """
        try:
            if fields is None:
                command_id = await self._call(self._reader.command_id(entry_id))
                await self._handle_entry(entry_id, {"id": command_id}, oversized=True)
            else:
                await self._handle_entry(entry_id, fields)
        except ResponseError as exc:
            log.error("dropping stream entry %s: Redis refused to process it (%s)", entry_id, exc)
            self._unwritten = [f for f in self._unwritten if f.entry_id != entry_id]
            await self._call(self._redis.xack(self._stream, self._group, entry_id))

    async def _handle_entry(
        self, entry_id: str, fields: dict[str, str], *, oversized: bool = False
    ) -> None:
        started = time.monotonic()
        command_id = fields.get("id", "")
        if not COMMAND_ID.fullmatch(command_id):
            # Nowhere to answer: a trimmed entry, or junk someone wrote to the stream.
            log.warning("dropping stream entry %s: no valid command id", entry_id)
            await self._call(self._redis.xack(self._stream, self._group, entry_id))
            return
        try:
            if oversized:
                raise CommandRejected(
                    f"rejected: malformed command (larger than {COMMAND_ENTRY_LIMIT} bytes)"
                )
            command = verify_signature(fields, self._secret, self._keys.prefix)
        except CommandRejected as exc:
            # Answered, but bound to no command (no verified signature): a forged entry that
            # reuses a real command's id must not answer for it.
            self._log_rejection(command_id, fields, str(exc))
            result = self._result(Outcome(False, False, str(exc)), started)
            await self._finish(Finish(entry_id, command_id, result, Marker.NONE, 0))
            return
        ttl_ms = marker_ttl_ms(command)
        outcome = self._precheck(command)
        if outcome is None and command.op in READ_ONLY_OPS:
            # No side effects: compute the answer first, then claim the id and answer in one
            # script. A redelivered read-only op may be computed again but answers once.
            outcome = await self._execute(command)
        if outcome is not None:
            result = self._result(outcome, started)
            finish = Finish(entry_id, command_id, result, Marker.CLAIM, ttl_ms)
            await self._finish(finish._replace(command_sig=command.sig))
            return
        await self._run_once(entry_id, command, ttl_ms, started)

    async def _run_once(
        self, entry_id: str, command: SignedCommand, ttl_ms: int, started: float
    ) -> None:
        """Run a command with side effects, unless this host has started it before.

        The ran marker is taken, then the id recorded in the host's ledger (fsynced), before
        anything runs: an interruption (a crash, SIGKILL, a Redis outage) or anything Redis is
        made to say (a deleted or rolled-back marker, a re-added entry, a re-created group)
        can never lead to a second run of this id on this host.
        """
        claim = await self._claim(command, ttl_ms)
        if claim is Claim.NEW:
            recorded = await self._record_start(command)
            if isinstance(recorded, Outcome):
                result = self._result(recorded, started)
                finish = Finish(entry_id, command.id, result, Marker.DONE, ttl_ms)
                await self._finish(finish._replace(command_sig=command.sig))
                return
            claim = recorded
        if claim is not Claim.NEW:
            await self._answer_again(entry_id, command, claim, started)
            return
        outcome = await self._execute(command)
        # Done before the answer is written: a copy read after the answer (even by the next
        # process, should this one stop right after answering) is "already handled".
        await self._record_done(command)
        result = self._result(outcome, started)
        finish = Finish(entry_id, command.id, result, Marker.DONE, ttl_ms, outcome.after)
        await self._finish(finish._replace(command_sig=command.sig))

    async def _record_start(self, command: SignedCommand) -> Claim | Outcome:
        """Record the command in the ledger before it runs; its earlier state if it has one.

        An Outcome when it cannot be recorded: then it must not run at all.
        """
        try:
            known = await asyncio.to_thread(self.ledger.start, command.id, keep_until(command))
        except LedgerFull as exc:
            log.error("command %s not run: the command ledger is full (%s)", command.id, exc)
            return Outcome(False, False, f"refused: too many recent commands on this host ({exc})")
        except OSError as exc:
            log.error(
                "command %s not run: cannot record it in %s: %s", command.id, self.ledger.path, exc
            )
            reason = exc.strerror or str(exc)
            return Outcome(
                False, False, f"failed: cannot record the command on this host ({reason})"
            )
        if known is None:
            return Claim.NEW
        log.warning("command %s is in this host's ledger (%s)", command.id, known.name.lower())
        return Claim.of_ledger(known)

    def _precheck(self, command: SignedCommand) -> Outcome | None:
        """The answer for a command that must not run at all, else None."""
        try:
            check_time(command, time.time())
        except CommandRejected as exc:
            fields = {"op": command.op, "args": json.dumps(list(command.args))}
            self._log_rejection(
                command.id, {**fields, "requested_by": command.requested_by}, str(exc)
            )
            return Outcome(False, False, str(exc))
        if not self.ops.knows(command.op):
            log.warning("command %s: unknown op %r", command.id, command.op[:40])
            return Outcome(False, False, f"refused: unknown op {command.op[:40]!r}")
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

    async def _claim(self, command: SignedCommand, ttl_ms: int) -> Claim:
        """Take the ran marker before running the command (see :class:`Claim`)."""
        key = self._keys.ran_marker(self.identity, command.id)
        if await self._call(self._redis.set(key, self._token, nx=True, px=ttl_ms)):
            return Claim.NEW
        # A bounded read: anyone can plant a value of any size at the marker's key.
        value = as_text(await self._call(self._redis.getrange(key, 0, MARKER_READ_BYTES - 1)))
        if value == self._token:
            return Claim.NEW  # our own SET reached Redis but its reply was lost before a reconnect
        return Claim.of_marker(value)

    async def _answer_again(
        self, entry_id: str, command: SignedCommand | Finish, claim: Claim, started: float
    ) -> None:
        """Answer a command id this host already started or answered, without running it."""
        interrupted = claim is Claim.STARTED
        summary = INTERRUPTED if interrupted else ALREADY_HANDLED
        command_id = command.id if isinstance(command, SignedCommand) else command.command_id
        sig = command.sig if isinstance(command, SignedCommand) else command.command_sig
        log.warning("command %s delivered again: %s", command_id, summary)
        result = self._result(Outcome(False, interrupted, summary), started)
        await self._finish(Finish(entry_id, command_id, result, Marker.DONE, 0, command_sig=sig))

    async def _execute(self, command: SignedCommand) -> Outcome:
        log.info(
            "running command %s: %s %s (requested by %s)",
            command.id,
            command.op,
            " ".join(command.args),
            command.requested_by,
        )
        try:
            return await self.ops.run(command.op, command.args)
        except Refused as exc:
            log.warning("command %s %s refused: %s", command.id, command.op, exc)
            return Outcome(False, False, str(exc))
        # An op that fails in an unforeseen way must still be answered and acknowledged: left
        # pending, it would be read again after the reconnect and, holding our own marker
        # token, run again.
        except Exception as exc:
            log.exception("command %s %s failed", command.id, command.op)
            return Outcome(False, True, f"failed: internal error ({type(exc).__name__}: {exc})")

    def _result(self, outcome: Outcome, started: float) -> HostResult:
        # Redacted before it is cut, so a secret is never left half-shown at the cut.
        text = cut_summary(redact(outcome.summary, self._secrets))
        return HostResult(self.identity, outcome.ok, outcome.ran, text, time.monotonic() - started)

    async def _finish(self, finish: Finish) -> None:
        """Write the result and acknowledge, then run what must come after the answer."""
        try:
            lost_to = await self._write_and_ack(finish)
        except ResponseError:
            raise  # deterministic: keeping it would fail the same way on every reconnect
        except BaseException:
            # Kept for the next connection, so a completed op's answer survives a Redis outage
            # (a daemon that dies meanwhile answers "interrupted" after it restarts instead).
            self._unwritten.append(finish)
            raise
        if lost_to is not None:
            # The claim lost: this id was started or answered here before (a replayed entry,
            # or our own earlier attempt whose reply was lost).
            await self._answer_again(finish.entry_id, finish, lost_to, time.monotonic())
            return
        if finish.after is not None:
            await finish.after()

    async def _record_done(self, command: SignedCommand) -> None:
        """Mark a command that ran as done in the ledger (a later copy: "already handled")."""
        try:
            await asyncio.to_thread(self.ledger.finish, command.id, keep_until(command))
        except OSError as exc:
            # Not a safety matter: "started" already keeps it from running again.
            log.warning("command %s: cannot mark it done in the ledger: %s", command.id, exc)

    async def _write_and_ack(self, finish: Finish) -> Claim | None:
        """Run the finish script; None when written, else who holds the marker."""
        keys = [
            self._keys.results(finish.command_id),
            self._keys.ran_marker(self.identity, finish.command_id),
            self._stream,
        ]
        # The group is named after the identity, which is also the result's host.
        fields = result_fields(
            finish.result,
            command_id=finish.command_id,
            secret=self._secret,
            command_sig=finish.command_sig,
            prefix=self._keys.prefix,
        )
        args = [self._group, finish.entry_id, finish.marker.value, str(finish.marker_ttl_ms)]
        args += [fields[name] for name in ("ok", "ran", "summary", "duration", "command_sig")]
        args.append(fields["sig"])
        reply = await self._call(self._finish_script(keys=keys, args=args))
        if int(reply[0]) == 1:
            return None
        return Claim.of_marker(as_text(reply[1]))

    async def _flush_unwritten(self) -> None:
        while self._unwritten:
            finish = self._unwritten.pop(0)
            await self._finish(finish)
