"""Install a checkout's requirements with the bot's own interpreter, into its virtual environment.

Standard library only. :func:`install_requirements` first asks the interpreter itself whether
it runs in a virtual environment (``sys.prefix != sys.base_prefix``) and what is installed;
outside one it runs nothing, since pip must never change the system Python. Then it runs
``python -m pip install -r <file>`` through the hardened runner: no shell, an environment built
from an allowlist plus the ``PIP_*`` variables that are set (an index URL with its password
among them: everything shown is redacted), a timeout that stops pip's whole process group,
output capped while it is read. What changed is read from the interpreter again afterwards,
not from pip's words.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Final, Literal, NamedTuple

from core.ops_exec import ExecResult, redact, run_exec

__all__ = ["DepsOutcome", "Installed", "describe_changes", "install_requirements", "pip_env"]

#: Seconds the interpreter may take to say what it has installed.
_INSPECT_TIMEOUT: Final = 60.0
#: pip's output kept (per stream); the rest is counted.
_PIP_OUTPUT: Final = 256 * 1024
_INSPECTION_OUTPUT: Final = 4 * 1024 * 1024
# Run with -I: the environment's PYTHONPATH or a user site cannot change what it reports.
_INSPECT: Final = """\
import json, sys
from importlib import metadata
found = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if name and name not in found:
        found[name] = dist.version
print(json.dumps({"venv": sys.prefix != sys.base_prefix, "prefix": sys.prefix, "packages": found}))
"""
#: Always set for pip, whatever the operator's ``PIP_*`` say: never prompt, never install
#: outside a virtual environment (checked before too: this is pip's own guard as well).
_PIP_FIXED: Final[Mapping[str, str]] = {
    "PIP_NO_INPUT": "1",
    "PIP_REQUIRE_VIRTUALENV": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "LC_ALL": "C",
    "LANG": "C",
    "PYTHONNOUSERSITE": "1",
}
_DEFAULT_PATH: Final = "/usr/local/bin:/usr/bin:/bin"

DepsStatus = Literal["installed", "unchanged", "refused", "failed"]


class Installed(NamedTuple):
    """What an interpreter reported about itself."""

    venv: bool
    prefix: str
    #: Normalised name → (name as the package spells it, version).
    packages: Mapping[str, tuple[str, str]]


class DepsOutcome(NamedTuple):
    """What :func:`install_requirements` did."""

    status: DepsStatus
    #: One sentence: what changed, or why nothing did.
    summary: str
    #: pip's full output (redacted, capped), when pip ran.
    output: str = ""

    @property
    def acted(self) -> bool:
        """Whether pip ran (it may have installed something even if it failed)."""
        return self.status != "refused"


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_env(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment pip runs in: ``PATH``, ``HOME``, the ``PIP_*`` that are set, fixed rules."""
    src = os.environ if source is None else source
    env = {key: src[key] for key in ("PATH", "HOME") if key in src}
    env.update((key, value) for key, value in src.items() if key.startswith("PIP_"))
    env.setdefault("PATH", _DEFAULT_PATH)
    env.update(_PIP_FIXED)
    return env


async def _inspect(python: str) -> Installed | str:
    """What ``python`` has installed and whether it is a virtual environment, or why unknown."""
    result = await run_exec(
        [python, "-I", "-c", _INSPECT],
        env={"PATH": os.environ.get("PATH", _DEFAULT_PATH), "LC_ALL": "C"},
        timeout=_INSPECT_TIMEOUT,
        max_output=_INSPECTION_OUTPUT,
    )
    try:
        if not result.ok or result.truncated:
            raise ValueError("no answer")
        data = json.loads(result.stdout)
        packages = {
            _normalised(name): (name, version)
            for name, version in data["packages"].items()
            if isinstance(name, str) and isinstance(version, str)
        }
        return Installed(data["venv"] is True, str(data["prefix"]), packages)
    except (ValueError, KeyError, TypeError, AttributeError):
        why = (result.stderr or result.stdout).strip().splitlines()
        return f"cannot run the bot's Python {python}: {why[-1] if why else 'no answer'}"


def describe_changes(before: Installed, after: Installed) -> str:
    """``installed aiohttp 3.10.2 → 3.10.5, new: orjson 3.10.7`` (empty when nothing changed)."""
    changed, new, removed = [], [], []
    for key, (name, version) in sorted(after.packages.items()):
        old = before.packages.get(key)
        if old is None:
            new.append(f"{name} {version}")
        elif old[1] != version:
            changed.append(f"{name} {old[1]} → {version}")
    for key, (name, version) in sorted(before.packages.items()):
        if key not in after.packages:
            removed.append(f"{name} {version}")
    parts = [", ".join(changed)] if changed else []
    parts += [f"new: {', '.join(new)}"] if new else []
    parts += [f"removed: {', '.join(removed)}"] if removed else []
    return f"installed {', '.join(parts)}" if parts else ""


def _requirements_file(checkout: str, requirements: str) -> str:
    """The requirements file's real path inside ``checkout``; ValueError saying why not."""
    root = os.path.realpath(checkout)
    path = os.path.realpath(os.path.join(root, requirements))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"{requirements} points outside the checkout {root}")
    if not os.path.isfile(path):
        raise ValueError(f"there is no {requirements} in {root}")
    return path


def _last_error(result: ExecResult) -> str:
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


async def install_requirements(
    python: str,
    checkout: str | os.PathLike[str],
    requirements: str,
    *,
    timeout: float,
    environ: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
) -> DepsOutcome:
    """Install ``checkout``'s ``requirements`` (a path inside it) with ``python``'s pip.

    Refuses, running nothing, when ``python`` is not in a virtual environment or the file is
    not in the checkout. ``environ`` (default ``os.environ``) gives the ``PIP_*`` variables.
    """
    secrets = tuple(secrets)
    root = os.path.realpath(checkout)
    try:
        path = _requirements_file(root, requirements)
    except ValueError as exc:
        return DepsOutcome("refused", f"Not installed: {exc}. Nothing was run.")
    before = await _inspect(python)
    if isinstance(before, str):
        return DepsOutcome("refused", f"Not installed: {before}. Nothing was run.")
    if not before.venv:
        return DepsOutcome(
            "refused",
            f"Not installed: the bot's Python ({python}, prefix {before.prefix}) does not run in "
            "a virtual environment, and the system Python is never changed. Nothing was run.",
        )
    argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-r", path]
    result = await run_exec(
        argv, cwd=root, env=pip_env(environ), timeout=timeout, max_output=_PIP_OUTPUT
    )
    output = redact(f"$ {shlex.join(argv)}\n{result.stdout}\n{result.stderr}".strip(), secrets)
    after = await _inspect(python)
    changes = describe_changes(before, after) if not isinstance(after, str) else ""
    if result.timed_out:
        done = changes or "nothing changed"
        summary = f"pip did not finish within {timeout:g} s and was stopped; {done}."
        return DepsOutcome("failed", summary, output)
    if not result.ok:
        done = changes or "nothing changed"
        error = redact(_last_error(result), secrets)
        return DepsOutcome(
            "failed", f"pip failed (exit {result.returncode}): {error}; {done}.", output
        )
    if not changes:
        return DepsOutcome(
            "unchanged", "Nothing to install: every requirement is satisfied.", output
        )
    return DepsOutcome("installed", f"{changes[:1].upper()}{changes[1:]}.", output)
