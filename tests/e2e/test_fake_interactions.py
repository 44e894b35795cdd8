"""The fake's application commands, interactions and components, spoken by discord.py itself.

``interaction_bot.py`` is a plain discord.py bot (not admin-ops): these tests show that what the
fake sends parses in discord.py and what discord.py answers is recorded as Discord would see it,
so tests of admin-ops' own slash commands and buttons can rely on the fake.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.fake_discord import FakeDiscord, Recorded
from tests.support.fake_discord_bot import BotProcess, bot_env, start_bot

CALLBACK = "POST /interactions/{interaction_id}/{token}/callback"
SCRIPT = Path(__file__).resolve().parent / "interaction_bot.py"


@pytest.fixture
async def interaction_bot(fake_discord: FakeDiscord, tmp_path: Path) -> AsyncIterator[BotProcess]:
    env = bot_env(fake_discord, tmp_path / "state", TEST_GUILD_ID=str(fake_discord.guild.id))
    bot = await start_bot(
        fake_discord, env, tmp_path / "bot.log", argv=[sys.executable, str(SCRIPT)]
    )
    try:
        await bot.wait_ready()
        yield bot
    finally:
        await bot.kill()


def callbacks(fake: FakeDiscord, token: str) -> list[Recorded]:
    return [r for r in fake.sent(CALLBACK) if r.params["token"] == token]


async def test_guild_commands_are_registered_in_the_guild_only(
    interaction_bot: BotProcess, fake_discord: FakeDiscord
) -> None:
    put = await interaction_bot.until(
        lambda: next(
            iter(
                fake_discord.sent("PUT /applications/{application_id}/guilds/{guild_id}/commands")
            ),
            None,
        ),
        what="guild command sync",
    )
    assert put.params["guild_id"] == str(fake_discord.guild.id)
    names = ["confirm", "note", "ping", "slow", "unit"]
    assert sorted(c["name"] for c in put.json) == names
    assert sorted(c["name"] for c in fake_discord.commands[fake_discord.guild.id]) == names
    assert fake_discord.sent("PUT /applications/{application_id}/commands") == []
    assert fake_discord.commands[None] == []


async def test_a_command_answered_ephemerally(
    interaction_bot: BotProcess, fake_discord: FakeDiscord
) -> None:
    asked = await fake_discord.invoke("ping", by=fake_discord.alice)

    (answer,) = await interaction_bot.until(
        lambda: callbacks(fake_discord, asked.token), what="callback"
    )

    assert answer.json["type"] == 4
    assert answer.content == "pong"
    assert answer.ephemeral
    assert asked.original_id is not None


async def test_a_deferred_command_follows_up_and_edits_its_original_response(
    interaction_bot: BotProcess, fake_discord: FakeDiscord
) -> None:
    asked = await fake_discord.invoke("slow", by=fake_discord.alice)

    edit = await interaction_bot.until(
        lambda: next(
            iter(
                fake_discord.sent("PATCH /webhooks/{application_id}/{token}/messages/{message_id}")
            ),
            None,
        ),
        what="edit of the original response",
    )

    (deferred,) = callbacks(fake_discord, asked.token)
    assert deferred.json["type"] == 5
    (followup,) = fake_discord.sent("POST /webhooks/{application_id}/{token}")
    assert followup.content == "done"
    assert followup.params["token"] == asked.token
    assert edit.params["message_id"] == "@original"
    assert edit.content == "finished"
    assert deferred.seq < followup.seq < edit.seq
    assert fake_discord.messages[asked.original_id or 0]["content"] == "finished"


async def test_a_button_pressed_by_someone_else_then_by_the_invoker(
    interaction_bot: BotProcess, fake_discord: FakeDiscord
) -> None:
    asked = await fake_discord.invoke("confirm", by=fake_discord.alice)
    (prompt,) = await interaction_bot.until(
        lambda: callbacks(fake_discord, asked.token), what="prompt"
    )
    assert prompt.content == "Sure?"
    assert not prompt.ephemeral
    (row,) = prompt.components
    assert row["components"][0]["custom_id"] == "confirm"
    assert asked.original_id is not None

    by_bob = await fake_discord.press(asked.original_id, "confirm", by=fake_discord.bob)
    (refused,) = await interaction_bot.until(
        lambda: callbacks(fake_discord, by_bob.token), what="refusal"
    )
    by_alice = await fake_discord.press(asked.original_id, "confirm", by=fake_discord.alice)
    (confirmed,) = await interaction_bot.until(
        lambda: callbacks(fake_discord, by_alice.token), what="update"
    )

    assert (refused.json["type"], refused.content, refused.ephemeral) == (
        4,
        "Only the invoker can confirm.",
        True,
    )
    assert confirmed.json["type"] == 7
    assert confirmed.content == "Confirmed."
    assert confirmed.components[0]["components"][0]["disabled"] is True
    stored = fake_discord.messages[asked.original_id]
    assert stored["content"] == "Confirmed."
    assert fake_discord.unhandled() == []


async def test_a_channel_message_sent_then_edited(
    interaction_bot: BotProcess, fake_discord: FakeDiscord
) -> None:
    await fake_discord.invoke("note", by=fake_discord.alice)

    edit = await interaction_bot.until(
        lambda: next(
            iter(fake_discord.sent("PATCH /channels/{channel_id}/messages/{message_id}")), None
        ),
        what="message edit",
    )

    (posted,) = fake_discord.sent()
    assert posted.content == "draft"
    assert edit.params["message_id"] == str(posted.created_id)
    assert edit.content == "final"
    assert fake_discord.messages[posted.created_id or 0]["content"] == "final"


async def test_autocomplete_then_the_command_with_the_chosen_value(
    interaction_bot: BotProcess, fake_discord: FakeDiscord
) -> None:
    typing = await fake_discord.autocomplete("unit", "name", "ng", by=fake_discord.alice)
    (suggested,) = await interaction_bot.until(
        lambda: callbacks(fake_discord, typing.token), what="autocomplete result"
    )
    chosen = suggested.body["choices"][0]["value"]
    asked = await fake_discord.invoke(
        "unit", by=fake_discord.alice, options=[{"name": "name", "type": 3, "value": chosen}]
    )
    (answer,) = await interaction_bot.until(
        lambda: callbacks(fake_discord, asked.token), what="answer"
    )

    assert suggested.json["type"] == 8
    assert suggested.body["choices"] == [{"name": "nginx.service", "value": "nginx.service"}]
    assert answer.content == "picked nginx.service"


async def test_without_the_message_content_intent_a_bot_gets_messages_without_content(
    interaction_bot: BotProcess, fake_discord: FakeDiscord
) -> None:
    """interaction_bot.py asks for the default intents only, as slash-first bots do."""
    bot_id = fake_discord.bot_user.id

    plain = await fake_discord.post("!bot_pull", by=fake_discord.alice)
    mention = await fake_discord.post(f"<@{bot_id}> hello", by=fake_discord.alice)

    assert plain["content"] == ""
    assert mention["content"] == f"<@{bot_id}> hello"
    assert fake_discord.messages[int(plain["id"])]["content"] == "!bot_pull"
