"""``core.updates``: what an update needs (pure), and ``fetch_preview`` against real repositories.

``git_repos`` is a bare ``origin``, the ``clone`` under test and a ``work`` clone that pushes.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from core.ops_exec import HeldCheckout, locked_checkout
from core.updates import (
    MAX_LISTED_COMMITS,
    LoadedCode,
    UpdateNeeds,
    classify_update,
    describe_needs,
    fetch_preview,
    is_dependency_file,
)
from tests.support.git import GitRepos, git
from tests.support.processes import write_script

CHECKOUT = "/srv/bot"
LOADED = LoadedCode(
    extensions={
        "cogs.music": frozenset(
            {"/srv/bot/cogs/music/__init__.py", "/srv/bot/cogs/music/queue.py"}
        ),
        "cogs.admin_ops": frozenset({"/srv/bot/cogs/admin_ops.py"}),
    },
    imported=frozenset(
        {
            "/srv/bot/bot.py",
            "/srv/bot/core/settings.py",
            "/srv/bot/cogs/admin_ops.py",
            "/srv/bot/cogs/music/__init__.py",
            "/srv/bot/cogs/music/queue.py",
            "/usr/lib/python3.11/json/__init__.py",
        }
    ),
)


# --------------------------------------------------------------------------------------------
# classify_update: pure
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "requirements.txt",
        "requirements-dev.txt",
        "requirements/prod.txt",
        "sub/requirements.in",
        "constraints.txt",
        "pyproject.toml",
        "setup.cfg",
        "setup.py",
        "poetry.lock",
        "uv.lock",
        "Pipfile.lock",
        "deps/pins.txt",  # the configured OPS_REQUIREMENTS below
    ],
)
def test_dependency_files_are_recognised(path: str) -> None:
    assert is_dependency_file(path, requirements="deps/pins.txt")


@pytest.mark.parametrize("path", ["README.md", "requirements.md", "core/setup_helpers.py", "x.txt"])
def test_other_files_are_not_dependency_files(path: str) -> None:
    assert not is_dependency_file(path)


def test_only_extension_files_changed_means_reload_those_extensions() -> None:
    needs = classify_update(CHECKOUT, ["cogs/music/queue.py", "cogs/admin_ops.py"], LOADED)

    assert needs == UpdateNeeds(reload=("cogs.admin_ops", "cogs.music"))
    assert describe_needs(needs) == ["reload with !ops_reload cogs.admin_ops cogs.music"]
    assert needs.headline() == "reload needed"


def test_a_changed_file_the_bot_imported_outside_extensions_means_restart() -> None:
    needs = classify_update(CHECKOUT, ["cogs/music/queue.py", "bot.py", "core/settings.py"], LOADED)

    assert needs.restart == ("bot.py", "core/settings.py")
    assert needs.reload == ("cogs.music",)
    # A restart loads everything anew: no reload is suggested beside it.
    assert describe_needs(needs) == [
        "restart needed (bot.py, core/settings.py changed): !bot_restart"
    ]


def test_dependency_files_need_bot_deps_with_the_target_named() -> None:
    needs = classify_update(CHECKOUT, ["requirements.txt", "README.md"], LOADED)

    assert needs == UpdateNeeds(dependencies=("requirements.txt",))
    # New packages are installed, not run: no code the bot runs changed.
    assert describe_needs(needs, prefix="?", target="worker") == [
        "dependencies changed (requirements.txt): run ?bot_deps worker"
    ]
    assert needs.headline() == "dependencies changed"


def test_files_the_bot_never_loaded_need_nothing() -> None:
    needs = classify_update(CHECKOUT, ["README.md", "tests/test_x.py", "cogs/unloaded.py"], LOADED)

    assert not needs.anything
    assert describe_needs(needs) == [
        "nothing to reload or restart: no file the running bot loaded changed"
    ]
    assert needs.headline() == "nothing to reload or restart"


def test_paths_are_matched_normalised_and_relative_to_that_checkout() -> None:
    other = classify_update("/srv/worker", ["bot.py"], LOADED)
    dotted = classify_update(CHECKOUT, ["./cogs/../bot.py"], LOADED)

    assert not other.anything
    assert dotted.restart == ("./cogs/../bot.py",)


def test_long_file_lists_are_counted() -> None:
    imported = frozenset(f"/srv/bot/core/m{i}.py" for i in range(8))
    needs = classify_update(
        CHECKOUT, [f"core/m{i}.py" for i in range(8)], LOADED._replace(imported=imported)
    )

    assert describe_needs(needs) == [
        "restart needed (core/m0.py, core/m1.py, core/m2.py, core/m3.py, core/m4.py and 3 more "
        "changed): !bot_restart"
    ]


# --------------------------------------------------------------------------------------------
# fetch_preview: real git
# --------------------------------------------------------------------------------------------


def tree_state(repo: Path) -> tuple[str, str]:
    """HEAD and the working tree's status: what a fetch must leave alone."""
    return git(repo, "rev-parse", "HEAD"), git(
        repo, "status", "--porcelain", "--untracked-files=all"
    )


async def test_nothing_incoming_is_up_to_date(git_repos: GitRepos) -> None:
    preview = await fetch_preview(git_repos.clone)

    assert preview.status == "up to date"
    assert (preview.incoming, preview.local, preview.commits) == (0, 0, ())
    assert preview.upstream == "origin/main"


async def test_incoming_commits_are_listed_up_to_15_with_a_diffstat_and_nothing_moves(
    git_repos: GitRepos,
) -> None:
    clone, work = git_repos.clone, git_repos.work
    before = tree_state(clone)
    (work / "bot.py").write_text("one\ntwo\nthree\n")
    git(work, "add", "bot.py")
    git(work, "commit", "-q", "-m", "Add bot.py")
    for n in range(16):
        git_repos.commit_upstream(f"change {n}", filename="notes.txt")
    git(work, "rm", "-q", "README")
    git(work, "commit", "-q", "-m", "Drop the README")
    git(work, "push", "-q", "origin", "HEAD:main")
    tip = git(work, "rev-parse", "HEAD")

    preview = await fetch_preview(clone)

    assert preview.status == "incoming"
    assert preview.incoming == 18
    assert len(preview.commits) == MAX_LISTED_COMMITS
    newest = preview.commits[0]
    assert (newest.short, newest.author, newest.subject) == (tip[:7], "Test", "Drop the README")
    assert preview.commits[1].line().endswith("Test: change 15")
    assert preview.diffstat == "3 files changed, +4 −1"
    assert sorted(preview.changed) == ["README", "bot.py", "notes.txt"]
    # Nothing but the remote-tracking branch moved.
    assert tree_state(clone) == before
    assert git(clone, "rev-parse", "origin/main") == tip


async def test_a_diverged_branch_says_a_pull_would_refuse_and_why(git_repos: GitRepos) -> None:
    clone = git_repos.clone
    (clone / "local.txt").write_text("local\n")
    git(clone, "add", "local.txt")
    git(clone, "commit", "-q", "-m", "local work")
    git_repos.commit_upstream("upstream work")
    before = tree_state(clone)

    preview = await fetch_preview(clone)

    assert preview.status == "diverged"
    assert (preview.local, preview.incoming) == (1, 1)
    assert "A pull would refuse: the branch has diverged from origin/main (1 local commit is " in (
        preview.summary
    )
    assert "never merges" in preview.summary
    assert [c.subject for c in preview.commits] == ["upstream work"]
    assert tree_state(clone) == before


async def test_local_changes_the_update_would_overwrite_say_a_pull_would_refuse(
    git_repos: GitRepos,
) -> None:
    clone = git_repos.clone
    git_repos.commit_upstream("touch the README", filename="README")
    git_repos.commit_upstream("a new file", filename="new.txt")
    (clone / "README").write_text("edited here\n")
    (clone / "new.txt").write_text("created here\n")
    (clone / "unrelated.txt").write_text("not in the update\n")
    before = tree_state(clone)

    preview = await fetch_preview(clone)

    assert preview.status == "blocked"
    assert preview.summary == (
        "A pull would refuse: local changes to README, new.txt would be overwritten. "
        "Commit, stash or discard them first."
    )
    assert tree_state(clone) == before


async def test_local_changes_elsewhere_do_not_block(git_repos: GitRepos) -> None:
    git_repos.commit_upstream("a new file", filename="new.txt")
    (git_repos.clone / "README").write_text("edited here\n")

    preview = await fetch_preview(git_repos.clone)

    assert preview.status == "incoming"


async def test_a_branch_without_upstream_is_one_sentence(git_repos: GitRepos) -> None:
    git(git_repos.clone, "checkout", "-q", "-b", "topic")

    preview = await fetch_preview(git_repos.clone)

    assert preview.status == "failed"
    assert preview.summary.startswith("Not fetched: the current branch has no upstream")


async def test_not_a_checkout_is_one_sentence(tmp_path: Path) -> None:
    preview = await fetch_preview(tmp_path)

    assert (preview.status, preview.summary) == (
        "failed",
        f"Not fetched: {os.path.realpath(tmp_path)} is not a git checkout.",
    )


async def test_an_unreachable_remote_is_reported_in_a_pulls_words(git_repos: GitRepos) -> None:
    git(git_repos.clone, "remote", "set-url", "origin", str(git_repos.origin) + "-gone")

    preview = await fetch_preview(git_repos.clone)

    assert preview.status == "failed"
    assert preview.summary.startswith("Not fetched: the remote is unreachable.")


async def test_a_fetch_waits_for_no_pull_it_skips_while_the_checkout_is_locked(
    git_repos: GitRepos,
) -> None:
    git_repos.commit_upstream("incoming")
    # A holder is shown in the holder grammar only (spaces and the like become "-").
    async with locked_checkout(git_repos.clone, holder="a pull of web-1:42") as held:
        assert isinstance(held, HeldCheckout)
        preview = await fetch_preview(git_repos.clone)

    assert preview.status == "skipped"
    assert preview.summary == (
        "Skipped: another process on this host (a-pull-of-web-1:42) is working in it."
    )
    assert not preview.fetched


async def test_a_hanging_fetch_is_stopped_at_the_timeout(
    git_repos: GitRepos, tmp_path: Path
) -> None:
    git_repos.commit_upstream("never arrives")
    hang = write_script(tmp_path / "hang.sh", "trap '' TERM\nsleep 30 &\nwait\n")
    git(git_repos.clone, "config", "remote.origin.uploadpack", str(hang))
    before = tree_state(git_repos.clone)

    preview = await fetch_preview(git_repos.clone, timeout=1.0)

    assert preview.status == "failed"
    assert preview.summary.startswith("git fetch timed out after 1s; stopped.")
    assert tree_state(git_repos.clone) == before


async def test_two_fetches_at_once_run_one_git_fetch(git_repos: GitRepos) -> None:
    git_repos.commit_upstream("incoming")

    first, second = await asyncio.gather(
        fetch_preview(git_repos.clone), fetch_preview(git_repos.clone)
    )

    assert sorted([first.status, second.status]) == ["incoming", "skipped"]
