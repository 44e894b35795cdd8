"""While a question waits: roles change, the cog is reloaded, the bot is stopped.

Confirm counts only from someone who may still run the command; a question of a cog that is
unloaded (reloaded, or the bot stopping) is cancelled and says so, its buttons disabled, so
nothing looks alive that is not, and the reloaded cog asks afresh.
"""

from __future__ import annotations

import signal
from typing import Any

from tests.e2e.test_confirmations import CHANNEL_MESSAGE, FOLLOWUP, buttons, callback_to
from tests.support import fake_discord_payloads as p
from tests.support.chat import SystemctlStub
from tests.support.fake_discord import FakeDiscord, InteractionState, Recorded, pings_nobody
from tests.support.fake_discord_bot import BotProcess, StartBot


async def asking_bot(start_bots: StartBot) -> BotProcess:
    """A bot that asks before ``/proxy_restart``, connected and synced."""
    bot = await start_bots(OPS_PROXY_SERVICE="proxy.service", OPS_CONFIRM="proxy_restart")
    await bot.wait_ready()
    await bot.wait_synced()
    return bot


async def asked(
    bot: BotProcess, fake: FakeDiscord, by: p.FakeMember
) -> tuple[InteractionState, dict[str, Any]]:
    """``by`` runs ``/proxy_restart``; the interaction and the question as the fake holds it."""
    state = await fake.invoke("proxy_restart", by=by)
    await callback_to(bot, fake, state.token)
    prompt = fake.original(state)
    assert prompt is not None
    return state, prompt


async def press(
    bot: BotProcess, fake: FakeDiscord, prompt: dict[str, Any], label: str, by: p.FakeMember
) -> Recorded:
    """``by`` presses the button ``label`` of ``prompt``; the bot's answer to the press."""
    pressed = await fake.press(int(prompt["id"]), buttons(prompt)[label]["custom_id"], by=by)
    return await callback_to(bot, fake, pressed.token)


async def test_the_invoker_who_lost_the_role_cannot_confirm_but_can_cancel(
    start_bots: StartBot, fake_discord: FakeDiscord, systemctl: SystemctlStub
) -> None:
    bot = await asking_bot(start_bots)
    alice = fake_discord.alice
    assert alice is not None

    _state, prompt = await asked(bot, fake_discord, alice)
    alice = await fake_discord.update_member(alice)  # her ops role taken away

    refused = await press(bot, fake_discord, prompt, "Confirm", alice)
    assert (refused.json["type"], refused.ephemeral) == (CHANNEL_MESSAGE, True)
    assert refused.content == (
        "You no longer have a role that may run `/proxy_restart`: nothing runs."
    )
    assert pings_nobody(refused.allowed_mentions)
    assert not any(button["disabled"] for button in buttons(prompt).values())

    assert (
        await press(bot, fake_discord, prompt, "Cancel", alice)
    ).content == "Cancelled by alice."
    (record,) = await bot.wait_audit(1)
    assert (record["outcome"], record["confirmation"]) == ("cancelled", "cancelled")
    assert systemctl.calls("restart") == []


STOPPED = "Cancelled: admin-ops stopped (a reload or a shutdown) before an answer"


async def test_a_reload_cancels_the_open_question_and_the_new_cog_asks_again(
    start_bots: StartBot, fake_discord: FakeDiscord, systemctl: SystemctlStub
) -> None:
    bot = await asking_bot(start_bots)
    alice = fake_discord.alice
    assert alice is not None

    _first, old_prompt = await asked(bot, fake_discord, alice)
    await fake_discord.post("!ops_reload cogs.admin_ops", by=alice)
    records = await bot.wait_audit(2)
    assert sorted((r["command"], r["outcome"]) for r in records) == [
        ("ops_reload", "ok"),
        ("proxy_restart", "cancelled"),
    ]
    assert old_prompt["content"] == STOPPED
    assert all(button["disabled"] for button in buttons(old_prompt).values())

    # The reloaded cog knows nothing is running: it asks, and alice's Confirm runs it once.
    second, prompt = await asked(bot, fake_discord, alice)
    await press(bot, fake_discord, prompt, "Confirm", alice)
    await bot.until(
        lambda: next((r for r in fake_discord.answers(second) if r.key == FOLLOWUP), None),
        what="the restart's answer",
    )
    assert len(systemctl.calls("restart")) == 1


async def test_a_question_open_when_the_bot_stops_says_so(
    start_bots: StartBot, fake_discord: FakeDiscord, systemctl: SystemctlStub
) -> None:
    bot = await start_bots(OPS_BOT_SERVICE="bot.service")  # !bot_restart asks by default
    await bot.wait_ready()
    alice = fake_discord.alice
    assert alice is not None
    request = await fake_discord.post("!bot_restart", by=alice)
    asked = await bot.reply_to(request)
    assert asked.created_id is not None
    prompt = fake_discord.messages[asked.created_id]

    assert await bot.stop(signal.SIGTERM, timeout=10) == 0

    assert prompt["content"] == STOPPED
    assert all(button["disabled"] for button in buttons(prompt).values())
    assert systemctl.calls("restart") == []
