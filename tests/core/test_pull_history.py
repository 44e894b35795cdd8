"""``core.pull_history``: recorded pulls in the state dir, and rolling them back in real git."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core.ops_exec import pull_checkout
from core.pull_history import (
    KEPT_PULLS,
    PullHistory,
    RecordedPull,
    roll_back_last_pull,
)
from core.updates import changed_files
from tests.support.git import GitRepos, git

A, B, C = "a" * 40, "b" * 40, "c" * 40


@pytest.fixture
def history(tmp_path: Path) -> PullHistory:
    return PullHistory(tmp_path / "state" / "pull-history.json")


async def pull_and_record(
    repos: GitRepos, history: PullHistory, who: str = "alice"
) -> RecordedPull:
    """A real pull of the clone, recorded as the cog records a pull that moved HEAD."""
    outcome = await pull_checkout(repos.clone, timeout=20)
    assert outcome.updated, outcome.summary
    assert outcome.head_before
    assert outcome.head_after
    pull = RecordedPull(outcome.head_before, outcome.head_after, who, 1.0)
    history.record(os.path.realpath(repos.clone), pull)
    return pull


def tree(repo: Path) -> tuple[str, str]:
    return git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain")


# --------------------------------------------------------------------------------------------
# The history file
# --------------------------------------------------------------------------------------------


def test_the_last_ten_pulls_are_kept_per_checkout(history: PullHistory) -> None:
    for n in range(KEPT_PULLS + 3):
        history.record("/srv/bot", RecordedPull(f"{n:040x}", f"{n + 1:040x}", "alice", float(n)))
    history.record("/srv/worker", RecordedPull(A, B, "bob", 5.0))

    kept = history.pulls("/srv/bot")
    assert [p.at for p in kept] == [float(n) for n in range(3, KEPT_PULLS + 3)]
    assert history.pulls("/srv/worker") == [RecordedPull(A, B, "bob", 5.0)]
    assert history.pulls("/srv/other") == []
    assert (history.path.stat().st_mode & 0o777) == 0o600


def test_forget_drops_only_the_pull_that_is_still_the_last(history: PullHistory) -> None:
    first, second = RecordedPull(A, B, "alice", 1.0), RecordedPull(B, C, "bob", 2.0)
    history.record("/srv/bot", first)
    history.record("/srv/bot", second)

    history.forget("/srv/bot", first)  # not the last one: someone recorded another since
    assert history.pulls("/srv/bot") == [first, second]
    history.forget("/srv/bot", second)
    assert history.pulls("/srv/bot") == [first]


def test_who_is_kept_as_one_clean_short_line(history: PullHistory) -> None:
    history.record("/srv/bot", RecordedPull(A, B, "ev\x1b[31mil\u202e" + "x" * 500, 1.0))

    (pull,) = history.pulls("/srv/bot")
    assert pull.who.startswith("evil")
    assert len(pull.who) == 100


@pytest.mark.parametrize(
    "entry",
    [
        {"before": "--hard", "after": B, "who": "x", "at": 1},
        {"before": A[:7], "after": B, "who": "x", "at": 1},
        {"before": A.upper(), "after": B, "who": "x", "at": 1},
        {"before": A, "after": B, "who": 7, "at": 1},
        {"before": A, "after": B, "who": "x", "at": float("nan")},
        {"before": A, "after": B, "who": "x", "at": True},
        {"before": A, "after": B},
        "not an object",
    ],
)
def test_entries_that_are_not_ours_are_ignored(history: PullHistory, entry: object) -> None:
    history.path.parent.mkdir(parents=True)
    good = {"before": B, "after": C, "who": "bob", "at": 2.0}
    history.path.write_text(json.dumps({"checkouts": {"/srv/bot": [good, entry]}}))

    assert history.pulls("/srv/bot") == [RecordedPull(B, C, "bob", 2.0)]


@pytest.mark.parametrize("content", ["{", "[]", '{"checkouts": 3}', "null"])
def test_a_broken_file_is_an_empty_history(history: PullHistory, content: str) -> None:
    history.path.parent.mkdir(parents=True)
    history.path.write_text(content)

    assert history.pulls("/srv/bot") == []
    history.record("/srv/bot", RecordedPull(A, B, "alice", 1.0))
    assert history.pulls("/srv/bot") == [RecordedPull(A, B, "alice", 1.0)]


# --------------------------------------------------------------------------------------------
# Rolling back in a real checkout
# --------------------------------------------------------------------------------------------


async def test_rollbacks_step_back_one_recorded_pull_each_then_say_nothing_is_left(
    git_repos: GitRepos, history: PullHistory
) -> None:
    start = git_repos.head()
    git_repos.commit_upstream("first", filename="one.txt")
    first = await pull_and_record(git_repos, history)
    git_repos.commit_upstream("second", filename="two.txt")
    git_repos.commit_upstream("third", filename="bot.py")
    second = await pull_and_record(git_repos, history, "bob")

    back = await roll_back_last_pull(git_repos.clone, history)

    assert back.status == "rolled back"
    assert (
        back.summary
        == f"Rolled back {second.after[:7]} → {second.before[:7]} (2 commits taken out)."
    )
    assert [c.subject for c in back.commits] == ["third", "second"]
    assert back.removed == 2
    assert sorted(back.changed) == ["bot.py", "two.txt"]
    assert back.pull == second
    assert git_repos.head() == second.before == first.after

    again = await roll_back_last_pull(git_repos.clone, history)

    assert again.status == "rolled back"
    assert [c.subject for c in again.commits] == ["first"]
    assert git_repos.head() == start

    done = await roll_back_last_pull(git_repos.clone, history)

    assert (done.status, done.summary) == (
        "nothing",
        "Nothing to roll back: no recorded pull moved this checkout.",
    )
    assert git_repos.head() == start
    # A later pull brings everything back.
    outcome = await pull_checkout(git_repos.clone, timeout=20)
    assert outcome.head_after == second.after


async def test_local_changes_the_rollback_would_lose_refuse_it_and_change_nothing(
    git_repos: GitRepos, history: PullHistory
) -> None:
    git_repos.commit_upstream("touch bot.py", filename="bot.py")
    pull = await pull_and_record(git_repos, history)
    (git_repos.clone / "bot.py").write_text("an operator's hot fix\n")
    before = tree(git_repos.clone)

    back = await roll_back_last_pull(git_repos.clone, history)

    assert back.status == "blocked"
    assert back.summary == (
        "Not rolled back: local changes to bot.py would be lost. Commit, stash or discard them "
        "first; nothing was changed."
    )
    assert tree(git_repos.clone) == before
    assert history.pulls(os.path.realpath(git_repos.clone)) == [pull]


async def test_local_changes_to_other_files_survive_a_rollback(
    git_repos: GitRepos, history: PullHistory
) -> None:
    git_repos.commit_upstream("touch bot.py", filename="bot.py")
    pull = await pull_and_record(git_repos, history)
    (git_repos.clone / "README").write_text("edited locally\n")

    back = await roll_back_last_pull(git_repos.clone, history)

    assert back.status == "rolled back"
    assert git_repos.head() == pull.before
    assert (git_repos.clone / "README").read_text() == "edited locally\n"
    assert not (git_repos.clone / "bot.py").exists()


async def test_a_head_moved_since_the_pull_refuses_and_changes_nothing(
    git_repos: GitRepos, history: PullHistory
) -> None:
    git_repos.commit_upstream("pulled", filename="one.txt")
    pull = await pull_and_record(git_repos, history)
    (git_repos.clone / "local.txt").write_text("local\n")
    git(git_repos.clone, "add", "local.txt")
    git(git_repos.clone, "commit", "-q", "-m", "a local commit after the pull")
    before = tree(git_repos.clone)

    back = await roll_back_last_pull(git_repos.clone, history)

    assert back.status == "moved"
    assert back.summary == (
        f"Not rolled back: HEAD is at {before[0][:7]}, not at {pull.after[:7]} where the last "
        "recorded pull left it; someone moved it since. Nothing was changed."
    )
    assert tree(git_repos.clone) == before
    assert history.pulls(os.path.realpath(git_repos.clone)) == [pull]


async def test_a_recorded_commit_that_is_gone_refuses(
    git_repos: GitRepos, history: PullHistory
) -> None:
    head = git_repos.head()
    history.record(os.path.realpath(git_repos.clone), RecordedPull("d" * 40, head, "alice", 1.0))

    back = await roll_back_last_pull(git_repos.clone, history)

    assert back.status == "failed"
    assert "is no longer in the repository" in back.summary
    assert git_repos.head() == head


async def test_changed_files_lists_names_git_would_quote(git_repos: GitRepos) -> None:
    old = git_repos.head()
    for name in ("tab\there.txt", "café.py", 'quote".txt'):
        git_repos.commit_upstream(name, filename=name)
    new = git(git_repos.work, "rev-parse", "HEAD")
    git(git_repos.clone, "fetch", "-q")
    changed = await changed_files(str(git_repos.clone), old, new)

    assert sorted(changed) == sorted(["tab\there.txt", "café.py", 'quote".txt'])
