"""The real ``bot.py`` process connecting, reconnecting and stopping, against the fake Discord."""

from __future__ import annotations

import signal

from tests.support.fake_discord import FakeDiscord
from tests.support.fake_discord_bot import StartBot
from tests.support.fake_discord_gateway import HEARTBEAT, IDENTIFY, RESUME


async def test_the_bot_logs_in_with_its_token_and_asks_for_the_intents_it_needs(
    start_bots: StartBot, fake_discord: FakeDiscord
) -> None:
    bot = await start_bots()

    session = await bot.wait_ready()

    assert [r.key for r in fake_discord.requests[:2]] == [
        "GET /users/@me",
        "GET /oauth2/applications/@me",
    ]
    assert all(r.authorization == f"Bot {fake_discord.token}" for r in fake_discord.requests)
    assert session.query == {"v": "10", "encoding": "json", "compress": "zlib-stream"}
    assert session.heartbeats >= 1  # discord.py beats once on HELLO, and got its ACK
    assert session.identify is not None
    intents = session.identify["intents"]
    assert intents & (1 << 15), "message content"
    assert intents & (1 << 1), "server members"
    assert fake_discord.unhandled() == []


async def test_sigterm_closes_the_connection_and_exits_0(
    start_bots: StartBot, fake_discord: FakeDiscord
) -> None:
    """As systemd stops a unit: the bot closes its gateway connection and exits 0 within 10 s."""
    bot = await start_bots()
    session = await bot.wait_ready()

    status = await bot.stop(signal.SIGTERM, timeout=10)

    assert status == 0, bot.output()
    await fake_discord.wait_until(lambda: session.closed, what="gateway connection closed")
    assert session.close_code == 1000  # closed by the bot, not dropped
    assert "SIGTERM received: closing" in bot.output()
    assert "Traceback" not in bot.output()


async def test_a_refused_resume_makes_the_bot_identify_again_and_it_keeps_answering(
    start_bots: StartBot, fake_discord: FakeDiscord
) -> None:
    """Discord asks for a reconnect (op 7), refuses the RESUME (op 9), the bot identifies anew.

    discord.py waits 5 s before identifying again (``before_identify_hook``): the slow part.
    """
    bot = await start_bots()
    first = await bot.wait_ready()

    await fake_discord.reconnect()
    third = await bot.wait_ready(after=first.number)

    first_id, tried, _ = fake_discord.gateway.sessions
    assert first_id is first
    assert tried.received_ops == [HEARTBEAT, RESUME]
    assert tried.resume is not None
    assert tried.resume["session_id"] == first.session_id
    assert (tried.ready, tried.close_code) == (False, 1000)
    assert third.received_ops[:2] == [HEARTBEAT, IDENTIFY]
    assert third.session_id != first.session_id
    message = await fake_discord.post("!ops_status", by=fake_discord.alice)
    reply = await bot.reply_to(message)
    assert reply.content is not None
    assert reply.content.startswith("📊 Ops status")
