"""Discord's 3 s: a slash command whose checks are slow is deferred before Discord forgets it.

The checks before a command's first answer may wait on Redis, Discord or systemctl (the restart
spacing asks ``systemctl show``). Here that ``show`` blocks until the test lets it go, and the
fake refuses a first answer later than 3 s after the interaction was created, as Discord does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support.chat import SystemctlStub
from tests.support.fake_discord import FakeDiscord, InteractionState, Recorded, pings_nobody
from tests.support.fake_discord_bot import BotProcess, StartBot
from tests.support.processes import write_script

CALLBACK = "POST /interactions/{interaction_id}/{token}/callback"
FOLLOWUP = "POST /webhooks/{application_id}/{token}"
DELETE_ORIGINAL = "DELETE /webhooks/{application_id}/{token}/messages/{message_id}"
DEFERRED = 5

#: The first ``systemctl show`` waits on a FIFO until the test lets it go; everything else
#: (and every later ``show``) is the recording stub.
BLOCKING_SHOW = """
import os, sys
if "show" in sys.argv and not os.path.exists({gate!r} + ".passed"):
    with open({gate!r}) as gate:
        gate.read()
    open({gate!r} + ".passed", "w").close()
os.execv({stub!r}, [{stub!r}, *sys.argv[1:]])
"""


async def slow_show_bot(
    start_bots: StartBot, fake: FakeDiscord, systemctl: SystemctlStub, tmp_path: Path
) -> tuple[BotProcess, Path]:
    """A bot whose ``systemctl show`` hangs on a FIFO; the fake enforces Discord's 3 s."""
    gate = tmp_path / "show-gate"
    os.mkfifo(gate)
    script = BLOCKING_SHOW.format(stub=str(systemctl.path), gate=str(gate))
    slow = write_script(tmp_path / "slow-systemctl", script, interpreter=sys.executable)
    bot = await start_bots(
        OPS_PROXY_SERVICE="proxy.service", OPS_CONFIRM="none", OPS_SYSTEMCTL=str(slow)
    )
    await bot.wait_ready()
    await bot.wait_synced()
    fake.answer_within = 3.0
    return bot, gate


async def deferred_while_show_hangs(
    bot: BotProcess, fake: FakeDiscord, state: InteractionState, gate: Path
) -> Recorded:
    """The bot's accepted deferral, then ``systemctl show`` let go (it was waiting all along)."""
    first = await bot.until(
        lambda: next((r for r in fake.answers(state) if r.key == CALLBACK), None),
        what="the first answer while systemctl show hangs",
    )
    assert (first.json["type"], first.status) == (DEFERRED, 200)

    def let_go() -> bool:
        try:  # non-blocking: only once the stub has the FIFO open for reading
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            return False
        return True

    await bot.until(let_go, what="systemctl show waiting on its gate")
    return first


async def test_slow_checks_then_the_action_answer_in_place_of_thinking(
    start_bots: StartBot, fake_discord: FakeDiscord, systemctl: SystemctlStub, tmp_path: Path
) -> None:
    bot, gate = await slow_show_bot(start_bots, fake_discord, systemctl, tmp_path)

    restart = await fake_discord.invoke("proxy_restart", by=fake_discord.alice)
    await deferred_while_show_hangs(bot, fake_discord, restart, gate)
    assert systemctl.calls("restart") == []  # deferred in the checks, before anything ran

    answer = await bot.until(
        lambda: next((r for r in fake_discord.answers(restart) if r.key == FOLLOWUP), None),
        what="the answer after the deferral",
    )
    assert (answer.status, answer.ephemeral) == (200, False)
    assert answer.content is not None
    assert answer.content.startswith("✅")
    assert pings_nobody(answer.allowed_mentions)
    assert len(systemctl.calls("restart")) == 1


async def test_a_refusal_after_the_deferral_is_still_private(
    start_bots: StartBot, fake_discord: FakeDiscord, systemctl: SystemctlStub, tmp_path: Path
) -> None:
    """The restart spacing refuses once ``show`` answers: the "thinking…" goes, privately."""
    bot, gate = await slow_show_bot(start_bots, fake_discord, systemctl, tmp_path)
    systemctl.started("proxy.service", seconds_ago=5)

    restart = await fake_discord.invoke("proxy_restart", by=fake_discord.alice)
    await deferred_while_show_hangs(bot, fake_discord, restart, gate)
    refusal = await bot.until(
        lambda: next((r for r in fake_discord.answers(restart) if r.key == FOLLOWUP), None),
        what="the refusal after the deferral",
    )

    assert (refusal.status, refusal.ephemeral) == (200, True)
    assert refusal.content is not None
    assert "refused: `proxy.service` restarted" in refusal.content
    deleted = [r for r in fake_discord.answers(restart) if r.key == DELETE_ORIGINAL]
    assert [(r.params["message_id"], r.seq < refusal.seq) for r in deleted] == [("@original", True)]
    assert systemctl.calls("restart") == []
