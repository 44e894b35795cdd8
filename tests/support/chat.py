"""A dpytest harness for the cog: a configured bot, roles, a send spy, a systemctl stand-in.

Notes on dpytest 0.7.0 with discord.py 2.7 (see issue 3): ``setup_hook`` is never called and the
bot is never marked ready; ``_async_setup_hook`` gives it a loop (``ctx.typing()`` needs one) and
a ``_ready`` event; the bot is not closed in teardown. dpytest drops the text of messages that
carry a file and the reply reference of every message, so outgoing messages are read from a spy
on ``handle_message_parameters`` instead of dpytest's queue.
"""

from __future__ import annotations

import json
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
import discord.abc
import discord.ext.test as dpytest
import discord.message
import pytest
from discord.ext import commands

from cogs.admin_ops import AdminOps
from core.settings import Settings

#: The logger of the audit lines, spelt out rather than imported: operators route it by this name.
AUDIT_LOGGER = "cogs.admin_ops.audit"


def stored_marker(raw: bytes | str | None) -> dict[str, Any]:
    """The restart marker in a value stored in Redis (signed: the marker is its payload)."""
    assert raw is not None, "no marker in Redis"
    payload = json.loads(raw)["payload"]
    return dict(json.loads(payload))


def audit_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """Every audit record logged during the test, parsed."""
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT_LOGGER]


class FakeClock:
    """A monotonic clock that moves only when a test moves it (``clock.now += 30``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Sent:
    """One outgoing message as the bot handed it to discord.py."""

    content: str | None
    allowed_mentions: Any
    reference: int | None
    files: dict[str, str]
    at: float


def _payload(params: Any) -> dict[str, Any]:
    if params.payload is not None:
        return dict(params.payload)
    for part in params.multipart or ():
        if part.get("name") == "payload_json":
            return dict(json.loads(part["value"]))
    raise AssertionError("no payload in the outgoing message")


def spy_on_sends(monkeypatch: pytest.MonkeyPatch, records: list[Sent]) -> None:
    """Record every message the bot sends or edits, before discord.py sends it."""

    def spy_on(module: Any) -> None:
        real = module.handle_message_parameters

        def spy(*args: Any, **kwargs: Any) -> Any:
            params = real(*args, **kwargs)
            payload = _payload(params)
            files = {}
            for file in params.files or ():
                files[file.filename] = file.fp.getvalue().decode()
            ref = payload.get("message_reference")
            records.append(
                Sent(
                    content=payload.get("content"),
                    allowed_mentions=payload.get("allowed_mentions"),
                    reference=int(ref["message_id"]) if ref else None,
                    files=files,
                    at=time.time(),
                )
            )
            return params

        monkeypatch.setattr(module, "handle_message_parameters", spy)

    spy_on(discord.abc)
    spy_on(discord.message)


def pings_nobody(record: Sent) -> bool:
    """Whether the message's allowed mentions are ``AllowedMentions.none()``'s."""
    mentions = record.allowed_mentions
    return (
        isinstance(mentions, dict)
        and mentions.get("parse") == []
        and "users" not in mentions
        and "roles" not in mentions
        and not mentions.get("replied_user")
    )


class SystemctlStub:
    """A stand-in ``systemctl`` that records its argv and when it ran, and fails on request.

    Like systemd it knows when each unit last became active (``show
    --property=ActiveEnterTimestampMonotonic``, CLOCK_MONOTONIC microseconds, which is
    ``time.monotonic()`` in every process): since boot until a restart, or what a test set.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "systemctl"
        self.log = directory / "systemctl-calls.jsonl"
        self.behaviour = directory / "systemctl-behaviour"
        self.starts = directory / "systemctl-starts.json"
        self.path.write_text(
            f"#!{sys.executable}\n"
            "import json, sys, time\n"
            f"starts_file = {str(self.starts)!r}\n"
            "try:\n"
            "    starts = json.load(open(starts_file))\n"
            "except FileNotFoundError:\n"
            "    starts = {}\n"
            f"with open({str(self.log)!r}, 'a') as log:\n"
            "    log.write(json.dumps({'argv': sys.argv[1:], 'at': time.time()}) + '\\n')\n"
            "if 'is-active' in sys.argv:\n"
            "    print('active')\n"
            "    sys.exit(0)\n"
            "if 'show' in sys.argv:\n"
            "    print(int(starts.get(sys.argv[-1], 1.0) * 1e6))\n"
            "    sys.exit(0)\n"
            "try:\n"
            f"    code, err = open({str(self.behaviour)!r}).read().split('\\n', 1)\n"
            "except FileNotFoundError:\n"
            "    code, err = '0', ''\n"
            "if code == '0' and 'restart' in sys.argv:\n"
            "    starts[sys.argv[-1]] = time.monotonic()\n"
            "    json.dump(starts, open(starts_file, 'w'))\n"
            "sys.stderr.write(err)\n"
            "sys.exit(int(code))\n"
        )
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR)

    def fail(self, code: int, stderr: str) -> None:
        """Make every later restart exit with ``code`` after printing ``stderr``."""
        self.behaviour.write_text(f"{code}\n{stderr}")

    def started(self, unit: str, seconds_ago: float) -> None:
        """Say ``unit`` became active ``seconds_ago`` seconds ago."""
        starts = json.loads(self.starts.read_text()) if self.starts.exists() else {}
        starts[unit] = time.monotonic() - seconds_ago
        self.starts.write_text(json.dumps(starts))

    def calls(self, verb: str = "restart") -> list[dict[str, Any]]:
        """The recorded runs whose argv contains ``verb``."""
        if not self.log.exists():
            return []
        runs = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [run for run in runs if verb in run["argv"]]


def make_bot() -> commands.Bot:
    """A bot like bot.py's but with default allowed mentions, so the cog has to set them."""
    intents = discord.Intents.default()
    intents.message_content = True
    intents.members = True
    return commands.Bot(command_prefix="!", intents=intents)


@dataclass
class Harness:
    """A configured dpytest guild with an ``ops`` role, and helpers to run the cog in it."""

    bot: commands.Bot
    guild: discord.Guild
    channel: discord.TextChannel
    other_channel: discord.TextChannel
    admins: list[discord.Member]
    outsider: discord.Member
    ops_role: discord.Role
    other_role: discord.Role
    state_dir: Path
    base_env: dict[str, str]
    exits: list[int] = field(default_factory=list)

    def settings(self, **env: str) -> Settings:
        """Settings from the harness defaults plus ``env`` (through the real parser)."""
        return Settings.from_env({**self.base_env, **env})

    async def add_cog(
        self, settings: Settings | None = None, redis: Any = None, **kwargs: Any
    ) -> AdminOps:
        cog = AdminOps(
            self.bot,
            settings=settings or self.settings(),
            redis=redis,
            exit_process=self.exits.append,
            **kwargs,
        )
        await self.bot.add_cog(cog)
        return cog

    async def remove_cog(self) -> None:
        await self.bot.remove_cog("AdminOps")

    async def reload_and_get_ready(self, **kwargs: Any) -> AdminOps:
        """What a restart looks like to the cog: loaded again, then the bot becomes ready."""
        if "AdminOps" in self.bot.cogs:
            await self.remove_cog()
        cog = await self.add_cog(**kwargs)
        self.bot._ready.set()
        self.bot.dispatch("ready")
        await dpytest.run_all_events()
        assert cog.back_online_task is not None
        await cog.back_online_task
        return cog

    async def say(
        self, content: str, member: discord.Member | None = None, channel: Any = None
    ) -> discord.Message:
        """Post ``content`` as ``member`` and wait until every handler finished."""
        return await dpytest.message(
            content, channel=channel or self.channel, member=member or self.admins[0]
        )


@dataclass
class StrangerServer:
    """Someone else's server with the bot in it, set up the way an attacker would.

    Eve holds a role called ``ops`` there, Trudy a role with the same ID as the harness's
    ``ops`` role (as far as the bot can tell), and Alice (the harness's admin) is a member too.
    """

    guild: discord.Guild
    channel: discord.TextChannel
    eve: discord.Member
    trudy: discord.Member
    alice: discord.Member


async def stranger_server(harness: Harness) -> StrangerServer:
    """Add a second server to the harness's bot: see :class:`StrangerServer`."""
    backend = dpytest.backend
    guild = backend.make_guild("Strangers")
    channel = backend.make_text_channel("ops", guild)
    backend.make_member(backend.get_state().user, guild)  # the bot, invited
    named_ops = backend.make_role("ops", guild)
    same_id = backend.make_role("ops-by-id", guild, id_num=harness.ops_role.id)
    eve = backend.make_member(backend.make_user("eve", 1), guild)
    trudy = backend.make_member(backend.make_user("trudy", 2), guild)
    alice_user = harness.bot.get_user(harness.admins[0].id)
    assert alice_user is not None
    alice = backend.make_member(alice_user, guild)
    await dpytest.add_role(eve, named_ops)
    await dpytest.add_role(trudy, same_id)
    assert any(role.id == harness.ops_role.id for role in trudy.roles)
    return StrangerServer(guild, channel, eve, trudy, alice)


async def configured_bot(
    *, members: list[str] | None = None
) -> tuple[commands.Bot, dpytest.RunnerConfig]:
    """A fresh bot in a fresh dpytest guild, with a loop and a (not set) ready event."""
    bot = make_bot()
    dpytest.configure(
        bot, text_channels=["ops", "general"], members=members or ["alice", "bob", "mallory"]
    )
    await bot._async_setup_hook()
    config = dpytest.get_config()
    for member in config.members:
        # dpytest nicknames everyone "<name>_<n>_nick"; plain names read better in assertions.
        dpytest.backend.update_member(member, nick=member.name)
    # The application owner is nobody in the guild unless a test says otherwise.
    bot.owner_id = 1
    return bot, config


def replies_to(sent: list[Sent], message: discord.Message) -> list[Sent]:
    """The outgoing messages that reply to ``message``."""
    return [s for s in sent if s.reference == message.id]


def only_reply(sent: list[Sent], message: discord.Message) -> Sent:
    """The single reply to ``message`` (fails when there is none or more than one)."""
    found = replies_to(sent, message)
    assert len(found) == 1, f"expected one reply, got {found}"
    return found[0]
