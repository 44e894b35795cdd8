"""Throw-away virtual environments and wheels written by the test, for a real pip without network.

A wheel is a zip: :func:`write_wheel` writes one (metadata, module, RECORD with hashes) into a
directory that pip reads with ``PIP_NO_INDEX=1`` and ``PIP_FIND_LINKS``. :func:`venv_template`
builds one virtual environment with pip (``ensurepip`` needs no network); :func:`copy_venv`
gives each test its own copy, so no test ever installs into the project's ``.venv``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


def write_wheel(
    directory: Path, name: str, version: str, *, requires: tuple[str, ...] = ()
) -> Path:
    """A pure-Python wheel of distribution ``name`` with one module of the same name."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {req}\n" for req in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: admin-ops-tests\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def venv_template(directory: Path) -> Path:
    """A virtual environment with pip in ``directory`` (its ``bin/python`` is returned)."""
    subprocess.run(
        [sys.executable, "-m", "venv", str(directory)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return directory / "bin" / "python"


def copy_venv(template: Path, directory: Path) -> Path:
    """A copy of the template's environment in ``directory``; its ``bin/python``."""
    shutil.copytree(template.parent.parent, directory, symlinks=True)
    return directory / "bin" / "python"


def installed(python: Path) -> dict[str, str]:
    """Distribution name → version, as ``python`` sees its own environment."""
    script = (
        "import json; from importlib import metadata; "
        "print(json.dumps({d.metadata['Name']: d.version for d in metadata.distributions()}))"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", script],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    return dict(json.loads(out.stdout))


def pip_install(python: Path, wheels: Path, *requirements: str) -> None:
    """Install ``requirements`` from ``wheels`` (test set-up, not the code under test)."""
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
         str(wheels), *requirements],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
