"""core.hardening: a git hook run by our pull cannot read the bot's environment.

A real ``post-merge`` hook walks up its parent processes and tries to read each one's
``/proc/PID/environ``, looking for the token. The "bot" is a real Python process holding the
token in its environment and pulling through ``pull_checkout``. Run as root, everything runs
with an empty capability bounding set (``setpriv``), as an unprivileged service would: root's
CAP_SYS_PTRACE reads any process's memory, which is not what a bot's user has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.git import GitRepos
from tests.support.processes import write_script

TOKEN = "canary-token-MTIzNDU2Nzg5"

HOOK = """
import os
found, denied = [], []
pid = os.getppid()
while pid > 1:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            if b"%s" in environ.read():
                found.append(pid)
    except OSError:
        denied.append(pid)
    with open(f"/proc/{pid}/stat") as stat:
        pid = int(stat.read().rsplit(")", 1)[1].split()[1])
with open(os.environ.get("HOOK_REPORT", "%s"), "w") as report:
    report.write(f"found={found} denied={denied}\\n")
"""

BOT = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from core.hardening import make_undumpable
from core.ops_exec import pull_checkout
if sys.argv[3] == "undumpable":
    assert make_undumpable()
outcome = asyncio.run(pull_checkout(sys.argv[2]))
print(outcome.ok, outcome.summary)
"""


def as_unprivileged(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to drop root's capabilities")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--", *argv]


def run_bot(git_repos: GitRepos, tmp_path: Path, mode: str) -> str:
    report = tmp_path / f"report-{mode}"
    write_script(
        git_repos.clone / ".git" / "hooks" / "post-merge",
        HOOK % (TOKEN, report),
        interpreter=sys.executable,
    )
    git_repos.commit_upstream(f"Trigger the hook ({mode})")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "DISCORD_TOKEN": TOKEN}
    env["GIT_CONFIG_GLOBAL"] = os.environ["GIT_CONFIG_GLOBAL"]
    done = subprocess.run(
        as_unprivileged([sys.executable, "-c", BOT, str(ROOT), str(git_repos.clone), mode]),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True"), done.stdout
    return report.read_text()


def test_a_hook_cannot_read_an_undumpable_bots_environment(
    git_repos: GitRepos, tmp_path: Path
) -> None:
    report = run_bot(git_repos, tmp_path, "undumpable")
    assert report.startswith("found=[] ")
    assert "denied=[]" not in report  # it did try the bot, and was refused


def test_the_same_hook_finds_the_token_in_a_dumpable_process(
    git_repos: GitRepos, tmp_path: Path
) -> None:
    # The control: without make_undumpable() the walk finds the token, so the test above can
    # tell the difference.
    report = run_bot(git_repos, tmp_path, "dumpable")
    assert not report.startswith("found=[] ")
