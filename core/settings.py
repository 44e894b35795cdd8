"""Typed, frozen settings for admin-ops, read from environment variables.

Standard library only (the fleet daemon CLI reuses it): nothing here imports discord or redis.
``Settings.from_env()`` validates everything at load and raises ``SettingsError`` whose lines each
start with the name of the bad variable, so an operator knows exactly what to fix.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import parse_qs, urlsplit

from core.ops_exec import redact, systemctl_argv, validate_unit_name

__all__ = [
    "COMMANDS",
    "DEFAULT_CONTROL_PREFIX",
    "DEFAULT_COOLDOWNS",
    "DEFAULT_TARGET",
    "PROJECT_ROOT",
    "PullTarget",
    "RestartMode",
    "Settings",
    "SettingsError",
    "default_state_dir",
]

#: The repository that contains ``bot.py``: the default checkout for ``!bot_pull``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Chat commands that settings know about. ``OPS_ROLE_IDS_<NAME>`` and ``OPS_COOLDOWN_<NAME>``
#: exist for each; a command added to the cog is added here too.
COMMANDS: tuple[str, ...] = (
    "bot_restart",
    "proxy_restart",
    "bot_pull",
    "ops_status",
    "fleet_pull",
    "fleet_restart",
    "fleet_status",
)

#: Seconds between two runs of a command, bot-wide. A command missing here has no cooldown.
DEFAULT_COOLDOWNS: Mapping[str, float] = {
    "bot_restart": 120.0,
    "proxy_restart": 30.0,
    "bot_pull": 15.0,
    "ops_status": 0.0,
    "fleet_pull": 15.0,
    "fleet_restart": 30.0,
    "fleet_status": 0.0,
}

#: The Redis key prefix of the fleet's streams and of every key the cog writes.
DEFAULT_CONTROL_PREFIX = "sg:control"

#: The name of the pull target that is the bot's own checkout (``OPS_REPO_DIR``).
DEFAULT_TARGET = "bot"

RestartMode = Literal["systemd", "exit"]

_TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
# A control daemon's identity, as core.control_ops accepts it (not imported: it needs redis).
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
# Shorter values would mangle ordinary output when redacted (a 2-character "secret" matches
# everywhere); such values are not worth calling secrets.
_MIN_SECRET_LENGTH = 4
_MAX_TIMEOUT = 3600.0
#: Variables whose values are secrets wherever they appear, besides the token and Redis password.
ALWAYS_SECRET = ("OPS_CONTROL_SECRET",)


class SettingsError(ValueError):
    """One or more environment variables are invalid; each line names its variable."""

    def __init__(self, problems: Iterable[str]) -> None:
        """Keep every problem so ``--check`` can show them all at once."""
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


class PullTarget(NamedTuple):
    """A checkout ``!bot_pull <name>`` may fast-forward."""

    name: str
    path: Path


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """Where cooldowns and the restart marker live when ``OPS_STATE_DIR`` is not set.

    systemd's ``StateDirectory=`` (exported as ``$STATE_DIRECTORY``, possibly a colon-separated
    list) comes first, then ``$XDG_STATE_HOME/admin-ops``, then ``~/.local/state/admin-ops``.
    """
    systemd_dirs = environ.get("STATE_DIRECTORY", "").strip()
    if systemd_dirs:
        return Path(systemd_dirs.split(":")[0])
    xdg = environ.get("XDG_STATE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "admin-ops"
    home = environ.get("HOME", "").strip()
    base = Path(home) if home else Path.home()
    return base / ".local" / "state" / "admin-ops"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything admin-ops reads from its environment, validated; see README "Settings"."""

    discord_token: str | None = field(default=None, repr=False)
    command_prefix: str = "!"
    redis_url: str | None = field(default=None, repr=False)
    state_dir: Path
    repo_dir: Path
    extra_targets: tuple[PullTarget, ...] = ()
    bot_service: str | None = None
    proxy_service: str | None = None
    restart_mode: RestartMode = "systemd"
    restart_delay: float = 1.0
    pull_timeout: float = 60.0
    control_secret: str | None = field(default=None, repr=False)
    control_prefix: str = DEFAULT_CONTROL_PREFIX
    fleet_timeout: float = 30.0
    control_in_process: bool = False
    control_identity: str | None = None
    admin_role_ids: frozenset[int] = frozenset()
    admin_role_names: frozenset[str] = frozenset()
    command_role_ids: tuple[tuple[str, frozenset[int]], ...] = ()
    channel_ids: frozenset[int] = frozenset()
    audit_channel_id: int | None = None
    cooldowns: tuple[tuple[str, float], ...] = tuple(DEFAULT_COOLDOWNS.items())
    redact_env: tuple[str, ...] = ()
    secrets: tuple[str, ...] = field(default=(), repr=False)

    # ----------------------------------------------------------------- derived values

    @property
    def pull_targets(self) -> tuple[PullTarget, ...]:
        """Every checkout ``!bot_pull`` knows, the bot's own (``bot``) first."""
        return (PullTarget(DEFAULT_TARGET, self.repo_dir), *self.extra_targets)

    def target(self, name: str) -> PullTarget | None:
        """The pull target called ``name`` (case-insensitive), or None."""
        wanted = name.strip().lower()
        return next((t for t in self.pull_targets if t.name == wanted), None)

    def cooldown(self, command: str) -> float:
        """Seconds between two runs of ``command``; 0 means no cooldown."""
        return dict(self.cooldowns).get(command, 0.0)

    def role_ids_for(self, command: str) -> frozenset[int]:
        """Role IDs allowed to run ``command``: its own override, else ``OPS_ADMIN_ROLE_IDS``."""
        return dict(self.command_role_ids).get(command, self.admin_role_ids)

    def has_role_override(self, command: str) -> bool:
        """Whether ``OPS_ROLE_IDS_<COMMAND>`` replaces the admin roles for ``command``."""
        return command in dict(self.command_role_ids)

    @property
    def fleet_missing(self) -> tuple[str, ...]:
        """The variables the ``!fleet_*`` commands still need (empty when they can run)."""
        missing = () if self.redis_url is not None else ("REDIS_URL",)
        return missing + (() if self.control_secret is not None else ("OPS_CONTROL_SECRET",))

    @property
    def cooldown_file(self) -> Path:
        """The JSON file that keeps cooldowns across restarts when Redis is absent or down."""
        return self.state_dir / "cooldowns.json"

    @property
    def marker_file(self) -> Path:
        """The restart marker's file when Redis is absent or down."""
        return self.state_dir / "restart-marker.json"

    @property
    def masked_redis_url(self) -> str | None:
        """``REDIS_URL`` with its credentials replaced by ``***``, for display."""
        if self.redis_url is None:
            return None
        return redact(self.redis_url, self.secrets)

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); raise ``SettingsError``."""
        env = os.environ if environ is None else environ
        reader = _Reader(env)

        token = reader.text("DISCORD_TOKEN")
        prefix = env.get("OPS_PREFIX", "!")
        if not prefix.strip():
            reader.problem("OPS_PREFIX", "must not be empty or blank")
            prefix = "!"
        redis_url = reader.redis_url("REDIS_URL")
        restart_mode = reader.restart_mode("OPS_RESTART_MODE")

        command_role_ids: list[tuple[str, frozenset[int]]] = []
        cooldowns: list[tuple[str, float]] = []
        for command in COMMANDS:
            var = f"OPS_ROLE_IDS_{command.upper()}"
            if reader.text(var) is not None:
                command_role_ids.append((command, reader.id_set(var, "role ID")))
            cooldowns.append(
                (
                    command,
                    reader.seconds(
                        f"OPS_COOLDOWN_{command.upper()}", DEFAULT_COOLDOWNS.get(command, 0.0)
                    ),
                )
            )

        # Used as given (not stripped): it is an HMAC key, and every daemon reads it raw too.
        control_secret = env.get("OPS_CONTROL_SECRET", "")
        control_prefix = reader.text("OPS_CONTROL_PREFIX") or DEFAULT_CONTROL_PREFIX
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,63}", control_prefix) is None:
            reader.problem(
                "OPS_CONTROL_PREFIX", "must be 1-64 of A-Z a-z 0-9 : . _ - (starting alphanumeric)"
            )
            control_prefix = DEFAULT_CONTROL_PREFIX
        control_in_process = reader.flag("OPS_CONTROL_IN_PROCESS")
        if control_in_process and (redis_url is None or not control_secret.strip()):
            reader.problem(
                "OPS_CONTROL_IN_PROCESS",
                "the in-process daemon needs REDIS_URL and OPS_CONTROL_SECRET",
            )
        control_identity = reader.text("OPS_IDENTITY")
        if control_identity is not None and _IDENTITY.fullmatch(control_identity) is None:
            reader.problem(
                "OPS_IDENTITY", "must be 1-128 of A-Z a-z 0-9 . _ : @ - (starting alphanumeric)"
            )
            control_identity = None

        try:
            # Read by core.ops_exec at each call; checked here so a typo stops the start-up.
            systemctl_argv(env)
        except ValueError as exc:
            reader.problem("OPS_SYSTEMCTL", str(exc).removeprefix("OPS_SYSTEMCTL "))
        redact_env = reader.names("OPS_REDACT_ENV")
        secret_values = [token, _url_password(redis_url)]
        secret_values += [env.get(name) for name in (*ALWAYS_SECRET, *redact_env)]
        secrets = tuple(
            dict.fromkeys(s for s in secret_values if s and len(s) >= _MIN_SECRET_LENGTH)
        )

        settings = cls(
            discord_token=token,
            command_prefix=prefix,
            redis_url=redis_url,
            state_dir=reader.path("OPS_STATE_DIR") or default_state_dir(env),
            repo_dir=reader.path("OPS_REPO_DIR") or PROJECT_ROOT,
            extra_targets=reader.targets("OPS_PULL_TARGETS"),
            bot_service=reader.unit("OPS_BOT_SERVICE"),
            proxy_service=reader.unit("OPS_PROXY_SERVICE"),
            restart_mode=restart_mode,
            restart_delay=reader.seconds("OPS_RESTART_DELAY", 1.0, maximum=60.0),
            pull_timeout=reader.seconds("OPS_PULL_TIMEOUT", 60.0, minimum=1.0),
            control_secret=control_secret if control_secret.strip() else None,
            control_prefix=control_prefix,
            fleet_timeout=reader.seconds("OPS_FLEET_TIMEOUT", 30.0, minimum=1.0),
            control_in_process=control_in_process,
            control_identity=control_identity,
            admin_role_ids=reader.id_set("OPS_ADMIN_ROLE_IDS", "role ID"),
            admin_role_names=frozenset(reader.list("OPS_ADMIN_ROLE_NAMES")),
            command_role_ids=tuple(command_role_ids),
            channel_ids=reader.id_set("OPS_CHANNEL_IDS", "channel ID"),
            audit_channel_id=reader.snowflake("OPS_AUDIT_CHANNEL_ID", "channel ID"),
            cooldowns=tuple(cooldowns),
            redact_env=redact_env,
            secrets=secrets,
        )
        if reader.problems:
            raise SettingsError(reader.problems)
        return settings


def _url_password(url: str | None) -> str | None:
    """The password in a Redis URL, in the userinfo or (redis-py style) ``?password=``."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        query_password = parse_qs(parts.query).get("password", [None])[0]
        return parts.password or query_password
    except ValueError:
        return None


class _Reader:
    """Reads one variable at a time and collects every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def problem(self, name: str, message: str) -> None:
        # Messages quote the bad value, and people paste tokens into the wrong variable.
        known = [self.env.get(var, "") for var in ("DISCORD_TOKEN", *ALWAYS_SECRET)]
        self.problems.append(redact(f"{name}: {message}", known))

    def text(self, name: str) -> str | None:
        """The stripped value, or None when unset or blank."""
        value = self.env.get(name, "").strip()
        return value or None

    def list(self, name: str) -> list[str]:
        """Comma-separated items, blanks dropped."""
        raw = self.text(name)
        if raw is None:
            return []
        return [item.strip() for item in raw.split(",") if item.strip()]

    def names(self, name: str) -> tuple[str, ...]:
        """A list of environment variable names."""
        result: list[str] = []
        for item in self.list(name):
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item) is None:
                self.problem(name, f"{item!r} is not an environment variable name")
            else:
                result.append(item)
        return tuple(result)

    def flag(self, name: str) -> bool:
        """``1/true/yes/on`` or ``0/false/no/off`` (any case); unset is False."""
        raw = (self.text(name) or "0").lower()
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw not in ("0", "false", "no", "off"):
            self.problem(name, f"must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")
        return False

    def snowflake(self, name: str, what: str) -> int | None:
        raw = self.text(name)
        if raw is None:
            return None
        return self._snowflake(name, raw, what)

    def _snowflake(self, name: str, raw: str, what: str) -> int | None:
        if not raw.isascii() or not raw.isdigit() or int(raw) <= 0 or int(raw) >= 2**64:
            self.problem(name, f"{raw!r} is not a {what} (expected a positive integer)")
            return None
        return int(raw)

    def id_set(self, name: str, what: str) -> frozenset[int]:
        """Comma-separated Discord IDs."""
        ids: set[int] = set()
        for item in self.list(name):
            value = self._snowflake(name, item, what)
            if value is not None:
                ids.add(value)
        return frozenset(ids)

    def seconds(
        self, name: str, default: float, *, minimum: float = 0.0, maximum: float = _MAX_TIMEOUT
    ) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problem(name, f"{raw!r} is not a number of seconds")
            return default
        if not math.isfinite(value) or not minimum <= value <= maximum:
            self.problem(name, f"must be between {minimum:g} and {maximum:g} seconds, got {raw!r}")
            return default
        return value

    def path(self, name: str) -> Path | None:
        raw = self.text(name)
        if raw is None:
            return None
        path = Path(raw).expanduser()
        if not path.is_absolute():
            self.problem(name, f"must be an absolute path, got {raw!r}")
            return None
        return path

    def unit(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            return validate_unit_name(raw)
        except ValueError as exc:
            self.problem(name, str(exc))
            return None

    def restart_mode(self, name: str) -> RestartMode:
        raw = (self.text(name) or "systemd").lower()
        if raw == "systemd":
            return "systemd"
        if raw == "exit":
            return "exit"
        self.problem(name, f"must be 'systemd' or 'exit', got {raw!r}")
        return "systemd"

    def redis_url(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            parts = urlsplit(raw)
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError:
            self.problem(name, "is not a valid URL")
            return None
        if parts.scheme not in _REDIS_SCHEMES:
            self.problem(name, "must start with redis://, rediss:// or unix://")
            return None
        return raw

    def targets(self, name: str) -> tuple[PullTarget, ...]:
        """``name=/abs/path`` pairs; ``bot`` is reserved for ``OPS_REPO_DIR``."""
        targets: dict[str, PullTarget] = {}
        for item in self.list(name):
            label, sep, raw_path = item.partition("=")
            label = label.strip().lower()
            raw_path = raw_path.strip()
            if not sep or not label or not raw_path:
                self.problem(name, f"{item!r} is not of the form name=/path/to/checkout")
                continue
            if _TARGET_NAME.fullmatch(label) is None:
                self.problem(
                    name,
                    f"target name {label!r} must be 1-32 of a-z 0-9 _ . - (starting alphanumeric)",
                )
                continue
            if label == DEFAULT_TARGET:
                self.problem(
                    name, f"{DEFAULT_TARGET!r} is the bot's own checkout: set OPS_REPO_DIR"
                )
                continue
            if label in targets:
                self.problem(name, f"target {label!r} is listed twice")
                continue
            path = Path(raw_path).expanduser()
            if not path.is_absolute():
                self.problem(name, f"target {label!r} needs an absolute path, got {raw_path!r}")
                continue
            targets[label] = PullTarget(label, path)
        return tuple(targets.values())
