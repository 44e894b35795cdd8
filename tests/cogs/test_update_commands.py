"""``!bot_fetch``, ``!bot_pull``'s needs, ``!bot_deps`` and ``!bot_rollback`` through the cog.

Real git repositories (the harness's checkout ``git_repos.clone``), real extensions imported
from that checkout, a real pip in a throw-away virtual environment reading wheels the test
wrote (no network).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.chat import AUDIT_LOGGER, Harness, Sent, audit_records, only_reply
from tests.support.git import GitRepos, git
from tests.support.processes import write_script
from tests.support.wheels import copy_venv, installed, pip_install, write_wheel

NO_COOLDOWNS = {
    f"OPS_COOLDOWN_{name}": "0" for name in ("BOT_PULL", "BOT_FETCH", "BOT_ROLLBACK", "BOT_DEPS")
}


def push(repos: GitRepos, files: dict[str, str], subject: str) -> str:
    """Commit ``files`` (path → content) upstream through ``work``; the new commit's hash."""
    for name, text in files.items():
        path = repos.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        git(repos.work, "add", name)
    git(repos.work, "commit", "-q", "-m", subject)
    git(repos.work, "push", "-q", "origin", "HEAD:main")
    return git(repos.work, "rev-parse", "HEAD")


def extension_source(version: str) -> str:
    return (
        "from discord.ext import commands\n\n"
        f"VERSION = {version!r}\n\n\n"
        "async def setup(bot: commands.Bot) -> None:\n"
        "    bot.demo_versions = {**getattr(bot, 'demo_versions', {}), __name__: VERSION}\n"
    )


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch, git_repos: GitRepos) -> Iterator[dict[str, str]]:
    """Unique module names (imports are process-wide), importable from the checkout."""
    monkeypatch.syspath_prepend(str(git_repos.clone))
    # An edit within the same second must not be hidden by a cached .pyc.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    tag = uuid.uuid4().hex[:8]
    found = {"extension": f"opsdemo_ext_{tag}", "helper": f"opsdemo_helper_{tag}"}
    yield found
    for name in found.values():
        sys.modules.pop(name, None)


@pytest.fixture
async def loaded(
    harness: Harness, git_repos: GitRepos, names: dict[str, str]
) -> AsyncIterator[None]:
    """The checkout holds an extension (loaded) and a helper module (imported), both pulled."""
    push(
        git_repos,
        {f"{names['extension']}.py": extension_source("1"), f"{names['helper']}.py": "X = 1\n"},
        "Add the demo extension",
    )
    git(git_repos.clone, "pull", "-q", "--ff-only")
    await harness.bot.load_extension(names["extension"])
    importlib.import_module(names["helper"])
    try:
        yield
    finally:
        if names["extension"] in harness.bot.extensions:
            await harness.bot.unload_extension(names["extension"])


# --------------------------------------------------------------------------------------------
# fetch → pull → reload / restart / deps
# --------------------------------------------------------------------------------------------


async def test_fetch_shows_what_a_pull_brings_and_needs_and_moves_nothing(
    harness: Harness, git_repos: GitRepos, names: dict[str, str], loaded: None, sent: list[Sent]
) -> None:
    await harness.add_cog(harness.settings(**NO_COOLDOWNS))
    head = git_repos.head()
    tip = push(
        git_repos,
        {f"{names['extension']}.py": extension_source("2"), "requirements.txt": "x\n"},
        "Extension v2 and a requirement",
    )

    message = await harness.say("!bot_fetch")

    reply = only_reply(sent, message).content or ""
    assert reply.startswith(
        "📥 `bot`: 1 commit to pull from `origin/main` (2 files changed, +2 −1) — "
        "dependencies changed, reload needed\n```\n"
    )
    assert f"{tip[:7]} Test: Extension v2 and a requirement" in reply
    assert "dependencies changed (requirements.txt): run !bot_deps" in reply
    assert f"reload with !ops_reload {names['extension']}" in reply
    assert git_repos.head() == head
    assert git(git_repos.clone, "status", "--porcelain") == ""


async def test_fetch_names_a_restart_when_code_outside_extensions_changed(
    harness: Harness, git_repos: GitRepos, names: dict[str, str], loaded: None, sent: list[Sent]
) -> None:
    await harness.add_cog()
    push(git_repos, {f"{names['helper']}.py": "X = 2\n"}, "Helper v2")

    message = await harness.say("!bot_fetch")

    reply = only_reply(sent, message).content or ""
    assert " — restart needed\n" in reply
    assert f"restart needed ({names['helper']}.py changed): !bot_restart" in reply


async def test_pull_adds_what_the_update_needs_and_reload_applies_it(
    harness: Harness, git_repos: GitRepos, names: dict[str, str], loaded: None, sent: list[Sent]
) -> None:
    await harness.add_cog(harness.settings(**NO_COOLDOWNS))
    ext = names["extension"]
    push(git_repos, {f"{ext}.py": extension_source("2")}, "Extension v2")

    pulled = await harness.say("!bot_pull")

    reply = only_reply(sent, pulled).content or ""
    assert reply.startswith("✅ `bot` updated\n```\nUpdated ")
    assert reply.endswith(f"\n\nreload with !ops_reload {ext}\n```")
    assert harness.bot.demo_versions[ext] == "1"  # type: ignore[attr-defined]

    reloaded = await harness.say("!ops_reload")

    assert only_reply(sent, reloaded).content == f"✅ `{ext}` reloaded"
    assert harness.bot.demo_versions[ext] == "2"  # type: ignore[attr-defined]


async def test_fetch_of_a_diverged_branch_says_a_pull_would_refuse(
    harness: Harness, git_repos: GitRepos, sent: list[Sent]
) -> None:
    await harness.add_cog()
    (git_repos.clone / "local.txt").write_text("local\n")
    git(git_repos.clone, "add", "local.txt")
    git(git_repos.clone, "commit", "-q", "-m", "local")
    git_repos.commit_upstream("upstream")
    head = git_repos.head()

    message = await harness.say("!bot_fetch")

    reply = only_reply(sent, message).content or ""
    assert reply.startswith(
        "⚠️ `bot`: 1 commit from `origin/main`, but a pull would refuse\n```\n"
        "A pull would refuse: the branch has diverged from origin/main (1 local commit is not "
        "upstream)"
    )
    assert git_repos.head() == head


async def test_fetch_when_up_to_date(harness: Harness, sent: list[Sent]) -> None:
    await harness.add_cog()

    message = await harness.say("!bot_fetch")

    assert only_reply(sent, message).content == "✅ `bot` already up to date with `origin/main`"


@pytest.mark.parametrize("command", ["bot_fetch", "bot_deps", "bot_rollback"])
async def test_an_unknown_target_is_one_sentence_and_runs_nothing(
    harness: Harness, git_repos: GitRepos, sent: list[Sent], command: str, caplog: Any
) -> None:
    await harness.add_cog()
    git_repos.commit_upstream("incoming")
    before = git(git_repos.clone, "rev-parse", "origin/main")

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say(f"!{command} nope")

    assert only_reply(sent, message).content == (
        f"Unknown target `nope` for `!{command}`. Configured targets: bot."
    )
    assert git(git_repos.clone, "rev-parse", "origin/main") == before  # not even fetched
    assert [r["outcome"] for r in audit_records(caplog)] == ["refused:config"]


# --------------------------------------------------------------------------------------------
# !bot_rollback
# --------------------------------------------------------------------------------------------


async def test_rollbacks_step_back_each_chat_pull_then_nothing_is_left(
    harness: Harness, git_repos: GitRepos, sent: list[Sent], caplog: Any
) -> None:
    await harness.add_cog(harness.settings(**NO_COOLDOWNS))
    start = git_repos.head()
    git_repos.commit_upstream("first", filename="one.txt")
    await harness.say("!bot_pull")
    middle = git_repos.head()
    git_repos.commit_upstream("second", filename="two.txt")
    git_repos.commit_upstream("third", filename="three.txt")
    await harness.say("!bot_pull")
    end = git_repos.head()

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        first = await harness.say("!bot_rollback")
        second = await harness.say("!bot_rollback")
        third = await harness.say("!bot_rollback")

    reply = only_reply(sent, first).content or ""
    assert reply.startswith(
        f"⏪ `bot` rolled back {end[:7]} → {middle[:7]} — nothing to reload or restart\n```\n"
        "Taken out (2 commits of the pull by alice"
    )
    assert "Test: third\n" in reply
    assert "Test: second\n" in reply
    assert reply.endswith("A later !bot_pull brings them back.\n```")
    assert (only_reply(sent, second).content or "").startswith(
        f"⏪ `bot` rolled back {middle[:7]} → {start[:7]}"
    )
    assert only_reply(sent, third).content == (
        "✅ `bot`: nothing to roll back (no recorded pull moved it)"
    )
    assert git_repos.head() == start
    assert [r["outcome"] for r in audit_records(caplog)] == ["ok", "ok", "ok"]


async def test_a_rollback_that_would_lose_local_changes_is_refused_and_changes_nothing(
    harness: Harness, git_repos: GitRepos, sent: list[Sent]
) -> None:
    await harness.add_cog(harness.settings(**NO_COOLDOWNS))
    git_repos.commit_upstream("touch it", filename="bot.py")
    await harness.say("!bot_pull")
    head = git_repos.head()
    (git_repos.clone / "bot.py").write_text("edited on the server\n")

    message = await harness.say("!bot_rollback")
    again = await harness.say("!bot_rollback")  # refused without acting: no cooldown taken

    assert only_reply(sent, message).content == (
        "❌ `bot` not rolled back\n```\nNot rolled back: local changes to bot.py would be lost. "
        "Commit, stash or discard them first; nothing was changed.\n```"
    )
    assert (only_reply(sent, again).content or "").startswith("❌ `bot` not rolled back")
    assert git_repos.head() == head
    assert (git_repos.clone / "bot.py").read_text() == "edited on the server\n"


async def test_a_rollback_after_someone_moved_head_is_refused(
    harness: Harness, git_repos: GitRepos, sent: list[Sent]
) -> None:
    await harness.add_cog()
    git_repos.commit_upstream("pulled")
    await harness.say("!bot_pull")
    git_repos.commit_upstream("pulled by hand")
    git(git_repos.clone, "pull", "-q", "--ff-only")
    head = git_repos.head()

    message = await harness.say("!bot_rollback")

    reply = only_reply(sent, message).content or ""
    assert reply.startswith(
        f"❌ `bot` not rolled back\n```\nNot rolled back: HEAD is at {head[:7]}"
    )
    assert "someone moved it since. Nothing was changed." in reply
    assert git_repos.head() == head


# --------------------------------------------------------------------------------------------
# !bot_deps
# --------------------------------------------------------------------------------------------


@pytest.fixture
def venv(pip_venv_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throw-away environment with opsdemo-alpha 1.0; pip reads only the test's wheels."""
    wheels = tmp_path / "wheels"
    write_wheel(wheels, "opsdemo-alpha", "1.0")
    write_wheel(wheels, "opsdemo-alpha", "1.1")
    write_wheel(wheels, "opsdemo-beta", "2.0")
    python = copy_venv(pip_venv_template, tmp_path / "venv")
    pip_install(python, wheels, "opsdemo-alpha==1.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return python


async def test_deps_installs_the_pulled_requirements_and_attaches_pips_output(
    harness: Harness, git_repos: GitRepos, venv: Path, sent: list[Sent]
) -> None:
    await harness.add_cog(harness.settings(**NO_COOLDOWNS), python=str(venv))
    push(git_repos, {"requirements.txt": "opsdemo-alpha==1.1\nopsdemo-beta==2.0\n"}, "Pin deps")
    pulled = await harness.say("!bot_pull")
    assert (only_reply(sent, pulled).content or "").endswith(
        "dependencies changed (requirements.txt): run !bot_deps\n```"
    )

    message = await harness.say("!bot_deps")

    reply = only_reply(sent, message)
    assert reply.content == ("📦 `bot`: Installed opsdemo-alpha 1.0 → 1.1, new: opsdemo-beta 2.0.")
    assert (
        "Successfully installed opsdemo-alpha-1.1 opsdemo-beta-2.0" in reply.files["bot_deps.txt"]
    )
    assert installed(venv)["opsdemo-beta"] == "2.0"


async def test_deps_outside_a_virtual_environment_refuses_and_gives_the_cooldown_back(
    harness: Harness, git_repos: GitRepos, tmp_path: Path, sent: list[Sent]
) -> None:
    calls = tmp_path / "calls.txt"
    system_python = Path(sys.base_prefix) / "bin" / "python3"
    python = write_script(
        tmp_path / "python", f'echo "$1 $2" >> {calls}\nexec {system_python} "$@"\n'
    )
    await harness.add_cog(python=str(python))
    (git_repos.clone / "requirements.txt").write_text("opsdemo-alpha\n")

    first = await harness.say("!bot_deps")
    second = await harness.say("!bot_deps")

    for message in (first, second):
        reply = only_reply(sent, message).content or ""
        assert reply.startswith("❌ `bot`: Not installed: the bot's Python (")
        assert reply.endswith("the system Python is never changed. Nothing was run.")
    assert calls.read_text().splitlines() == ["-I -c", "-I -c"]


async def test_deps_reports_a_pip_failure_in_one_sentence(
    harness: Harness, git_repos: GitRepos, venv: Path, sent: list[Sent]
) -> None:
    await harness.add_cog(python=str(venv))
    (git_repos.clone / "requirements.txt").write_text("opsdemo-alpha==1.1\nopsdemo-nowhere==1\n")
    before = installed(venv)

    message = await harness.say("!bot_deps")

    reply = only_reply(sent, message)
    assert reply.content == (
        "❌ `bot`: pip failed (exit 1): ERROR: No matching distribution found for "
        "opsdemo-nowhere==1; nothing changed."
    )
    assert "opsdemo-nowhere" in reply.files["bot_deps.txt"]
    assert installed(venv) == before


@pytest.fixture
async def silent_index() -> AsyncIterator[str]:
    """A loopback "package index" that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/simple"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_deps_stops_pip_at_its_timeout(
    harness: Harness,
    git_repos: GitRepos,
    venv: Path,
    silent_index: str,
    sent: list[Sent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.setenv("PIP_INDEX_URL", silent_index)
    await harness.add_cog(harness.settings(OPS_PIP_TIMEOUT="3"), python=str(venv))
    (git_repos.clone / "requirements.txt").write_text("opsdemo-beta==2.0\n")
    before = installed(venv)

    message = await harness.say("!bot_deps")

    assert only_reply(sent, message).content == (
        "❌ `bot`: pip did not finish within 3 s and was stopped; nothing changed."
    )
    assert installed(venv) == before
