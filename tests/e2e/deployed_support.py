"""The real ``bot.py`` installed under the shipped unit in the private systemd of ``tests/deploy``.

What deploy/README.md does on a server, done in the test tree of
:func:`tests.deploy.deploy_support.build_deploy_tree` (which already has the service users, the
shared checkout of step 2, ``/etc/admin-ops`` as ``/srv/etc-admin-ops`` and the units):

- the project's code is committed upstream and pulled into ``/srv/admin-ops/app`` by ``opsbot``;
- ``python3 -m venv /srv/admin-ops/app/.venv`` is run by ``opsbot``, and ``requirements.txt``
  is installed into it: its distributions (and theirs) are copied from the test's environment
  instead of downloaded, the very files pip installed there;
- ``bot.env`` and the credential files of step 3 are written.

The interpreter. The service user must be able to run the venv's Python under the unit's
sandbox (``ProtectHome=yes`` hides ``/root`` and ``/home``, ``PrivateTmp=yes`` hides ``/tmp``).
A test run's interpreter often lives in one of those (pyenv under ``/root``, mode 0700). Another
interpreter on the machine will not do: the copied packages were resolved for this one (redis
needs ``async-timeout`` below Python 3.11.3, for example, so Debian 12's 3.11.2 would need a
package the test environment does not have). So this one is made reachable: its installation
(``sys.base_prefix``) is bind-mounted read-only at ``/srv/admin-ops-python`` inside the
harness's private mount namespace only, the way a Python built into ``/opt`` would sit on a
server. A Python linked against its own ``libpython`` looks for it by an absolute run path under
the old prefix, which the sandbox hides: the unit then gets ``LD_LIBRARY_PATH`` pointing at the
mounted copy, in the test's drop-in (an environment variable, no change to the sandbox).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from tests.deploy.deploy_support import (
    CHECKOUT_INSIDE,
    LIB_INSIDE,
    PLAIN_ENV,
    DeployTree,
    chown_tree,
    git,
    skip_or_fail,
)
from tests.deploy.systemd_harness import SERVICE_UID
from tests.support import ROOT
from tests.support.fake_discord_bot import SITE_DIR

#: Where the test's Python installation appears inside the namespace, when it must be moved.
PYTHON_INSIDE = "/srv/admin-ops-python"
#: The test-only sitecustomize, inside the namespace.
SITE_INSIDE = f"{LIB_INSIDE}/fake-discord-site"
#: What the sandbox hides from the service (ProtectHome=, PrivateTmp=).
HIDDEN = (Path("/root"), Path("/home"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"))
#: The product's files, as a clone of the project would have them.
PRODUCT = ("bot.py", "cogs", "core", "deploy", "requirements.txt")


@dataclass(frozen=True)
class ServiceInterpreter:
    """The interpreter the service's venv is made from, as seen inside the namespace."""

    python: str
    #: Set when the interpreter was moved and finds its libpython only through this.
    ld_library_path: str | None = None

    def env(self) -> dict[str, str]:
        """What a process running it needs besides a plain ``PATH``."""
        extra = {"LD_LIBRARY_PATH": self.ld_library_path} if self.ld_library_path else {}
        return {**PLAIN_ENV, **extra}


def _hidden(path: Path) -> bool:
    return any(path.is_relative_to(hidden) for hidden in HIDDEN)


def reachable_interpreter(tree: DeployTree) -> ServiceInterpreter:
    """This test run's Python, runnable by the service user under the unit's sandbox."""
    base = Path(sys.base_prefix).resolve()
    real = Path(os.path.realpath(sys.executable))
    if not real.is_relative_to(base):
        skip_or_fail(f"{real} is not inside its installation {base}: cannot make it reachable")
    if not _hidden(base):
        return ServiceInterpreter(str(real))
    systemd = tree.systemd
    (systemd.srv / Path(PYTHON_INSIDE).relative_to("/srv")).mkdir(exist_ok=True)
    systemd.run(
        "/bin/sh",
        "-euc",
        f'mount --bind "{base}" {PYTHON_INSIDE}; mount -o remount,bind,ro {PYTHON_INSIDE}',
        check=True,
    )
    python = f"{PYTHON_INSIDE}/{real.relative_to(base)}"
    libdir = Path(str(sysconfig.get_config_var("LIBDIR") or ""))
    shared = sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir.is_relative_to(base)
    library = f"{PYTHON_INSIDE}/{libdir.relative_to(base)}" if shared else None
    return ServiceInterpreter(python, library)


def requirement_distributions() -> list[importlib.metadata.Distribution]:
    """The distributions ``pip install -r requirements.txt`` installs here, dependencies included.

    Markers are evaluated for this interpreter, which is also the service's.
    """
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pending = [Requirement(text) for line in lines if (text := line.split("#")[0].strip())]
    found: dict[str, importlib.metadata.Distribution] = {}
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        distribution = importlib.metadata.distribution(requirement.name)
        name = distribution.metadata["Name"].lower()
        if name not in found:
            found[name] = distribution
            pending += [Requirement(text) for text in distribution.requires or []]
    return list(found.values())


def install_project(tree: DeployTree) -> str:
    """Commit the product's files upstream and pull them into the checkout as ``opsbot``.

    Returns the commit. The upstream clone belongs to the test; the pull is the one deploy/README
    step 2's ``git clone`` would have made.
    """
    upstream = tree.upstream
    for name in PRODUCT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source,
                upstream / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                dirs_exist_ok=True,
            )
        else:
            shutil.copy2(source, upstream / name)
    (upstream / ".gitignore").write_text(".venv/\n__pycache__/\n")
    git(upstream, "add", "-A", config=tree.gitconfig)
    git(upstream, "commit", "-q", "-m", "admin-ops under test", config=tree.gitconfig)
    git(upstream, "push", "-q", "origin", "HEAD:main", config=tree.gitconfig)
    tree.systemd.run(
        "runuser", "-u", "opsbot", "--", "git", "-C", CHECKOUT_INSIDE, "pull", "-q", "--ff-only",
        env=PLAIN_ENV, check=True, timeout=30,
    )  # fmt: skip
    return tree.checkout_head()


def install_venv(tree: DeployTree, interpreter: ServiceInterpreter) -> None:
    """``python3 -m venv`` as ``opsbot`` (step 2), then requirements.txt's files copied in."""
    systemd = tree.systemd
    venv = tree.checkout / ".venv"
    shutil.rmtree(venv, ignore_errors=True)  # the tree's stand-in: a bare interpreter link
    systemd.run(
        "runuser", "-u", "opsbot", "--", interpreter.python, "-m", "venv", "--without-pip",
        f"{CHECKOUT_INSIDE}/.venv",
        env=interpreter.env(), check=True, timeout=60,
    )  # fmt: skip
    (site_packages,) = venv.glob("lib/python3*/site-packages")
    for distribution in requirement_distributions():
        root = Path(str(distribution.locate_file("")))
        for entry in distribution.files or ():
            if entry.parts[0] == "..":
                continue  # console scripts and the like, outside site-packages
            target = site_packages / entry
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / entry, target)
    chown_tree(venv, SERVICE_UID)
    check = systemd.run(
        "runuser", "-u", "opsbot", "--", f"{CHECKOUT_INSIDE}/.venv/bin/python", "-c",
        "import discord, redis.asyncio, aiohttp",
        env=interpreter.env(), timeout=60,
    )  # fmt: skip
    if check.returncode != 0:
        skip_or_fail(f"the service's venv cannot import its requirements: {check.stderr}")


def install_site(tree: DeployTree) -> None:
    """The test-only sitecustomize, where the service user can read it."""
    site = tree.systemd.srv / Path(SITE_INSIDE).relative_to("/srv")
    site.mkdir(mode=0o755, exist_ok=True)
    shutil.copy(SITE_DIR / "sitecustomize.py", site / "sitecustomize.py")
    (site / "sitecustomize.py").chmod(0o644)


def write_settings(tree: DeployTree, token: str, settings: dict[str, str]) -> None:
    """Step 3: the shipped ``bot.env`` with ``settings`` filled in, and the credential files.

    Only the Discord token is set: without Redis and the fleet, ``redis-url`` and
    ``control-secret`` stay empty, as the README says.
    """
    lines = (ROOT / "deploy" / "admin-ops.env.example").read_text().splitlines()
    kept = [line for line in lines if line.split("=", 1)[0] not in settings]
    settings_lines = [f"{name}={value}" for name, value in settings.items()]
    (tree.etc / "bot.env").write_text("\n".join([*kept, *settings_lines]) + "\n")
    (tree.etc / "discord-token").write_text(token + "\n")
    for name in ("control-secret", "redis-url"):
        (tree.etc / name).write_text("")
