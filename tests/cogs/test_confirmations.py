"""The pipeline around a confirmation: what runs, what is taken, what is recorded.

dpytest cannot press buttons, so the answer here comes from a scripted confirmer in the
pipeline's seat; tests/e2e/test_confirmations.py presses the real buttons through the real
bot process.
"""

from __future__ import annotations

import asyncio
import logging
import re

import discord.ext.test as dpytest
import pytest

from core.chat.confirm import Confirmation, StillAllowed
from core.chat.invocation import Invocation
from tests.support.chat import (
    AUDIT_LOGGER,
    Harness,
    SystemctlStub,
    audit_records,
    only_reply,
    replies_to,
)


class Scripted:
    """Answers every question with ``answer`` once ``release`` is set (at once by default)."""

    def __init__(self, answer: Confirmation) -> None:
        self.answer = answer
        self.questions: list[tuple[str, str]] = []
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.still_allowed: StillAllowed | None = None

    async def ask(
        self, inv: Invocation, question: str, still_allowed: StillAllowed | None = None
    ) -> Confirmation:
        self.questions.append((inv.command, question))
        self.still_allowed = still_allowed
        self.asked.set()
        await self.release.wait()
        return self.answer


CONFIRMED = Confirmation("confirmed", "confirmed")
CANCELLED = Confirmation("cancelled", "cancelled")
TIMED_OUT = Confirmation("timed out", "no answer in 30 s")


async def with_confirmer(harness: Harness, answer: Confirmation, **env: str) -> Scripted:
    cog = await harness.add_cog(harness.settings(OPS_CONFIRM="proxy_restart,bot_restart", **env))
    scripted = Scripted(answer)
    cog.pipeline.confirmer = scripted
    return scripted


async def test_a_confirmed_command_runs_takes_its_cooldown_and_says_so_in_its_record(
    harness: Harness, systemctl: SystemctlStub, sent, caplog: pytest.LogCaptureFixture
) -> None:
    scripted = await with_confirmer(harness, CONFIRMED)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!proxy_restart")
        again = await harness.say("!proxy_restart", member=harness.admins[1])

    assert only_reply(sent, message).content.startswith("✅ Restarted `proxy.service`")
    assert "cooling down" in only_reply(sent, again).content
    assert len(systemctl.calls()) == 1
    assert scripted.questions == [("proxy_restart", "Run `!proxy_restart`?")]
    first, second = audit_records(caplog)
    assert (first["outcome"], first["confirmation"]) == ("ok", "confirmed")
    # Refused before anything was asked: a cooldown under way refuses at once.
    assert (second["outcome"], second["confirmation"]) == ("refused:cooldown", None)


@pytest.mark.parametrize("answer", [CANCELLED, TIMED_OUT])
async def test_a_command_not_confirmed_runs_nothing_and_takes_no_cooldown(
    harness: Harness,
    systemctl: SystemctlStub,
    sent,
    caplog: pytest.LogCaptureFixture,
    answer: Confirmation,
) -> None:
    scripted = await with_confirmer(harness, answer)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!proxy_restart")
        scripted.answer = CONFIRMED
        again = await harness.say("!proxy_restart")

    # The prompt's own edit says how it ended: no further reply.
    assert replies_to(sent, message) == []
    assert only_reply(sent, again).content.startswith("✅ Restarted `proxy.service`")
    assert len(systemctl.calls()) == 1
    first, second = audit_records(caplog)
    assert (first["outcome"], first["confirmation"], first["detail"]) == (
        "cancelled",
        answer.answer,
        answer.detail,
    )
    assert (second["outcome"], second["confirmation"]) == ("ok", "confirmed")


async def test_already_running_holds_from_the_first_prompt(
    harness: Harness, systemctl: SystemctlStub, sent
) -> None:
    scripted = await with_confirmer(harness, CONFIRMED)
    scripted.release.clear()
    first = dpytest.backend.make_message("!proxy_restart", harness.admins[0], harness.channel)
    await asyncio.wait_for(scripted.asked.wait(), 5)
    second = dpytest.backend.make_message("!proxy_restart", harness.admins[1], harness.channel)
    try:
        await asyncio.wait_for(dpytest.runner.sent_queue.get(), 5)  # the answer to the second
    finally:
        scripted.release.set()
    await dpytest.run_all_events()

    assert re.fullmatch(
        r"`!proxy_restart` is already running \(started by alice \d+ s ago\)",
        only_reply(sent, second).content,
    )
    assert [q for q, _ in scripted.questions] == ["proxy_restart"]
    assert only_reply(sent, first).content.startswith("✅ Restarted")
    assert len(systemctl.calls()) == 1


async def test_the_restart_question_says_what_happens(
    harness: Harness, systemctl: SystemctlStub, sent
) -> None:
    scripted = await with_confirmer(harness, CANCELLED)
    await harness.say("!bot_restart")
    await harness.say("!ops_status")

    assert scripted.questions == [
        ("bot_restart", "Restart `bot.service`? This takes the bot offline for a few seconds.")
    ]
    assert systemctl.calls() == []


async def test_who_and_where_are_checked_before_anything_is_asked(
    harness: Harness, systemctl: SystemctlStub, sent
) -> None:
    scripted = await with_confirmer(harness, CONFIRMED)
    message = await harness.say("!proxy_restart", member=harness.outsider)

    assert only_reply(sent, message).content == "You need an ops role to run `!proxy_restart`."
    assert scripted.questions == []
    assert systemctl.calls() == []


async def test_the_restart_spacing_is_checked_again_once_confirmed(
    harness: Harness, systemctl: SystemctlStub, sent
) -> None:
    scripted = await with_confirmer(harness, CONFIRMED)
    systemctl.started("proxy.service", seconds_ago=5)
    message = await harness.say("!proxy_restart")

    assert scripted.questions  # asked: the spacing is the last check, after the answer
    assert "refused: `proxy.service` restarted" in only_reply(sent, message).content
    assert systemctl.calls() == []


async def test_a_member_who_lost_the_role_while_asked_may_not_answer(
    harness: Harness, systemctl: SystemctlStub
) -> None:
    """The role checks are handed to the confirmer for the press: roles change while it waits."""
    scripted = await with_confirmer(harness, CANCELLED)
    await harness.say("!proxy_restart")
    check = scripted.still_allowed
    assert check is not None
    member = harness.admins[0]

    assert await check(member)
    await dpytest.remove_role(member, harness.ops_role)
    assert not await check(harness.guild.get_member(member.id))
