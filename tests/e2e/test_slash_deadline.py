"""Discord's 3 s: a slash command whose checks are slow is deferred before Discord forgets it.

The checks before a command's first answer may wait on Redis, Discord or systemctl (the restart
spacing asks ``systemctl show``). Here that ``show`` blocks until the test lets it go, and the
test lets it go only once the bot has deferred the interaction on its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support.chat import SystemctlStub
from tests.support.fake_discord import FakeDiscord, pings_nobody
from tests.support.fake_discord_bot import StartBot
from tests.support.processes import write_script

CALLBACK = "POST /interactions/{interaction_id}/{token}/callback"
FOLLOWUP = "POST /webhooks/{application_id}/{token}"
DEFERRED = 5

#: ``systemctl show`` waits for a line on a FIFO first; everything else is the recording stub.
BLOCKING_SHOW = """
import os, sys
if "show" in sys.argv:
    with open({gate!r}) as gate:
        gate.read()
os.execv({stub!r}, [{stub!r}, *sys.argv[1:]])
"""


async def test_a_slash_command_with_slow_checks_is_deferred_then_answered(
    start_bots: StartBot, fake_discord: FakeDiscord, systemctl: SystemctlStub, tmp_path: Path
) -> None:
    gate = tmp_path / "show-gate"
    os.mkfifo(gate)
    slow = write_script(
        tmp_path / "slow-systemctl",
        BLOCKING_SHOW.format(stub=str(systemctl.path), gate=str(gate)),
        interpreter=sys.executable,
    )
    bot = await start_bots(
        OPS_PROXY_SERVICE="proxy.service",
        OPS_CONFIRM="none",
        OPS_SYSTEMCTL=str(slow),
    )
    await bot.wait_ready()
    await bot.wait_synced()

    restart = await fake_discord.invoke("proxy_restart", by=fake_discord.alice)
    first = await bot.until(
        lambda: next((r for r in fake_discord.answers(restart) if r.key == CALLBACK), None),
        what="the deferral while systemctl show hangs",
    )
    assert first.json["type"] == DEFERRED
    assert systemctl.calls("restart") == []  # still in the checks: nothing ran yet

    # Non-blocking: the stub must already be waiting on the FIFO (else ENXIO, and the test fails).
    release = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    os.close(release)
    answer = await bot.until(
        lambda: next((r for r in fake_discord.answers(restart) if r.key == FOLLOWUP), None),
        what="the answer after the deferral",
    )
    assert answer.content is not None
    assert answer.content.startswith("✅")
    assert pings_nobody(answer.allowed_mentions)
    assert len(systemctl.calls("restart")) == 1
    assert [r.key for r in fake_discord.answers(restart)].count(CALLBACK) == 1
