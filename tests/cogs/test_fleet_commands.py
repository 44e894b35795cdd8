"""The ``!fleet_*`` commands in dpytest, against real in-process control daemons.

Each daemon is a real :class:`core.control_ops.ControlDaemon` task with its own identity and
Redis client on the ephemeral Redis, pulling real git checkouts and restarting through the
systemctl stand-in. Edits of the live message are recorded by a spy on ``Message.edit`` (and,
through the ``sent`` fixture, checked for ``AllowedMentions.none()`` like every send). Nothing
waits by sleeping: tests wait on events, on Redis stream reads, or on the commands themselves.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
import redis.asyncio as aioredis

from cogs.admin_ops import MESSAGE_LIMIT, AdminOps
from core.control_ops import (
    ControlDaemon,
    HostResult,
    alive_hosts,
    command_stream_key,
    results_key,
)
from core.control_ops.wire import result_fields
from tests.support.chat import (
    AUDIT_LOGGER,
    Harness,
    Sent,
    SystemctlStub,
    audit_records,
    only_reply,
    replies_to,
)
from tests.support.fleet import signed_ghost
from tests.support.git import GitRepos, git
from tests.support.redis_proc import RedisServer, free_port

SECRET = "fleet-chat-secret-5e1d"
DEADLINE = 10.0  # a bound on anything a test waits for; tests finish far sooner
FINAL_OK = re.compile(r"\n✅ (\d+)/(\d+) hosts ok in \d+\.\d s$")


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Edit:
    """One ``Message.edit`` call the cog made."""

    message_id: int
    content: str | None
    allowed_mentions: Any
    at: float


@pytest.fixture
def edits(monkeypatch: pytest.MonkeyPatch) -> list[Edit]:
    """Every edit of a message, recorded before discord.py (and dpytest) handle it."""
    records: list[Edit] = []
    real = discord.Message.edit

    async def spy(self: discord.Message, *args: Any, **kwargs: Any) -> Any:
        records.append(
            Edit(self.id, kwargs.get("content"), kwargs.get("allowed_mentions"), time.time())
        )
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(discord.Message, "edit", spy)
    return records


class Fleet:
    """Control daemons as tasks on the test Redis, each with its own client, as on real hosts."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.clients: list[aioredis.Redis] = []

    async def start(self, identity: str, **options: Any) -> ControlDaemon:
        """Start a daemon and wait until it serves (its heartbeat is then written)."""
        client = aioredis.Redis.from_url(self.url, socket_timeout=5)
        self.clients.append(client)
        options.setdefault("pull_targets", {})
        options.setdefault("restart_units", ())
        daemon = ControlDaemon(
            client, identity=identity, secret=SECRET, prefix=self.prefix, **options
        )
        self.tasks[identity] = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.serving.wait(), DEADLINE)
        return daemon

    async def ghost(self, identity: str) -> None:
        """A heartbeat with no daemon behind it: a host that is expected but never answers."""
        client = self.clients[0] if self.clients else await self._client()
        await signed_ghost(client, identity, self.prefix, secret=SECRET)

    async def _client(self) -> aioredis.Redis:
        client = aioredis.Redis.from_url(self.url, socket_timeout=5)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.wait_for(
            asyncio.gather(*self.tasks.values(), return_exceptions=True), DEADLINE
        )
        for client in self.clients:
            await client.aclose()


@pytest.fixture
async def fleet(
    redis_server: RedisServer, redis_client: aioredis.Redis, key_prefix: str
) -> AsyncIterator[Fleet]:
    """Daemons started by the test; all stopped cleanly (cancelled) afterwards."""
    daemons = Fleet(redis_server.url, key_prefix)
    try:
        yield daemons
    finally:
        await daemons.close()


async def fleet_cog(
    harness: Harness,
    redis_client: aioredis.Redis,
    key_prefix: str,
    *,
    interval: float = 0.0,
    **env: str,
) -> AdminOps:
    """The cog with the shared secret, the test Redis and the test's key prefix."""
    settings = harness.settings(OPS_CONTROL_SECRET=SECRET, **env)
    return await harness.add_cog(
        settings, redis=redis_client, key_prefix=key_prefix, fleet_edit_interval=interval
    )


def clone_for(git_repos: GitRepos, tmp_path: Path, host: str) -> Path:
    """Each host's own checkout of the shared origin."""
    path = tmp_path / "hosts" / host
    path.parent.mkdir(exist_ok=True)
    git(path.parent, "clone", "-q", str(git_repos.origin), str(path))
    return path


def final_text(sent: list[Sent], edits: list[Edit], message: discord.Message) -> str:
    """What the live message says at the end: its last edit, else what was sent."""
    live = replies_to(sent, message)[0]
    assert live.content is not None
    return edits[-1].content if edits and edits[-1].content is not None else live.content


def audit_outcomes(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r["command"], r["outcome"]) for r in audit_records(caplog)]


async def published_commands(client: aioredis.Redis, prefix: str) -> list[dict[str, str]]:
    entries = await client.xrange(command_stream_key(prefix))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in entries]


async def answer_in_one_burst(
    url: str, prefix: str, hosts: Sequence[str], summary: Callable[[str], str], *, ran: bool = True
) -> None:
    """Stand in for ``hosts``: wait for the next command, then answer for all of them at once.

    Every answer is ok; ``ran=False``: each host skipped it (another service was pulling).
    """
    client = aioredis.Redis.from_url(url, socket_timeout=DEADLINE + 5)
    try:
        reply = await client.xread({command_stream_key(prefix): "0"}, count=1, block=10_000)
        assert reply, "no command was published"
        [(_stream, [(_entry, fields)])] = reply
        command_id, command_sig = fields[b"id"].decode(), fields[b"sig"].decode()
        pipe = client.pipeline(transaction=True)  # one MULTI: every answer lands together
        for host in hosts:
            # Signed, as a real daemon's answer is: the publisher believes nothing else.
            answer = HostResult(host, ok=True, ran=ran, summary=summary(host), duration=0.01)
            signed = result_fields(
                answer, command_id=command_id, secret=SECRET, command_sig=command_sig, prefix=prefix
            )
            pipe.xadd(results_key(command_id, prefix), dict(signed))
        await pipe.execute()
    finally:
        await client.aclose()


async def fleet_status_answered_at_once(
    harness: Harness, fleet: Fleet, hosts: Sequence[str], summary: Callable[[str], str]
) -> discord.Message:
    """Say ``!fleet_status`` while a stand-in answers for all of ``hosts`` at once."""
    answering = asyncio.create_task(answer_in_one_burst(fleet.url, fleet.prefix, hosts, summary))
    message = await harness.say("!fleet_status")
    await asyncio.wait_for(answering, DEADLINE)
    return message


# --------------------------------------------------------------------------------------------
# !fleet_pull
# --------------------------------------------------------------------------------------------


async def test_fleet_pull_fans_out_and_edits_one_message_live(
    harness: Harness,
    fleet: Fleet,
    git_repos: GitRepos,
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    sent: list[Sent],
    edits: list[Edit],
    caplog: pytest.LogCaptureFixture,
):
    hosts = ["web-1", "web-2", "web-3"]
    clones = {host: clone_for(git_repos, tmp_path, host) for host in hosts}
    for host in hosts:
        await fleet.start(host, pull_targets={"bot": clones[host]})
    new = git_repos.commit_upstream("Fleet-wide change")
    await fleet_cog(harness, redis_client, key_prefix)

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!fleet_pull")
    first = only_reply(sent, message)  # one message…
    assert first.content is not None
    assert first.content.startswith("📡 Fleet pull of `bot`\n```\n")
    for host in hosts:
        assert f"⏳ {host}  " in first.content
    assert first.content.endswith("⏳ 0/3 answered…")
    assert edits, "the message is edited as hosts answer"
    assert len({e.message_id for e in edits}) == 1  # …edited in place
    none = discord.AllowedMentions.none().to_dict()
    assert all(e.allowed_mentions.to_dict() == none for e in edits)

    final = final_text(sent, edits, message)
    match = FINAL_OK.search(final)
    assert match, final
    assert match.groups() == ("3", "3")
    for host in hosts:
        assert re.search(rf"\n✅ {host}\s+\d+\.\d s  Updated [0-9a-f]{{7}} → {new[:7]} ", final)
        assert git(clones[host], "rev-parse", "HEAD") == new
    assert git_repos.head() != new  # the bot's own checkout is not a fleet host here
    assert audit_outcomes(caplog) == [("fleet_pull", "ok")]

    [command] = await published_commands(redis_client, key_prefix)
    alice = harness.admins[0]
    assert command["op"] == "pull"
    assert command["args"] == "[]"
    assert command["requested_by"] == f"{alice.name} ({alice.id}) via {socket.gethostname()}"

    # The run acted on every host: the cooldown (15 s by default) holds, for everyone.
    again = await harness.say("!fleet_pull", member=harness.admins[1])
    assert re.fullmatch(
        r"`!fleet_pull` is cooling down — try again in 1[45] s\.",
        only_reply(sent, again).content or "",
    )
    assert len(await published_commands(redis_client, key_prefix)) == 1


async def test_a_pull_every_host_skipped_is_not_shown_as_ok(
    harness: Harness,
    fleet: Fleet,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    edits: list[Edit],
    caplog: pytest.LogCaptureFixture,
):
    hosts = ["web-1", "web-2"]
    for host in hosts:
        await fleet.ghost(host)
    await fleet_cog(harness, redis_client, key_prefix)
    skipped = "Skipped: another service on this host is already pulling"
    answering = asyncio.create_task(
        answer_in_one_burst(fleet.url, fleet.prefix, hosts, lambda _h: skipped, ran=False)
    )
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!fleet_pull")
    await asyncio.wait_for(answering, DEADLINE)

    final = final_text(sent, edits, message)
    assert re.search(r"\n⏭️ 0/2 hosts ran it: skipped on 2 in \d+\.\d s$", final), final
    assert "✅" not in final  # every answer was ok, and nothing ran anywhere
    assert audit_outcomes(caplog) == [("fleet_pull", "skipped")]


async def test_a_host_whose_pull_fails_is_marked_and_listed(
    harness: Harness,
    fleet: Fleet,
    git_repos: GitRepos,
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    sent: list[Sent],
    edits: list[Edit],
    caplog: pytest.LogCaptureFixture,
):
    clones = {host: clone_for(git_repos, tmp_path, host) for host in ("a-1", "b-2")}
    git_repos.commit_upstream("upstream side")
    (clones["b-2"] / "local.txt").write_text("local\n")
    git(clones["b-2"], "add", "local.txt")
    git(clones["b-2"], "commit", "-q", "-m", "local side")
    for host, path in clones.items():
        await fleet.start(host, pull_targets={"bot": path, "worker": path})
    await fleet_cog(harness, redis_client, key_prefix)

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!fleet_pull worker")
    final = final_text(sent, edits, message)
    assert final.startswith("📡 Fleet pull of `worker`\n```\n")
    assert re.search(r"\n✅ a-1\s+\d+\.\d s  Updated ", final)
    assert re.search(r"\n❌ b-2\s+\d+\.\d s  Not pulled: the branch has diverged", final)
    assert re.search(r"\n❌ 1 failed: b-2 — 1/2 hosts ok in \d+\.\d s$", final)
    assert audit_outcomes(caplog) == [("fleet_pull", "failed")]
    [command] = await published_commands(redis_client, key_prefix)
    assert command["args"] == '["worker"]'

    # git ran on both hosts: the run acted, so the cooldown holds although it failed.
    again = await harness.say("!fleet_pull")
    assert "is cooling down" in (only_reply(sent, again).content or "")


async def test_a_silent_host_is_listed_and_a_second_run_is_refused_meanwhile(
    harness: Harness,
    fleet: Fleet,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    edits: list[Edit],
):
    await fleet.start("web-1")
    await fleet.ghost("gone-1")
    await fleet_cog(harness, redis_client, key_prefix, OPS_FLEET_TIMEOUT="1")

    # dpytest.message() waits for every handler, so the first one is not awaited yet.
    first = dpytest.backend.make_message("!fleet_status", harness.admins[0], harness.channel)
    await asyncio.wait_for(dpytest.runner.sent_queue.get(), DEADLINE)  # the live message is out
    second = dpytest.backend.make_message("!fleet_status", harness.admins[1], harness.channel)
    await dpytest.run_all_events()

    assert re.fullmatch(
        r"`!fleet_status` is already running \(started by alice [01] s ago\)",
        only_reply(sent, second).content or "",
    )
    final = final_text(sent, edits, first)
    assert re.search(r"\n✅ web-1\s+\d+\.\d s  admin-ops \S+, daemon up ", final)
    assert "\n⌛ gone-1           no answer\n" in final
    assert re.search(r"\n❌ 1 silent: gone-1 — 1/2 hosts ok in 1\.\d s$", final)
    assert len(await published_commands(redis_client, key_prefix)) == 1


async def test_no_hosts_alive_is_one_message_and_gives_the_cooldown_back(
    harness: Harness,
    fleet: Fleet,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    edits: list[Edit],
    caplog: pytest.LogCaptureFixture,
):
    await fleet_cog(harness, redis_client, key_prefix)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        for _ in range(2):  # nothing ran, so the cooldown does not hold
            message = await harness.say("!fleet_pull")
            assert only_reply(sent, message).content == (
                "📡 Fleet pull of `bot`\n"
                "❌ No hosts are alive: no control daemon has a heartbeat in Redis; nothing ran."
            )
    assert edits == []
    assert audit_outcomes(caplog) == [("fleet_pull", "failed"), ("fleet_pull", "failed")]


# --------------------------------------------------------------------------------------------
# !fleet_restart and !fleet_status
# --------------------------------------------------------------------------------------------


async def test_fleet_restart_runs_only_where_the_host_allows_it(
    harness: Harness,
    fleet: Fleet,
    redis_client: aioredis.Redis,
    key_prefix: str,
    systemctl: SystemctlStub,
    sent: list[Sent],
    edits: list[Edit],
):
    await fleet.start("edge-1", restart_units=["proxy"])
    await fleet.start("edge-2", restart_units=["other"])
    await fleet_cog(harness, redis_client, key_prefix)

    message = await harness.say("!fleet_restart proxy")
    final = final_text(sent, edits, message)
    assert final.startswith("📡 Fleet restart of `proxy.service`\n```\n")
    assert re.search(r"\n✅ edge-1\s+\d+\.\d s  restarted proxy\.service\n", final)
    assert re.search(r"\n❌ edge-2\s+\d+\.\d s  refused: not allowed on this host\n", final)
    assert re.search(r"\n❌ 1 failed: edge-2 — 1/2 hosts ok in \d+\.\d s$", final)
    assert [c["argv"] for c in systemctl.calls()] == [
        ["--no-ask-password", "restart", "--", "proxy.service"]
    ]
    [command] = await published_commands(redis_client, key_prefix)
    assert (command["op"], command["args"]) == ("restart", '["proxy.service"]')


async def test_fleet_restart_needs_a_valid_unit_and_publishes_nothing_without_one(
    harness: Harness,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    caplog: pytest.LogCaptureFixture,
):
    await fleet_cog(harness, redis_client, key_prefix)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say("!fleet_restart")
        assert only_reply(sent, message).content == (
            "Usage: `!fleet_restart <unit>`, e.g. `!fleet_restart proxy.service`."
        )
        for bad, reason in [
            ("-H evil", "must not start with '-'"),
            ("../../etc", "'/' is not allowed"),
            ("nginx*", "globs are not allowed"),
        ]:
            message = await harness.say(f"!fleet_restart {bad}")
            content = only_reply(sent, message).content or ""
            assert content.startswith("`!fleet_restart` not sent: invalid unit name "), content
            assert reason in content
            assert "\n" not in content
        message = await harness.say("!fleet_pull two words")
        assert only_reply(sent, message).content == (
            "Invalid target `two words` for `!fleet_pull`: "
            "one name of letters, digits and . _ - (e.g. `bot`)."
        )
    assert await published_commands(redis_client, key_prefix) == []
    assert {outcome for _, outcome in audit_outcomes(caplog)} == {"refused:config"}


async def test_fleet_status_shows_each_host(
    harness: Harness,
    fleet: Fleet,
    git_repos: GitRepos,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    edits: list[Edit],
):
    await fleet.start("app-1", pull_targets={"bot": git_repos.clone}, restart_units=["proxy"])
    await fleet.start("app-2")
    await fleet_cog(harness, redis_client, key_prefix)
    message = await harness.say("!fleet_status")
    final = final_text(sent, edits, message)
    head = git_repos.head()[:7]
    assert re.search(
        rf"\n✅ app-1\s+\d+\.\d s  admin-ops \S+, daemon up \S+.* · targets: bot {head} · "
        r"units: proxy\.service active\n",
        final,
    ), final
    assert re.search(r"\n✅ app-2\s+\d+\.\d s  admin-ops ", final)
    assert FINAL_OK.search(final)


# --------------------------------------------------------------------------------------------
# Who may run them, and when they are configured
# --------------------------------------------------------------------------------------------


async def test_not_configured_without_redis_or_secret_and_roles_come_first(
    harness: Harness,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
):
    await harness.add_cog(redis=redis_client, key_prefix=key_prefix)  # no OPS_CONTROL_SECRET
    message = await harness.say("!fleet_pull")
    assert only_reply(sent, message).content == (
        "`!fleet_pull` is not configured: set OPS_CONTROL_SECRET"
    )
    # Configuration comes before usage: an unconfigured fleet says so whatever the arguments.
    message = await harness.say("!fleet_restart")
    assert only_reply(sent, message).content == (
        "`!fleet_restart` is not configured: set OPS_CONTROL_SECRET"
    )
    message = await harness.say("!fleet_status", member=harness.outsider)
    assert only_reply(sent, message).content == "You need an ops role to run `!fleet_status`."
    await harness.remove_cog()

    await harness.add_cog()  # no Redis at all
    message = await harness.say("!fleet_status")
    assert only_reply(sent, message).content == (
        "`!fleet_status` is not configured: set REDIS_URL and OPS_CONTROL_SECRET"
    )
    assert await published_commands(redis_client, key_prefix) == []


async def test_per_command_role_override_applies_to_fleet_commands(
    harness: Harness,
    fleet: Fleet,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    edits: list[Edit],
):
    await dpytest.add_role(harness.outsider, harness.other_role)  # "deployers"
    # A unit that is neither the bot's nor its proxy's: those need their own command's role too.
    await fleet.start("web-1", restart_units=["worker"])
    await fleet_cog(
        harness, redis_client, key_prefix, OPS_ROLE_IDS_FLEET_RESTART=str(harness.other_role.id)
    )
    message = await harness.say("!fleet_restart worker")  # alice: ops, but not a deployer
    assert only_reply(sent, message).content == "You need an ops role to run `!fleet_restart`."
    assert await published_commands(redis_client, key_prefix) == []
    message = await harness.say("!fleet_restart worker", member=harness.outsider)
    assert FINAL_OK.search(final_text(sent, edits, message))


# --------------------------------------------------------------------------------------------
# Output: the real edit rate, the limit, redaction
# --------------------------------------------------------------------------------------------


async def test_ten_answers_at_once_cost_at_most_two_edits_a_second_apart(
    harness: Harness,
    fleet: Fleet,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    edits: list[Edit],
):
    hosts = [f"node-{n}" for n in range(10)]
    for host in hosts:
        await fleet.ghost(host)
    # The real interval (1 s): this test takes about a second.
    cog = await fleet_cog(harness, redis_client, key_prefix, interval=1.0)
    assert cog.fleet_edit_interval == 1.0
    message = await fleet_status_answered_at_once(
        harness, fleet, hosts, lambda h: f"```\n@everyone <@&1> {h} ok"
    )

    first = only_reply(sent, message)
    assert 1 <= len(edits) <= 2, edits
    times = [first.at, *(e.at for e in edits)]
    assert all(later - earlier >= 0.9 for earlier, later in itertools.pairwise(times))
    final = final_text(sent, edits, message)
    assert FINAL_OK.search(final)
    assert final.count("```") == 2  # the hosts' fences cannot close the table
    assert all(f"@everyone <@&1> {host} ok" in final for host in hosts)


async def test_a_table_too_long_for_one_message_comes_as_an_attachment(
    harness: Harness,
    fleet: Fleet,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    edits: list[Edit],
):
    token = harness.base_env["DISCORD_TOKEN"]
    hosts = [f"host-{n:02d}." + "x" * 50 for n in range(40)]
    for host in hosts:
        await fleet.ghost(host)
    await fleet_cog(harness, redis_client, key_prefix)
    message = await fleet_status_answered_at_once(
        harness, fleet, hosts, lambda h: f"line one\nsaw {token}\nlast line"
    )

    live, follow_up = replies_to(sent, message)
    final = final_text(sent, edits, message)
    assert len(final) <= MESSAGE_LIMIT
    assert re.fullmatch(
        r"📡 Fleet status\n✅ 40\n✅ 40/40 hosts ok in \d+\.\d s\n"
        r"📎 Every host's full answer is in the next message\.",
        final,
    ), final
    assert follow_up.content == (
        "📎 Every host's full answer to `!fleet_status`\n📎 Full output attached."
    )
    attached = follow_up.files["fleet_status.txt"]
    assert all(host in attached for host in hosts)
    assert attached.count("    last line") == 40
    for record in [*sent, *edits]:
        assert token not in (record.content or "")
    assert token not in attached
    assert live.content is not None


async def test_when_the_last_edit_fails_the_final_state_is_posted_anew(
    harness: Harness,
    fleet: Fleet,
    redis_client: aioredis.Redis,
    key_prefix: str,
    sent: list[Sent],
    monkeypatch: pytest.MonkeyPatch,
):
    await fleet.ghost("solo-1")
    cog = await fleet_cog(harness, redis_client, key_prefix)

    async def refused(message: discord.Message, content: str) -> bool:
        return False  # e.g. someone deleted the live message meanwhile

    monkeypatch.setattr(cog.replies, "edit_live", refused)
    message = await fleet_status_answered_at_once(harness, fleet, ["solo-1"], lambda h: "pong")
    live, final = replies_to(sent, message)
    assert (live.content or "").endswith("⏳ 0/1 answered…")
    assert FINAL_OK.search(final.content or "")


# --------------------------------------------------------------------------------------------
# A daemon in the bot's own process
# --------------------------------------------------------------------------------------------


async def test_the_bot_can_join_the_fleet_with_an_in_process_daemon(
    harness: Harness,
    fleet: Fleet,
    git_repos: GitRepos,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
    sent: list[Sent],
    edits: list[Edit],
):
    cog = await fleet_cog(
        harness,
        redis_client,
        key_prefix,
        OPS_CONTROL_IN_PROCESS="1",
        REDIS_URL=redis_server.url,
        OPS_IDENTITY="bot-host:bot",
    )
    daemon = cog.control_daemon
    assert daemon is not None
    await asyncio.wait_for(daemon.serving.wait(), DEADLINE)
    assert daemon.pull_targets == {"bot": str(git_repos.clone)}
    assert daemon.restart_units == {"bot.service", "proxy.service"}
    assert daemon.own_units == {"bot.service"}  # restarted deferred: answer first
    await fleet.start("web-1", pull_targets={"bot": clone_for(git_repos, tmp_path, "web-1")})
    new = git_repos.commit_upstream("Deploy everywhere")

    message = await harness.say("!fleet_pull")
    final = final_text(sent, edits, message)
    assert re.search(rf"\n✅ bot-host:bot\s+\d+\.\d s  Updated [0-9a-f]{{7}} → {new[:7]} ", final)
    assert (FINAL_OK.search(final) or pytest.fail(final)).groups() == ("2", "2")
    assert git_repos.head() == new  # the bot's own checkout

    message = await harness.say("!ops_status")
    assert "fleet      in-process daemon bot-host:bot: serving" in (
        only_reply(sent, message).content or ""
    )
    await harness.remove_cog()  # a clean stop: the bot leaves the fleet at once
    assert cog.control_task is None
    assert await alive_hosts(redis_client, prefix=key_prefix, secret=SECRET) == {"web-1"}


# --------------------------------------------------------------------------------------------
# Redis trouble
# --------------------------------------------------------------------------------------------


async def test_redis_down_before_publishing_is_reported_and_releases_the_cooldown(
    harness: Harness, sent: list[Sent], caplog: pytest.LogCaptureFixture
):
    dead = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5, socket_connect_timeout=0.5
    )
    try:
        await harness.add_cog(harness.settings(OPS_CONTROL_SECRET=SECRET), redis=dead)
        with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
            for _ in range(2):  # nothing was published: no cooldown held
                message = await harness.say("!fleet_pull")
                content = only_reply(sent, message).content or ""
                assert content.startswith(
                    "📡 Fleet pull of `bot`\n❌ Redis failed before publishing; nothing ran: "
                ), content
    finally:
        await dead.aclose()
    assert audit_outcomes(caplog) == [("fleet_pull", "failed"), ("fleet_pull", "failed")]
