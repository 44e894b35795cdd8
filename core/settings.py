"""Typed, frozen settings for the bot and the fleet daemon, read from environment variables.

Standard library only (the daemon runs on hosts without discord.py). Both settings classes read
every variable they share through the same parser in :mod:`core.env_reader`, so a variable
means the same to the bot and to the daemon. ``from_env()`` validates everything at load and
raises :class:`SettingsError`, whose lines each start with the name of the bad variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypedDict

from core.env_reader import (
    ALWAYS_SECRET,
    DEFAULT_HEALTHY_AFTER,
    DEFAULT_PIP_TIMEOUT,
    DEFAULT_REQUIREMENTS,
    DEFAULT_RESTART_MIN_INTERVAL,
    EnvReader,
    PullTarget,
    RestartMode,
    SettingsError,
    default_state_dir,
    environ_or,
)
from core.journal import journalctl_argv
from core.names import DEFAULT_KEY_PREFIX, DEFAULT_TARGET, default_identity, target_name
from core.ops_exec import redact

__all__ = [
    "ALWAYS_SECRET",
    "COMMANDS",
    "DEFAULT_CONFIRM",
    "DEFAULT_CONFIRM_TIMEOUT",
    "DEFAULT_CONTROL_PREFIX",
    "DEFAULT_COOLDOWNS",
    "DEFAULT_DAEMON_REDIS_URL",
    "DEFAULT_RESTART_MIN_INTERVAL",
    "DEFAULT_TARGET",
    "PROJECT_ROOT",
    "DaemonSettings",
    "PublisherSettings",
    "PullTarget",
    "RestartMode",
    "RollbackSettings",
    "Settings",
    "SettingsError",
    "default_state_dir",
]

#: The repository that contains ``bot.py``: the default checkout for ``!bot_pull``.
PROJECT_ROOT: Final = Path(__file__).resolve().parent.parent

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
    "bot_fetch",
    "bot_deps",
    "ops_reload",
    "bot_rollback",
    "ops_logs",
    "ops_sync",
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
    "bot_fetch": 15.0,
    "bot_deps": 60.0,
    "ops_reload": 5.0,
    "bot_rollback": 30.0,
    "ops_logs": 10.0,
    "ops_sync": 60.0,
}

#: Commands that ask "are you sure?" with Confirm and Cancel buttons unless ``OPS_CONFIRM`` says
#: otherwise: the ones that take the bot, a unit or a whole fleet offline, or undo an update.
DEFAULT_CONFIRM: Final = ("bot_restart", "fleet_restart", "fleet_pull", "bot_rollback")
#: Seconds a confirmation prompt waits for its answer (``OPS_CONFIRM_TIMEOUT``).
DEFAULT_CONFIRM_TIMEOUT: Final = 30.0
#: The longest ``OPS_CONFIRM_TIMEOUT``: a slash command's token lasts 15 minutes, and the action
#: confirmed after the prompt still has to answer through it.
MAX_CONFIRM_TIMEOUT: Final = 600.0

#: The Redis key prefix of the fleet's streams and of every key the cog writes.
DEFAULT_CONTROL_PREFIX: Final = DEFAULT_KEY_PREFIX

#: The daemon's Redis when ``REDIS_URL`` is unset (the bot then runs without Redis).
DEFAULT_DAEMON_REDIS_URL: Final = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the bot and its cog read from the environment, validated (README "Settings")."""

    discord_token: str | None = field(default=None, repr=False)
    command_prefix: str = "!"
    redis_url: str | None = field(default=None, repr=False)
    state_dir: Path
    #: Where the host-wide restart locks live (``OPS_LOCK_DIR``): the state dir by default.
    lock_dir: Path
    repo_dir: Path
    extra_targets: tuple[PullTarget, ...] = ()
    bot_service: str | None = None
    proxy_service: str | None = None
    restart_mode: RestartMode = "systemd"
    restart_delay: float = 1.0
    restart_min_interval: float = DEFAULT_RESTART_MIN_INTERVAL
    pull_timeout: float = 60.0
    git_env_passthrough: tuple[str, ...] = ()
    requirements: str = DEFAULT_REQUIREMENTS
    pip_timeout: float = DEFAULT_PIP_TIMEOUT
    healthy_after: float = DEFAULT_HEALTHY_AFTER
    control_secret: str | None = field(default=None, repr=False)
    control_prefix: str = DEFAULT_CONTROL_PREFIX
    fleet_timeout: float = 30.0
    control_in_process: bool = False
    control_identity: str | None = None
    guild_ids: frozenset[int] = frozenset()
    admin_role_ids: frozenset[int] = frozenset()
    admin_role_names: frozenset[str] = frozenset()
    command_role_ids: tuple[tuple[str, frozenset[int]], ...] = ()
    channel_ids: frozenset[int] = frozenset()
    audit_channel_id: int | None = None
    cooldowns: tuple[tuple[str, float], ...] = tuple(DEFAULT_COOLDOWNS.items())
    confirm: frozenset[str] = frozenset(DEFAULT_CONFIRM)
    confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT
    log_units: tuple[str, ...] = ()
    redact_env: tuple[str, ...] = ()
    secrets: tuple[str, ...] = field(default=(), repr=False)

    # ----------------------------------------------------------------- derived values

    @property
    def pull_targets(self) -> tuple[PullTarget, ...]:
        """Every checkout ``!bot_pull`` knows, the bot's own (``bot``) first."""
        return (PullTarget(DEFAULT_TARGET, self.repo_dir), *self.extra_targets)

    def target(self, name: str) -> PullTarget | None:
        """The pull target called ``name`` (case-insensitive), or None."""
        wanted = target_name(name)
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
    def readable_units(self) -> tuple[str, ...]:
        """The units ``!ops_logs`` may read: the bot's, the proxy's, then ``OPS_LOG_UNITS``."""
        units = (self.bot_service, self.proxy_service, *self.log_units)
        return tuple(dict.fromkeys(unit for unit in units if unit))

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

    def daemon_settings(self) -> DaemonSettings | None:
        """The in-process daemon's settings (``OPS_CONTROL_IN_PROCESS``); None without Redis.

        It may pull every target of ``!bot_pull`` and restart the bot's and the proxy's unit;
        the bot's own unit is restarted deferred (the answer goes out first).
        """
        if self.redis_url is None or self.control_secret is None:
            return None
        units = tuple(unit for unit in (self.bot_service, self.proxy_service) if unit)
        # Named after the bot's unit, so it never collides with the host's own daemon.
        service = self.bot_service.removesuffix(".service") if self.bot_service else "bot"
        return DaemonSettings(
            redis_url=self.redis_url,
            secret=self.control_secret,
            identity=self.control_identity or default_identity(service),
            pull_targets={t.name: str(t.path) for t in self.pull_targets},
            restart_units=units,
            own_units=(self.bot_service,) if self.bot_service else (),
            prefix=self.control_prefix,
            pull_timeout=self.pull_timeout,
            env_passthrough=self.git_env_passthrough,
            restart_delay=self.restart_delay,
            restart_min_interval=self.restart_min_interval,
            state_dir=self.state_dir,
            lock_dir=self.lock_dir,
            secrets=self.secrets,
        )

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); raise ``SettingsError``."""
        env = environ_or(environ)
        reader = EnvReader(env)
        token = reader.text("DISCORD_TOKEN")
        prefix = env.get("OPS_PREFIX", "!")
        if not prefix.strip():
            reader.problem("OPS_PREFIX", "must not be empty or blank")
            prefix = "!"
        redis_url = reader.redis_url()
        restart_mode = reader.restart_mode()
        command_role_ids, cooldowns = _per_command(reader)
        control_secret = reader.control_secret()
        control_prefix = reader.control_prefix()
        control_in_process = reader.flag("OPS_CONTROL_IN_PROCESS")
        if control_in_process and (redis_url is None or control_secret is None):
            reader.problem(
                "OPS_CONTROL_IN_PROCESS",
                "the in-process daemon needs REDIS_URL and OPS_CONTROL_SECRET",
            )
        control_identity = reader.identity()
        reader.systemctl()
        _check_journalctl(reader)
        redact_env = reader.names("OPS_REDACT_ENV")
        settings = cls(
            discord_token=token,
            command_prefix=prefix,
            redis_url=redis_url,
            **_dirs(reader),
            repo_dir=reader.path("OPS_REPO_DIR") or PROJECT_ROOT,
            extra_targets=reader.pull_targets(),
            bot_service=reader.unit("OPS_BOT_SERVICE"),
            proxy_service=reader.unit("OPS_PROXY_SERVICE"),
            restart_mode=restart_mode,
            restart_delay=reader.restart_delay(),
            restart_min_interval=reader.restart_min_interval(),
            pull_timeout=reader.pull_timeout(),
            git_env_passthrough=reader.git_env_passthrough(),
            requirements=reader.requirements(),
            pip_timeout=reader.pip_timeout(),
            healthy_after=reader.healthy_after(),
            control_secret=control_secret,
            control_prefix=control_prefix,
            fleet_timeout=reader.seconds("OPS_FLEET_TIMEOUT", 30.0, minimum=1.0),
            control_in_process=control_in_process,
            control_identity=control_identity,
            guild_ids=reader.id_set("OPS_GUILD_IDS", "server ID"),
            admin_role_ids=reader.id_set("OPS_ADMIN_ROLE_IDS", "role ID"),
            admin_role_names=frozenset(reader.list("OPS_ADMIN_ROLE_NAMES")),
            command_role_ids=command_role_ids,
            channel_ids=reader.id_set("OPS_CHANNEL_IDS", "channel ID"),
            audit_channel_id=reader.snowflake("OPS_AUDIT_CHANNEL_ID", "channel ID"),
            cooldowns=cooldowns,
            **_chat_settings(reader),
            redact_env=redact_env,
            secrets=reader.secret_values(redact_env, token),
        )
        _check_role_names(reader, settings)
        reader.raise_problems()
        return settings


class _Dirs(TypedDict):
    state_dir: Path
    lock_dir: Path


def _dirs(reader: EnvReader) -> _Dirs:
    """``OPS_STATE_DIR`` and ``OPS_LOCK_DIR`` (the state dir unless set), alike for both."""
    state_dir = reader.state_dir()
    return {"state_dir": state_dir, "lock_dir": reader.lock_dir(state_dir)}


def _check_role_names(reader: EnvReader, settings: Settings) -> None:
    """Role names admit anyone who can create a role: only in servers the operator names."""
    if settings.admin_role_names and not settings.guild_ids:
        reader.problem(
            "OPS_ADMIN_ROLE_NAMES",
            "role names need OPS_GUILD_IDS: without it, anyone who adds the bot to a server "
            "of their own can create a role with that name there",
        )


def _chat_settings(reader: EnvReader) -> dict[str, Any]:
    """Confirmation prompts and ``!ops_logs``: ``OPS_CONFIRM``, its timeout, ``OPS_LOG_UNITS``."""
    return {
        "confirm": _confirm(reader),
        "confirm_timeout": reader.seconds(
            "OPS_CONFIRM_TIMEOUT", DEFAULT_CONFIRM_TIMEOUT, minimum=1.0, maximum=MAX_CONFIRM_TIMEOUT
        ),
        "log_units": reader.units("OPS_LOG_UNITS"),
    }


def _confirm(reader: EnvReader) -> frozenset[str]:
    """``OPS_CONFIRM``: command names (``bot_restart`` or ``!bot_restart``), or ``none``."""
    name = "OPS_CONFIRM"
    if reader.text(name) is None:
        return frozenset(DEFAULT_CONFIRM)
    items = [item.lower().lstrip("!/") for item in reader.list(name)]
    if items == ["none"]:
        return frozenset()
    unknown = [item for item in items if item not in COMMANDS]
    for item in unknown:
        reader.problem(
            name, f"{item!r} is not a command (or 'none'); commands: {', '.join(COMMANDS)}"
        )
    return frozenset(item for item in items if item in COMMANDS)


def _check_journalctl(reader: EnvReader) -> None:
    """``OPS_JOURNALCTL``: read by :mod:`core.journal` at each call; checked here at start."""
    try:
        journalctl_argv(reader.env)
    except ValueError as exc:
        reader.problem("OPS_JOURNALCTL", str(exc).removeprefix("OPS_JOURNALCTL "))


def _per_command(
    reader: EnvReader,
) -> tuple[tuple[tuple[str, frozenset[int]], ...], tuple[tuple[str, float], ...]]:
    """``OPS_ROLE_IDS_<COMMAND>`` overrides and ``OPS_COOLDOWN_<COMMAND>`` for every command."""
    role_ids: list[tuple[str, frozenset[int]]] = []
    cooldowns: list[tuple[str, float]] = []
    for command in COMMANDS:
        var = f"OPS_ROLE_IDS_{command.upper()}"
        if reader.text(var) is not None:
            role_ids.append((command, reader.id_set(var, "role ID")))
        default = DEFAULT_COOLDOWNS.get(command, 0.0)
        cooldowns.append((command, reader.seconds(f"OPS_COOLDOWN_{command.upper()}", default)))
    return tuple(role_ids), tuple(cooldowns)


@dataclass(frozen=True, kw_only=True)
class PublisherSettings:
    """What publishing a fleet command needs: the fleet's Redis, its secret and key prefix."""

    redis_url: str = field(repr=False)
    secret: str = field(repr=False)
    prefix: str = DEFAULT_CONTROL_PREFIX
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PublisherSettings:
        """Read ``REDIS_URL``, ``OPS_CONTROL_SECRET`` and ``OPS_CONTROL_PREFIX``."""
        reader = EnvReader(environ_or(environ))
        settings = cls(
            redis_url=reader.redis_url() or DEFAULT_DAEMON_REDIS_URL,
            secret=_required_secret(reader),
            prefix=reader.control_prefix(),
            secrets=reader.secret_values(reader.names("OPS_REDACT_ENV")),
        )
        reader.raise_problems()
        return settings


@dataclass(frozen=True, kw_only=True)
class DaemonSettings:
    """What a fleet control daemon reads from the environment (README "Fleet")."""

    redis_url: str = field(repr=False)
    secret: str = field(repr=False)
    identity: str
    #: Target name → checkout path: ``bot`` is ``OPS_REPO_DIR``, then ``OPS_PULL_TARGETS``.
    pull_targets: dict[str, str]
    restart_units: tuple[str, ...]
    own_units: tuple[str, ...]
    prefix: str = DEFAULT_CONTROL_PREFIX
    pull_timeout: float = 60.0
    env_passthrough: tuple[str, ...] = ()
    restart_delay: float = 1.0
    restart_min_interval: float = DEFAULT_RESTART_MIN_INTERVAL
    state_dir: Path | None = None
    #: Where the host-wide restart locks live (``OPS_LOCK_DIR``); None: ``state_dir``.
    lock_dir: Path | None = None
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DaemonSettings:
        """Build the daemon's settings from ``environ``; raise ``SettingsError``."""
        reader = EnvReader(environ_or(environ))
        secret = _required_secret(reader)
        repo_dir = reader.path("OPS_REPO_DIR") or PROJECT_ROOT
        targets = {DEFAULT_TARGET: str(repo_dir)}
        targets.update((t.name, str(t.path)) for t in reader.pull_targets())
        settings = cls(
            redis_url=reader.redis_url() or DEFAULT_DAEMON_REDIS_URL,
            secret=secret,
            identity=reader.identity() or default_identity(),
            pull_targets=targets,
            restart_units=reader.units("OPS_RESTART_UNITS"),
            own_units=reader.units("OPS_OWN_UNITS"),
            prefix=reader.control_prefix(),
            pull_timeout=reader.pull_timeout(),
            env_passthrough=reader.git_env_passthrough(),
            restart_delay=reader.restart_delay(),
            restart_min_interval=reader.restart_min_interval(),
            **_dirs(reader),
            secrets=reader.secret_values(reader.names("OPS_REDACT_ENV")),
        )
        reader.systemctl()
        reader.raise_problems()
        return settings


def _required_secret(reader: EnvReader) -> str:
    secret = reader.control_secret()
    if secret is None:
        reader.problem("OPS_CONTROL_SECRET", "is not set: the fleet's shared HMAC secret")
        return ""
    return secret


@dataclass(frozen=True, kw_only=True)
class RollbackSettings:
    """What the crash-loop guard (``python -m core.rollback``) reads: the bot's own settings."""

    repo_dir: Path
    state_dir: Path
    bot_service: str
    #: Seconds git may take to move the checkout back (``OPS_PULL_TIMEOUT``).
    git_timeout: float = 60.0
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RollbackSettings:
        """Read ``OPS_REPO_DIR``, ``OPS_STATE_DIR``, ``OPS_BOT_SERVICE`` and ``OPS_SYSTEMCTL``.

        ``OPS_BOT_SERVICE`` is required: it is the unit rolled back and started again.
        """
        reader = EnvReader(environ_or(environ))
        unit = reader.unit("OPS_BOT_SERVICE")
        if reader.text("OPS_BOT_SERVICE") is None:
            reader.problem("OPS_BOT_SERVICE", "is not set: the unit to roll back and start again")
        settings = cls(
            repo_dir=reader.path("OPS_REPO_DIR") or PROJECT_ROOT,
            state_dir=reader.state_dir(),
            bot_service=unit or "",
            git_timeout=reader.pull_timeout(),
            secrets=reader.secret_values(reader.names("OPS_REDACT_ENV")),
        )
        reader.systemctl()
        reader.raise_problems()
        return settings
