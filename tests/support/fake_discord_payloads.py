"""The objects of the fake Discord (users, roles, channels, a guild) and their JSON payloads.

Payloads have the fields discord.py 2.7 reads without a default (``discord/state.py``,
``guild.py``, ``member.py``, ``message.py``, ``interactions.py``): a field it reads with
``data[...]`` is always present here, so a payload it cannot parse is a bug in this module, not a
difference between the fake and Discord.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: Discord's epoch (2015-01-01), the origin of the timestamp inside every snowflake.
DISCORD_EPOCH_MS = 1_420_070_400_000
#: Permission bits, from Discord's documentation.
ADMINISTRATOR = 1 << 3
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
READ_MESSAGE_HISTORY = 1 << 16
EVERYONE_PERMISSIONS = VIEW_CHANNEL | SEND_MESSAGES | READ_MESSAGE_HISTORY
#: The gateway intent without which Discord sends bots messages without their content.
MESSAGE_CONTENT_INTENT = 1 << 15
#: Message flags.
EPHEMERAL = 1 << 6
#: Interaction types.
APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
AUTOCOMPLETE = 4
#: Channel types.
GUILD_TEXT = 0


def snowflake_age(snowflake: int) -> float:
    """Seconds since the time inside ``snowflake`` (when Discord created what it names)."""
    return time.time() - ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000


class Snowflakes:
    """New IDs in Discord's format (time since its epoch, then a counter), always increasing.

    discord.py derives a message's ``created_at`` from its ID, so IDs made here carry the real
    time; the counter keeps two IDs of one millisecond apart.
    """

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def __call__(self) -> int:
        """A new ID."""
        now_ms = int(time.time() * 1000)
        return ((now_ms - DISCORD_EPOCH_MS) << 22) | (next(self._counter) & 0x3FFFFF)


def timestamp() -> str:
    """Now, as Discord writes times (ISO 8601 with a time zone)."""
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class FakeUser:
    """A Discord account."""

    id: int
    name: str
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        """The user object."""
        return {
            "id": str(self.id),
            "username": self.name,
            "global_name": None,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }


@dataclass(frozen=True)
class FakeRole:
    """A role of the guild; the one whose ID is the guild's is ``@everyone``."""

    id: int
    name: str
    position: int = 1
    permissions: int = 0

    def payload(self) -> dict[str, Any]:
        """The role object."""
        return {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }


@dataclass(frozen=True)
class FakeChannel:
    """A text channel of the guild."""

    id: int
    name: str
    position: int = 0

    def payload(self, guild_id: int) -> dict[str, Any]:
        """The channel object."""
        return {
            "id": str(self.id),
            "type": GUILD_TEXT,
            "guild_id": str(guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [],
            "nsfw": False,
            "topic": None,
            "parent_id": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }

    def partial(self, guild_id: int) -> dict[str, Any]:
        """The channel as an interaction carries it."""
        return {**self.payload(guild_id), "flags": 0}


@dataclass(frozen=True)
class FakeMember:
    """A user in the guild, with the IDs of the roles they hold."""

    user: FakeUser
    role_ids: tuple[int, ...] = ()

    @property
    def id(self) -> int:
        """The user's ID."""
        return self.user.id

    def payload(self, *, with_user: bool = True) -> dict[str, Any]:
        """The member object (a message's ``member`` has no ``user``: it is the author)."""
        data: dict[str, Any] = {
            "roles": [str(role) for role in self.role_ids],
            "nick": None,
            "avatar": None,
            "joined_at": "2024-01-01T00:00:00+00:00",
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.payload()
        return data


@dataclass
class FakeGuild:
    """One server: its channels, roles and members (the bot among them)."""

    id: int
    name: str
    owner_id: int
    channels: list[FakeChannel] = field(default_factory=list)
    roles: list[FakeRole] = field(default_factory=list)
    members: list[FakeMember] = field(default_factory=list)

    def channel(self, channel_id: int) -> FakeChannel | None:
        """The channel with ``channel_id``, if it is this guild's."""
        return next((c for c in self.channels if c.id == channel_id), None)

    def member(self, user_id: int) -> FakeMember | None:
        """The member with ``user_id``, if any."""
        return next((m for m in self.members if m.id == user_id), None)

    def payload(self) -> dict[str, Any]:
        """The full guild, as GUILD_CREATE carries it.

        ``member_count`` equals the members sent, so discord.py sees the guild as chunked and
        has no reason to ask for members (it still may: the gateway answers that too).
        """
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "features": [],
            "mfa_level": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "unavailable": False,
            "large": False,
            "joined_at": "2024-01-01T00:00:00+00:00",
            "member_count": len(self.members),
            "roles": [role.payload() for role in self.roles],
            "emojis": [],
            "stickers": [],
            "channels": [channel.payload(self.id) for channel in self.channels],
            "threads": [],
            "members": [member.payload() for member in self.members],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


def message(
    *,
    message_id: int,
    channel_id: int,
    author: FakeUser,
    content: str,
    guild_id: int | None = None,
    member: FakeMember | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A message object; ``fields`` add to or replace the defaults (``flags``, ``components``…).

    ``guild_id`` and ``member`` are what the gateway's MESSAGE_CREATE adds for a guild message.
    """
    data: dict[str, Any] = {
        "id": str(message_id),
        "type": 0,
        "channel_id": str(channel_id),
        "author": author.payload(),
        "content": content,
        "timestamp": timestamp(),
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "flags": 0,
        "components": [],
    }
    if guild_id is not None:
        data["guild_id"] = str(guild_id)
    if member is not None:
        data["member"] = member.payload(with_user=False)
    data.update(fields)
    return data


def application(app_id: int, name: str, owner: FakeUser, team: list[FakeUser]) -> dict[str, Any]:
    """``GET /oauth2/applications/@me``: owned by ``owner``, or by a team of ``team`` if any.

    Team members are admins (discord.py counts admins and developers as owners).
    """
    data: dict[str, Any] = {
        "id": str(app_id),
        "name": name,
        "icon": None,
        "description": "",
        "bot_public": False,
        "bot_require_code_grant": False,
        "verify_key": "0" * 64,
        "flags": 0,
        "owner": owner.payload(),
        "team": None,
        "interactions_endpoint_url": None,
    }
    if team:
        data["team"] = {
            "id": str(app_id + 1),
            "name": f"{name} team",
            "icon": None,
            "owner_user_id": str(team[0].id),
            "members": [
                {
                    "membership_state": 2,
                    "team_id": str(app_id + 1),
                    "role": "admin",
                    "permissions": ["*"],
                    "user": user.payload(),
                }
                for user in team
            ],
        }
    return data


def interaction(
    *,
    interaction_id: int,
    token: str,
    kind: int,
    data: dict[str, Any],
    application_id: int,
    guild: FakeGuild,
    channel: FakeChannel,
    member: FakeMember,
    message: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An INTERACTION_CREATE payload of type ``kind`` by ``member`` in ``channel``.

    ``message`` is the message a component (type 3) belongs to.
    """
    payload: dict[str, Any] = {
        "id": str(interaction_id),
        "application_id": str(application_id),
        "type": kind,
        "data": data,
        "guild_id": str(guild.id),
        "guild": {"id": str(guild.id), "locale": "en-US", "features": []},
        "channel_id": str(channel.id),
        "channel": channel.partial(guild.id),
        "member": {**member.payload(), "permissions": str(EVERYONE_PERMISSIONS)},
        "token": token,
        "version": 1,
        "app_permissions": str(EVERYONE_PERMISSIONS),
        "locale": "en-US",
        "guild_locale": "en-US",
        "entitlements": [],
        "authorizing_integration_owners": {"0": str(guild.id)},
        "context": 0,
        "attachment_size_limit": 10 * 1024 * 1024,
    }
    if message is not None:
        payload["message"] = message
    return payload
