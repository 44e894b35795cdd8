"""The cog's commands as slash commands, through the real ``bot.py`` and discord.py's own code.

Registered as guild commands of ``OPS_GUILD_IDS`` (never globally) with "Manage Server" as their
default permission; the same pipeline as the prefix commands: a refusal answered privately, an
admitted command deferred ("thinking…") and then answered, Discord's forgetting of a late
interaction survived, a sync at start only when the command set changed, ``/ops_sync``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from core.settings import COMMANDS
from tests.support.chat import SystemctlStub
from tests.support.fake_discord import FakeDiscord, InteractionState, Recorded, pings_nobody
from tests.support.fake_discord_bot import BotProcess, StartBot
from tests.support.git import GitRepos
from tests.support.processes import write_script

GUILD_PUT = "PUT /applications/{application_id}/guilds/{guild_id}/commands"
GLOBAL_ROUTES = ("/applications/{application_id}/commands",)
CALLBACK = "POST /interactions/{interaction_id}/{token}/callback"
FOLLOWUP = "POST /webhooks/{application_id}/{token}"
MANAGE_GUILD = 1 << 5

#: A journalctl printing ``-n`` numbered lines of the unit asked for.
JOURNALCTL = """
import sys
unit = sys.argv[sys.argv.index("-u") + 1]
for n in range(int(sys.argv[sys.argv.index("-n") + 1])):
    print(f"2024-05-01T12:00:00+0000 web-1 {unit}[42]: line {n}")
"""


async def answered(bot: BotProcess, fake: FakeDiscord, state: InteractionState) -> Recorded:
    """The interaction's callback (its first answer)."""
    return await bot.until(
        lambda: next((r for r in fake.answers(state) if r.key == CALLBACK), None),
        what=f"the answer to interaction {state.id}",
    )


async def followed_up(bot: BotProcess, fake: FakeDiscord, state: InteractionState) -> Recorded:
    """The interaction's first follow-up."""
    return await bot.until(
        lambda: next((r for r in fake.answers(state) if r.key == FOLLOWUP), None),
        what=f"a follow-up to interaction {state.id}",
    )


async def test_slash_commands_run_the_pipeline_of_the_prefix_ones(
    start_bots: StartBot,
    fake_discord: FakeDiscord,
    git_repos: GitRepos,
    systemctl: SystemctlStub,
    tmp_path: Path,
) -> None:
    journalctl = write_script(tmp_path / "journalctl", JOURNALCTL, interpreter=sys.executable)
    new_head = git_repos.commit_upstream("fix the proxy config")
    bot = await start_bots(
        OPS_PROXY_SERVICE="proxy.service", OPS_JOURNALCTL=str(journalctl), OPS_CONFIRM="none"
    )
    await bot.wait_ready()
    await bot.wait_synced()
    (put,) = fake_discord.sent(GUILD_PUT)

    # Registered in the listed server only, every command, shown to server managers.
    assert put.params["guild_id"] == str(fake_discord.guild.id)
    assert sorted(c["name"] for c in put.json) == sorted(COMMANDS)
    assert {int(c["default_member_permissions"]) for c in put.json} == {MANAGE_GUILD}
    assert not [r for r in fake_discord.requests if r.route in GLOBAL_ROUTES]

    # /bot_pull: "thinking…" within Discord's 3 s, then the answer in its place.
    pull = await fake_discord.invoke("bot_pull", by=fake_discord.alice)
    deferred = await answered(bot, fake_discord, pull)
    answer = await followed_up(bot, fake_discord, pull)
    assert (deferred.json["type"], deferred.ephemeral) == (5, False)
    assert answer.content is not None
    assert answer.content.startswith("✅ `bot` updated")
    assert "fix the proxy config" in answer.content
    assert pings_nobody(answer.allowed_mentions)
    assert git_repos.head() == new_head
    shown = fake_discord.original(pull)
    assert shown is not None
    assert shown["content"] == answer.content  # the thinking message became the answer

    # /ops_logs with its integer option.
    logs = await fake_discord.invoke(
        "ops_logs",
        by=fake_discord.alice,
        options=[
            {"name": "unit", "type": 3, "value": "proxy.service"},
            {"name": "lines", "type": 4, "value": 3},
        ],
    )
    tail = await followed_up(bot, fake_discord, logs)
    assert tail.content is not None
    assert tail.content.startswith("📜 Last 3 lines of `proxy.service`\n```\n")
    assert "proxy.service[42]: line 2" in tail.content

    # A member without the role: answered privately, every time, and nothing runs.
    for _ in range(2):
        refused = await fake_discord.invoke("proxy_restart", by=fake_discord.bob)
        refusal = await answered(bot, fake_discord, refused)
        assert (refusal.json["type"], refusal.ephemeral) == (4, True)
        assert refusal.content == "You need an ops role to run `/proxy_restart`."
        assert pings_nobody(refusal.allowed_mentions)
    assert systemctl.calls("restart") == []

    # Autocompletion names the configured targets, to those who may run the command only.
    for member, expected in ((fake_discord.bob, []), (fake_discord.alice, ["bot"])):
        typing = await fake_discord.autocomplete("bot_pull", "target", "", by=member)
        offered = await answered(bot, fake_discord, typing)
        assert offered.json["type"] == 8
        assert [c["value"] for c in offered.body["choices"]] == expected

    # Her role taken away (GUILD_MEMBER_UPDATE), alice is refused like bob.
    alice = await fake_discord.update_member(fake_discord.alice)
    status = await fake_discord.invoke("ops_status", by=alice)
    assert (await answered(bot, fake_discord, status)).content == (
        "You need an ops role to run `/ops_status`."
    )
    assert fake_discord.unhandled() == []
    records = [(r["command"], r["outcome"]) for r in await bot.wait_audit(5)]
    assert records == [
        ("bot_pull", "ok"),
        ("ops_logs", "ok"),
        ("proxy_restart", "refused:role"),
        ("proxy_restart", "refused:role"),
        ("ops_status", "refused:role"),
    ]


async def test_an_interaction_discord_forgot_is_answered_in_the_channel(
    start_bots: StartBot, fake_discord: FakeDiscord
) -> None:
    """Answered too late (Discord answers 10062): the answer still arrives, in the channel."""
    bot = await start_bots()
    await bot.wait_ready()
    await bot.wait_synced()  # Discord lets members run only the commands it knows

    late = await fake_discord.invoke("ops_status", by=fake_discord.alice, expired=True)
    posted = await bot.until(
        lambda: next(iter(fake_discord.sent()), None), what="the status posted in the channel"
    )

    assert posted.content is not None
    assert posted.content.startswith("📊 Ops status")
    assert posted.params["channel_id"] == str(late.channel_id)
    assert pings_nobody(posted.allowed_mentions)
    assert {r.status for r in fake_discord.answers(late)} == {404}
    # A refusal is nobody else's business: it is not posted for all to see.
    refused = await fake_discord.invoke("ops_status", by=fake_discord.bob, expired=True)
    await bot.until(lambda: fake_discord.answers(refused), what="the refused answer attempt")
    second = await fake_discord.invoke("ops_status", by=fake_discord.alice)
    await followed_up(bot, fake_discord, second)
    # Each record follows its answer (or the attempt): the refusal was not posted after all.
    records = [(r["user"], r["outcome"]) for r in await bot.wait_audit(3)]
    assert sorted(records) == [("alice", "ok"), ("alice", "ok"), ("bob", "refused:role")]
    assert len(fake_discord.sent()) == 1


async def test_a_start_syncs_only_a_changed_command_set_and_ops_sync_forces_one(
    start_bots: StartBot, fake_discord: FakeDiscord
) -> None:
    first = await start_bots()
    session = await first.wait_ready()
    assert "synced in server" in await first.wait_synced()  # and its hash kept
    assert await first.stop() == 0

    second = await start_bots()  # the same state dir: the same host
    await second.wait_ready(after=session.number)
    assert "unchanged in 1 server(s): not synced" in await second.wait_synced()
    forced = await fake_discord.invoke("ops_sync", by=fake_discord.alice)
    answer = await followed_up(second, fake_discord, forced)

    assert answer.content is not None
    assert answer.content.startswith(f"✅ Synced {len(COMMANDS)} slash commands in 1 server")
    assert len(fake_discord.sent(GUILD_PUT)) == 2
    assert [r["outcome"] for r in await second.wait_audit(1)] == ["ok"]
