"""admin-ops dropped into someone else's bot, exactly as README.md's "Drop-in" section says.

``host_bot/`` is a bot built the way the popular templates build one: every ``cogs/*.py`` loaded
as an extension, its own cog with its own slash command, the message content intent off, its
own tree synced for its server. The test copies it to ``tmp_path``, then follows the README's
drop-in steps literally (the shell block of that section: a step this test cannot follow fails
it, so the README cannot list a file the test does not copy), and runs it against the fake
Discord with this interpreter. Nothing of the checkout is on its path: it imports what the steps
copied, or nothing.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.settings import COMMANDS
from tests.support import ROOT
from tests.support.chat import SystemctlStub
from tests.support.fake_discord import FakeDiscord, InteractionState, Recorded, pings_nobody
from tests.support.fake_discord_bot import BotProcess, bot_env, start_bot
from tests.support.fake_discord_payloads import MESSAGE_CONTENT_INTENT
from tests.support.git import GitRepos

HOST = Path(__file__).resolve().parent / "host_bot"
#: Where the README's steps say admin-ops is checked out, next to the host's checkout.
CHECKOUT = "admin-ops/"
CALLBACK = "POST /interactions/{interaction_id}/{token}/callback"
FOLLOWUP = "POST /webhooks/{application_id}/{token}"
REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def drop_in_steps(readme: str) -> list[list[str]]:
    """The commands of the README's drop-in section (its ``sh`` block), one argv each."""
    section = readme.split("\n## Drop-in", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def source(path: str) -> Path:
    """A path of the admin-ops checkout, as the steps name it."""
    assert path.startswith(CHECKOUT), f"{path!r} is not in the admin-ops checkout"
    return ROOT / path.removeprefix(CHECKOUT)


def destination(host: Path, path: str, copied: Path) -> Path:
    """Where ``cp`` puts ``copied``: into ``path`` when it is a directory, else at ``path``."""
    target = host / path
    return target / copied.name if path.endswith("/") or target.is_dir() else target


def follow(step: list[str], host: Path) -> None:
    """Do what one step says, in the host's checkout (pip: check this interpreter has it all)."""
    match step:
        case ["cp", "-r", tree, to]:
            copied = source(tree)
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(copied, destination(host, to, copied), ignore=ignore)
        case ["cp", file, to]:
            copied = source(file)
            shutil.copy2(copied, destination(host, to, copied))
        case ["pip", "install", "-r", requirements]:
            for line in source(requirements).read_text().splitlines():
                name = REQUIREMENT_NAME.match(line.split("#", 1)[0].strip())
                if name:  # the host runs with this interpreter: it must have them
                    importlib.metadata.version(name.group())
        case _:
            raise AssertionError(f"a drop-in step this test cannot follow: {shlex.join(step)}")


@pytest.fixture
async def host_bot(
    fake_discord: FakeDiscord, systemctl: SystemctlStub, git_repos: GitRepos, tmp_path: Path
) -> AsyncIterator[BotProcess]:
    """The host bot with admin-ops dropped in, running against the fake."""
    host = tmp_path / "host-bot"
    shutil.copytree(HOST, host, ignore=shutil.ignore_patterns("__pycache__"))
    steps = drop_in_steps((ROOT / "README.md").read_text())
    assert steps, "the README's drop-in section has no steps"
    for step in steps:
        follow(step, host)
    # Nothing of admin-ops loose in the host's cogs/: its loader loads every file there.
    assert sorted(p.name for p in (host / "cogs").iterdir()) == ["admin_ops.py", "greetings.py"]
    env = bot_env(
        fake_discord,
        tmp_path / "state",
        OPS_SYSTEMCTL=str(systemctl.path),
        OPS_REPO_DIR=str(git_repos.clone),
        TOKEN=fake_discord.token,  # the host's own variable
        HOST_GUILD_ID=str(fake_discord.guild.id),
    )
    del env["DISCORD_TOKEN"]  # the cog does not need it in a bot of someone else's
    bot = await start_bot(
        fake_discord, env, tmp_path / "host.log", argv=[sys.executable, "bot.py"], cwd=host
    )
    try:
        yield bot
    finally:
        await bot.kill()


async def callback_to(bot: BotProcess, fake: FakeDiscord, state: InteractionState) -> Recorded:
    return await bot.until(
        lambda: next((r for r in fake.answers(state) if r.key == CALLBACK), None),
        what=f"the answer to interaction {state.id}",
    )


async def test_the_slash_commands_work_in_a_slash_first_host_bot(
    host_bot: BotProcess, fake_discord: FakeDiscord
) -> None:
    session = await host_bot.wait_ready()
    await host_bot.wait_logged(r"Synced \d+ commands to the guild")
    await host_bot.wait_synced()
    alice, bob = fake_discord.alice, fake_discord.bob
    assert alice is not None
    assert bob is not None

    # Every file of the host's cogs/ loaded; no message content intent asked for.
    output = host_bot.output()
    assert "Loaded extension 'admin_ops'" in output
    assert "Loaded extension 'greetings'" in output
    assert "Failed to load" not in output
    assert not int((session.identify or {}).get("intents") or 0) & MESSAGE_CONTENT_INTENT
    # The host's sync and the cog's, in either order: both sets stay, in the server only.
    registered = sorted(c["name"] for c in fake_discord.commands[fake_discord.guild.id])
    assert registered == sorted([*COMMANDS, "hello"])
    assert fake_discord.commands[None] == []

    status = await fake_discord.invoke("ops_status", by=alice)
    answer = await host_bot.until(
        lambda: next((r for r in fake_discord.answers(status) if r.key == FOLLOWUP), None),
        what="the status",
    )
    assert answer.content is not None
    assert answer.content.startswith("📊 Ops status")
    assert pings_nobody(answer.allowed_mentions)

    refused = await callback_to(
        host_bot, fake_discord, await fake_discord.invoke("ops_status", by=bob)
    )
    assert (refused.ephemeral, refused.content) == (
        True,
        "You need an ops role to run `/ops_status`.",
    )
    hello = await callback_to(host_bot, fake_discord, await fake_discord.invoke("hello", by=bob))
    assert hello.content == "Hello, bob!"

    records = [(r["command"], r["outcome"]) for r in await host_bot.wait_audit(2)]
    assert records == [("ops_status", "ok"), ("ops_status", "refused:role")]
    assert fake_discord.unhandled() == []
    assert "Traceback" not in host_bot.output()
