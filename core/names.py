"""The grammars of what admin-ops names, and the layout of its Redis keys: one home for each.

Standard library only. Settings, the fleet daemon, the publisher and the cog all validate names
and build keys through here, so a grammar or a key can never differ between them.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Final

from core.ops_exec import DEFAULT_KEY_PREFIX, pull_lock_key

__all__ = [
    "COMMAND_ID",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_TARGET",
    "IDENTITY",
    "IDENTITY_RULE",
    "KEY_PREFIX",
    "KEY_PREFIX_RULE",
    "TARGET_NAME",
    "TARGET_NAME_RULE",
    "Keys",
    "default_identity",
    "target_name",
]

#: The name of the pull target that is the bot's own checkout (``OPS_REPO_DIR``).
DEFAULT_TARGET: Final = "bot"

#: A pull target's name, matched after lower-casing: ``worker``, ``site.v2``.
TARGET_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
TARGET_NAME_RULE: Final = "1-32 of a-z 0-9 _ . - (starting alphanumeric)"

#: A control daemon's identity, as it appears in results: ``web-1``, ``web-1:admin-ops-bot``.
IDENTITY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
IDENTITY_RULE: Final = "1-64 of A-Z a-z 0-9 . _ : @ - (starting alphanumeric)"

_IDENTITY_MAX: Final = 64
_IDENTITY_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._:@-]")

#: A fleet command's id (a uuid4 hex from our publisher).
COMMAND_ID: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")

#: ``OPS_CONTROL_PREFIX``: the first part of every Redis key.
KEY_PREFIX: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,63}")
KEY_PREFIX_RULE: Final = "1-64 of A-Z a-z 0-9 : . _ - (starting alphanumeric)"


def target_name(text: str) -> str | None:
    """``text`` as a pull target name (stripped, lower-cased), or None when it is not one."""
    name = text.strip().lower()
    return name if TARGET_NAME.fullmatch(name) else None


def default_identity(service: str | None = None) -> str:
    """This host's name, plus ``:service`` when several daemons share a host.

    Always a valid identity: characters outside the grammar become ``-`` and a long host
    name is cut so that the whole fits.
    """
    host = _IDENTITY_UNSAFE.sub("-", socket.gethostname() or "localhost").lstrip("-._:@")
    suffix = f":{_IDENTITY_UNSAFE.sub('-', service)}" if service else ""
    return f"{(host or 'localhost')[: _IDENTITY_MAX - len(suffix)]}{suffix}"[:_IDENTITY_MAX]


@dataclass(frozen=True)
class Keys:
    """Every Redis key admin-ops reads or writes, under one prefix."""

    prefix: str = DEFAULT_KEY_PREFIX

    @property
    def commands(self) -> str:
        """The stream every fleet command is published to."""
        return f"{self.prefix}:commands"

    def results(self, command_id: str) -> str:
        """The per-command stream hosts answer on."""
        return f"{self.prefix}:results:{command_id}"

    def heartbeat(self, identity: str) -> str:
        """The key whose existence says a daemon is alive."""
        return f"{self.prefix}:hosts:{identity}"

    @property
    def hosts_index(self) -> str:
        """The set of identities that have heartbeated (pruned lazily by publishers)."""
        return f"{self.prefix}:hosts"

    def ran_marker(self, identity: str, command_id: str) -> str:
        """The marker that makes a command id run at most once on one daemon."""
        return f"{self.prefix}:ran:{identity}:{command_id}"

    @property
    def cooldowns(self) -> str:
        """The prefix of the chat commands' cooldown keys (``…:cooldown:bot_pull``)."""
        return f"{self.prefix}:cooldown"

    def restart_marker(self, host: str, unit: str) -> str:
        """Where ``!bot_restart`` leaves its note for the next process of ``unit`` on ``host``."""
        return f"{self.prefix}:restart-marker:{host}:{unit}"

    @property
    def audit(self) -> str:
        """The audit stream of the chat commands."""
        return f"{self.prefix}:audit"

    def pull_lock(self, repo_dir: str, hostname: str | None = None) -> str:
        """The lock that dedupes pulls of one checkout on one host."""
        return pull_lock_key(repo_dir, hostname, prefix=self.prefix)
