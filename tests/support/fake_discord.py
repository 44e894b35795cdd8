"""A protocol-level fake of Discord's HTTP API v10 and gateway, for the real ``bot.py`` process.

It runs in the test's event loop on 127.0.0.1 (aiohttp). discord.py reaches it through its own
base URLs (``discord.http.Route.BASE`` and ``DiscordWebSocket.DEFAULT_GATEWAY``), set by the
test-only ``sitecustomize`` in ``fake_discord_site/`` (see :mod:`tests.support.fake_discord_bot`).

Every REST request is recorded (:class:`Recorded`) before it is answered, with its JSON body (the
``payload_json`` part of a multipart one) and its files, so a test asserts on what the bot sent:
content, ``allowed_mentions``, ``message_reference``, flags, components. Waits are event-driven
and bounded (:meth:`FakeDiscord.wait_until`). Routes the fake does not know answer 404 and are
recorded as ``UNHANDLED`` (:meth:`FakeDiscord.unhandled`). The gateway is in
:mod:`tests.support.fake_discord_gateway`, the payloads in
:mod:`tests.support.fake_discord_payloads`, the recorded requests and error answers in
:mod:`tests.support.fake_discord_http`; tests/e2e/README.md lists what is supported.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from tests.support import fake_discord_payloads as p
from tests.support.fake_discord_gateway import Gateway, GatewaySession, GatewayWorld
from tests.support.fake_discord_http import (
    DiscordError,
    Recorded,
    json_response,
    pings_nobody,
    read_body,
)

__all__ = ["DiscordError", "FakeDiscord", "InteractionState", "Recorded", "pings_nobody"]

T = TypeVar("T")
API = "/api/v10"
#: Routes that authenticate with the interaction token in the URL, not the bot token.
TOKEN_ROUTES = ("/interactions/", "/webhooks/")
#: Interaction callback types (Discord's names) that create or change a message.
CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE = 4, 5, 6, 7
#: The flag of a deferred response's message until it is edited.
LOADING = 1 << 7


@dataclass
class InteractionState:
    """An interaction the fake dispatched, and how the bot answered it."""

    id: int
    token: str
    channel_id: int
    message_id: int | None = None  # the component's message (type 3)
    callback_type: int | None = None
    original_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    #: Discord no longer knows it (answered after 3 s, or 15 minutes old): 10062 / 10015.
    expired: bool = False
    #: The deferred ("thinking…") response was replaced by the first follow-up.
    filled: bool = False


def _world(name: str = "ops-guild") -> tuple[p.FakeUser, p.FakeUser, p.FakeGuild, dict[str, Any]]:
    """The default world: a bot, an owner, a guild with ``ops`` and ``general`` channels.

    Members: the bot, ``alice`` (role ``ops``) and ``bob`` (no role).
    """
    ids = p.Snowflakes()
    bot, owner = p.FakeUser(ids(), "admin-ops-bot", bot=True), p.FakeUser(ids(), "owen")
    guild_id = ids()
    ops_role = p.FakeRole(ids(), "ops", position=1)
    roles = [p.FakeRole(guild_id, "@everyone", 0, p.EVERYONE_PERMISSIONS), ops_role]
    alice, bob = p.FakeUser(ids(), "alice"), p.FakeUser(ids(), "bob")
    guild = p.FakeGuild(
        id=guild_id,
        name=name,
        owner_id=owner.id,
        channels=[p.FakeChannel(ids(), "ops", 0), p.FakeChannel(ids(), "general", 1)],
        roles=roles,
        members=[
            p.FakeMember(bot),
            p.FakeMember(alice, (ops_role.id,)),
            p.FakeMember(bob),
        ],
    )
    return bot, owner, guild, {"ops_role": ops_role, "alice": alice, "bob": bob}


class FakeDiscord:
    """Discord's REST API and gateway for one bot, one application and its guilds."""

    def __init__(self, *, token: str | None = None, accept_resume: bool = False) -> None:
        """A fresh world (see :func:`_world`); ``token`` is the only one accepted."""
        self.token = token or f"fake-token-{secrets.token_hex(12)}"
        self.ids = p.Snowflakes()
        self.bot_user, self.owner, guild, named = _world()
        self.guilds: list[p.FakeGuild] = [guild]
        self.ops_role: p.FakeRole = named["ops_role"]
        self.alice = guild.member(named["alice"].id)
        self.bob = guild.member(named["bob"].id)
        self.application_id = self.ids()
        self.team: list[p.FakeUser] = []
        self.messages: dict[int, dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self.commands: dict[int | None, list[dict[str, Any]]] = {None: []}
        self.interactions: dict[str, InteractionState] = {}
        #: Seconds after an interaction's creation (its snowflake's time) past which its first
        #: callback is refused with 10062, as Discord does after 3 s; None: no limit (a loaded
        #: test machine must not fail other tests on Discord's clock).
        self.answer_within: float | None = None
        self._changed = asyncio.Condition()
        self.gateway = Gateway(
            GatewayWorld(
                token=self.token,
                ready_payload=self._ready_payload,
                guild_payloads=lambda: [guild.payload() for guild in self.guilds],
                member_chunk=self._member_chunk,
                changed=self.poke,
                requests_so_far=lambda: len(self.requests),
                accept_resume=accept_resume,
            )
        )
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ the server

    @property
    def guild(self) -> p.FakeGuild:
        """The first guild (the bot's own server in most tests)."""
        return self.guilds[0]

    @property
    def channel(self) -> p.FakeChannel:
        """The guild's first channel, ``ops``."""
        return self.guild.channels[0]

    @property
    def base_url(self) -> str:
        """What ``discord.http.Route.BASE`` must be."""
        return f"http://127.0.0.1:{self.port}{API}"

    @property
    def gateway_url(self) -> str:
        """What ``DiscordWebSocket.DEFAULT_GATEWAY`` must be."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_get("/gateway", self.gateway.handle)
        for method, route, handler in self._routes():
            app.router.add_route(method, API + route, self._recording(route, handler))
        app.router.add_route("*", "/{tail:.*}", self._recording("UNHANDLED", self._unhandled))
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        await web.SockSite(self._runner, listener).start()

    async def close(self) -> None:
        """Close every gateway connection and stop listening."""
        await self.gateway.close_all()
        if self._runner is not None:
            await self._runner.cleanup()

    def _routes(self) -> list[tuple[str, str, Callable[[Recorded], Awaitable[Any]]]]:
        """Every route the fake answers, as discord.py's ``Route`` spells it."""
        app = "/applications/{application_id}"
        hook = "/webhooks/{application_id}/{token}"
        return [
            ("GET", "/users/@me", self._me),
            ("GET", "/users/{user_id}", self._user),
            ("GET", "/gateway", self._gateway_info),
            ("GET", "/gateway/bot", self._gateway_info),
            ("GET", "/oauth2/applications/@me", self._application),
            ("GET", "/channels/{channel_id}", self._get_channel),
            ("POST", "/channels/{channel_id}/messages", self._create_message),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._get_message),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._edit_message),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_message),
            ("POST", "/channels/{channel_id}/typing", self._typing),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._callback),
            ("POST", hook, self._followup),
            ("GET", hook + "/messages/{message_id}", self._get_webhook_message),
            ("PATCH", hook + "/messages/{message_id}", self._edit_webhook_message),
            ("DELETE", hook + "/messages/{message_id}", self._delete_webhook_message),
            ("GET", app + "/commands", self._list_commands),
            ("PUT", app + "/commands", self._overwrite_commands),
            ("POST", app + "/commands", self._create_command),
            ("GET", app + "/guilds/{guild_id}/commands", self._list_commands),
            ("PUT", app + "/guilds/{guild_id}/commands", self._overwrite_commands),
            ("POST", app + "/guilds/{guild_id}/commands", self._create_command),
        ]

    def _recording(
        self, route: str, handler: Callable[[Recorded], Awaitable[Any]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            body, files = await read_body(request)
            record = Recorded(
                seq=len(self.requests) + 1,
                method=request.method,
                route=route,
                path=request.path,
                params=dict(request.match_info),
                query=dict(request.query),
                json=body,
                files=files,
                authorization=request.headers.get("Authorization"),
            )
            self.requests.append(record)
            try:
                if route != "UNHANDLED" and not route.startswith(TOKEN_ROUTES):
                    self._authorise(record)
                answer = await handler(record)
            except DiscordError as error:
                record.status, record.response = error.status, error.payload
                await self.poke()
                return json_response(error.payload, error.status)
            record.status, record.response = (204, None) if answer is None else (200, answer)
            await self.poke()
            return web.Response(status=204) if answer is None else json_response(answer)

        return handle

    def _authorise(self, record: Recorded) -> None:
        if record.authorization != f"Bot {self.token}":
            raise DiscordError(401, "401: Unauthorized")

    # ------------------------------------------------------------------ waiting

    async def poke(self) -> None:
        """Wake every waiter to look again (the fake changed, or a process ended)."""
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(
        self, condition: Callable[[], T | None], *, timeout: float = 20.0, what: str = "it"
    ) -> T:
        """The first truthy value of ``condition()``, checked at each change, within ``timeout``.

        ``condition`` may raise to give up early (say, because the bot process died).
        """
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    while not (found := condition()):
                        await self._changed.wait()
            except TimeoutError:
                raise AssertionError(
                    f"no {what} within {timeout:g} s; requests so far:\n{self.summary()}"
                ) from None
        return found

    async def wait_for_request(
        self, predicate: Callable[[Recorded], bool], *, timeout: float = 20.0, what: str = "request"
    ) -> Recorded:
        """The first recorded request for which ``predicate`` holds (earlier ones count)."""
        return await self.wait_until(
            lambda: next((r for r in self.requests if predicate(r)), None),
            timeout=timeout,
            what=what,
        )

    async def wait_ready(self, *, after: int = 0, timeout: float = 20.0) -> GatewaySession:
        """A gateway session numbered above ``after`` that has its READY and guilds."""
        return await self.wait_until(
            lambda: next(
                (s for s in self.gateway.sessions if s.number > after and s.ready and not s.closed),
                None,
            ),
            timeout=timeout,
            what=f"gateway session after #{after} that is ready",
        )

    def summary(self) -> str:
        """The recorded requests and gateway sessions, one line each (for failure messages)."""
        lines = [f"  {r.seq} {r.key} -> {r.status} {r.content!r}" for r in self.requests[-30:]]
        for s in self.gateway.sessions:
            lines.append(
                f"  gateway #{s.number}: ops {s.received_ops}, ready={s.ready}, "
                f"closed={s.closed} ({s.close_code})"
            )
        return "\n".join(lines) or "  (none)"

    # ------------------------------------------------------------------ what tests ask

    def sent(self, key: str = "POST /channels/{channel_id}/messages") -> list[Recorded]:
        """The recorded requests of one route (by default: messages the bot created)."""
        return [r for r in self.requests if r.key == key]

    def replies_to(self, message_id: int) -> list[Recorded]:
        """The messages the bot sent in reply to ``message_id``."""
        return [r for r in self.sent() if r.reference_id == message_id and r.status == 200]

    def answers(self, state: InteractionState) -> list[Recorded]:
        """Every request answering one interaction: its callback, follow-ups and edits."""
        return [r for r in self.requests if r.params.get("token") == state.token]

    def original(self, state: InteractionState) -> dict[str, Any] | None:
        """The interaction's original response as stored now (after its edits), if any."""
        return self.messages.get(state.original_id) if state.original_id else None

    def unhandled(self) -> list[Recorded]:
        """Requests to routes the fake does not know (a test usually expects none)."""
        return [r for r in self.requests if r.route == "UNHANDLED"]

    def add_member(self, user: p.FakeUser, *role_ids: int) -> p.FakeMember:
        """Make ``user`` a member of the guild (before the bot connects: READY carries it)."""
        member = p.FakeMember(user, tuple(role_ids))
        self.guild.members.append(member)
        return member

    def member(self, name: str) -> p.FakeMember:
        """The guild member called ``name``."""
        found = next((m for m in self.guild.members if m.user.name == name), None)
        assert found is not None, f"no member {name!r}"
        return found

    async def post(
        self, content: str, *, by: p.FakeMember, channel: p.FakeChannel | None = None
    ) -> dict[str, Any]:
        """``by`` posts ``content`` (MESSAGE_CREATE on the current session); the message sent.

        As Discord does, a bot that did not ask for the message content intent gets the
        message without its content (and embeds, attachments, components) unless it is
        mentioned: a slash-first bot never sees ``!bot_pull``.
        """
        channel = channel or self.channel
        data = p.message(
            message_id=self.ids(),
            channel_id=channel.id,
            author=by.user,
            content=content,
            guild_id=self.guild.id,
            member=by,
        )
        self.messages[int(data["id"])] = data
        session = self._current()
        intents = int((session.identify or {}).get("intents") or 0)
        if not intents & p.MESSAGE_CONTENT_INTENT and f"<@{self.bot_user.id}>" not in content:
            data = {**data, "content": "", "embeds": [], "attachments": [], "components": []}
        await session.dispatch("MESSAGE_CREATE", data)
        return data

    def command_data(self, name: str, options: list[dict[str, Any]]) -> dict[str, Any]:
        """An application command interaction's ``data`` for ``/name`` in the guild.

        The ID is the registered command's (its ``PUT``), else a new one, as for a command
        registered some other way. A guild command's data names its guild; a global one's
        does not, as from Discord.
        """
        registered = next(
            (c for c in self.commands.get(self.guild.id, []) if c["name"] == name), None
        )
        data: dict[str, Any] = {"name": name, "type": 1, "options": options}
        if registered is not None:
            return {**data, "id": registered["id"], "guild_id": str(self.guild.id)}
        known = next((c for c in self.commands.get(None, []) if c["name"] == name), None)
        return {**data, "id": known["id"] if known else str(self.ids())}

    async def invoke(
        self,
        name: str,
        *,
        by: p.FakeMember,
        options: list[dict[str, Any]] | None = None,
        channel: p.FakeChannel | None = None,
        expired: bool = False,
    ) -> InteractionState:
        """``by`` runs the slash command ``name`` (INTERACTION_CREATE, type 2).

        ``options`` as Discord sends them: ``{"name": ..., "type": 3, "value": ...}``.
        ``expired``: Discord forgets the interaction at once, as when the bot answers it after
        its 3 s (the callback answers 10062, its webhook 10015).
        """
        data = self.command_data(name, options or [])
        return await self.interact(
            p.APPLICATION_COMMAND, data, by=by, channel=channel, expired=expired
        )

    async def autocomplete(
        self, name: str, option: str, typed: str, *, by: p.FakeMember
    ) -> InteractionState:
        """``by`` types ``typed`` into the string option ``option`` of ``/name`` (type 4)."""
        focused = {"name": option, "type": 3, "value": typed, "focused": True}
        return await self.interact(p.AUTOCOMPLETE, self.command_data(name, [focused]), by=by)

    async def press(
        self, message_id: int, custom_id: str, *, by: p.FakeMember, component_type: int = 2
    ) -> InteractionState:
        """``by`` presses the component ``custom_id`` of a message (INTERACTION_CREATE, type 3)."""
        message = self.messages[message_id]
        channel = self.guild.channel(int(message["channel_id"]))
        assert channel is not None
        data = {"custom_id": custom_id, "component_type": component_type}
        return await self.interact(
            p.MESSAGE_COMPONENT, data, by=by, channel=channel, message=message
        )

    async def interact(
        self,
        kind: int,
        data: dict[str, Any],
        *,
        by: p.FakeMember,
        channel: p.FakeChannel | None = None,
        message: dict[str, Any] | None = None,
        expired: bool = False,
    ) -> InteractionState:
        """Dispatch an INTERACTION_CREATE of type ``kind`` with ``data`` (any interaction)."""
        channel = channel or self.channel
        state = InteractionState(
            id=self.ids(),
            token=f"interaction-{secrets.token_urlsafe(24)}",
            channel_id=channel.id,
            message_id=int(message["id"]) if message else None,
            expired=expired,
        )
        self.interactions[state.token] = state
        payload = p.interaction(
            interaction_id=state.id,
            token=state.token,
            kind=kind,
            data=data,
            application_id=self.application_id,
            guild=self.guild,
            channel=channel,
            member=by,
            message=message,
        )
        await self._current().dispatch("INTERACTION_CREATE", payload)
        return state

    async def update_member(self, member: p.FakeMember, *role_ids: int) -> p.FakeMember:
        """Give ``member`` exactly ``role_ids`` (GUILD_MEMBER_UPDATE); the updated member."""
        updated = p.FakeMember(member.user, tuple(role_ids))
        self.guild.members = [updated if m.id == member.id else m for m in self.guild.members]
        payload = {**updated.payload(), "guild_id": str(self.guild.id)}
        await self._current().dispatch("GUILD_MEMBER_UPDATE", payload)
        return updated

    async def reconnect(self) -> None:
        """Ask the bot to reconnect (op 7), as Discord does when it moves a session."""
        await self._current().send(7, None)

    def _current(self) -> GatewaySession:
        session = self.gateway.current
        assert session is not None, "no ready gateway session: wait_ready() first"
        return session

    # ------------------------------------------------------------------ gateway content

    def _ready_payload(self, session: GatewaySession) -> dict[str, Any]:
        return {
            "v": 10,
            "user": {**self.bot_user.payload(), "verified": True, "mfa_enabled": False},
            "guilds": [{"id": str(guild.id), "unavailable": True} for guild in self.guilds],
            "session_id": session.session_id,
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
        }

    def _member_chunk(self, guild_id: int) -> list[dict[str, Any]]:
        guild = self._guild(guild_id)
        return [member.payload() for member in guild.members]

    def _guild(self, guild_id: int | str) -> p.FakeGuild:
        found = next((g for g in self.guilds if g.id == int(guild_id)), None)
        if found is None:
            raise DiscordError(404, "Unknown Guild", 10004)
        return found

    def _channel(self, channel_id: int | str) -> tuple[p.FakeGuild, p.FakeChannel]:
        for guild in self.guilds:
            channel = guild.channel(int(channel_id))
            if channel is not None:
                return guild, channel
        raise DiscordError(404, "Unknown Channel", 10003)

    # ------------------------------------------------------------------ REST: session

    async def _me(self, _: Recorded) -> Any:
        return {**self.bot_user.payload(), "verified": True, "mfa_enabled": False}

    async def _user(self, record: Recorded) -> Any:
        for guild in self.guilds:
            member = guild.member(int(record.params["user_id"]))
            if member is not None:
                return member.user.payload()
        if int(record.params["user_id"]) == self.owner.id:
            return self.owner.payload()
        raise DiscordError(404, "Unknown User", 10013)

    async def _gateway_info(self, _: Recorded) -> Any:
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}

    async def _application(self, _: Recorded) -> Any:
        return p.application(self.application_id, "admin-ops", self.owner, self.team)

    async def _get_channel(self, record: Recorded) -> Any:
        guild, channel = self._channel(record.params["channel_id"])
        return channel.payload(guild.id)

    async def _get_member(self, record: Recorded) -> Any:
        member = self._guild(record.params["guild_id"]).member(int(record.params["user_id"]))
        if member is None:
            raise DiscordError(404, "Unknown Member", 10007)
        return member.payload()

    async def _typing(self, record: Recorded) -> Any:
        self._channel(record.params["channel_id"])
        return None

    # ------------------------------------------------------------------ REST: messages

    def _new_message(
        self, channel_id: int, body: dict[str, Any], files: dict[str, bytes]
    ) -> dict[str, Any]:
        """Store and return a message by the bot built from what it sent."""
        guild, _ = self._channel(channel_id)
        fields: dict[str, Any] = {
            "flags": int(body.get("flags") or 0),
            "components": body.get("components") or [],
            "embeds": body.get("embeds") or [],
            "attachments": self._attachments(files),
        }
        reference = body.get("message_reference")
        if isinstance(reference, dict):
            fields["message_reference"] = {**reference, "type": 0}
            referenced = self.messages.get(int(reference["message_id"]))
            if referenced is not None:
                fields["referenced_message"] = referenced
            elif reference.get("fail_if_not_exists", True):
                raise DiscordError(400, "Invalid Form Body: Unknown message", 50035)
        data = p.message(
            message_id=self.ids(),
            channel_id=channel_id,
            author=self.bot_user,
            content=body.get("content") or "",
            guild_id=guild.id,
            **fields,
        )
        self.messages[int(data["id"])] = data
        return data

    def _attachments(self, files: dict[str, bytes]) -> list[dict[str, Any]]:
        attachments = []
        for name, content in files.items():
            attachment_id = self.ids()
            url = f"http://127.0.0.1:{self.port}/attachments/{attachment_id}/{name}"
            attachments.append(
                {
                    "id": str(attachment_id),
                    "filename": name,
                    "size": len(content),
                    "url": url,
                    "proxy_url": url,
                    "content_type": "text/plain",
                }
            )
        return attachments

    def _stored(self, message_id: int | str, channel_id: int | str | None = None) -> dict[str, Any]:
        message = self.messages.get(int(message_id))
        if message is None or (channel_id is not None and message["channel_id"] != str(channel_id)):
            raise DiscordError(404, "Unknown Message", 10008)
        return message

    def _edit(self, message: dict[str, Any], body: dict[str, Any], files: dict[str, bytes]) -> Any:
        for key in ("content", "components", "embeds", "flags"):
            if key in body:
                message[key] = body[key]
        if files:
            message["attachments"] = [*message["attachments"], *self._attachments(files)]
        message["flags"] = int(message.get("flags") or 0) & ~LOADING
        message["edited_timestamp"] = p.timestamp()
        return message

    async def _create_message(self, record: Recorded) -> Any:
        return self._new_message(int(record.params["channel_id"]), record.body, record.files)

    async def _get_message(self, record: Recorded) -> Any:
        message = self._stored(record.params["message_id"], record.params["channel_id"])
        if int(message.get("flags") or 0) & p.EPHEMERAL:
            # Only its interaction's webhook can read an ephemeral message.
            raise DiscordError(404, "Unknown Message", 10008)
        return message

    async def _edit_message(self, record: Recorded) -> Any:
        message = self._stored(record.params["message_id"], record.params["channel_id"])
        return self._edit(message, record.body, record.files)

    async def _delete_message(self, record: Recorded) -> Any:
        self._stored(record.params["message_id"], record.params["channel_id"])
        del self.messages[int(record.params["message_id"])]
        return None

    # ------------------------------------------------------------------ REST: interactions

    def _interaction(self, record: Recorded) -> InteractionState:
        state = self.interactions.get(record.params["token"])
        application = record.params.get("application_id")
        if state is None or (application is not None and int(application) != self.application_id):
            raise DiscordError(404, "Unknown Webhook", 10015)
        if state.expired:
            if "interaction_id" in record.params:
                raise DiscordError(404, "Unknown interaction", 10062)
            raise DiscordError(404, "Unknown Webhook", 10015)
        if "interaction_id" in record.params and int(record.params["interaction_id"]) != state.id:
            raise DiscordError(404, "Unknown interaction", 10062)
        return state

    async def _callback(self, record: Recorded) -> Any:
        state = self._interaction(record)
        if state.callback_type is not None:
            raise DiscordError(400, "Interaction has already been acknowledged.", 40060)
        if self.answer_within is not None and p.snowflake_age(state.id) > self.answer_within:
            state.expired = True  # Discord forgets it: its webhook is gone too
            raise DiscordError(404, "Unknown interaction", 10062)
        kind = int(record.json.get("type", 0)) if isinstance(record.json, dict) else 0
        state.callback_type = kind
        answer: dict[str, Any] = {"interaction": {"id": str(state.id), "type": kind}}
        message: dict[str, Any] | None = None
        if kind in (CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE):
            body = dict(record.body)
            if kind == DEFERRED_CHANNEL_MESSAGE:
                body["flags"] = int(body.get("flags") or 0) | LOADING
            message = self._new_message(state.channel_id, body, record.files)
            state.original_id = int(message["id"])
            answer["interaction"].update(
                response_message_id=message["id"],
                response_message_loading=kind == DEFERRED_CHANNEL_MESSAGE,
                response_message_ephemeral=bool(message["flags"] & p.EPHEMERAL),
            )
        elif kind == UPDATE_MESSAGE and state.message_id is not None:
            message = self._edit(self._stored(state.message_id), record.body, record.files)
        if message is not None:
            answer["resource"] = {"type": kind, "message": message}
        return answer

    def _webhook_message(self, record: Recorded) -> dict[str, Any]:
        state = self._interaction(record)
        wanted = record.params["message_id"]
        if wanted == "@original":
            if state.original_id is None:
                raise DiscordError(404, "Unknown Message", 10008)
            return self._stored(state.original_id)
        if int(wanted) not in state.followup_ids:
            raise DiscordError(404, "Unknown Message", 10008)
        return self._stored(wanted)

    async def _followup(self, record: Recorded) -> Any:
        state = self._interaction(record)
        if state.callback_type is None:
            raise DiscordError(404, "Unknown Webhook", 10015)  # a follow-up needs a response first
        original_kept = state.original_id in self.messages
        if state.callback_type == DEFERRED_CHANNEL_MESSAGE and not state.filled and original_kept:
            # As Discord does: the first follow-up after "thinking…" becomes that message,
            # visible to whom the deferral said (its ephemeral flag wins). Once the "thinking…"
            # was deleted, a follow-up is a message of its own (discord-api-docs#2739).
            state.filled = True
            original = self._stored(state.original_id or 0)
            body = {k: v for k, v in record.body.items() if k != "flags"}
            return self._edit(original, body, record.files)
        message = self._new_message(state.channel_id, record.body, record.files)
        state.followup_ids.append(int(message["id"]))
        return message

    async def _get_webhook_message(self, record: Recorded) -> Any:
        return self._webhook_message(record)

    async def _edit_webhook_message(self, record: Recorded) -> Any:
        return self._edit(self._webhook_message(record), record.body, record.files)

    async def _delete_webhook_message(self, record: Recorded) -> Any:
        del self.messages[int(self._webhook_message(record)["id"])]
        return None

    # ------------------------------------------------------------------ REST: app commands

    def _command_scope(self, record: Recorded) -> int | None:
        if int(record.params["application_id"]) != self.application_id:
            raise DiscordError(403, "Missing Access", 50001)
        guild_id = record.params.get("guild_id")
        return None if guild_id is None else self._guild(guild_id).id

    def _command(self, scope: int | None, data: dict[str, Any]) -> dict[str, Any]:
        known = next(
            (c for c in self.commands.get(scope, []) if c["name"] == data.get("name")), None
        )
        command = {
            "type": 1,
            "description": "",
            "options": [],
            "default_member_permissions": None,
            "nsfw": False,
            "name_localizations": None,
            "description_localizations": None,
            **data,
            "id": known["id"] if known else str(self.ids()),
            "application_id": str(self.application_id),
            "version": str(self.ids()),
        }
        if scope is not None:
            command["guild_id"] = str(scope)
        return command

    async def _list_commands(self, record: Recorded) -> Any:
        return self.commands.get(self._command_scope(record), [])

    async def _overwrite_commands(self, record: Recorded) -> Any:
        scope = self._command_scope(record)
        given = record.json if isinstance(record.json, list) else []
        self.commands[scope] = [self._command(scope, dict(data)) for data in given]
        return self.commands[scope]

    async def _create_command(self, record: Recorded) -> Any:
        scope = self._command_scope(record)
        command = self._command(scope, record.body)
        others = [c for c in self.commands.get(scope, []) if c["name"] != command["name"]]
        self.commands[scope] = [*others, command]
        return command

    async def _unhandled(self, record: Recorded) -> Any:
        raise DiscordError(404, "404: Not Found")
