"""The git side of ``ops_exec``: git's environment, ``run_git_pull`` outcomes, deadlines, redaction.

Everything runs against real repositories in tmp (``git_repos``: a bare origin, the ``clone``
under test and a ``work`` clone that pushes upstream commits) with real child processes.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.ops_exec import (
    DEFAULT_KILL_GRACE,
    GIT_ENV_ALLOWLIST,
    GIT_ENV_FIXED,
    ExecResult,
    _clean_index_lock_after_kill,
    git_env,
    pull_lock_key,
    run_exec,
    run_git_pull,
)
from tests.support.git import GitRepos, git
from tests.support.processes import ProcessLedger, live_group_members, pid_is_dead, write_script
from tests.support.redis_proc import free_port

# The contract from issue 2, written out so a change to the module cannot silently change it.
EXPECTED_FIXED = {
    "LC_ALL": "C",
    "LANG": "C",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GCM_INTERACTIVE": "never",
    "GIT_MERGE_AUTOEDIT": "no",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ControlMaster=no -o ConnectTimeout=10",
}
SECRET_SOURCE = {
    "PATH": "/opt/tools/bin:/usr/bin:/bin",
    "HOME": "/home/bot",
    "DISCORD_TOKEN": "canary-discord",
    "REDIS_URL": "redis://:canary-pw@10.0.0.5:6379/0",
    "AWS_ACCESS_KEY_ID": "AKIACANARYCANARY0000",
    "AWS_SECRET_ACCESS_KEY": "canary-aws-secret",
    "AWS_SESSION_TOKEN": "canary-aws-session",
    "GIT_ASKPASS": "/tmp/canary-askpass",
    "SSH_ASKPASS": "/tmp/canary-ssh-askpass",
    "SSH_AUTH_SOCK": "/run/user/1000/ssh-agent",
    "GIT_DIR": "/tmp/canary-git-dir",
    "GIT_WORK_TREE": "/tmp/canary-work-tree",
    "GIT_CONFIG_PARAMETERS": "'core.hookspath'='/tmp/canary-hooks'",
    "GIT_EXEC_PATH": "/tmp/canary-exec-path",
    "GIT_SSH": "/tmp/canary-ssh",
    "https_proxy": "http://proxy.internal:3128",
}
# Timed-out pulls must return by their deadline: timeout + kill grace + 1 s (issue 2).
PULL_TIMEOUT = 2.0
PULL_DEADLINE = PULL_TIMEOUT + DEFAULT_KILL_GRACE + 1.0


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ProcessLedger]:
    """Where stand-in scripts record their PIDs; anything still alive afterwards is killed."""
    directory = tmp_path / "ledger"
    directory.mkdir()
    book = ProcessLedger(directory)
    yield book
    book.kill_survivors()


def assert_nothing_of_the_run_survives(book: ProcessLedger) -> None:
    pids = book.recorded()
    assert len(pids) >= 2, f"the stand-in did not record its processes: {pids}"
    assert [pid for pid in pids if not pid_is_dead(pid)] == []
    assert live_group_members(book.run_pgid()) == []


# --------------------------------------------------------------------------------------------
# git_env: pure
# --------------------------------------------------------------------------------------------


def test_git_env_is_the_allowlist_plus_the_fixed_settings() -> None:
    assert GIT_ENV_ALLOWLIST == ("PATH", "HOME")
    assert dict(GIT_ENV_FIXED) == EXPECTED_FIXED
    env = git_env(SECRET_SOURCE)
    assert env == {"PATH": "/opt/tools/bin:/usr/bin:/bin", "HOME": "/home/bot", **EXPECTED_FIXED}


@pytest.mark.parametrize(
    "key",
    [
        "DISCORD_TOKEN",
        "REDIS_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "GIT_ASKPASS",
        "SSH_ASKPASS",
        "SSH_AUTH_SOCK",
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_CONFIG_PARAMETERS",
        "GIT_EXEC_PATH",
        "GIT_SSH",
        "https_proxy",
    ],
)
def test_git_env_drops_everything_else(key: str) -> None:
    env = git_env(SECRET_SOURCE)
    assert key not in env
    assert SECRET_SOURCE[key] not in env.values()


def test_git_env_fixed_settings_win_over_the_source() -> None:
    hostile = {
        "PATH": "/usr/bin",
        "LC_ALL": "de_DE.UTF-8",
        "LANG": "de_DE.UTF-8",
        "GIT_TERMINAL_PROMPT": "1",
        "GIT_CONFIG_NOSYSTEM": "0",
        "GCM_INTERACTIVE": "always",
        "GIT_MERGE_AUTOEDIT": "yes",
        "GIT_SSH_COMMAND": "ssh -o ProxyCommand=/tmp/evil",
    }
    env = git_env(hostile, passthrough=list(hostile))
    assert {key: env[key] for key in EXPECTED_FIXED} == EXPECTED_FIXED


def test_git_env_passthrough_extends_the_allowlist_explicitly() -> None:
    assert "SSH_AUTH_SOCK" not in git_env(SECRET_SOURCE)
    env = git_env(SECRET_SOURCE, passthrough=("SSH_AUTH_SOCK", "https_proxy", "NOT_SET_ANYWHERE"))
    assert env["SSH_AUTH_SOCK"] == "/run/user/1000/ssh-agent"
    assert env["https_proxy"] == "http://proxy.internal:3128"
    assert "NOT_SET_ANYWHERE" not in env
    assert "DISCORD_TOKEN" not in env
    assert set(env) == {"PATH", "HOME", "SSH_AUTH_SOCK", "https_proxy", *EXPECTED_FIXED}


def test_git_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "canary-from-os-environ")
    monkeypatch.setenv("PATH", "/canary/path/bin:/usr/bin")
    env = git_env()
    assert env["PATH"] == "/canary/path/bin:/usr/bin"
    assert env["HOME"] == os.environ["HOME"]
    assert "DISCORD_TOKEN" not in env
    assert set(env) == {"PATH", "HOME", *EXPECTED_FIXED}


# --------------------------------------------------------------------------------------------
# git_env end to end: what a hook and an askpass program get to see
# --------------------------------------------------------------------------------------------


async def test_pull_hooks_see_no_secrets_and_no_askpass_runs(
    git_repos: GitRepos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clone = git_repos.clone
    new_head = git_repos.commit_upstream("upstream change")
    env_dump = tmp_path / "hook-env.txt"
    write_script(clone / ".git" / "hooks" / "post-merge", f"env > {env_dump}\n")
    spy_marker = tmp_path / "askpass-ran"
    spy = write_script(tmp_path / "spy-askpass", f'echo "$@" >> {spy_marker}\necho canary\n')
    canaries = {
        "DISCORD_TOKEN": "canary-discord-token-value",
        "AWS_SECRET_ACCESS_KEY": "canary-aws-secret-value",
        "AWS_ACCESS_KEY_ID": "AKIACANARY0123456789",
        "REDIS_URL": "redis://:canary-redis-pw@127.0.0.1:6399/0",
        "GIT_ASKPASS": str(spy),
        "SSH_ASKPASS": str(spy),
        # Would point git at another repository (and fail the pull) if it leaked through.
        "GIT_DIR": str(tmp_path / "canary-git-dir"),
    }
    for key, value in canaries.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OPS_TEST_PASSED_ON_PURPOSE", "visible-by-choice")

    result = await run_git_pull(clone, env_passthrough=["OPS_TEST_PASSED_ON_PURPOSE"])

    assert result.ran, result.summary
    assert result.ok, result.summary
    monkeypatch.delenv("GIT_DIR")
    assert git_repos.head() == new_head
    hook_env = env_dump.read_text()  # the hook ran: the fast-forward invoked post-merge
    assert "GIT_TERMINAL_PROMPT=0" in hook_env.splitlines()
    assert "OPS_TEST_PASSED_ON_PURPOSE=visible-by-choice" in hook_env.splitlines()
    for key, value in canaries.items():
        assert value not in hook_env, f"{key} reached the hook"
    for key in ("DISCORD_TOKEN", "AWS_SECRET_ACCESS_KEY", "REDIS_URL", "GIT_ASKPASS"):
        assert f"\n{key}=" not in f"\n{hook_env}"
    assert not spy_marker.exists()


@pytest.fixture
async def http_auth_wall() -> AsyncIterator[str]:
    """A loopback HTTP server that answers every request with 401 (credentials required)."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="git"\r\n'
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/team/app.git"
    finally:
        server.close()
        await server.wait_closed()


async def test_pull_never_runs_askpass_even_when_the_remote_wants_credentials(
    git_repos: GitRepos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_auth_wall: str
) -> None:
    clone = git_repos.clone
    git(clone, "remote", "set-url", "origin", http_auth_wall)
    spy_marker = tmp_path / "askpass-ran"
    spy = write_script(tmp_path / "spy-askpass", f'echo "$@" >> {spy_marker}\necho canary\n')
    monkeypatch.setenv("GIT_ASKPASS", str(spy))
    monkeypatch.setenv("SSH_ASKPASS", str(spy))

    # Control: git handed the full environment does run the spy, so its absence below means
    # something.
    leaky = await run_exec(["git", "ls-remote", http_auth_wall], env=dict(os.environ), timeout=20)
    assert not leaky.ok
    assert spy_marker.exists(), leaky.stderr
    spy_marker.unlink()

    started = time.monotonic()
    result = await run_git_pull(clone, timeout=20)

    assert time.monotonic() - started < 20
    assert (result.ran, result.ok) == (True, False)
    assert "requires authentication" in result.summary
    assert "never prompts" in result.summary
    assert not spy_marker.exists()


# --------------------------------------------------------------------------------------------
# run_git_pull outcomes
# --------------------------------------------------------------------------------------------


async def test_fast_forward_lists_the_new_commits(git_repos: GitRepos) -> None:
    old = git_repos.head()
    commits = [git_repos.commit_upstream(f"change number {n:02d}") for n in range(1, 13)]

    result = await run_git_pull(git_repos.clone)

    assert (result.ran, result.ok) == (True, True), result.summary
    new = commits[-1]
    assert git_repos.head() == new
    lines = result.summary.splitlines()
    assert lines[0] == f"Updated {old[:7]} → {new[:7]} (12 commits, 12 files changed)"
    newest_first = list(enumerate(commits, start=1))[::-1][:10]
    assert lines[1:11] == [f"{sha[:7]} change number {n:02d}" for n, sha in newest_first]
    assert lines[11:] == ["… and 2 more"]


async def test_fast_forward_of_one_commit_uses_singular_words(git_repos: GitRepos) -> None:
    old = git_repos.head()
    new = git_repos.commit_upstream("fix the thing")

    result = await run_git_pull(git_repos.clone)

    assert result.summary.splitlines() == [
        f"Updated {old[:7]} → {new[:7]} (1 commit, 1 file changed)",
        f"{new[:7]} fix the thing",
    ]


async def test_already_up_to_date(git_repos: GitRepos) -> None:
    head = git_repos.head()

    result = await run_git_pull(git_repos.clone)

    assert result == (True, True, f"Already up to date at {head[:7]}.")
    assert git_repos.head() == head


async def test_diverged_branch_is_not_merged(git_repos: GitRepos) -> None:
    clone = git_repos.clone
    (clone / "local.txt").write_text("only here\n")
    git(clone, "add", "local.txt")
    git(clone, "commit", "-q", "-m", "local work")
    local_head = git_repos.head()
    git_repos.commit_upstream("upstream work")

    result = await run_git_pull(clone)

    assert (result.ran, result.ok) == (True, False)
    assert "diverged" in result.summary.splitlines()[0]
    assert git_repos.head() == local_head
    assert not (clone / ".git" / "MERGE_HEAD").exists()
    assert git(clone, "status", "--porcelain") == ""


async def test_local_changes_blocking_the_fast_forward(git_repos: GitRepos) -> None:
    clone = git_repos.clone
    head = git_repos.head()
    git_repos.commit_upstream("upstream edits the readme", filename="README")
    (clone / "README").write_text("edited on the server\n")

    result = await run_git_pull(clone)

    assert (result.ran, result.ok) == (True, False)
    assert result.summary.splitlines()[0] == (
        "Not pulled: local changes in the checkout block the fast-forward. "
        "Commit, stash or discard them first."
    )
    assert "README" in result.summary  # git's own words name the file
    assert git_repos.head() == head
    assert (clone / "README").read_text() == "edited on the server\n"


async def test_branch_without_upstream(git_repos: GitRepos) -> None:
    git(git_repos.clone, "checkout", "-q", "-b", "hotfix")
    git_repos.commit_upstream("upstream work")
    head = git_repos.head()

    result = await run_git_pull(git_repos.clone)

    assert result.ok is False
    assert "no upstream" in result.summary.splitlines()[0]
    assert git_repos.head() == head


async def test_not_a_repository(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()

    result = await run_git_pull(plain)

    assert (result.ran, result.ok) == (False, False)
    assert result.summary == f"Not pulled: {plain} is not a git checkout."
    assert list(plain.iterdir()) == []


async def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    result = await run_git_pull(missing)

    assert (result.ran, result.ok) == (False, False)
    assert "does not exist" in result.summary
    assert not missing.exists()


async def test_checkout_path_with_a_space(git_repos: GitRepos, tmp_path: Path) -> None:
    # Regression: the git dir used to be parsed with str.split(), so "/srv/my app/.git" broke
    # the flock and the index.lock check.
    checkout = tmp_path / "my app" / "clone"
    checkout.parent.mkdir()
    git(tmp_path, "clone", "-q", str(git_repos.origin), str(checkout))
    new = git_repos.commit_upstream("spaced out")

    result = await run_git_pull(checkout)

    assert (result.ran, result.ok) == (True, True), result.summary
    assert git(checkout, "rev-parse", "HEAD") == new
    assert (checkout / ".git" / "admin-ops-pull.lock").exists()
    index_lock = checkout / ".git" / "index.lock"
    index_lock.touch()

    blocked = await run_git_pull(checkout)

    assert (blocked.ran, blocked.ok) == (False, False)
    assert f"rm {shlex.quote(str(index_lock))}" in blocked.summary  # a command that works as is
    assert index_lock.exists()


async def test_unusable_pull_lock_is_a_result_not_an_exception(git_repos: GitRepos) -> None:
    # Regression: an unopenable lock file (read-only mount, a directory in its place) raised.
    (git_repos.clone / ".git" / "admin-ops-pull.lock").mkdir()
    git_repos.commit_upstream("cannot land")
    head = git_repos.head()

    result = await run_git_pull(git_repos.clone)

    assert (result.ran, result.ok) == (False, False)
    assert "admin-ops-pull.lock" in result.summary
    assert git_repos.head() == head


# --------------------------------------------------------------------------------------------
# Deadlines: nothing of a timed-out pull survives, and no index.lock is left behind
# --------------------------------------------------------------------------------------------


async def test_hanging_remote_that_ignores_sigterm_is_stopped_by_the_deadline(
    git_repos: GitRepos, tmp_path: Path, ledger: ProcessLedger
) -> None:
    clone = git_repos.clone
    git_repos.commit_upstream("never arrives")
    head = git_repos.head()
    hang = write_script(tmp_path / "hang.sh", ledger.shell_recording() + ledger.shell_hang())
    git(clone, "config", "remote.origin.uploadpack", str(hang))

    started = time.monotonic()
    result = await run_git_pull(clone, timeout=PULL_TIMEOUT, lock_ttl=10)
    elapsed = time.monotonic() - started

    assert elapsed < PULL_DEADLINE
    assert (result.ran, result.ok) == (True, False)
    assert "timed out after 2s; stopped" in result.summary
    assert_nothing_of_the_run_survives(ledger)
    assert not (clone / ".git" / "index.lock").exists()
    assert git_repos.head() == head


async def test_checkout_held_by_a_slow_smudge_filter_leaves_no_index_lock(
    git_repos: GitRepos, tmp_path: Path, ledger: ProcessLedger
) -> None:
    clone, work = git_repos.clone, git_repos.work
    (work / ".gitattributes").write_text("slow.txt filter=slow\n")
    (work / "slow.txt").write_text("v1\n")
    git(work, "add", ".gitattributes", "slow.txt")
    git(work, "commit", "-q", "-m", "add a filtered file")
    git(work, "push", "-q", "origin", "HEAD:main")
    git(clone, "pull", "-q", "--ff-only")  # before the filter exists: a plain checkout
    lock_seen = tmp_path / "index-lock-seen"
    index_lock = clone / ".git" / "index.lock"
    slow = write_script(
        tmp_path / "slow-smudge.sh",
        f"if [ -e {index_lock} ]; then echo held > {lock_seen}; else echo free > {lock_seen}; fi\n"
        + ledger.shell_recording()
        + ledger.shell_hang(),
    )
    git(clone, "config", "filter.slow.smudge", str(slow))
    git_repos.commit_upstream("v2", filename="slow.txt")

    started = time.monotonic()
    result = await run_git_pull(clone, timeout=PULL_TIMEOUT, lock_ttl=10)
    elapsed = time.monotonic() - started

    assert lock_seen.read_text() == "held\n", "the deadline did not hit during the checkout"
    assert elapsed < PULL_DEADLINE
    assert (result.ran, result.ok) == (True, False)
    assert "timed out after 2s; stopped" in result.summary
    assert_nothing_of_the_run_survives(ledger)
    assert not index_lock.exists()


async def test_stale_index_lock_is_reported_and_left_alone(git_repos: GitRepos) -> None:
    clone = git_repos.clone
    head = git_repos.head()
    git_repos.commit_upstream("cannot land yet")
    index_lock = clone / ".git" / "index.lock"
    index_lock.write_text("left by a crashed git\n")

    result = await run_git_pull(clone)

    assert result.ok is False
    assert str(index_lock) in result.summary
    assert f"rm {index_lock}" in result.summary
    assert index_lock.read_text() == "left by a crashed git\n"
    assert git_repos.head() == head


# --------------------------------------------------------------------------------------------
# Redaction in pull summaries
# --------------------------------------------------------------------------------------------

GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"


async def test_unreachable_remote_with_credentials_in_its_url(git_repos: GitRepos) -> None:
    closed = free_port()
    url = f"https://deploy:{GITHUB_TOKEN}@127.0.0.1:{closed}/team/app.git"
    git(git_repos.clone, "remote", "set-url", "origin", url)

    result = await run_git_pull(git_repos.clone, timeout=20)

    assert (result.ran, result.ok) == (True, False)
    assert result.summary.splitlines()[0] == "Not pulled: the remote is unreachable."
    assert GITHUB_TOKEN not in result.summary
    assert "deploy:" not in result.summary


async def test_credentials_in_git_output_are_redacted(git_repos: GitRepos, tmp_path: Path) -> None:
    # git itself anonymises the URLs it prints, but a remote program's stderr reaches the summary
    # verbatim: this one prints a URL with credentials and a token, as a misbehaving helper would.
    discord_token = "MTA1NjQ0NzE3NjI3NDk0NjQzMA.GhT9zQ.abcdefghijklmnopqrstuvwxyz0123456"
    leaky = write_script(
        tmp_path / "leaky-upload-pack",
        f"echo 'fatal: cannot read https://deploy:{GITHUB_TOKEN}@git.example.com/app.git' >&2\n"
        f"echo 'debug: token {discord_token}' >&2\n"
        "exit 128\n",
    )
    git(git_repos.clone, "config", "remote.origin.uploadpack", str(leaky))

    result = await run_git_pull(git_repos.clone)

    assert (result.ran, result.ok) == (True, False)
    assert "https://***@git.example.com/app.git" in result.summary
    assert GITHUB_TOKEN not in result.summary
    assert discord_token not in result.summary
    assert "deploy:" not in result.summary


async def test_summaries_that_echo_the_path_are_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator pasting a clone URL where a path belongs must not get the token echoed back.
    monkeypatch.chdir(tmp_path)

    result = await run_git_pull(f"https://deploy:{GITHUB_TOKEN}@github.com/team/app.git")

    assert (result.ran, result.ok) == (False, False)
    assert "does not exist" in result.summary
    assert GITHUB_TOKEN not in result.summary


# --------------------------------------------------------------------------------------------
# Arguments and the lock key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lock_ttl", "timeout"),
    [(60 + DEFAULT_KILL_GRACE, 60.0), (60, 60.0), (10, 60.0), (5, 3.0), (0, 0.5)],
)
async def test_lock_ttl_must_exceed_timeout_plus_grace(
    lock_ttl: float, timeout: float, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="lock_ttl"):
        await run_git_pull(tmp_path, lock_ttl=lock_ttl, timeout=timeout)


async def test_lock_ttl_just_above_timeout_plus_grace_is_accepted(git_repos: GitRepos) -> None:
    result = await run_git_pull(
        git_repos.clone, timeout=5.0, lock_ttl=5.0 + DEFAULT_KILL_GRACE + 0.5
    )
    assert (result.ran, result.ok) == (True, True)


def test_pull_lock_key_normalises_the_path(tmp_path: Path) -> None:
    app = tmp_path / "srv" / "app"
    app.mkdir(parents=True)
    link = tmp_path / "current"
    link.symlink_to(app)
    real = os.path.realpath(app)
    expected = f"sg:control:pull:{socket.gethostname()}:{real}"

    assert pull_lock_key(str(app)) == expected
    assert pull_lock_key(f"{app}/") == expected
    assert pull_lock_key(link) == expected
    assert pull_lock_key(f"{link}/") == expected
    assert pull_lock_key("/srv/app") == pull_lock_key("/srv/app/")
    assert pull_lock_key("/srv/app", hostname="web-1", prefix="fleet") == (
        f"fleet:pull:web-1:{os.path.realpath('/srv/app')}"
    )


async def test_repo_configured_credential_helper_and_askpass_never_run(
    git_repos: GitRepos, tmp_path: Path, http_auth_wall: str
) -> None:
    # A checkout's own config may name a credential helper or askpass program (left by a
    # developer, or planted); an unattended pull must run neither.
    clone = git_repos.clone
    git(clone, "remote", "set-url", "origin", http_auth_wall)
    helper_marker = tmp_path / "helper-ran"
    askpass_marker = tmp_path / "askpass-ran"
    helper = write_script(tmp_path / "spy-helper", f'echo "$@" >> {helper_marker}\n')
    askpass = write_script(tmp_path / "spy-askpass", f'echo "$@" >> {askpass_marker}\necho x\n')
    git(clone, "config", "credential.helper", str(helper))
    git(clone, "config", "core.askPass", str(askpass))

    # Control: a plain git with the same config does consult the helper.
    control = await run_exec(["git", "-C", str(clone), "fetch"], env=git_env(), timeout=20)
    assert not control.ok
    assert helper_marker.exists(), control.stderr
    helper_marker.unlink(missing_ok=True)
    askpass_marker.unlink(missing_ok=True)

    result = await run_git_pull(clone, timeout=20)
    assert (result.ran, result.ok) == (True, False)
    assert "requires authentication" in result.summary
    assert not helper_marker.exists()
    assert not askpass_marker.exists()


# --------------------------------------------------------------------------------------------
# Removing an index.lock after a killed pull: only when it is provably ours
# --------------------------------------------------------------------------------------------


def killed_result(signal_number: int) -> ExecResult:
    return ExecResult(("git", "pull"), -signal_number, "", "", True, False, 1.0)


def test_lock_left_by_a_sigkilled_git_is_removed(git_repos: GitRepos) -> None:
    git_dir = git_repos.clone / ".git"
    started = time.time()
    (git_dir / "index.lock").write_text("")
    note = _clean_index_lock_after_kill(
        str(git_repos.clone), str(git_dir), started, killed_result(signal.SIGKILL)
    )
    assert "Removed the index.lock" in note
    assert not (git_dir / "index.lock").exists()


def test_lock_is_left_when_git_stopped_on_sigterm(git_repos: GitRepos) -> None:
    # git removes its own lock on SIGTERM; a lock that is still there belongs to someone else.
    git_dir = git_repos.clone / ".git"
    started = time.time()
    (git_dir / "index.lock").write_text("")
    note = _clean_index_lock_after_kill(
        str(git_repos.clone), str(git_dir), started, killed_result(signal.SIGTERM)
    )
    assert "index.lock exists" in note
    assert (git_dir / "index.lock").exists()


def test_lock_is_left_when_another_process_works_in_the_checkout(git_repos: GitRepos) -> None:
    # An operator's `git commit` waiting in its editor holds index.lock with its cwd in the
    # checkout; deleting that lock would break their commit.
    git_dir = git_repos.clone / ".git"
    started = time.time()
    (git_dir / "index.lock").write_text("")
    operator = subprocess.Popen(["sleep", "30"], cwd=git_repos.clone)
    try:
        note = _clean_index_lock_after_kill(
            str(git_repos.clone), str(git_dir), started, killed_result(signal.SIGKILL)
        )
    finally:
        operator.kill()
        operator.wait()
    assert "index.lock exists" in note
    assert (git_dir / "index.lock").exists()


async def test_caller_secrets_straddling_the_cut_are_still_removed(
    git_repos: GitRepos, tmp_path: Path
) -> None:
    # A secret of no known shape (say a database password) that git prints where the summary's
    # detail is cut short: it must be removed before the cut, or its head would survive.
    secret = "plain-secret-value-0123456789"
    leaky = write_script(
        tmp_path / "leaky-upload-pack",
        f"printf '%s' \"$(head -c 1490 /dev/zero | tr '\\0' x)\" >&2\necho '{secret}' >&2\n"
        "exit 128\n",
    )
    git(git_repos.clone, "config", "remote.origin.uploadpack", str(leaky))

    result = await run_git_pull(git_repos.clone, secrets=[secret])

    assert (result.ran, result.ok) == (True, False)
    assert "plain-secret" not in result.summary
    assert "***" in result.summary


async def test_the_pull_lock_is_group_writable_as_far_as_the_umask_allows(
    git_repos: GitRepos,
) -> None:
    # Services of different users sharing a checkout through a group must open the same lock.
    old = os.umask(0o002)
    try:
        result = await run_git_pull(git_repos.clone)
    finally:
        os.umask(old)
    assert result.ok, result.summary
    lock = git_repos.clone / ".git" / "admin-ops-pull.lock"
    assert lock.stat().st_mode & 0o777 == 0o660
