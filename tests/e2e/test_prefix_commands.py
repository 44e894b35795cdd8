"""Prefix commands through the real ``bot.py``: discord.py's gateway parsing and HTTP."""

from __future__ import annotations

import pytest

from tests.support.chat import SystemctlStub
from tests.support.fake_discord import FakeDiscord, pings_nobody
from tests.support.fake_discord_bot import StartBot
from tests.support.fake_discord_payloads import FakeUser
from tests.support.git import GitRepos, git


async def test_bot_pull_updates_the_checkout_and_replies_to_the_command(
    start_bots: StartBot, fake_discord: FakeDiscord, git_repos: GitRepos
) -> None:
    new_head = git_repos.commit_upstream("fix the proxy config")
    bot = await start_bots()
    await bot.wait_ready()

    message = await fake_discord.post("!bot_pull", by=fake_discord.alice)
    reply = await bot.reply_to(message)

    assert git_repos.head() == new_head
    assert reply.content is not None
    assert reply.content.startswith("✅ `bot` updated")
    assert "fix the proxy config" in reply.content
    assert pings_nobody(reply.allowed_mentions)
    assert reply.body["message_reference"]["fail_if_not_exists"] is False
    typing = fake_discord.sent("POST /channels/{channel_id}/typing")
    assert typing, "typing… was shown while git ran"
    assert typing[0].seq < reply.seq
    assert fake_discord.replies_to(int(message["id"])) == [reply]  # exactly one reply
    assert fake_discord.unhandled() == []


async def test_long_output_goes_in_an_attachment(
    start_bots: StartBot, fake_discord: FakeDiscord, git_repos: GitRepos
) -> None:
    """A pull whose details do not fit in a message: multipart, with ``bot_pull.txt``."""
    for n in range(10):  # the most commits a pull lists, each with a long subject
        subject = f"change {n}: " + "adjust the upstream timeouts of the proxy " * 6
        git(git_repos.work, "commit", "-q", "--allow-empty", "-m", subject)
    git(git_repos.work, "push", "-q", "origin", "HEAD:main")
    bot = await start_bots()
    await bot.wait_ready()

    message = await fake_discord.post("!bot_pull", by=fake_discord.alice)
    reply = await bot.reply_to(message)

    assert reply.content == "✅ `bot` updated\n📎 Full output attached."
    assert list(reply.files) == ["bot_pull.txt"]
    attached = reply.files["bot_pull.txt"].decode()
    assert attached.startswith("Updated ")
    assert "change 9: adjust the upstream timeouts" in attached
    assert pings_nobody(reply.allowed_mentions)
    assert reply.reference_id == int(message["id"])
    stored = fake_discord.messages[reply.created_id or 0]
    assert stored["attachments"][0]["filename"] == "bot_pull.txt"


async def test_a_member_without_the_role_is_refused_and_nothing_runs(
    start_bots: StartBot,
    fake_discord: FakeDiscord,
    git_repos: GitRepos,
    systemctl: SystemctlStub,
) -> None:
    before = git_repos.head()
    git_repos.commit_upstream("not for bob")
    bot = await start_bots(OPS_PROXY_SERVICE="proxy.service")
    await bot.wait_ready()

    pull = await fake_discord.post("!bot_pull", by=fake_discord.bob)
    restart = await fake_discord.post("!proxy_restart", by=fake_discord.bob)

    assert (await bot.reply_to(pull)).content == "You need an ops role to run `!bot_pull`."
    assert (await bot.reply_to(restart)).content == (
        "You need an ops role to run `!proxy_restart`."
    )
    assert git_repos.head() == before
    assert systemctl.calls("restart") == []
    assert fake_discord.sent("POST /channels/{channel_id}/typing") == []


@pytest.mark.parametrize("through", ["owner", "team"])
async def test_the_application_owner_or_a_team_admin_needs_no_role(
    start_bots: StartBot, fake_discord: FakeDiscord, through: str
) -> None:
    """discord.py learns who owns the bot from ``GET /oauth2/applications/@me``."""
    user = fake_discord.owner
    if through == "team":
        user = FakeUser(fake_discord.ids(), "tess")
        fake_discord.team = [user]
    member = fake_discord.add_member(user)
    bot = await start_bots()
    await bot.wait_ready()

    message = await fake_discord.post("!ops_status", by=member)
    reply = await bot.reply_to(message)

    assert reply.content is not None
    assert reply.content.startswith("📊 Ops status")
