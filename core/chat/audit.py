"""The audit trail: one record per chat command, as a log line, a Redis stream entry and a post.

An :class:`AuditDraft` is taken when a command arrives (who, where, what, when); the record is
the draft plus how it ended. The draft is plain data so a self-restart can carry it to the next
process, which writes the record once it is back (the process that asked for the restart may be
stopped at any moment after asking).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import discord
import redis.asyncio as aioredis
from discord.ext import commands
from redis.typing import EncodableT, FieldT

from core.chat.fields import finite_number, snowflake
from core.chat.replies import Replies, display_name
from core.ops_exec import bounded, clean_text, redis_errors
from core.settings import COMMANDS
from core.text import cut, format_duration, inline_code

__all__ = ["AUDIT_LOGGER", "AUDIT_MAXLEN", "AuditDraft", "AuditSink"]

#: The logger of the audit lines (one JSON object each); operators route it by this name.
AUDIT_LOGGER: Final = "cogs.admin_ops.audit"
#: The audit stream keeps roughly this many entries.
AUDIT_MAXLEN: Final = 10_000
#: How a confirmation prompt can end, as a record says it.
CONFIRMATIONS: Final = ("confirmed", "cancelled", "timed out")
#: The longest detail kept in a record.
DETAIL_LIMIT: Final = 300

# What a stored draft may hold: Discord's own limits, with room to spare (a display name with
# its Markdown escaped may double).
_NAME_LIMIT: Final = 200
_PREFIX_LIMIT: Final = 64
_ARG_LIMIT: Final = 2000
_MAX_ARGS: Final = 8
_INVOCATION_ID: Final = re.compile(r"[0-9a-f]{1,64}")

# Trouble writing the trail goes to the cog's log, not into the trail itself.
log = logging.getLogger("cogs.admin_ops")
audit_log = logging.getLogger(AUDIT_LOGGER)


@dataclass(frozen=True, kw_only=True)
class AuditDraft:
    """Everything of an audit record but its outcome: who asked for what, where and when."""

    #: Ties the record to the invocation, also when another process writes it.
    invocation: str
    user_id: int
    user: str
    #: The requester's display name, Markdown made inert, for the audit channel.
    user_shown: str
    guild_id: int | None
    guild: str | None
    channel_id: int
    channel: str
    command: str
    #: The arguments as typed, redacted.
    args: tuple[str, ...]
    #: The prefix the command was typed with (``!``).
    prefix: str
    #: Wall-clock time the command arrived.
    started_at: float
    #: How its confirmation prompt was answered (``confirmed``, ``cancelled``, ``timed out``);
    #: None when it asked for none.
    confirmation: str | None = None

    @classmethod
    def of(
        cls,
        ctx: commands.Context[Any],
        command: str,
        args: Sequence[str],
        clean: Callable[[str], str],
    ) -> AuditDraft:
        """The draft for ``command`` as ``ctx`` invoked it; ``clean`` redacts the arguments."""
        guild = ctx.guild
        # Stored as it will be checked when read back (a self-restart's next process must be
        # able to write the record): names on one line, without controls, within the limits.
        return cls(
            invocation=uuid.uuid4().hex,
            user_id=ctx.author.id,
            user=_as_name(str(ctx.author), _NAME_LIMIT),
            user_shown=_as_name(display_name(ctx.author), 2 * _NAME_LIMIT),
            guild_id=guild.id if guild else None,
            guild=_as_name(guild.name, _NAME_LIMIT) if guild else None,
            channel_id=ctx.channel.id,
            channel=_as_name(getattr(ctx.channel, "name", None) or "DM", _NAME_LIMIT),
            command=command,
            args=tuple(cut(clean(arg), _ARG_LIMIT) for arg in args[:_MAX_ARGS]),
            prefix=_as_name(ctx.clean_prefix, _PREFIX_LIMIT),
            started_at=time.time(),
        )

    @classmethod
    def standing_in(
        cls,
        *,
        command: str,
        user_id: int,
        user: str,
        guild_id: int | None,
        channel_id: int,
        started_at: float,
    ) -> AuditDraft:
        """A draft made of checked ids, for an invocation whose own draft was lost.

        A record with less detail is better than none: an audit trail must not have holes.
        """
        name = _as_name(user, _NAME_LIMIT)
        return cls(
            invocation=uuid.uuid4().hex,
            user_id=user_id,
            user=name,
            user_shown=name,
            guild_id=guild_id,
            guild=None,
            channel_id=channel_id,
            channel="?",
            command=command,
            args=(),
            prefix="",
            started_at=started_at,
        )

    def to_json(self) -> dict[str, Any]:
        """The draft as a JSON object (kept in a restart marker)."""
        data = asdict(self)
        data["args"] = list(self.args)
        return data

    @classmethod
    def from_json(cls, data: object) -> AuditDraft | None:
        """The draft saved by :meth:`to_json`, or None when ``data`` is not one.

        Strict: every field must have the type and size this bot writes, so a draft that did
        not come from here cannot become a record.
        """
        if not isinstance(data, Mapping):
            return None
        try:
            fields = {name: check(data[name]) for name, check in _DRAFT_FIELDS.items()}
            # Absent from drafts written before confirmations existed (the restart that
            # brings this version in was asked for by the previous one).
            confirmation = _confirmation(data.get("confirmation"))
        except (KeyError, TypeError, ValueError):
            return None
        return cls(**fields, confirmation=confirmation)


def _as_name(text: str, limit: int) -> str:
    """``text`` as a stored name: no controls or escapes, one line, at most ``limit`` long."""
    return cut(clean_text(text).replace("\n", " ").replace("\t", " "), limit)


def _text(limit: int, *, one_line: bool = True) -> Callable[[object], str]:
    """A text of at most ``limit`` characters; a name is one line without control characters."""

    def check(value: object) -> str:
        if not isinstance(value, str) or len(value) > limit:
            raise ValueError(f"not a text of at most {limit} characters")
        if one_line and (clean_text(value) != value or "\n" in value or "\t" in value):
            raise ValueError("not a name")
        return value

    return check


def _optional(check: Callable[[object], Any]) -> Callable[[object], Any]:
    return lambda value: None if value is None else check(value)


def _args(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > _MAX_ARGS:
        raise ValueError("not a list of arguments")
    return tuple(_text(_ARG_LIMIT, one_line=False)(arg) for arg in value)


def _command(value: object) -> str:
    if value not in COMMANDS:
        raise ValueError("not a command of this bot")
    return str(value)


def _confirmation(value: object) -> str | None:
    if value is not None and value not in CONFIRMATIONS:
        raise ValueError("not an answer to a confirmation prompt")
    return value if isinstance(value, str) else None


def _invocation(value: object) -> str:
    if not isinstance(value, str) or not _INVOCATION_ID.fullmatch(value):
        raise ValueError("not an invocation id")
    return value


#: Each field of a stored draft and how it is checked.
_DRAFT_FIELDS: Final[Mapping[str, Callable[[object], Any]]] = {
    "invocation": _invocation,
    "user_id": snowflake,
    "user": _text(_NAME_LIMIT),
    "user_shown": _text(2 * _NAME_LIMIT),
    "guild_id": _optional(snowflake),
    "guild": _optional(_text(_NAME_LIMIT)),
    "channel_id": snowflake,
    "channel": _text(_NAME_LIMIT),
    "command": _command,
    "args": _args,
    "prefix": _text(_PREFIX_LIMIT),
    "started_at": finite_number,
}


class AuditSink:
    """Write audit records: a log line, the Redis stream (with Redis), the audit channel."""

    def __init__(
        self,
        bot: commands.Bot,
        replies: Replies,
        *,
        redis: aioredis.Redis | None,
        stream: str,
        channel_id: int | None,
    ) -> None:
        """Post to ``channel_id`` when set; add to ``stream`` when a Redis client is given."""
        self.bot = bot
        self.replies = replies
        self.redis = redis
        self.stream = stream
        self.channel_id = channel_id

    async def write(
        self, draft: AuditDraft, status: str, detail: str, duration: float, *, post: bool = True
    ) -> None:
        """Record how ``draft``'s invocation ended: ``status``, ``detail``, after ``duration`` s.

        The log line and the stream entry are always written; ``post=False`` leaves out the
        audit channel's line (a refusal flood).
        """
        record: dict[str, Any] = {
            "user_id": draft.user_id,
            "user": draft.user,
            "guild_id": draft.guild_id,
            "guild": draft.guild,
            "channel_id": draft.channel_id,
            "channel": draft.channel,
            "command": draft.command,
            "args": list(draft.args),
            "outcome": status,
            "detail": self.replies.redact(detail.strip())[:DETAIL_LIMIT],
            "duration_s": round(duration, 3),
            "invocation": draft.invocation,
            "confirmation": draft.confirmation,
        }
        audit_log.info("%s", json.dumps(record, ensure_ascii=False))
        await self._add_to_stream(record)
        if post:
            await self._post(draft, status, duration)

    async def _add_to_stream(self, record: Mapping[str, Any]) -> None:
        if self.redis is None:
            return
        fields: dict[FieldT, EncodableT] = {
            key: json.dumps(value) if isinstance(value, list) else str(value or "")
            for key, value in record.items()
        }
        fields["duration_s"] = str(record["duration_s"])
        try:
            await bounded(
                self.redis.xadd(self.stream, fields, maxlen=AUDIT_MAXLEN, approximate=True)
            )
        except redis_errors() as exc:
            log.warning("audit: cannot XADD to %s: %s", self.stream, exc)

    async def _post(self, draft: AuditDraft, status: str, duration: float) -> None:
        if self.channel_id is None:
            return
        channel = self.bot.get_channel(self.channel_id)
        if not isinstance(channel, discord.abc.Messageable):
            log.warning("audit channel %s not found", self.channel_id)
            return
        typed = " ".join([f"{draft.prefix}{draft.command}", *draft.args])
        # A thread's name is free text: Markdown in it must not become a link.
        channel_name = discord.utils.escape_markdown(draft.channel)
        where = f"#{channel_name}" if draft.guild_id is not None else "a DM"
        line = (
            f"{inline_code(typed)} by {draft.user_shown} ({draft.user_id}) "
            f"in {where}: {status} ({format_duration(duration)})"
        )
        await self.replies.post(channel, line)
