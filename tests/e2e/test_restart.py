"""``!bot_restart`` across two real ``bot.py`` processes, the test standing in for the supervisor.

Exit mode: the first replies, closes its connection and exits with status 26; the test (as
systemd's ``RestartForceExitStatus=26``, Docker or pm2 would) starts the next one, which posts
the back-online notice in reply to the original message, fetched from the fake. systemd mode,
with a ``systemctl`` that stops the unit the way systemd does (SIGTERM to the bot and to
``systemctl`` itself): the same notice. tests/e2e/test_deployed.py does it under real systemd.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.support.fake_discord import FakeDiscord, pings_nobody
from tests.support.fake_discord_bot import BotProcess, StartBot
from tests.support.git import GitRepos
from tests.support.processes import write_script

#: Exit mode, and no wait between starts: a test cannot wait the default 60 s. No confirmation
#: prompt: tests/e2e/test_confirmations.py presses its buttons.
EXIT_MODE = {"OPS_RESTART_MODE": "exit", "OPS_RESTART_MIN_INTERVAL": "0", "OPS_CONFIRM": "none"}


async def test_exit_mode_replies_exits_26_and_the_next_process_says_back_online(
    start_bots: StartBot, fake_discord: FakeDiscord, git_repos: GitRepos
) -> None:
    first = await start_bots(**EXIT_MODE)
    first_session = await first.wait_ready()

    request = await fake_discord.post("!bot_restart", by=fake_discord.alice)
    status = await first.wait_exit(timeout=20)

    assert status == 26, first.output()
    (restarting,) = fake_discord.replies_to(int(request["id"]))
    assert restarting.content == "♻️ Restarting the bot (requested by alice)…"
    assert pings_nobody(restarting.allowed_mentions)
    # The reply went out before the connection closed, and the bot closed it rather than dropping
    # it (1006): with 1000, or 4000 when discord.py's gateway loop, waiting for a message, sees
    # the close that ``bot.close()`` (called from the command) starts and closes first.
    assert first_session.closed
    assert first_session.close_code in (1000, 4000)
    assert first_session.closed_after_requests is not None
    assert restarting.seq <= first_session.closed_after_requests

    second = await start_bots(**EXIT_MODE)
    second_session = await second.wait_ready(after=first_session.number)
    notice = await second.until(
        lambda: next(
            (r for r in fake_discord.replies_to(int(request["id"])) if r is not restarting), None
        ),
        what="back-online notice",
    )

    head = git_repos.head()[:7]
    assert notice.content is not None
    assert re.fullmatch(rf"✅ Back online after \d+ s — still at {head}", notice.content)
    assert pings_nobody(notice.allowed_mentions)
    fetched = fake_discord.sent("GET /channels/{channel_id}/messages/{message_id}")
    assert [r.params["message_id"] for r in fetched] == [request["id"]]
    assert fetched[0].seq < notice.seq
    # Sent by the second process: after its session was ready, with the first one long gone.
    assert notice.seq > (first_session.closed_after_requests or 0)
    assert not second_session.closed
    assert fake_discord.unhandled() == []


#: A systemctl whose ``restart`` does what systemd does to the unit's processes: SIGTERM to every
#: process of the unit, here the bot (its parent) and itself, before it could print anything.
STOPPING_SYSTEMCTL = """
import os, signal, sys
if "restart" in sys.argv:
    os.kill(os.getppid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
print("active")
"""


async def next_notice(bot: BotProcess, fake: FakeDiscord, request_id: int, skip: object) -> str:
    """The text of the next process's reply to ``request_id`` (other than ``skip``)."""
    notice = await bot.until(
        lambda: next((r for r in fake.replies_to(request_id) if r is not skip), None),
        what="back-online notice",
    )
    assert notice.content is not None
    assert pings_nobody(notice.allowed_mentions)
    return notice.content


async def test_systemd_mode_survives_the_sigterm_of_its_own_restart(
    start_bots: StartBot, fake_discord: FakeDiscord, git_repos: GitRepos, tmp_path: Path
) -> None:
    """The SIGTERM that the restart brings must not make the bot drop its restart marker.

    The stand-in systemctl ends itself with SIGTERM too, as systemd does to every process of
    the unit: the command must read that as "restart under way", not as a failed request.
    """
    systemctl = write_script(
        tmp_path / "stopping-systemctl", STOPPING_SYSTEMCTL, interpreter=sys.executable
    )
    settings = {
        "OPS_SYSTEMCTL": str(systemctl),
        "OPS_BOT_SERVICE": "admin-ops-bot.service",
        "OPS_RESTART_DELAY": "0",
        "OPS_RESTART_MIN_INTERVAL": "0",
        "OPS_CONFIRM": "none",
    }
    first = await start_bots(**settings)
    first_session = await first.wait_ready()

    request = await fake_discord.post("!bot_restart", by=fake_discord.alice)
    status = await first.wait_exit(timeout=20)

    assert status == 0, first.output()
    (restarting,) = fake_discord.replies_to(int(request["id"]))
    assert restarting.content == "♻️ Restarting `admin-ops-bot.service` (requested by alice)…"
    second = await start_bots(**settings)
    await second.wait_ready(after=first_session.number)
    notice = await next_notice(second, fake_discord, int(request["id"]), restarting)
    assert re.fullmatch(rf"✅ Back online after \d+ s — still at {git_repos.head()[:7]}", notice)
    # The first process closed as on any SIGTERM, and left the record to the next one: one
    # record, not a failure nor an interruption.
    assert "SIGTERM received: closing" in first.output()
    assert first_session.close_code == 1000
    assert first.audit_records() == []
    [record] = second.audit_records()
    assert (record["command"], record["outcome"]) == ("bot_restart", "ok")
    assert "Traceback" not in first.output()
