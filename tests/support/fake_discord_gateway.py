"""The fake Discord's gateway: one websocket session per connection, as discord.py 2.7 speaks it.

HELLO, then IDENTIFY (token checked) → READY and one GUILD_CREATE per guild; heartbeats are
acknowledged; RESUME is refused with INVALID_SESSION (``d: false``) unless the fake accepts
resumes; REQUEST_GUILD_MEMBERS gets every member in one chunk. With ``compress=zlib-stream`` in
the URL (discord.py asks for it) every event is a zlib stream chunk ending in a sync flush, as
Discord sends it; otherwise a text frame.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

# Gateway opcodes (discord/gateway.py names them the same way).
DISPATCH = 0
HEARTBEAT = 1
IDENTIFY = 2
PRESENCE = 3
RESUME = 6
RECONNECT = 7
REQUEST_MEMBERS = 8
INVALID_SESSION = 9
HELLO = 10
HEARTBEAT_ACK = 11
#: Close code Discord uses for a wrong token.
AUTHENTICATION_FAILED = 4004


@dataclass
class GatewaySession:
    """One websocket connection and what went over it."""

    number: int
    ws: web.WebSocketResponse
    compress: bool
    query: dict[str, str]
    identify: dict[str, Any] | None = None
    resume: dict[str, Any] | None = None
    session_id: str | None = None
    #: READY and the guilds have been sent: the bot has its guilds and acts on events.
    ready: bool = False
    #: Dispatches sent, as ``(sequence, event name)``.
    dispatched: list[tuple[int, str]] = field(default_factory=list)
    #: Every opcode received, in order.
    received_ops: list[int] = field(default_factory=list)
    heartbeats: int = 0
    closed: bool = False
    #: The close code the client sent (1000: a clean close), None if it sent none.
    close_code: int | None = None
    #: How many REST requests the fake had recorded when the connection closed (for ordering).
    closed_after_requests: int | None = None
    _sequence: int = 0
    _deflate: Any = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        if self.compress:
            self._deflate = zlib.compressobj()

    async def send(self, op: int, data: Any, event: str | None = None) -> None:
        """Send one gateway message (a dispatch when ``event`` is given)."""
        async with self._lock:  # one zlib stream: frames must leave in the order compressed
            message: dict[str, Any] = {"op": op, "d": data, "s": None, "t": None}
            if event is not None:
                self._sequence += 1
                message.update(s=self._sequence, t=event)
                self.dispatched.append((self._sequence, event))
            raw = json.dumps(message).encode()
            if self._deflate is not None:
                await self.ws.send_bytes(
                    self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
                )
            else:
                await self.ws.send_str(raw.decode())

    async def dispatch(self, event: str, data: Any) -> None:
        """Send the event ``event`` with ``data``."""
        await self.send(DISPATCH, data, event)


@dataclass
class GatewayWorld:
    """What the gateway needs from the fake: the token, READY's content, a change callback."""

    token: str
    ready_payload: Callable[[GatewaySession], dict[str, Any]]
    guild_payloads: Callable[[], list[dict[str, Any]]]
    member_chunk: Callable[[int], list[dict[str, Any]]]
    changed: Callable[[], Awaitable[None]]
    requests_so_far: Callable[[], int]
    accept_resume: bool = False
    heartbeat_interval_ms: int = 41_250


class Gateway:
    """Serves ``GET /gateway`` (a websocket) and keeps every session it had."""

    def __init__(self, world: GatewayWorld) -> None:
        """Answer with what ``world`` says."""
        self.world = world
        self.sessions: list[GatewaySession] = []

    @property
    def current(self) -> GatewaySession | None:
        """The newest session that is ready and still open."""
        for session in reversed(self.sessions):
            if session.ready and not session.closed:
                return session
        return None

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """One connection, from HELLO to close."""
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        session = GatewaySession(
            number=len(self.sessions) + 1,
            ws=ws,
            compress=request.query.get("compress") == "zlib-stream",
            query=dict(request.query),
        )
        self.sessions.append(session)
        try:
            await session.send(HELLO, {"heartbeat_interval": self.world.heartbeat_interval_ms})
            async for message in ws:
                if message.type is not WSMsgType.TEXT:
                    continue  # discord.py sends text; anything else is not part of the protocol
                await self._received(session, json.loads(message.data))
        finally:
            session.closed = True
            session.close_code = ws.close_code
            session.closed_after_requests = self.world.requests_so_far()
            await self.world.changed()
        return ws

    async def _received(self, session: GatewaySession, message: dict[str, Any]) -> None:
        op, data = message.get("op"), message.get("d")
        session.received_ops.append(op if isinstance(op, int) else -1)
        if op == HEARTBEAT:
            session.heartbeats += 1
            await session.send(HEARTBEAT_ACK, None)
        elif op == IDENTIFY:
            await self._identify(session, data)
        elif op == RESUME:
            await self._resume(session, data)
        elif op == REQUEST_MEMBERS:
            await self._members(session, data)
        await self.world.changed()

    async def _identify(self, session: GatewaySession, data: Any) -> None:
        session.identify = data if isinstance(data, dict) else {}
        if session.identify.get("token") != self.world.token:
            await session.ws.close(code=AUTHENTICATION_FAILED, message=b"Authentication failed.")
            return
        session.session_id = uuid.uuid4().hex
        await session.dispatch("READY", self.world.ready_payload(session))
        for guild in self.world.guild_payloads():
            await session.dispatch("GUILD_CREATE", guild)
        session.ready = True

    async def _resume(self, session: GatewaySession, data: Any) -> None:
        session.resume = data if isinstance(data, dict) else {}
        if not self.world.accept_resume or session.resume.get("token") != self.world.token:
            # d=false: the session cannot be resumed; discord.py identifies anew.
            await session.send(INVALID_SESSION, False)
            return
        session.session_id = str(session.resume.get("session_id"))
        await session.dispatch("RESUMED", {})
        session.ready = True

    async def _members(self, session: GatewaySession, data: Any) -> None:
        request = data if isinstance(data, dict) else {}
        guild_id = int(request.get("guild_id", 0))
        chunk: dict[str, Any] = {
            "guild_id": str(guild_id),
            "members": self.world.member_chunk(guild_id),
            "chunk_index": 0,
            "chunk_count": 1,
        }
        if "nonce" in request:
            chunk["nonce"] = request["nonce"]
        await session.dispatch("GUILD_MEMBERS_CHUNK", chunk)

    async def close_all(self) -> None:
        """Close every open connection (the fake is shutting down)."""
        for session in self.sessions:
            if not session.ws.closed:
                await session.ws.close(code=1001)
