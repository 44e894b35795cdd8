"""ssh for pulls: a checkout's own ``core.sshCommand`` (its deploy key) is used, and never prompts.

The remote is an ``ssh://`` URL served by a stand-in ``ssh`` program that records how it was
called and then runs the command git asked for, as sshd would, against the real bare origin.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from core.ops_exec import GIT_ENV_FIXED, pull_checkout, run_git_pull, ssh_batch_command
from tests.support.git import GitRepos, git
from tests.support.processes import write_script

STAND_IN = """
import json, os, subprocess, sys
with open(os.environ.get("SSH_STAND_IN_LOG", "{log}"), "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
# Like sshd: the last argument is the remote command, run by a shell.
sys.exit(subprocess.call(["/bin/sh", "-c", sys.argv[-1]]))
"""


def ssh_stand_in(directory: Path, name: str = "ssh") -> tuple[Path, Path]:
    """A program called ``name`` that logs its argv and serves the remote command locally."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "calls.jsonl"
    program = write_script(directory / name, STAND_IN.format(log=log), interpreter=sys.executable)
    return program, log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def over_ssh(git_repos: GitRepos) -> None:
    """Point the clone's origin at an ssh URL of the same bare repository."""
    git(
        git_repos.clone,
        "remote",
        "set-url",
        "origin",
        f"ssh://git@example.invalid{git_repos.origin}",
    )


async def test_a_checkouts_own_ssh_command_is_used_with_batch_options(
    git_repos: GitRepos, tmp_path: Path
) -> None:
    program, log = ssh_stand_in(tmp_path / "bin")
    key = tmp_path / "deploy_key"
    over_ssh(git_repos)
    git(git_repos.clone, "config", "core.sshCommand", f"{program} -i {key} -o IdentitiesOnly=yes")
    new = git_repos.commit_upstream("Needs the deploy key")

    outcome = await pull_checkout(git_repos.clone)

    assert outcome.ok, outcome.summary
    assert outcome.updated
    assert outcome.head_after == new == git_repos.head()
    [argv] = calls(log)
    # The checkout's key comes first, so OpenSSH (first value wins) uses it.
    assert argv[:4] == ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    assert "BatchMode=yes" in argv
    assert "ConnectTimeout=10" in argv


async def test_without_a_checkout_ssh_command_the_fixed_one_applies(
    git_repos: GitRepos, tmp_path: Path, monkeypatch
) -> None:
    # The fixed GIT_SSH_COMMAND runs "ssh" from PATH: put the stand-in first on PATH.
    program, log = ssh_stand_in(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{program.parent}:{'/usr/local/bin:/usr/bin:/bin'}")
    over_ssh(git_repos)
    git_repos.commit_upstream("Plain ssh")

    result = await run_git_pull(git_repos.clone)

    assert result.ok, result.summary
    [argv] = calls(log)
    fixed = shlex.split(GIT_ENV_FIXED["GIT_SSH_COMMAND"])[1:]
    assert argv[: len(fixed)] == fixed


def test_batch_options_are_added_to_ssh_only() -> None:
    assert ssh_batch_command("ssh -i /k") == (
        "ssh -i /k -o BatchMode=yes -o ControlMaster=no -o ConnectTimeout=10"
    )
    assert ssh_batch_command("/usr/bin/ssh -i '/my keys/k'").startswith(
        "/usr/bin/ssh -i '/my keys/k' -o BatchMode=yes"
    )
    # Another program would not understand OpenSSH options; it still has no terminal.
    assert ssh_batch_command("plink -batch") == "plink -batch"
    assert ssh_batch_command("ssh 'unterminated") == "ssh 'unterminated"


async def test_pull_outcome_carries_both_commits_and_the_seed_result_its_three_fields(
    git_repos: GitRepos,
) -> None:
    before = git_repos.head()
    new = git_repos.commit_upstream("Typed")

    outcome = await pull_checkout(git_repos.clone)

    assert (outcome.head_before, outcome.head_after) == (before, new)
    assert outcome.updated
    assert tuple(outcome.result) == (True, True, outcome.summary)
    again = await pull_checkout(git_repos.clone)
    assert again.ok
    assert not again.updated
