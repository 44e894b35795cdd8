"""The fake Discord's HTTP side: what a recorded request holds, and Discord's answer shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from tests.support import fake_discord_payloads as p


@dataclass
class Recorded:
    """One REST request the bot made, and the fake's answer."""

    seq: int
    method: str
    #: The route as discord.py's ``Route`` spells it: ``/channels/{channel_id}/messages``.
    route: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    json: Any
    files: dict[str, bytes]
    authorization: str | None
    status: int = 0
    response: Any = None

    @property
    def key(self) -> str:
        """``METHOD route``, e.g. ``POST /channels/{channel_id}/messages``."""
        return f"{self.method} {self.route}"

    @property
    def body(self) -> dict[str, Any]:
        """The message fields: an interaction callback's ``data``, else the JSON body."""
        data = self.json
        if self.route.endswith("/callback") and isinstance(data, dict):
            data = data.get("data")
        return data if isinstance(data, dict) else {}

    @property
    def content(self) -> str | None:
        """The message text sent."""
        return self.body.get("content")

    @property
    def allowed_mentions(self) -> Any:
        """The ``allowed_mentions`` object sent (None when absent)."""
        return self.body.get("allowed_mentions")

    @property
    def reference_id(self) -> int | None:
        """The ID of the message this one replies to, if any."""
        reference = self.body.get("message_reference")
        return int(reference["message_id"]) if isinstance(reference, dict) else None

    @property
    def flags(self) -> int:
        """The message flags sent (64: ephemeral)."""
        return int(self.body.get("flags") or 0)

    @property
    def ephemeral(self) -> bool:
        """Whether the message is visible to the invoker only."""
        return bool(self.flags & p.EPHEMERAL)

    @property
    def components(self) -> list[Any]:
        """The components (action rows of buttons…) sent."""
        return list(self.body.get("components") or [])

    @property
    def created_id(self) -> int | None:
        """The ID of the message this request created or changed, from the fake's answer."""
        answer = self.response
        if isinstance(answer, dict) and isinstance(answer.get("resource"), dict):
            answer = answer["resource"].get("message")
        return int(answer["id"]) if isinstance(answer, dict) and "id" in answer else None


def pings_nobody(allowed_mentions: Any) -> bool:
    """Whether ``allowed_mentions`` is ``AllowedMentions.none()``'s."""
    return (
        isinstance(allowed_mentions, dict)
        and allowed_mentions.get("parse") == []
        and not allowed_mentions.get("users")
        and not allowed_mentions.get("roles")
        and not allowed_mentions.get("replied_user")
    )


class DiscordError(Exception):
    """An error answer with Discord's JSON body, raised by a route handler."""

    def __init__(self, status: int, message: str, code: int = 0) -> None:
        """``status`` with ``{"message": ..., "code": ...}``: Discord's error shape."""
        super().__init__(message)
        self.status = status
        self.payload = {"message": message, "code": code}


def json_response(payload: Any, status: int = 200) -> web.Response:
    """A JSON answer typed exactly ``application/json``: discord.py parses no other type."""
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )


async def read_body(request: web.Request) -> tuple[Any, dict[str, bytes]]:
    """The JSON body (or a multipart's ``payload_json``) and the files of a multipart body."""
    if request.content_type.startswith("multipart/"):
        body: Any = None
        files: dict[str, bytes] = {}
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "payload_json":
                body = json.loads(await part.text())
            elif part.filename is not None:
                files[part.filename] = bytes(await part.read())
        return body, files
    raw = await request.read()
    return (json.loads(raw) if raw else None), {}
