"""Confirm and Cancel in front of ``OPS_CONFIRM``'s commands, pressed through the real ``bot.py``.

tests/cogs/test_confirmations.py covers the pipeline around a scripted answer (what runs, what is
taken, what is recorded); dpytest cannot press buttons. Here discord.py's own view machinery gets
the presses as Discord sends them (INTERACTION_CREATE type 3), and the fake records what the bot
answers: the question in the channel for all to see, a stranger's press refused privately, the
invoker's press editing the question before the command runs, no answer editing it once the
timeout is over, the buttons disabled every time it ends.
"""

from __future__ import annotations

from typing import Any

from tests.support.chat import SystemctlStub
from tests.support.fake_discord import FakeDiscord, Recorded, pings_nobody
from tests.support.fake_discord_bot import BotProcess, StartBot

CALLBACK = "POST /interactions/{interaction_id}/{token}/callback"
FOLLOWUP = "POST /webhooks/{application_id}/{token}"
EDIT = "PATCH /channels/{channel_id}/messages/{message_id}"
#: Interaction callback types: a message, and the edit of the pressed button's message.
CHANNEL_MESSAGE, UPDATE_MESSAGE = 4, 7


def buttons(message: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The buttons under a message, by label."""
    return {
        item["label"]: item
        for row in message.get("components") or []
        for item in row.get("components") or []
    }


async def callback_to(bot: BotProcess, fake: FakeDiscord, token: str) -> Recorded:
    """The bot's answer to one interaction (by its token)."""
    return await bot.until(
        lambda: next((r for r in fake.sent(CALLBACK) if r.params["token"] == token), None),
        what="the answer to an interaction",
    )


async def test_only_the_invoker_answers_a_slash_commands_question(
    start_bots: StartBot, fake_discord: FakeDiscord, systemctl: SystemctlStub
) -> None:
    """Cancel runs nothing; a stranger's Confirm is refused; the invoker's runs the command."""
    bot = await start_bots(OPS_PROXY_SERVICE="proxy.service", OPS_CONFIRM="proxy_restart")
    await bot.wait_ready()
    await bot.wait_synced()
    alice, bob = fake_discord.alice, fake_discord.bob
    assert alice is not None
    assert bob is not None

    # Cancelled by alice: the question says so at once, and nothing ran.
    first = await fake_discord.invoke("proxy_restart", by=alice)
    asked = await callback_to(bot, fake_discord, first.token)
    assert (asked.json["type"], asked.ephemeral) == (CHANNEL_MESSAGE, False)  # for all to see
    assert asked.content == "Run `/proxy_restart`?"
    prompt = fake_discord.original(first)
    assert prompt is not None
    cancel = await fake_discord.press(
        int(prompt["id"]), buttons(prompt)["Cancel"]["custom_id"], by=alice
    )
    cancelled = await callback_to(bot, fake_discord, cancel.token)
    assert (cancelled.json["type"], cancelled.content) == (UPDATE_MESSAGE, "Cancelled by alice.")
    assert all(button["disabled"] for button in buttons(prompt).values())
    # Running until its record is written (a second one meanwhile would be "already running").
    (record,) = await bot.wait_audit(1)
    assert (record["outcome"], record["confirmation"]) == ("cancelled", "cancelled")

    # Asked again (Cancel took no cooldown); bob's press is refused privately and runs nothing.
    second = await fake_discord.invoke("proxy_restart", by=alice)
    assert (await callback_to(bot, fake_discord, second.token)).content == asked.content
    prompt = fake_discord.original(second)
    assert prompt is not None
    confirm_id = buttons(prompt)["Confirm"]["custom_id"]
    stranger = await fake_discord.press(int(prompt["id"]), confirm_id, by=bob)
    refused = await callback_to(bot, fake_discord, stranger.token)
    assert (refused.json["type"], refused.ephemeral) == (CHANNEL_MESSAGE, True)
    assert refused.content == "Only alice can confirm this."
    assert pings_nobody(refused.allowed_mentions)
    assert systemctl.calls() == []
    assert not any(button["disabled"] for button in buttons(prompt).values())

    # alice confirms: the question says so, then the command runs and answers.
    pressed = await fake_discord.press(int(prompt["id"]), confirm_id, by=alice)
    confirmed = await callback_to(bot, fake_discord, pressed.token)
    assert (confirmed.json["type"], confirmed.content) == (
        UPDATE_MESSAGE,
        "Run `/proxy_restart`?\n✅ Confirmed by alice.",
    )
    assert all(button["disabled"] for button in buttons(prompt).values())
    answer = await bot.until(
        lambda: next((r for r in fake_discord.answers(second) if r.key == FOLLOWUP), None),
        what="the command's answer",
    )
    assert answer.content is not None
    assert answer.content.startswith("✅ Restarted `proxy.service`")
    assert pings_nobody(answer.allowed_mentions)
    assert answer.seq > confirmed.seq
    assert len(systemctl.calls()) == 1

    records = await bot.wait_audit(2)
    assert [(r["outcome"], r["confirmation"]) for r in records] == [
        ("cancelled", "cancelled"),
        ("ok", "confirmed"),
    ]
    assert len(bot.audit_records()) == 2  # bob's press is no invocation: no record of its own
    assert fake_discord.unhandled() == []


async def test_an_unanswered_question_times_out_and_nothing_runs(
    start_bots: StartBot, fake_discord: FakeDiscord, systemctl: SystemctlStub
) -> None:
    """``!bot_restart`` (asked by default) with the shortest timeout allowed, 1 s."""
    bot = await start_bots(OPS_BOT_SERVICE="bot.service", OPS_CONFIRM_TIMEOUT="1")
    await bot.wait_ready()
    alice = fake_discord.alice
    assert alice is not None

    request = await fake_discord.post("!bot_restart", by=alice)
    asked = await bot.reply_to(request)
    question = "Restart `bot.service`? This takes the bot offline for a few seconds."
    assert asked.content == question
    assert pings_nobody(asked.allowed_mentions)
    assert asked.created_id is not None
    prompt = fake_discord.messages[asked.created_id]
    assert sorted(buttons(prompt)) == ["Cancel", "Confirm"]

    edit = await bot.until(
        lambda: next((r for r in fake_discord.sent(EDIT) if r.status == 200), None),
        what="the question edited once its time is over",
    )
    assert edit.params["message_id"] == str(asked.created_id)
    assert prompt["content"] == "Cancelled: no answer in 1 s"
    assert all(button["disabled"] for button in buttons(prompt).values())
    assert pings_nobody(edit.allowed_mentions)

    (record,) = await bot.wait_audit(1)
    assert (record["command"], record["outcome"], record["confirmation"], record["detail"]) == (
        "bot_restart",
        "cancelled",
        "timed out",
        "no answer in 1 s",
    )
    assert systemctl.calls() == []
    assert bot.returncode is None  # still running: nothing restarted it
    assert fake_discord.replies_to(int(request["id"])) == [asked]  # the edit said it all
