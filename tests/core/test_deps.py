"""``core.deps``: a real pip, in a throw-away virtual environment, from wheels the test wrote.

No network: ``PIP_NO_INDEX=1`` and ``PIP_FIND_LINKS`` point pip at a local directory (or, for
the timeout, ``PIP_INDEX_URL`` at a loopback server that never answers).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.deps import install_requirements, pip_env
from tests.support.processes import write_script
from tests.support.wheels import copy_venv, installed, pip_install, write_wheel


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    directory = tmp_path / "wheels"
    for version in ("1.0", "1.1"):
        write_wheel(directory, "opsdemo-alpha", version)
    write_wheel(directory, "opsdemo-beta", "2.0", requires=("opsdemo-gamma>=3",))
    write_wheel(directory, "opsdemo-gamma", "3.0")
    return directory


@pytest.fixture
def venv(pip_venv_template: Path, tmp_path: Path, wheels: Path) -> Path:
    """A throw-away environment with opsdemo-alpha 1.0 installed."""
    python = copy_venv(pip_venv_template, tmp_path / "venv")
    pip_install(python, wheels, "opsdemo-alpha==1.0")
    return python


@pytest.fixture
def offline(wheels: Path) -> dict[str, str]:
    return {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    path = tmp_path / "checkout"
    path.mkdir()
    return path


async def test_requirements_are_installed_and_the_changes_reported(
    venv: Path, checkout: Path, offline: dict[str, str]
) -> None:
    (checkout / "requirements.txt").write_text("opsdemo-alpha==1.1\nopsdemo-beta==2.0\n")

    outcome = await install_requirements(
        str(venv), checkout, "requirements.txt", timeout=120, environ=offline
    )

    assert outcome.status == "installed", outcome
    assert outcome.summary == (
        "Installed opsdemo-alpha 1.0 → 1.1, new: opsdemo-beta 2.0, opsdemo-gamma 3.0."
    )
    assert outcome.acted
    assert "Successfully installed" in outcome.output
    assert outcome.output.startswith(f"$ {shlex.quote(str(venv))} -m pip install ")
    found = installed(venv)
    assert (found["opsdemo-alpha"], found["opsdemo-beta"]) == ("1.1", "2.0")


async def test_satisfied_requirements_change_nothing(
    venv: Path, checkout: Path, offline: dict[str, str]
) -> None:
    (checkout / "requirements.txt").write_text("opsdemo-alpha==1.0\n")

    outcome = await install_requirements(
        str(venv), checkout, "requirements.txt", timeout=120, environ=offline
    )

    assert (outcome.status, outcome.summary) == (
        "unchanged",
        "Nothing to install: every requirement is satisfied.",
    )


async def test_a_configured_file_inside_the_checkout_is_used(
    venv: Path, checkout: Path, offline: dict[str, str]
) -> None:
    (checkout / "deploy").mkdir()
    (checkout / "deploy" / "pins.txt").write_text("opsdemo-gamma==3.0\n")

    outcome = await install_requirements(
        str(venv), checkout, "deploy/pins.txt", timeout=120, environ=offline
    )

    assert outcome.summary == "Installed new: opsdemo-gamma 3.0."


async def test_a_pip_failure_is_one_sentence_and_changes_nothing(
    venv: Path, checkout: Path, offline: dict[str, str]
) -> None:
    (checkout / "requirements.txt").write_text("opsdemo-alpha==1.1\nopsdemo-missing==9\n")
    before = installed(venv)

    outcome = await install_requirements(
        str(venv), checkout, "requirements.txt", timeout=120, environ=offline
    )

    assert outcome.status == "failed"
    assert outcome.summary == (
        "pip failed (exit 1): ERROR: No matching distribution found for opsdemo-missing==9; "
        "nothing changed."
    )
    assert installed(venv) == before


@pytest.fixture
async def silent_index() -> AsyncIterator[str]:
    """A loopback "package index" that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://ops:s3cret-index-pass@127.0.0.1:{port}/simple"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_pip_that_does_not_finish_in_time_is_stopped_and_nothing_changes(
    venv: Path, checkout: Path, silent_index: str
) -> None:
    (checkout / "requirements.txt").write_text("opsdemo-beta==2.0\n")
    before = installed(venv)
    environ = {**os.environ, "PIP_INDEX_URL": silent_index, "PIP_TIMEOUT": "120"}

    outcome = await install_requirements(
        str(venv), checkout, "requirements.txt", timeout=3, environ=environ, secrets=()
    )

    assert outcome.status == "failed"
    assert outcome.summary == "pip did not finish within 3 s and was stopped; nothing changed."
    assert installed(venv) == before
    # The index URL's password is in pip's environment, and shown nowhere.
    assert "s3cret-index-pass" not in outcome.output + outcome.summary


async def test_outside_a_virtual_environment_nothing_runs(
    checkout: Path, tmp_path: Path, offline: dict[str, str]
) -> None:
    (checkout / "requirements.txt").write_text("opsdemo-alpha==1.1\n")
    calls = tmp_path / "calls.txt"
    system_python = Path(sys.base_prefix) / "bin" / "python3"
    # The system Python, watched: every run of it is recorded.
    python = write_script(
        tmp_path / "python", f'echo "$1 $2" >> {calls}\nexec {system_python} "$@"\n'
    )

    outcome = await install_requirements(
        str(python), checkout, "requirements.txt", timeout=60, environ=offline
    )

    assert outcome.status == "refused"
    assert outcome.summary.startswith(f"Not installed: the bot's Python ({python}, prefix ")
    assert outcome.summary.endswith(
        "does not run in a virtual environment, and the system Python is never changed. "
        "Nothing was run."
    )
    assert not outcome.acted
    runs = calls.read_text().splitlines()
    assert len(runs) == 1
    assert runs == ["-I -c"]  # the question, never pip


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda c: None, "there is no requirements.txt in {root}"),
        (lambda c: (c / "requirements.txt").mkdir(), "there is no requirements.txt in {root}"),
        (
            lambda c: (c / "requirements.txt").symlink_to("/etc/hostname"),
            "requirements.txt points outside the checkout {root}",
        ),
    ],
    ids=["missing", "a directory", "a link out of the checkout"],
)
async def test_a_requirements_file_not_in_the_checkout_is_refused(
    venv: Path, checkout: Path, offline: dict[str, str], setup: object, expected: str
) -> None:
    setup(checkout)  # type: ignore[operator]

    outcome = await install_requirements(
        str(venv), checkout, "requirements.txt", timeout=60, environ=offline
    )

    root = os.path.realpath(checkout)
    assert (outcome.status, outcome.summary) == (
        "refused",
        f"Not installed: {expected.format(root=root)}. Nothing was run.",
    )


async def test_an_interpreter_that_cannot_run_is_refused(checkout: Path) -> None:
    (checkout / "requirements.txt").write_text("x\n")

    outcome = await install_requirements(
        "/nonexistent/python", checkout, "requirements.txt", timeout=60
    )

    assert outcome.status == "refused"
    assert outcome.summary.startswith("Not installed: cannot run the bot's Python /nonexistent/")


def test_pip_gets_the_allowlist_and_the_pip_variables_only() -> None:
    source = {
        "PATH": "/usr/bin",
        "HOME": "/srv/admin-ops",
        "PIP_INDEX_URL": "https://u:p@pypi.example/simple",
        "PIP_REQUIRE_VIRTUALENV": "0",
        "DISCORD_TOKEN": "secret",
        "REDIS_URL": "redis://:pw@h/0",
        "PYTHONPATH": "/tmp/evil",
        "VIRTUAL_ENV": "/elsewhere",
    }

    assert pip_env(source) == {
        "PATH": "/usr/bin",
        "HOME": "/srv/admin-ops",
        "PIP_INDEX_URL": "https://u:p@pypi.example/simple",
        # Fixed, whatever the environment says.
        "PIP_REQUIRE_VIRTUALENV": "1",
        "PIP_NO_INPUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "LC_ALL": "C",
        "LANG": "C",
        "PYTHONNOUSERSITE": "1",
    }
