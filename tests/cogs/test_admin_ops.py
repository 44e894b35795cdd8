"""The admin-ops cog in dpytest, with real git repositories, Redis and a systemctl stand-in."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
import redis.asyncio as aioredis
from discord.context_managers import Typing
from discord.ext import commands

import core.chat.actions as chat_actions
import core.chat.restart as chat_restart
from cogs.admin_ops import MARKER_MAX_AGE, MESSAGE_LIMIT, AdminOps
from core import text
from core.chat.restart import RestartRequest
from core.ops_exec import UnitResult, pull_lock_key
from tests.support import ROOT
from tests.support.chat import (
    AUDIT_LOGGER,
    Harness,
    Sent,
    SystemctlStub,
    audit_records,
    configured_bot,
    only_reply,
    replies_to,
    stored_marker,
)
from tests.support.git import git
from tests.support.processes import write_script
from tests.support.redis_proc import free_port


def count_fetches(clone: Path, tmp_path: Path) -> Path:
    """Route the clone's fetches through an upload-pack wrapper that counts them."""
    counter = tmp_path / "fetches"
    counter.write_text("")
    wrapper = write_script(
        tmp_path / "counting-upload-pack",
        f'echo fetch >> "{counter}"\nexec git upload-pack "$@"\n',
    )
    git(clone, "config", "remote.origin.uploadpack", str(wrapper))
    return counter


def fetches(counter: Path) -> int:
    return len(counter.read_text().splitlines())


def code_block(content: str) -> str:
    """The text between the message's opening and closing fence."""
    match = re.search(r"\n```\n(.*)\n```$", content, re.DOTALL)
    assert match, content
    return match.group(1)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


def test_the_public_names_stay_importable_from_the_cog_module() -> None:
    import cogs.admin_ops as module

    for name in [*module.__all__, "MARKER_MAX_AGE"]:
        assert getattr(module, name) is not None, name
    assert set(module.__all__) >= {
        "FLEET_EDIT_INTERVAL", "MESSAGE_LIMIT", "NO_MENTIONS", "RESTART_EXIT_STATUS", "AdminOps",
        "FleetBoard", "LiveMessage", "Outcome", "RestartMarkers", "format_duration",
        "format_reply", "neutralise_fences", "setup",
    }  # fmt: skip
    # One home each: the cog module re-exports them, it does not copy them.
    assert module.format_reply is text.format_reply
    assert module.MESSAGE_LIMIT == text.MESSAGE_LIMIT == 2000
    assert module.RESTART_EXIT_STATUS == 26


# --------------------------------------------------------------------------------------------
# !bot_pull
# --------------------------------------------------------------------------------------------


async def test_pull_fast_forwards_and_lists_commits(harness: Harness, git_repos: Any, sent):
    await harness.add_cog()
    new = git_repos.commit_upstream("Add the widget")
    message = await harness.say("!bot_pull")
    reply = only_reply(sent, message)
    assert reply.content.startswith("✅ `bot` updated\n```\nUpdated ")
    assert f"{new[:7]} Add the widget" in reply.content
    assert git_repos.head() == new


async def test_pull_already_up_to_date(harness: Harness, git_repos: Any, sent):
    await harness.add_cog()
    message = await harness.say("!bot_pull")
    reply = only_reply(sent, message)
    assert reply.content.startswith("✅ `bot` already up to date")
    assert "Already up to date at" in reply.content


async def test_pull_named_target_and_unknown_target(
    harness: Harness, git_repos: Any, tmp_path: Path, sent
):
    worker = tmp_path / "worker"
    git(tmp_path, "clone", "-q", str(git_repos.origin), str(worker))
    new = git_repos.commit_upstream("Worker change")
    await harness.add_cog(harness.settings(OPS_PULL_TARGETS=f"worker={worker}"))

    message = await harness.say("!bot_pull worker")
    assert only_reply(sent, message).content.startswith("✅ `worker` updated")
    assert git(worker, "rev-parse", "HEAD") == new
    assert git_repos.head() != new  # the bot's own checkout was not touched

    message = await harness.say("!bot_pull nope")
    assert only_reply(sent, message).content == (
        "Unknown target `nope` for `!bot_pull`. Configured targets: bot, worker."
    )


async def test_pull_failure_keeps_the_cooldown(harness: Harness, git_repos: Any, sent):
    """Git ran (and failed): the run acted, so the cooldown holds."""
    await harness.add_cog()
    git_repos.commit_upstream("upstream side")
    (git_repos.clone / "local.txt").write_text("local\n")
    git(git_repos.clone, "add", "local.txt")
    git(git_repos.clone, "commit", "-q", "-m", "local side")

    message = await harness.say("!bot_pull")
    reply = only_reply(sent, message)
    assert reply.content.startswith(
        "❌ `bot` pull failed\n```\nNot pulled: the branch has diverged"
    )
    message = await harness.say("!bot_pull")
    assert "cooling down" in only_reply(sent, message).content


async def test_pull_of_a_missing_checkout_releases_the_cooldown(
    harness: Harness, tmp_path: Path, sent
):
    """Nothing ran (not a checkout): the operator may retry at once after fixing it."""
    missing = tmp_path / "not-a-checkout"
    missing.mkdir()
    await harness.add_cog(harness.settings(OPS_REPO_DIR=str(missing)))
    for _ in range(2):
        message = await harness.say("!bot_pull")
        reply = only_reply(sent, message)
        assert reply.content.startswith("❌ `bot` pull failed")
        assert "is not a git checkout" in reply.content


async def test_pull_skips_while_another_service_pulls_the_checkout(
    harness: Harness, git_repos: Any, redis_client: Any, tmp_path: Path, sent, key_prefix: str
):
    counter = count_fetches(git_repos.clone, tmp_path)
    # A real holder's lock expires within any pull's lock TTL (90 s at least).
    await redis_client.set(
        pull_lock_key(git_repos.clone),
        "worker-host:worker.service:77:" + "0123abcd" * 4,
        px=60_000,
    )
    await harness.add_cog(redis=redis_client, key_prefix=key_prefix)
    message = await harness.say("!bot_pull")
    reply = only_reply(sent, message)
    assert reply.content.startswith(
        "⏭️ `bot` skipped: another service on this host is pulling it\n```\nSkipped: "
    )
    assert "worker-host:worker.service:77" in reply.content
    assert fetches(counter) == 0


async def test_pull_hands_the_passed_through_variables_to_git(
    harness: Harness, git_repos: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent
):
    # OPS_GIT_ENV_PASSTHROUGH (an ssh-agent's socket, say) reaches the git the pull runs; other
    # variables of the bot's environment still do not.
    seen = tmp_path / "seen-by-upload-pack"
    wrapper = write_script(
        tmp_path / "recording-upload-pack",
        'echo "agent=${SSH_AUTH_SOCK:-unset} other=${OPS_TEST_NOT_PASSED:-unset}"'
        f' >> "{seen}"\n'
        'exec git upload-pack "$@"\n',
    )
    git(git_repos.clone, "config", "remote.origin.uploadpack", str(wrapper))
    monkeypatch.setenv("SSH_AUTH_SOCK", "/run/user/1000/agent.sock")
    monkeypatch.setenv("OPS_TEST_NOT_PASSED", "kept-from-git")
    await harness.add_cog(harness.settings(OPS_GIT_ENV_PASSTHROUGH="SSH_AUTH_SOCK"))
    message = await harness.say("!bot_pull")
    assert only_reply(sent, message).content.startswith("✅ `bot` already up to date")
    assert seen.read_text() == "agent=/run/user/1000/agent.sock other=unset\n"


# --------------------------------------------------------------------------------------------
# !proxy_restart
# --------------------------------------------------------------------------------------------


async def test_proxy_restart_runs_systemctl(harness: Harness, systemctl: SystemctlStub, sent):
    await harness.add_cog()
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content == (
        "✅ Restarted `proxy.service`\n```\nrestarted proxy.service\n```"
    )
    assert [c["argv"] for c in systemctl.calls()] == [
        ["--no-ask-password", "restart", "--", "proxy.service"]
    ]


async def test_proxy_restart_failure_is_reported_and_releases_the_cooldown(
    harness: Harness, systemctl: SystemctlStub, sent
):
    await harness.add_cog()
    systemctl.fail(1, "Failed to restart proxy.service: Access denied\n")
    for _ in range(2):  # the second run is not refused: the failed one did not act
        message = await harness.say("!proxy_restart")
        reply = only_reply(sent, message)
        assert reply.content.startswith("❌ Could not restart `proxy.service`")
        assert "Access denied" in reply.content
    assert len(systemctl.calls()) == 2


async def test_a_timed_out_proxy_restart_keeps_the_cooldown(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent
):
    # systemd keeps the job after a timeout, so the restart may still happen: no instant retry.
    calls: list[str] = []

    async def timed_out(unit: str, timeout: float = 20.0, **_: object) -> UnitResult:
        calls.append(unit)
        summary = f"systemctl restart {unit} timed out after 20s; the job may still complete"
        return UnitResult(False, summary, timed_out=True)

    monkeypatch.setattr(chat_actions, "restart_unit", timed_out)
    await harness.add_cog()
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content.startswith("❌ Could not restart `proxy.service`")
    message = await harness.say("!proxy_restart", member=harness.admins[1])
    assert "is cooling down" in only_reply(sent, message).content
    assert calls == ["proxy.service"]


async def test_bot_restart_is_still_running_while_its_request_waits(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent
):
    # The request waits OPS_RESTART_DELAY after the reply; a second !bot_restart meanwhile must
    # be refused even with no cooldown at all.
    requested, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def gated(unit: str, **_: object) -> RestartRequest:
        calls.append(unit)
        requested.set()
        await release.wait()
        return RestartRequest(UnitResult(True, f"restart of {unit} requested"))

    monkeypatch.setattr(chat_restart, "request_own_restart", gated)
    await harness.add_cog(harness.settings(OPS_COOLDOWN_BOT_RESTART="0"))
    first = dpytest.backend.make_message("!bot_restart", harness.admins[0], harness.channel)
    await asyncio.wait_for(requested.wait(), 5)
    second = dpytest.backend.make_message("!bot_restart", harness.admins[1], harness.channel)
    try:
        await asyncio.wait_for(dpytest.runner.sent_queue.get(), 5)  # the first's reply
        await asyncio.wait_for(dpytest.runner.sent_queue.get(), 5)  # the answer to the second
    finally:
        release.set()
    await dpytest.run_all_events()
    assert only_reply(sent, second).content.startswith("`!bot_restart` is already running")
    assert only_reply(sent, first).content.startswith("♻️ Restarting")
    assert calls == ["bot.service"]


async def test_cooldown_refuses_a_second_run(harness: Harness, systemctl: SystemctlStub, sent):
    await harness.add_cog()
    await harness.say("!proxy_restart")
    message = await harness.say("!proxy_restart", member=harness.admins[1])
    assert re.fullmatch(
        r"`!proxy_restart` is cooling down — try again in (29|30) s\.",
        only_reply(sent, message).content,
    )
    assert len(systemctl.calls()) == 1


async def test_a_second_invocation_while_one_runs_is_refused_at_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent
):
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_restart(unit: str, timeout: float = 20.0, **_: object) -> UnitResult:
        started.set()
        await release.wait()
        return UnitResult(True, f"restarted {unit}")

    monkeypatch.setattr(chat_actions, "restart_unit", slow_restart)
    await harness.add_cog()
    # dpytest.message() waits for every handler, so the first one must not be awaited yet.
    first = dpytest.backend.make_message("!proxy_restart", harness.admins[0], harness.channel)
    await asyncio.wait_for(started.wait(), 5)
    second = dpytest.backend.make_message("!proxy_restart", harness.admins[1], harness.channel)
    # The answer comes while the first run still waits: refused at once, not queued.
    try:
        await asyncio.wait_for(dpytest.runner.sent_queue.get(), 5)
    finally:
        release.set()
    assert only_reply(sent, second).content == (
        "`!proxy_restart` is already running (started by alice 0 s ago)"
    )
    assert replies_to(sent, first) == []
    release.set()
    await dpytest.run_all_events()
    assert only_reply(sent, first).content.startswith("✅ Restarted `proxy.service`")


async def test_an_unexpected_error_is_answered_in_one_sentence(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent
):
    cog = await harness.add_cog()

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(cog.pipeline, "invoke", broken)
    # dpytest re-raises a command's error after the cog's handler answered it.
    with pytest.raises(commands.CommandInvokeError):
        await harness.say("!ops_status")
    [answer] = sent
    assert answer.content == "❌ That failed unexpectedly; the details are in the bot's log."


async def test_a_failing_action_is_answered_audited_and_frees_the_command(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent, caplog: pytest.LogCaptureFixture
):
    async def crash(unit: str, timeout: float = 20.0, **_: object) -> UnitResult:
        raise OSError("disk on fire")

    monkeypatch.setattr(chat_actions, "restart_unit", crash)
    await harness.add_cog(harness.settings(OPS_COOLDOWN_PROXY_RESTART="0"))
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        for _ in range(2):  # not stuck "already running" after the crash
            message = await harness.say("!proxy_restart")
            assert only_reply(sent, message).content == (
                "❌ `!proxy_restart` failed unexpectedly; the details are in the bot's log."
            )
    outcomes = [
        json.loads(r.getMessage())["outcome"] for r in caplog.records if r.name == AUDIT_LOGGER
    ]
    assert outcomes == ["error", "error"]


# --------------------------------------------------------------------------------------------
# Who may run what
# --------------------------------------------------------------------------------------------


async def test_refusals_reveal_nothing_and_run_nothing(
    harness: Harness, systemctl: SystemctlStub, sent
):
    await harness.add_cog(harness.settings(OPS_CHANNEL_IDS=str(harness.channel.id)))

    message = await harness.say("!proxy_restart", member=harness.outsider)
    assert only_reply(sent, message).content == "You need an ops role to run `!proxy_restart`."

    # Role comes before channel: an outsider in the wrong channel learns nothing about channels.
    message = await harness.say(
        "!bot_restart", member=harness.outsider, channel=harness.other_channel
    )
    assert only_reply(sent, message).content == "You need an ops role to run `!bot_restart`."

    message = await harness.say("!proxy_restart", channel=harness.other_channel)
    assert only_reply(sent, message).content == "`!proxy_restart` can't be used in this channel."

    # Bob: Alice was just refused `!proxy_restart`, and hears that once per 30 s.
    dm = await harness.admins[1].create_dm()
    message = await harness.say("!proxy_restart", member=harness.admins[1], channel=dm)
    assert only_reply(sent, message).content == "These commands only work in a server."
    assert systemctl.calls() == []


async def test_unconfigured_command_says_what_to_set_only_to_admins(
    harness: Harness, systemctl: SystemctlStub, sent
):
    settings = harness.settings(OPS_PROXY_SERVICE="", OPS_BOT_SERVICE="")
    await harness.add_cog(settings)

    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content == (
        "`!proxy_restart` is not configured: set OPS_PROXY_SERVICE"
    )
    message = await harness.say("!bot_restart")
    assert only_reply(sent, message).content == (
        "`!bot_restart` is not configured: set OPS_BOT_SERVICE"
    )
    message = await harness.say("!proxy_restart", member=harness.outsider)
    assert only_reply(sent, message).content == "You need an ops role to run `!proxy_restart`."
    # Refusals and configuration errors consume no cooldown.
    configured = harness.settings()
    await harness.remove_cog()
    await harness.add_cog(configured)
    message = await harness.say("!proxy_restart")
    assert only_reply(sent, message).content.startswith("✅ Restarted")
    assert len(systemctl.calls()) == 1


async def test_owner_needs_no_role(harness: Harness, systemctl: SystemctlStub, sent):
    harness.bot.owner_id = harness.outsider.id
    await harness.add_cog()
    message = await harness.say("!proxy_restart", member=harness.outsider)
    assert only_reply(sent, message).content.startswith("✅ Restarted")


async def test_per_command_role_override_and_role_names(
    harness: Harness, systemctl: SystemctlStub, sent
):
    await dpytest.add_role(harness.outsider, harness.other_role)  # "deployers"
    settings = harness.settings(
        OPS_ADMIN_ROLE_IDS="12345",  # nobody's role: Alice's "ops" counts by name only
        OPS_ADMIN_ROLE_NAMES="ops",
        OPS_GUILD_IDS=str(harness.guild.id),
        OPS_ROLE_IDS_PROXY_RESTART=str(harness.other_role.id),
    )
    await harness.add_cog(settings)
    alice, mallory = harness.admins[0], harness.outsider

    message = await harness.say("!ops_status", member=alice)
    assert only_reply(sent, message).content.startswith("📊 Ops status")
    # The override replaces the admin roles, names included.
    message = await harness.say("!proxy_restart", member=alice)
    assert only_reply(sent, message).content == "You need an ops role to run `!proxy_restart`."
    message = await harness.say("!proxy_restart", member=mallory)
    assert only_reply(sent, message).content.startswith("✅ Restarted")
    message = await harness.say("!ops_status", member=mallory)
    assert only_reply(sent, message).content == "You need an ops role to run `!ops_status`."


async def test_role_names_count_only_in_the_listed_servers(harness: Harness, sent):
    settings = harness.settings(
        OPS_ADMIN_ROLE_IDS="12345",  # nobody's role: Alice's "ops" could only count by name
        OPS_ADMIN_ROLE_NAMES="ops",
        OPS_GUILD_IDS="999000",  # not this server
    )
    await harness.add_cog(settings)
    message = await harness.say("!ops_status")
    # A server that is not listed is refused before any role is looked at.
    assert only_reply(sent, message).content == "These commands only work in a server."


async def test_role_names_are_ignored_unless_configured(harness: Harness, sent):
    ops_named = dpytest.backend.make_role("admin", harness.guild)
    await dpytest.add_role(harness.outsider, ops_named)
    await harness.add_cog()
    message = await harness.say("!ops_status", member=harness.outsider)
    assert only_reply(sent, message).content == "You need an ops role to run `!ops_status`."


# --------------------------------------------------------------------------------------------
# Cooldowns survive a restart
# --------------------------------------------------------------------------------------------


async def _run_then_restart(
    harness: Harness, sent: list[Sent], before: Any, after: Any, **env: str
) -> Sent:
    """!proxy_restart runs; then a new bot and cog (``after`` Redis client, ``env``) try again."""
    await harness.add_cog(redis=before)
    await harness.say("!proxy_restart")
    await harness.remove_cog()

    bot, config = await configured_bot(members=["erin"])
    role = dpytest.backend.make_role("ops", config.guilds[0])
    await dpytest.add_role(config.members[0], role)
    settings = harness.settings(OPS_ADMIN_ROLE_IDS=str(role.id), **env)
    await bot.add_cog(AdminOps(bot, settings=settings, redis=after))
    try:
        message = await dpytest.message(
            "!proxy_restart", channel=config.channels[0], member=config.members[0]
        )
        return only_reply(sent, message)
    finally:
        await bot.remove_cog("AdminOps")


async def test_cooldown_survives_a_restart_with_redis(
    harness: Harness, redis_server: Any, systemctl: SystemctlStub, sent
):
    first = aioredis.Redis.from_url(redis_server.url)
    second = aioredis.Redis.from_url(redis_server.url)
    try:
        # A different state dir: only Redis can carry the cooldown over.
        elsewhere = str(harness.state_dir / "elsewhere")
        reply = await _run_then_restart(harness, sent, first, second, OPS_STATE_DIR=elsewhere)
    finally:
        await first.aclose()
        await second.aclose()
    assert "is cooling down" in reply.content
    assert len(systemctl.calls()) == 1


async def test_cooldown_survives_a_restart_with_the_state_file(
    harness: Harness, systemctl: SystemctlStub, sent
):
    reply = await _run_then_restart(harness, sent, None, None)
    assert "is cooling down" in reply.content
    assert len(systemctl.calls()) == 1
    assert (harness.state_dir / "cooldowns.json").exists()


# --------------------------------------------------------------------------------------------
# !bot_restart and the back-online notice
# --------------------------------------------------------------------------------------------


async def test_restart_replies_first_then_asks_systemd(
    harness: Harness, systemctl: SystemctlStub, redis_client: Any, sent, key_prefix: str
):
    cog = await harness.add_cog(redis=redis_client, key_prefix=key_prefix)
    message = await harness.say("!bot_restart")
    reply = only_reply(sent, message)
    assert reply.content == "♻️ Restarting `bot.service` (requested by alice)…"
    [call] = systemctl.calls()
    assert call["argv"] == ["--no-block", "--no-ask-password", "restart", "--", "bot.service"]
    assert reply.at < call["at"]
    marker = stored_marker(await redis_client.get(cog.markers.key))
    assert marker["message_id"] == message.id
    assert marker["channel_id"] == harness.channel.id
    assert marker["requester_id"] == harness.admins[0].id
    # The restart acted: its cooldown holds (and, in Redis, outlives the process).
    message = await harness.say("!bot_restart")
    assert "cooling down — try again in 2m 00s." in only_reply(sent, message).content


async def test_restart_failure_is_reported_and_clears_marker_and_cooldown(
    harness: Harness, systemctl: SystemctlStub, sent
):
    cog = await harness.add_cog()
    systemctl.fail(1, "Failed to restart bot.service: Interactive authentication required.\n")
    message = await harness.say("!bot_restart")
    first, failure = replies_to(sent, message)
    assert first.content.startswith("♻️ Restarting")
    assert failure.content.startswith("❌ Could not restart `bot.service`")
    assert "Interactive authentication required" in failure.content
    assert not cog.markers.path.exists()
    message = await harness.say("!bot_restart")
    assert replies_to(sent, message)[0].content.startswith("♻️ Restarting")
    assert len(systemctl.calls()) == 2


async def test_exit_mode_replies_marks_closes_and_exits_26(
    harness: Harness, systemctl: SystemctlStub, monkeypatch: pytest.MonkeyPatch, sent
):
    closed: list[float] = []

    async def close() -> None:
        closed.append(time.time())

    monkeypatch.setattr(harness.bot, "close", close)
    settings = harness.settings(OPS_RESTART_MODE="exit", OPS_BOT_SERVICE="")
    cog = await harness.add_cog(settings)
    message = await harness.say("!bot_restart")
    reply = only_reply(sent, message)
    assert reply.content == "♻️ Restarting the bot (requested by alice)…"
    assert json.loads(cog.markers.path.read_text())["message_id"] == message.id
    assert len(closed) == 1
    assert reply.at <= closed[0]
    assert harness.exits == [26]
    assert systemctl.calls() == []


async def _reload_and_get_ready(harness: Harness, **kwargs: Any) -> AdminOps:
    """What a restart looks like to the cog: loaded again, then the bot becomes ready."""
    if "AdminOps" in harness.bot.cogs:
        await harness.remove_cog()
    cog = await harness.add_cog(**kwargs)
    harness.bot._ready.set()
    harness.bot.dispatch("ready")
    await dpytest.run_all_events()
    assert cog.back_online_task is not None
    await cog.back_online_task
    return cog


async def test_back_online_notice_replies_to_the_restart_request(
    harness: Harness, git_repos: Any, redis_client: Any, sent, key_prefix: str
):
    before = git_repos.head()[:7]
    cog = await harness.add_cog(redis=redis_client, key_prefix=key_prefix)
    message = await harness.say("!bot_restart")
    # Seven seconds pass and the new process runs a newer commit.
    marker = stored_marker(await redis_client.get(cog.markers.key))
    marker["requested_at"] -= 7
    await redis_client.set(cog.markers.key, cog.markers.sealed(marker))
    git_repos.commit_upstream("New code")
    git(git_repos.clone, "pull", "-q", "--ff-only")
    after = git_repos.head()[:7]

    await _reload_and_get_ready(harness, redis=redis_client, key_prefix=key_prefix)
    notice = replies_to(sent, message)[-1]
    assert notice.content == f"✅ Back online after 7 s — now at {after} (was {before})"
    assert await redis_client.exists(cog.markers.key) == 0
    # Once only: another load finds no marker.
    count = len(sent)
    await _reload_and_get_ready(harness, redis=redis_client, key_prefix=key_prefix)
    assert len(sent) == count


async def test_back_online_posts_in_the_channel_when_the_request_is_gone(harness: Harness, sent):
    cog = await harness.add_cog()
    message = await harness.say("!bot_restart")
    dpytest.backend.delete_message(message)
    count = len(sent)
    await _reload_and_get_ready(harness)
    [notice] = sent[count:]
    assert notice.content.startswith("✅ Back online after ")
    assert notice.reference is None
    assert not cog.markers.path.exists()


async def test_back_online_with_the_channel_gone_only_logs(
    harness: Harness, sent, caplog: pytest.LogCaptureFixture
):
    cog = await harness.add_cog()
    await cog.markers.save(
        {"channel_id": 4242, "message_id": 1, "requested_at": time.time(), "commit": None}
    )
    count = len(sent)
    with caplog.at_level(logging.WARNING, logger="cogs.admin_ops"):
        await _reload_and_get_ready(harness)
    assert sent[count:] == []
    assert "channel 4242 of the restart request is gone" in caplog.text


async def test_a_stale_marker_is_discarded_with_a_log_line(
    harness: Harness, sent, caplog: pytest.LogCaptureFixture
):
    cog = await harness.add_cog()
    message = await harness.say("!bot_restart")
    marker = json.loads(cog.markers.path.read_text())
    marker["requested_at"] -= MARKER_MAX_AGE + 60
    cog.markers.path.write_text(json.dumps(marker))
    count = len(sent)
    with caplog.at_level(logging.INFO, logger="cogs.admin_ops"):
        await _reload_and_get_ready(harness)
    assert sent[count:] == []
    assert replies_to(sent, message)[-1].content.startswith("♻️")
    assert "discarded without a notice" in caplog.text
    assert not cog.markers.path.exists()


async def test_a_stale_marker_still_gets_its_audit_record(
    harness: Harness, sent, caplog: pytest.LogCaptureFixture
):
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id))
    cog = await harness.add_cog(settings)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!bot_restart")
        assert audit_records(caplog) == []
        marker = json.loads(cog.markers.path.read_text())
        marker["requested_at"] -= MARKER_MAX_AGE + 60
        marker["audit"]["started_at"] -= MARKER_MAX_AGE + 60
        cog.markers.path.write_text(json.dumps(marker))
        count = len(sent)
        await _reload_and_get_ready(harness, settings=settings)
    [record] = audit_records(caplog)
    assert (record["command"], record["outcome"]) == ("bot_restart", "ok")
    assert re.fullmatch(r"restart requested; back online after 11m 0\ds", record["detail"])
    assert record["duration_s"] >= MARKER_MAX_AGE + 60
    # The audit channel gets the record; the request gets no notice.
    [posted] = sent[count:]
    assert posted.reference is None
    assert posted.content.startswith("`!bot_restart` by alice")
    assert replies_to(sent, message)[-1].content.startswith("♻️")


async def test_a_timed_out_self_restart_is_recorded_now_and_still_announced(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent, caplog: pytest.LogCaptureFixture
):
    async def timed_out(unit: str, **_: object) -> RestartRequest:
        summary = f"systemctl restart {unit} timed out after 10s; the job may still complete"
        return RestartRequest(UnitResult(False, summary, timed_out=True))

    monkeypatch.setattr(chat_restart, "request_own_restart", timed_out)
    cog = await harness.add_cog()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!bot_restart")
        _, failure = replies_to(sent, message)
        assert failure.content.startswith("❌ Could not restart `bot.service`")
        # systemd may still run the job: the marker stays to announce it, the cooldown holds.
        assert cog.markers.path.exists()
        again = await harness.say("!bot_restart")
        assert "cooling down" in only_reply(sent, again).content
        count = len(sent)
        await _reload_and_get_ready(harness)
    # Recorded once, by the process that asked: the one that comes back only announces it.
    assert [(r["command"], r["outcome"]) for r in audit_records(caplog)] == [
        ("bot_restart", "failed"),
        ("bot_restart", "refused:cooldown"),
    ]
    [notice] = sent[count:]
    assert notice.content.startswith("✅ Back online after ")
    assert notice.reference == message.id


async def test_a_crashing_restart_request_is_recorded_once_and_leaves_no_marker(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent, caplog: pytest.LogCaptureFixture
):
    async def crash(unit: str, **_: object) -> RestartRequest:
        raise OSError("the bus is gone")

    monkeypatch.setattr(chat_restart, "request_own_restart", crash)
    cog = await harness.add_cog()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!bot_restart")
        assert replies_to(sent, message)[-1].content == (
            "❌ `!bot_restart` failed unexpectedly; the details are in the bot's log."
        )
        assert not cog.markers.path.exists()
        count = len(sent)
        await _reload_and_get_ready(harness)
    assert [r["outcome"] for r in audit_records(caplog)] == ["error"]
    assert sent[count:] == []


async def test_exit_mode_records_the_restart_once_before_it_closes(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent, caplog: pytest.LogCaptureFixture
):
    settings = harness.settings(OPS_RESTART_MODE="exit", OPS_BOT_SERVICE="")
    records_at_close: list[int] = []

    async def close() -> None:
        records_at_close.append(len(audit_records(caplog)))

    monkeypatch.setattr(harness.bot, "close", close)
    await harness.add_cog(settings)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        await harness.say("!bot_restart")
        await _reload_and_get_ready(harness, settings=settings)
    [record] = audit_records(caplog)
    assert (record["outcome"], record["detail"]) == ("ok", "exit 26")
    assert records_at_close == [1]
    assert harness.exits == [26]


async def test_a_redis_outage_falls_back_to_the_state_dir(
    harness: Harness, systemctl: SystemctlStub, sent
):
    dead = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5, socket_connect_timeout=0.5
    )
    try:
        cog = await harness.add_cog(redis=dead)
        message = await harness.say("!bot_restart")
        assert only_reply(sent, message).content.startswith("♻️ Restarting")
        assert len(systemctl.calls()) == 1
        assert json.loads(cog.markers.path.read_text())["message_id"] == message.id
        message = await harness.say("!bot_restart")
        assert "cooling down" in only_reply(sent, message).content
        message = await harness.say("!ops_status")
        assert "redis      unreachable (" in only_reply(sent, message).content
    finally:
        await dead.aclose()


# --------------------------------------------------------------------------------------------
# Output safety
# --------------------------------------------------------------------------------------------


async def test_mentions_in_output_ping_nobody(harness: Harness, git_repos: Any, sent):
    await harness.add_cog()
    git_repos.commit_upstream(f"@everyone <@&{harness.ops_role.id}> <@{harness.admins[1].id}>")
    message = await harness.say("!bot_pull")
    reply = only_reply(sent, message)
    assert "@everyone" in reply.content
    assert reply.allowed_mentions == {"parse": [], "replied_user": False}


async def test_output_cannot_break_out_of_its_code_block(harness: Harness, git_repos: Any, sent):
    await harness.add_cog()
    git_repos.commit_upstream("```\n**bold** @here")
    message = await harness.say("!bot_pull")
    content = only_reply(sent, message).content
    assert content.count("```") == 2
    assert "```" not in code_block(content)
    assert "**bold** @here" in content


async def test_long_output_goes_into_an_attachment(harness: Harness, git_repos: Any, sent):
    await harness.add_cog()
    subjects = [f"Change {n} " + "y" * 250 for n in range(10)]
    for subject in subjects:
        git_repos.commit_upstream(subject)
    message = await harness.say("!bot_pull")
    reply = only_reply(sent, message)
    assert reply.content == "✅ `bot` updated\n📎 Full output attached."
    assert len(reply.content) <= MESSAGE_LIMIT
    attached = reply.files["bot_pull.txt"]
    assert all(subject in attached for subject in subjects)


async def test_secrets_are_redacted_from_a_failing_pull(
    harness: Harness, git_repos: Any, tmp_path: Path, sent
):
    github_token = "ghp_" + "A1b2C3d4E5" * 4
    bot_token = harness.base_env["DISCORD_TOKEN"]
    extra = "hunter2-database-password"
    failing = write_script(
        tmp_path / "failing-upload-pack",
        f"echo 'fatal: cannot read https://deploy:{github_token}@git.example.invalid/r.git' >&2\n"
        f"echo 'hook said {bot_token} and {extra}' >&2\n"
        "exit 128\n",
    )
    git(git_repos.clone, "config", "remote.origin.uploadpack", str(failing))
    settings = harness.settings(OPS_REDACT_ENV="DB_PASSWORD", DB_PASSWORD=extra)
    await harness.add_cog(settings)
    message = await harness.say("!bot_pull")
    reply = only_reply(sent, message)
    assert reply.content.startswith("❌ `bot` pull failed")
    assert "https://***@git.example.invalid/r.git" in reply.content
    for secret in (github_token, bot_token, extra):
        assert all(secret not in (s.content or "") for s in sent)


# --------------------------------------------------------------------------------------------
# Audit
# --------------------------------------------------------------------------------------------


async def test_every_invocation_is_audited(
    harness: Harness,
    systemctl: SystemctlStub,
    redis_client: Any,
    sent,
    caplog: pytest.LogCaptureFixture,
):
    audit_channel = harness.other_channel
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(audit_channel.id))
    await harness.add_cog(settings, redis=redis_client)  # the default prefix: sg:control
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        await harness.say("!proxy_restart")
        await harness.say("!proxy_restart", member=harness.admins[1])
        await harness.say("!bot_pull <@&1> secret", member=harness.outsider)

    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT_LOGGER]
    assert [(r["command"], r["outcome"]) for r in records] == [
        ("proxy_restart", "ok"),
        ("proxy_restart", "refused:cooldown"),
        ("bot_pull", "refused:role"),
    ]
    first = records[0]
    assert first["user_id"] == harness.admins[0].id
    assert first["guild_id"] == harness.guild.id
    assert first["channel_id"] == harness.channel.id
    assert first["args"] == []
    assert records[2]["args"] == ["<@&1> secret"]
    assert all(r["duration_s"] >= 0 for r in records)

    entries = await redis_client.xrange("sg:control:audit")
    assert [e[1][b"outcome"] for e in entries] == [b"ok", b"refused:cooldown", b"refused:role"]
    assert entries[0][1][b"user_id"] == str(harness.admins[0].id).encode()

    in_channel = [s for s in sent if s.reference is None]
    assert len(in_channel) == 3
    assert in_channel[0].content.startswith("`!proxy_restart` by alice")
    assert in_channel[2].content.startswith("`!bot_pull <@&1> secret` by mallory")


# --------------------------------------------------------------------------------------------
# !ops_status
# --------------------------------------------------------------------------------------------


async def test_status_shows_host_units_targets_cooldowns_and_redis(
    harness: Harness, git_repos: Any, redis_client: Any, sent, key_prefix: str
):
    await harness.add_cog(redis=redis_client, key_prefix=key_prefix)
    await harness.say("!proxy_restart")
    message = await harness.say("!ops_status")
    content = only_reply(sent, message).content
    assert content.startswith("📊 Ops status for `")
    assert "bot.service: active" in content
    assert "proxy.service: active" in content
    assert f"{git_repos.head()[:7]} ← origin/main" in content
    assert re.search(r"cooldowns  proxy_restart (29|30) s", content)
    assert "redis      reachable" in content


# --------------------------------------------------------------------------------------------
# The burst
# --------------------------------------------------------------------------------------------


async def test_a_burst_of_200_pulls_runs_git_once_per_cooldown_window(
    harness: Harness, git_repos: Any, redis_client: Any, tmp_path: Path, sent, key_prefix: str
):
    counter = count_fetches(git_repos.clone, tmp_path)
    bot, config = await configured_bot(members=[f"admin{n}" for n in range(5)])
    role = dpytest.backend.make_role("ops", config.guilds[0])
    for member in config.members:
        await dpytest.add_role(member, role)
    settings = harness.settings(OPS_ADMIN_ROLE_IDS=str(role.id))
    cog = AdminOps(bot, settings=settings, redis=redis_client, key_prefix=key_prefix)
    await bot.add_cog(cog)
    channel = config.channels[0]

    async def burst(size: int) -> list[discord.Message]:
        # All messages arrive before any handler runs: a real burst, not one after another.
        messages = [
            dpytest.backend.make_message("!bot_pull", config.members[n % 5], channel)
            for n in range(size)
        ]
        await dpytest.run_all_events()
        return messages

    git_repos.commit_upstream("first window")
    window_one = await burst(200)
    assert fetches(counter) == 1
    # The window ends (as if 15 s passed), and the next burst again runs git exactly once.
    await cog.cooldowns["bot_pull"].release("bot_pull")
    window_two = await burst(100)
    assert fetches(counter) == 2

    for message in window_one + window_two:
        assert len(replies_to(sent, message)) == 1, "every message gets exactly one answer"
    answers = [replies_to(sent, m)[0].content for m in window_one]
    assert sum(a.startswith("✅ `bot` updated") for a in answers) == 1
    assert all(a.startswith("✅") or "already running" in a or "cooling down" in a for a in answers)
    await bot.remove_cog("AdminOps")


# --------------------------------------------------------------------------------------------
# Loading as an extension
# --------------------------------------------------------------------------------------------


async def test_loads_as_an_extension_with_settings_from_the_environment(
    harness: Harness, redis_server: Any, monkeypatch: pytest.MonkeyPatch
):
    for key, value in harness.base_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    await harness.bot.load_extension("cogs.admin_ops")
    cog: Any = harness.bot.get_cog("AdminOps")
    # load_extension imports the module afresh, so the class is a twin of ours, not ours.
    assert type(cog).__qualname__ == "AdminOps"
    assert cog.settings.proxy_service == "proxy.service"
    assert await cog.redis.ping()
    await harness.bot.unload_extension("cogs.admin_ops")


async def test_restart_is_audited_once_by_the_process_that_comes_back(
    harness: Harness, systemctl: SystemctlStub, sent, caplog: pytest.LogCaptureFixture
):
    # systemd stops the bot as soon as it runs the job, so the process that asks writes no
    # record: its marker carries the invocation, and the process that comes back records it.
    await harness.add_cog()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        await harness.say("!bot_restart")
        assert [r for r in caplog.records if r.name == AUDIT_LOGGER] == []
        [call] = systemctl.calls()
        await _reload_and_get_ready(harness)
    [record] = [r for r in caplog.records if r.name == AUDIT_LOGGER]
    written = json.loads(record.getMessage())
    assert (written["command"], written["outcome"]) == ("bot_restart", "ok")
    assert written["user_id"] == harness.admins[0].id
    assert written["channel_id"] == harness.channel.id
    assert re.fullmatch(r"restart requested; back online after \d+ s", written["detail"])
    assert record.created > call["at"]


async def test_a_failed_restart_request_is_audited_once(
    harness: Harness, systemctl: SystemctlStub, sent, caplog: pytest.LogCaptureFixture
):
    await harness.add_cog()
    systemctl.fail(1, "Failed to restart bot.service: Access denied\n")
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        await harness.say("!bot_restart")
    outcomes = [
        json.loads(r.getMessage())["outcome"] for r in caplog.records if r.name == AUDIT_LOGGER
    ]
    assert outcomes == ["failed"]


# --------------------------------------------------------------------------------------------
# Guarantees each pinned by one test (a reviewer removed each one and every other test passed)
# --------------------------------------------------------------------------------------------


async def test_a_long_outputs_attachment_is_redacted_too(
    harness: Harness, git_repos: Any, monkeypatch: pytest.MonkeyPatch, sent
):
    # The cog redacts whatever it shows, even output whose source did not (here a pull run
    # without the cog's secrets), and an attachment is shown as much as the message text.
    bot_token = harness.base_env["DISCORD_TOKEN"]
    extra = "hunter2-database-password"
    real_pull = chat_actions.pull_checkout

    async def forgetful_pull(*args: Any, **kwargs: Any) -> Any:
        return await real_pull(*args, **{**kwargs, "secrets": ()})

    monkeypatch.setattr(chat_actions, "pull_checkout", forgetful_pull)
    await harness.add_cog(harness.settings(OPS_REDACT_ENV="DB_PASSWORD", DB_PASSWORD=extra))
    for n in range(9):
        git_repos.commit_upstream(f"Change {n} " + "y" * 250)
    git_repos.commit_upstream(f"Leak {bot_token} and {extra} here")
    message = await harness.say("!bot_pull")
    reply = only_reply(sent, message)
    assert reply.content == "✅ `bot` updated\n📎 Full output attached."
    attached = reply.files["bot_pull.txt"]
    assert "Leak *** and *** here" in attached
    assert bot_token not in attached
    assert extra not in attached


async def test_back_online_waits_until_the_bot_is_ready(harness: Harness, sent):
    await harness.add_cog()
    message = await harness.say("!bot_restart")
    count = len(sent)
    # The new process loads the cog before it is connected.
    await harness.remove_cog()
    assert not harness.bot.is_ready()
    cog = await harness.add_cog()
    await dpytest.run_all_events()
    if cog.back_online_task is not None:  # give a premature notice every chance to go out
        await cog.back_online_task
    assert sent[count:] == []
    assert cog.markers.path.exists()

    harness.bot._ready.set()
    harness.bot.dispatch("ready")
    await dpytest.run_all_events()
    assert cog.back_online_task is not None
    await cog.back_online_task
    [notice] = sent[count:]
    assert notice.content.startswith("✅ Back online after ")
    assert notice.reference == message.id


async def test_the_audit_stream_is_capped_near_10000_entries(
    harness: Harness,
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    sent,
    key_prefix: str,
):
    stream = f"{key_prefix}:audit"
    async with redis_client.pipeline(transaction=False) as pipe:
        for n in range(10_500):
            pipe.xadd(stream, {"n": str(n)})
        await pipe.execute()
    calls: list[dict[str, Any]] = []
    real_xadd = redis_client.xadd

    async def xadd(name: str, fields: dict[str, Any], **kwargs: Any) -> Any:
        calls.append({"name": name, **kwargs})
        return await real_xadd(name, fields, **kwargs)

    monkeypatch.setattr(redis_client, "xadd", xadd)
    await harness.add_cog(redis=redis_client, key_prefix=key_prefix)
    await harness.say("!ops_status")
    [call] = calls
    assert call["name"] == stream
    assert call.get("maxlen") == 10_000
    assert call.get("approximate", True) is True  # "~": Redis trims whole nodes, cheaply
    # Approximate trimming leaves at most one node (100 entries) beyond the cap.
    assert 10_000 <= await redis_client.xlen(stream) <= 10_100
    await redis_client.delete(stream)


async def test_pull_shows_typing_while_git_runs(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent
):
    events: list[Any] = []
    real_enter, real_exit = Typing.__aenter__, Typing.__aexit__
    real_pull = chat_actions.pull_checkout

    async def enter(self: Typing) -> None:
        await real_enter(self)
        events.append(("typing in", self.channel.id if self.channel else None))

    async def exit_(self: Typing, *exc: Any) -> None:
        events.append("typing stopped")
        await real_exit(self, *exc)

    async def pull(*args: Any, **kwargs: Any) -> Any:
        events.append("git starts")
        try:
            return await real_pull(*args, **kwargs)
        finally:
            events.append("git ends")

    monkeypatch.setattr(Typing, "__aenter__", enter)
    monkeypatch.setattr(Typing, "__aexit__", exit_)
    monkeypatch.setattr(chat_actions, "pull_checkout", pull)
    await harness.add_cog()
    message = await harness.say("!bot_pull")
    assert only_reply(sent, message).content.startswith("✅ `bot` already up to date")
    assert events == [
        ("typing in", harness.channel.id),
        "git starts",
        "git ends",
        "typing stopped",
    ]


async def test_the_channel_check_comes_before_the_configuration_check(
    harness: Harness, systemctl: SystemctlStub, sent
):
    # An admin in the wrong channel learns nothing about what is configured.
    settings = harness.settings(OPS_CHANNEL_IDS=str(harness.channel.id), OPS_PROXY_SERVICE="")
    await harness.add_cog(settings)
    message = await harness.say("!proxy_restart", channel=harness.other_channel)
    assert only_reply(sent, message).content == "`!proxy_restart` can't be used in this channel."
    message = await harness.say("!bot_pull nope", channel=harness.other_channel)
    assert only_reply(sent, message).content == "`!bot_pull` can't be used in this channel."
    assert systemctl.calls() == []


async def test_audit_records_are_redacted(
    harness: Harness,
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    sent,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
):
    token = harness.base_env["DISCORD_TOKEN"]

    async def leaky(unit: str, timeout: float = 20.0, **_: object) -> UnitResult:
        raise OSError(f"cannot reach the bus with {token}")

    monkeypatch.setattr(chat_actions, "restart_unit", leaky)
    settings = harness.settings(OPS_AUDIT_CHANNEL_ID=str(harness.other_channel.id))
    await harness.add_cog(settings, redis=redis_client, key_prefix=key_prefix)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        await harness.say(f"!bot_pull {token}")  # pasted into the wrong window
        await harness.say("!proxy_restart")
    lines = [r.getMessage() for r in caplog.records if r.name == AUDIT_LOGGER]
    records = [json.loads(line) for line in lines]
    assert [(r["command"], r["outcome"]) for r in records] == [
        ("bot_pull", "refused:config"),
        ("proxy_restart", "error"),
    ]
    assert records[0]["args"] == ["***"]
    assert records[1]["detail"] == "OSError: cannot reach the bus with ***"
    assert all(token not in line for line in lines)

    entries = await redis_client.xrange(f"{key_prefix}:audit")
    assert [e[1][b"args"] for e in entries] == [b'["***"]', b"[]"]
    assert entries[1][1][b"detail"] == b"OSError: cannot reach the bus with ***"
    assert all(token.encode() not in value for _, e in entries for value in e.values())
    assert all(token not in (s.content or "") for s in sent)


async def test_pull_names_this_instance_host_service_and_pid(
    harness: Harness, redis_client: Any, monkeypatch: pytest.MonkeyPatch, sent, key_prefix: str
):
    # The Redis lock's holder: another service skipping this pull is told who holds it.
    calls: list[dict[str, Any]] = []
    real_pull = chat_actions.pull_checkout

    async def pull(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return await real_pull(*args, **kwargs)

    monkeypatch.setattr(chat_actions, "pull_checkout", pull)
    await harness.add_cog(redis=redis_client, key_prefix=key_prefix)
    message = await harness.say("!bot_pull")
    assert only_reply(sent, message).content.startswith("✅")
    [kwargs] = calls
    assert kwargs["instance_id"] == f"{socket.gethostname()}:bot.service:{os.getpid()}"
    assert kwargs["redis"] is redis_client
    assert kwargs["dedupe"] is True


def make_thread(parent: discord.TextChannel, owner: discord.Member) -> discord.Thread:
    """A public thread of ``parent``, known to its guild (dpytest 0.7.0 cannot make threads)."""
    data: Any = {
        "id": dpytest.factories.make_id(),
        "guild_id": parent.guild.id,
        "parent_id": parent.id,
        "owner_id": owner.id,
        "name": "incident",
        "type": discord.ChannelType.public_thread.value,
        "message_count": 0,
        "member_count": 1,
        "rate_limit_per_user": 0,
        "thread_metadata": {
            "archived": False,
            "auto_archive_duration": 1440,
            "archive_timestamp": "2024-01-01T00:00:00+00:00",
            "locked": False,
        },
    }
    thread = discord.Thread(guild=parent.guild, state=dpytest.backend.get_state(), data=data)
    parent.guild._add_thread(thread)
    return thread


async def test_a_thread_of_an_allowed_channel_is_allowed(
    harness: Harness, systemctl: SystemctlStub, sent
):
    await harness.add_cog(harness.settings(OPS_CHANNEL_IDS=str(harness.channel.id)))
    thread = make_thread(harness.channel, harness.admins[0])
    message = await harness.say("!proxy_restart", channel=thread)
    assert only_reply(sent, message).content.startswith("✅ Restarted `proxy.service`")
    elsewhere = make_thread(harness.other_channel, harness.admins[1])
    message = await harness.say("!ops_status", channel=elsewhere)
    assert only_reply(sent, message).content == "`!ops_status` can't be used in this channel."
    assert len(systemctl.calls()) == 1


async def test_the_connections_token_is_redacted_when_not_in_the_settings(
    harness: Harness, git_repos: Any, tmp_path: Path, sent
):
    # Loaded into an existing bot that got its token elsewhere: DISCORD_TOKEN is unset.
    connection_token = "connection-token-" + "Zx9q" * 6
    harness.bot.http.token = connection_token
    failing = write_script(
        tmp_path / "failing-upload-pack",
        f"echo 'hook said {connection_token}' >&2\nexit 128\n",
    )
    git(git_repos.clone, "config", "remote.origin.uploadpack", str(failing))
    await harness.add_cog(harness.settings(DISCORD_TOKEN=""))
    message = await harness.say("!bot_pull")
    reply = only_reply(sent, message)
    assert reply.content.startswith("❌ `bot` pull failed")
    assert "hook said ***" in reply.content
    assert all(connection_token not in (s.content or "") for s in sent)


async def test_exit_mode_writes_the_marker_before_closing_the_bot(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sent
):
    settings = harness.settings(OPS_RESTART_MODE="exit", OPS_BOT_SERVICE="")
    marker_written_at_close: list[bool] = []

    async def close() -> None:
        marker_written_at_close.append(settings.marker_file.exists())

    monkeypatch.setattr(harness.bot, "close", close)
    await harness.add_cog(settings)
    await harness.say("!bot_restart")
    assert marker_written_at_close == [True]
    assert harness.exits == [26]


def test_loading_the_cog_into_any_bot_makes_the_process_undumpable(tmp_path: Path) -> None:
    # The drop-in case: a bot that is not ours loads the cog. Its token (and with an in-process
    # daemon the fleet secret) must not be readable by the git hooks of the checkouts it pulls.
    script = (
        "import asyncio, discord\n"
        "from discord.ext import commands\n"
        "from core.hardening import is_dumpable\n"
        "async def main():\n"
        "    bot = commands.Bot(command_prefix='!', intents=discord.Intents.default())\n"
        "    before = is_dumpable()\n"
        "    await bot.load_extension('cogs.admin_ops')\n"
        "    print(before, is_dumpable())\n"
        "    await bot.unload_extension('cogs.admin_ops')\n"
        "asyncio.run(main())\n"
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "OPS_STATE_DIR": str(tmp_path / "state"),
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
