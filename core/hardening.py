"""Keeping a process's secrets out of reach of other processes of the same user.

Standard library only. Any process of the same user may read ``/proc/PID/environ`` of a dumpable
process, so a git hook run by a pull could walk up to the bot and read ``DISCORD_TOKEN``.
:func:`make_undumpable` closes that; :func:`with_credentials` lets secrets come from systemd's
credentials (``LoadCredential=``) instead of the environment at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Final

__all__ = ["CREDENTIALS", "is_dumpable", "make_undumpable", "with_credentials"]

log = logging.getLogger("admin_ops.hardening")

#: Environment variable → the file name of a systemd credential that may stand in for it.
CREDENTIALS: Final[Mapping[str, str]] = {
    "DISCORD_TOKEN": "discord-token",
    "OPS_CONTROL_SECRET": "control-secret",
    "REDIS_URL": "redis-url",
}
#: A credential is a short secret; anything larger is not what we are looking for.
_MAX_CREDENTIAL_BYTES: Final = 64 * 1024

_PR_SET_DUMPABLE: Final = 4
_PR_GET_DUMPABLE: Final = 3


def _prctl() -> Callable[..., int] | None:
    """The C library's ``prctl``, or None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    function: Callable[..., int] | None = getattr(libc, "prctl", None)
    return function


def make_undumpable() -> bool:
    """Make this process undumpable; True when it is.

    Other processes of the same user (without CAP_SYS_PTRACE) can then no longer read its
    environment or memory through /proc or ptrace, and it leaves no core dump. Children start
    dumpable again after exec, so git and systemctl are unaffected.
    """
    prctl = _prctl()
    if prctl is None:
        log.warning("prctl is not available: this process stays dumpable")
        return False
    if prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(error))
        return False
    return True


def is_dumpable() -> bool:
    """Whether this process is dumpable (True when that cannot be told)."""
    prctl = _prctl()
    return True if prctl is None else bool(prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))


def _credential_values(environ: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    directory = environ.get("CREDENTIALS_DIRECTORY", "").strip()
    if not directory:
        return
    for variable, name in CREDENTIALS.items():
        if environ.get(variable, "").strip():
            continue  # an explicit variable wins
        path = Path(directory) / name
        try:
            with path.open("rb") as credential:
                data = credential.read(_MAX_CREDENTIAL_BYTES + 1)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot read credential %s: %s", path, exc.strerror or exc)
            continue
        if len(data) > _MAX_CREDENTIAL_BYTES:
            log.warning("credential %s is larger than %d bytes; ignored", path, len(data))
            continue
        # Files written with `echo` end with a newline that is not part of the secret.
        yield variable, data.decode("utf-8", errors="replace").rstrip("\r\n")


def with_credentials(environ: Mapping[str, str]) -> Mapping[str, str]:
    """``environ`` plus the systemd credentials that stand in for unset variables.

    With ``LoadCredential=discord-token:/etc/admin-ops/discord-token`` in a unit, systemd puts
    the file in ``$CREDENTIALS_DIRECTORY``, readable by the service only and never in any
    process's environment. ``environ`` itself is not changed.
    """
    found = dict(_credential_values(environ))
    if not found:
        return environ
    return {**environ, **found}
