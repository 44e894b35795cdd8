"""What the ``!fleet_*`` commands do: publish one command to the fleet, show the answers live.

``configure_*`` resolves the fleet's Redis client and secret (both needed; what is missing is
:attr:`core.settings.Settings.fleet_missing`) and checks the arguments, before anything is
published. :meth:`FleetCommands.run` publishes through :func:`core.control_ops.publish` and keeps
one message up to date as hosts answer (:class:`~core.chat.fleet_board.FleetBoard` renders it,
:class:`~core.chat.fleet_board.LiveMessage` edits it at a bounded rate).
"""

from __future__ import annotations

import functools
import logging
import socket
from dataclasses import dataclass
from typing import Final

import redis.asyncio as aioredis

from core.chat.fleet_board import FleetBoard, LiveMessage
from core.chat.invocation import Action, Invocation, NotConfigured, Outcome, Plan
from core.chat.replies import Replies
from core.control_ops import MAX_CLOCK_SKEW, FleetResult, HostResult, Published, publish
from core.names import DEFAULT_TARGET, target_name
from core.ops_exec import redis_errors, validate_unit_name
from core.settings import Settings
from core.text import inline_code

__all__ = ["FLEET_TTL_SLACK", "FleetCommands", "FleetConfig"]

log = logging.getLogger("cogs.admin_ops.fleet")

#: A fleet command stays valid this long past ``OPS_FLEET_TIMEOUT``, for clock skew between hosts
#: (the skew every daemon allows); a host that was away longer never runs it later, behind the
#: operator's back.
FLEET_TTL_SLACK: Final = MAX_CLOCK_SKEW


@dataclass(frozen=True)
class FleetConfig:
    """What publishing needs, present: the fleet's Redis client and its shared secret."""

    redis: aioredis.Redis
    secret: str


@dataclass(frozen=True)
class FleetRequest:
    """One command for the fleet: the op, its arguments and the live message's title."""

    op: str
    args: tuple[str, ...]
    title: str


class FleetCommands:
    """``!fleet_pull``, ``!fleet_restart`` and ``!fleet_status``."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis: aioredis.Redis | None,
        replies: Replies,
        prefix: str,
        edit_interval: float,
    ) -> None:
        """Publish under ``prefix``; edit a live message at most every ``edit_interval`` s."""
        self.settings = settings
        self.redis = redis
        self.replies = replies
        self.prefix = prefix
        self.edit_interval = edit_interval

    def _config(self, inv: Invocation) -> FleetConfig | NotConfigured:
        redis, secret = self.redis, self.settings.control_secret
        if redis is not None and secret is not None:
            return FleetConfig(redis, secret)
        # A client handed to the cog stands in for REDIS_URL.
        missing = [v for v in self.settings.fleet_missing if v != "REDIS_URL" or redis is None]
        return NotConfigured.missing(inv, missing)

    def _plan(self, config: FleetConfig, request: FleetRequest) -> Action:
        return functools.partial(self.run, config=config, request=request)

    def configure_pull(self, inv: Invocation, typed: str) -> Plan | NotConfigured:
        """Pull ``typed`` (default ``bot``) on every host."""
        config = self._config(inv)
        if isinstance(config, NotConfigured):
            return config
        name = target_name(typed) if typed else DEFAULT_TARGET
        if name is None:
            return NotConfigured(
                f"Invalid target {inline_code(typed)} for {inv.shown}: "
                "one name of letters, digits and . _ - (e.g. `bot`)."
            )
        title = f"📡 Fleet pull of {inline_code(name)}"
        action = self._plan(config, FleetRequest("pull", (name,) if typed else (), title))
        prompt = f"Pull {inline_code(name)} on every host that runs the control daemon?"
        return Plan(action, prompt=prompt)

    def configure_restart(self, inv: Invocation, typed: str) -> Plan | NotConfigured:
        """Restart the unit ``typed`` on every host that allows it.

        Restarting this bot's unit or its proxy's is what ``!bot_restart`` or
        ``!proxy_restart`` does, so the invoker needs that command's role too. Names are
        compared once validated: ``bot``, ``bot.service`` and ``OPS_BOT_SERVICE`` are one unit.
        """
        config = self._config(inv)
        if isinstance(config, NotConfigured):
            return config
        if not typed:
            usage = f"{inv.ctx.clean_prefix}{inv.command}"
            return NotConfigured(f"Usage: `{usage} <unit>`, e.g. `{usage} proxy.service`.")
        try:
            unit = validate_unit_name(typed)
        except ValueError as exc:
            return NotConfigured(f"{inv.shown} not sent: {exc}.")
        title = f"📡 Fleet restart of {inline_code(unit)}"
        also_as = tuple(
            command
            for command, own in (
                ("bot_restart", self.settings.bot_service),
                ("proxy_restart", self.settings.proxy_service),
            )
            if own is not None and own == unit
        )
        prompt = f"Restart {inline_code(unit)} on every host that allows it?"
        action = self._plan(config, FleetRequest("restart", (unit,), title))
        return Plan(action, also_as=also_as, prompt=prompt)

    def configure_status(self, inv: Invocation) -> Action | NotConfigured:
        """Ask every host for its status."""
        config = self._config(inv)
        if isinstance(config, NotConfigured):
            return config
        return self._plan(config, FleetRequest("status", (), "📡 Fleet status"))

    async def run(self, inv: Invocation, *, config: FleetConfig, request: FleetRequest) -> Outcome:
        """Publish ``request``; one message shows each host's answer as it arrives.

        The message is sent once the command is out (listing the hosts expected to answer),
        edited at most every ``edit_interval`` seconds while answers arrive, and edited a last
        time with the outcome. When the table does not fit in one message, a follow-up carries
        every host's full answer as a ``.txt`` attachment.
        """
        ctx = inv.ctx
        live = _LiveBoard(inv, self.replies, request.title, self.edit_interval)
        timeout = self.settings.fleet_timeout
        fleet: FleetResult | None = None
        try:
            fleet = await publish(
                config.redis,
                request.op,
                list(request.args),
                requested_by=f"{ctx.author.name} ({ctx.author.id}) via {socket.gethostname()}",
                secret=config.secret,
                timeout=timeout,
                ttl=timeout + FLEET_TTL_SLACK,
                on_result=live.on_result,
                on_published=live.on_published,
                prefix=self.prefix,
            )
        except redis_errors() as exc:
            reason = self.replies.redact(
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            )
            log.warning("fleet %s: Redis failed: %s", request.op, reason)
            when = "while collecting answers" if live.sent_out else "before publishing; nothing ran"
            live.board.fail(f"Redis failed {when}: {reason}")
        except BaseException:
            await live.cancel()
            raise
        else:
            live.board.finish(fleet)
        await live.show_final()
        detail = live.board.footer()
        if fleet is None:
            return Outcome("failed", acted=live.sent_out, detail=detail)
        acted = any(result.ran for result in fleet.results.values())
        if fleet.ok and not acted:  # every host skipped it: ok, but nothing ran anywhere
            return Outcome("skipped", acted=False, detail=detail)
        return Outcome("ok" if fleet.ok else "failed", acted=acted, detail=detail)


class _LiveBoard:
    """The board of one fleet command and the live message that shows it."""

    def __init__(self, inv: Invocation, replies: Replies, title: str, interval: float) -> None:
        self.inv = inv
        self.replies = replies
        self.interval = interval
        self.board = FleetBoard(title=replies.redact(title), clean=replies.redact)
        self.live: LiveMessage | None = None
        #: Whether the command was published (so hosts may have acted on it).
        self.sent_out = False

    async def on_published(self, published: Published) -> None:
        """The command is out: post the message listing the hosts expected to answer."""
        self.sent_out = True
        self.board.published(published)
        if not published.expected:
            return  # publish returns at once: the final state is the only message
        content, _ = self.board.render()
        message = await self.replies.send_live(self.inv.ctx, content)
        if message is not None:
            self.live = LiveMessage(
                lambda: self.board.render()[0],
                functools.partial(self.replies.edit_live, message),
                shown=content,
                interval=self.interval,
            )

    def on_result(self, result: HostResult) -> None:
        """A host answered."""
        self.board.add(result)
        if self.live is not None:
            self.live.changed()

    async def cancel(self) -> None:
        """Stop editing: the command itself failed or was cancelled."""
        if self.live is not None:
            await self.live.cancel()

    async def show_final(self) -> None:
        """Show the final state, and attach every full answer when the table did not fit."""
        content, complete = self.board.render()
        shown = await self.live.finish() if self.live is not None else False
        if not shown:
            # No live message (no host was expected, or the first send failed), or the last
            # edit failed (the message was deleted): the final state goes out as a new message.
            await self.replies.send_live(self.inv.ctx, content)
        if not complete:
            await self.replies.reply(
                self.inv.ctx,
                f"📎 Every host's full answer to {self.inv.shown}",
                self.board.full_text(),
            )
