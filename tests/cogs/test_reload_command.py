"""``!ops_reload``: real extension files, edited on disk and reloaded; the cog reloading itself."""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import discord.ext.test as dpytest
import pytest
import redis.asyncio as aioredis
from discord.ext import commands

from tests.support.chat import AUDIT_LOGGER, Harness, Sent, audit_records, only_reply
from tests.support.redis_proc import RedisServer


def source(version: str, *, broken: bool = False) -> str:
    body = "    bot.demo_versions = {**getattr(bot, 'demo_versions', {}), __name__: VERSION}\n"
    return (
        "from discord.ext import commands\n\n"
        f"VERSION = {version!r}\n"
        + ("def oops(:\n" if broken else "")
        + "\n\nasync def setup(bot: commands.Bot) -> None:\n"
        + body
    )


@pytest.fixture
async def extensions(
    tmp_path: Path, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[str], Path]]:
    """Load extensions from files in a directory of their own: ``load(name)``."""
    directory = tmp_path / "exts"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    # An edit within the same second must not be hidden by a cached .pyc.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    names: list[str] = []

    def write(name: str) -> Path:
        path = directory / f"{name}.py"
        path.write_text(source("1"))
        names.append(name)
        return path

    yield write
    for name in names:
        sys.modules.pop(name, None)


def versions(harness: Harness) -> dict[str, str]:
    return dict(getattr(harness.bot, "demo_versions", {}))


def unique(label: str) -> str:
    return f"opsdemo_{label}_{uuid.uuid4().hex[:8]}"


async def test_without_names_only_extensions_changed_on_disk_are_reloaded(
    harness: Harness, extensions: Callable[[str], Path], sent: list[Sent]
) -> None:
    edited, untouched = unique("edited"), unique("untouched")
    path = extensions(edited)
    extensions(untouched)
    await harness.bot.load_extension(edited)
    await harness.add_cog()
    # Loaded after the cog, as a bot's setup_hook may: seen when the bot becomes ready.
    await harness.bot.load_extension(untouched)
    harness.bot.dispatch("ready")
    await dpytest.run_all_events()
    path.write_text(source("2"))
    extensions_dir = path.parent
    (extensions_dir / f"{untouched}.py").write_text(source("2"))

    message = await harness.say("!ops_reload")

    assert sorted((only_reply(sent, message).content or "").splitlines()) == sorted(
        [f"✅ `{edited}` reloaded", f"✅ `{untouched}` reloaded"]
    )
    assert versions(harness) == {edited: "2", untouched: "2"}


async def test_an_extension_edited_back_as_it_was_is_not_reloaded(
    harness: Harness, extensions: Callable[[str], Path], sent: list[Sent]
) -> None:
    name, other = unique("same"), unique("other")
    path = extensions(name)
    other_path = extensions(other)
    for each in (name, other):
        await harness.bot.load_extension(each)
    await harness.add_cog()
    path.write_text(source("2"))
    path.write_text(source("1"))  # touched, but the same source: what runs is what is on disk
    other_path.write_text(source("2"))

    message = await harness.say("!ops_reload")

    assert only_reply(sent, message).content == f"✅ `{other}` reloaded"
    assert versions(harness) == {name: "1", other: "2"}


async def test_named_extensions_are_reloaded_changed_or_not(
    harness: Harness, extensions: Callable[[str], Path], sent: list[Sent]
) -> None:
    first, second = unique("first"), unique("second")
    for name in (first, second):
        extensions(name)
        await harness.bot.load_extension(name)
    await harness.add_cog()

    message = await harness.say(f"!ops_reload {second} {first}")

    assert only_reply(sent, message).content == f"✅ `{second}` reloaded\n✅ `{first}` reloaded"


async def test_a_broken_edit_keeps_the_previous_version_running(
    harness: Harness,
    extensions: Callable[[str], Path],
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, broken = unique("good"), unique("broken")
    good_path, broken_path = extensions(good), extensions(broken)
    for name in (good, broken):
        await harness.bot.load_extension(name)
    await harness.add_cog(harness.settings(OPS_COOLDOWN_OPS_RELOAD="0"))
    good_path.write_text(source("2"))
    broken_path.write_text(source("2", broken=True))

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!ops_reload")

    lines = (only_reply(sent, message).content or "").splitlines()
    assert sorted(lines) == sorted(
        [
            f"✅ `{good}` reloaded",
            f"❌ `{broken}` kept the previous version: `SyntaxError: invalid syntax "
            f"({broken}.py, line 4)`",
        ]
    )
    assert versions(harness) == {good: "2", broken: "1"}
    assert broken in harness.bot.extensions
    (record,) = audit_records(caplog)
    assert record["outcome"] == "failed"
    # Fixed on disk, it is still "changed since loaded" and the next run takes it.
    broken_path.write_text(source("3"))
    again = await harness.say("!ops_reload")
    assert only_reply(sent, again).content == f"✅ `{broken}` reloaded"
    assert versions(harness)[broken] == "3"


async def test_unknown_or_unloaded_names_get_the_list_of_loaded_extensions(
    harness: Harness, extensions: Callable[[str], Path], sent: list[Sent]
) -> None:
    loaded, on_disk = unique("loaded"), unique("ondisk")
    extensions(loaded)
    extensions(on_disk)
    await harness.bot.load_extension(loaded)
    await harness.add_cog()

    message = await harness.say(f"!ops_reload {on_disk}")

    assert only_reply(sent, message).content == (
        f"`{on_disk}` is not a loaded extension. Loaded: `{loaded}`."
    )
    assert on_disk not in sys.modules


async def test_nothing_changed_reloads_nothing_and_keeps_no_cooldown(
    harness: Harness, extensions: Callable[[str], Path], sent: list[Sent]
) -> None:
    name = unique("same")
    extensions(name)
    await harness.bot.load_extension(name)
    await harness.add_cog()

    first = await harness.say("!ops_reload")
    second = await harness.say("!ops_reload")

    for message in (first, second):
        assert only_reply(sent, message).content == (
            "✅ No loaded extension changed since it was loaded: nothing reloaded."
        )


async def test_the_cog_reloads_itself_and_still_replies_records_and_keeps_its_cooldown(
    harness: Harness,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bot: Any = harness.bot
    bot.settings = harness.settings(REDIS_URL=redis_server.url, OPS_CONTROL_PREFIX=key_prefix)
    await bot.load_extension("cogs.admin_ops")
    old = bot.get_cog("AdminOps")
    assert old is not None
    assert old.redis is not None
    closed: list[bool] = []
    close = old.redis.aclose

    async def watched_close() -> None:
        closed.append(old.pipeline.busy)
        await close()

    monkeypatch.setattr(old.redis, "aclose", watched_close)

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!ops_reload cogs.admin_ops")

    assert only_reply(sent, message).content == "✅ `cogs.admin_ops` reloaded"
    new = bot.get_cog("AdminOps")
    assert new is not None
    assert new is not old
    assert type(new) is not type(old)  # the module was imported anew
    (record,) = audit_records(caplog)
    assert (record["command"], record["outcome"]) == ("ops_reload", "ok")
    # The record reached Redis through the old instance's client, closed only afterwards.
    entries = await redis_client.xrange(f"{key_prefix}:audit")
    assert [fields[b"command"] for _, fields in entries] == [b"ops_reload"]
    assert old.closing_task is not None
    await old.closing_task
    assert closed == [False]
    # The cooldown lives in Redis: the new instance keeps it.
    again = await harness.say("!ops_reload cogs.admin_ops")
    assert (only_reply(sent, again).content or "").startswith(
        "`!ops_reload` is cooling down — try again in "
    )
    await bot.unload_extension("cogs.admin_ops")


async def test_reload_checks_come_first(harness: Harness, sent: list[Sent]) -> None:
    """Someone without the role learns nothing about the loaded extensions."""
    await harness.add_cog()

    message = await harness.say("!ops_reload nope", member=harness.outsider)

    assert only_reply(sent, message).content == "You need an ops role to run `!ops_reload`."
    assert isinstance(harness.bot, commands.Bot)
