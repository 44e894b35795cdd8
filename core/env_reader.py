"""One parser per environment variable, shared by the bot's and the daemon's settings.

Standard library only. :class:`EnvReader` reads one variable at a time and collects every problem
instead of stopping at the first, so ``--check`` can list them all; each problem starts with the
variable's name and never quotes a secret.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final, Literal, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from core.hardening import with_credentials
from core.names import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_TARGET,
    IDENTITY,
    IDENTITY_RULE,
    KEY_PREFIX,
    KEY_PREFIX_RULE,
    TARGET_NAME_RULE,
    target_name,
)
from core.ops_exec import MIN_SECRET_LENGTH, redact, systemctl_argv, validate_unit_name

__all__ = [
    "ALWAYS_SECRET",
    "DEFAULT_HEALTHY_AFTER",
    "DEFAULT_PIP_TIMEOUT",
    "DEFAULT_REQUIREMENTS",
    "DEFAULT_RESTART_MIN_INTERVAL",
    "DEFAULT_SENTINEL_PORT",
    "MAX_SECONDS",
    "SENTINEL_SCHEME",
    "EnvReader",
    "PullTarget",
    "RestartMode",
    "SentinelTarget",
    "SettingsError",
    "default_state_dir",
    "environ_or",
    "is_sentinel_url",
    "parse_sentinel_url",
    "url_password",
    "url_secrets",
]

RestartMode = Literal["systemd", "exit"]

#: The largest number of seconds any duration setting accepts.
MAX_SECONDS: Final = 3600.0
#: Seconds a unit must have run before a command may restart it again.
DEFAULT_RESTART_MIN_INTERVAL: Final = 60.0
#: The requirements file ``!bot_deps`` installs, relative to the checkout.
DEFAULT_REQUIREMENTS: Final = "requirements.txt"
#: Seconds ``!bot_deps`` gives pip.
DEFAULT_PIP_TIMEOUT: Final = 300.0
#: Seconds the bot must have been ready and connected before its commit counts as good.
DEFAULT_HEALTHY_AFTER: Final = 60.0
#: Variables whose values are secrets wherever they appear, besides the token and Redis password.
ALWAYS_SECRET: Final = ("OPS_CONTROL_SECRET",)
#: Variables that must never be handed to git, whatever ``OPS_GIT_ENV_PASSTHROUGH`` says.
_NEVER_PASSED: Final = frozenset({"DISCORD_TOKEN", "REDIS_URL", *ALWAYS_SECRET})
#: The scheme of a Redis reached through Sentinel:
#: ``redis+sentinel://[[user]:password@]host:port,host:port/service[/db][?sentinel_password=…]``.
SENTINEL_SCHEME: Final = "redis+sentinel"
#: The port of a sentinel given without one.
DEFAULT_SENTINEL_PORT: Final = 26379
_REDIS_SCHEMES: Final = ("redis", "rediss", "unix", SENTINEL_SCHEME)
# A Sentinel master name: what `sentinel monitor <name> …` accepts in practice, kept to what
# reads well in a log line and cannot be mistaken for a path or a list.
_SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# More sentinels than this in one URL is a mistake (three or five is the usual layout).
_MAX_SENTINELS: Final = 16
_SENTINEL_QUERY: Final = ("sentinel_password",)
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Unit names contain neither commas nor whitespace, so either separates them.
_UNIT_SEPARATORS: Final = re.compile(r"[,\s]+")


class SettingsError(ValueError):
    """One or more environment variables are invalid; each line names its variable."""

    def __init__(self, problems: Iterable[str]) -> None:
        """Keep every problem so ``--check`` can show them all at once."""
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


class PullTarget(NamedTuple):
    """A checkout that may be fast-forwarded under a name (``!bot_pull <name>``, fleet pulls)."""

    name: str
    path: Path


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """Where state lives when ``OPS_STATE_DIR`` is not set.

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


@dataclass(frozen=True)
class SentinelTarget:
    """Where a ``redis+sentinel://`` URL points: the sentinels, the service, the credentials.

    The passwords are kept out of ``repr()``: this object is logged by accident more easily
    than the URL, which every log line redacts.
    """

    #: ``(host, port)`` of each sentinel, in the order given.
    sentinels: tuple[tuple[str, int], ...]
    #: The master's name in the sentinels' configuration (``sentinel monitor <service> …``).
    service: str
    #: The database number on the master.
    db: int = 0
    #: The master's ACL user, if any.
    username: str | None = None
    #: The master's password (the sentinels get ``sentinel_password``, never this one).
    password: str | None = field(default=None, repr=False)
    #: The sentinels' own password (``?sentinel_password=``), if they require one.
    sentinel_password: str | None = field(default=None, repr=False)


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a Redis reached through Sentinel (``redis+sentinel://``)."""
    return url[: len(SENTINEL_SCHEME) + 3].lower() == f"{SENTINEL_SCHEME}://"


def _sentinel_address(item: str, number: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6 address]:port`` as ``(host, port)``; ValueError if not.

    The message names the sentinel by its place in the list, never by its text: a password
    with an unencoded ``/`` would end up here.
    """
    what = f"sentinel {number} must be host:port (an IPv6 address in [])"
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(what)
        port_text = rest[1:]
    else:
        host, colon, port_text = item.partition(":")
        if (colon and not port_text) or ":" in port_text:
            raise ValueError(what)
    if not host or any(c in host for c in " /\\@?#[]%"):
        raise ValueError(what)
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(what)
    return host, int(port_text)


def _service_and_db(path: str) -> tuple[str, int]:
    """``/service`` or ``/service/db`` as ``(service, db)``; ValueError if not."""
    service, _, db_text = path.removesuffix("/").partition("/")
    if not _SERVICE_NAME.fullmatch(service):
        raise ValueError(
            "needs the Sentinel service after the sentinels: redis+sentinel://host:26379/mymaster"
            " (1-64 of A-Z a-z 0-9 . _ -)"
        )
    if not db_text:
        return service, 0
    if not db_text.isascii() or not db_text.isdigit() or len(db_text) > 5:
        raise ValueError("the database after the service must be a number (…/mymaster/0)")
    return service, int(db_text)


def _sentinel_password(query: str) -> str | None:
    """``sentinel_password`` from the query, the only parameter there is; ValueError if not.

    No message quotes the query: a password with an unencoded ``&`` would be in it.
    """
    if not query:
        return None
    pairs = [item.partition("=") for item in query.split("&")]
    if any(name not in _SENTINEL_QUERY or not eq for name, eq, _value in pairs):
        raise ValueError(
            "the only query parameter is sentinel_password=… (percent-encode & in a password)"
        )
    if len(pairs) > 1:
        raise ValueError("sentinel_password is given twice")
    return unquote(pairs[0][2]) or None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels, service, database and credentials of a ``redis+sentinel://`` URL.

    ``redis+sentinel://[[user]:password@]host1:26379,host2:26379/<service>[/<db>]``, with a
    ``sentinel_password`` query parameter for the sentinels themselves. The user and password
    are the master's. Percent-encode ``@ : / ? # & %`` inside a password (``+`` is a plus).
    Raises ValueError with a message that quotes no password.
    """
    if not is_sentinel_url(url):
        raise ValueError(f"must start with {SENTINEL_SCHEME}://")
    rest = url[len(SENTINEL_SCHEME) + 3 :]
    if "#" in rest:
        raise ValueError("must not have a #fragment")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    # The last '@': a password may contain one when it is not percent-encoded.
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    items = [item.strip() for item in hosts.split(",")]
    if not all(items) or not slash:
        raise ValueError(
            f"must list the sentinels, then the service: {SENTINEL_SCHEME}://host:26379/mymaster"
        )
    if len(items) > _MAX_SENTINELS:
        raise ValueError(f"lists {len(items)} sentinels; at most {_MAX_SENTINELS}")
    addresses = (_sentinel_address(item, n) for n, item in enumerate(items, 1))
    sentinels = tuple(dict.fromkeys(addresses))
    service, db = _service_and_db(path)
    return SentinelTarget(
        sentinels=sentinels,
        service=service,
        db=db,
        username=unquote(user) or None,
        password=unquote(password) or None,
        sentinel_password=_sentinel_password(query),
    )


def url_password(url: str | None) -> str | None:
    """The password in a Redis URL, in the userinfo or (redis-py style) ``?password=``.

    For a ``redis+sentinel://`` URL, the master's password (see :func:`url_secrets` for the
    sentinels' one too).
    """
    if not url:
        return None
    if is_sentinel_url(url):
        try:
            return parse_sentinel_url(url).password
        except ValueError:
            return None
    try:
        parts = urlsplit(url)
        query_password = parse_qs(parts.query).get("password", [None])[0]
        return parts.password or query_password
    except ValueError:
        return None


def url_secrets(url: str | None) -> tuple[str, ...]:
    """Every secret a Redis URL holds, both as written in it and decoded.

    The password (userinfo or ``?password=``) and, for ``redis+sentinel://``, the
    ``sentinel_password``: each is redacted wherever it could show.
    """
    if not url:
        return ()
    found: list[str | None] = [url_password(url)]
    if is_sentinel_url(url):
        rest, _, query = url[len(SENTINEL_SCHEME) + 3 :].partition("?")
        netloc = rest.partition("/")[0]
        if "@" in netloc:
            found.append(netloc.rpartition("@")[0].partition(":")[2])
        for pair in query.split("&"):
            name, _, value = pair.partition("=")
            if name == "sentinel_password":
                found += (value, unquote(value))
    return tuple(dict.fromkeys(value for value in found if value))


class EnvReader:
    """Reads variables from one environment, collecting problems; one method per kind of value.

    The variables that the bot and the daemon share each have a method of their own here
    (``redis_url``, ``pull_targets``, ``control_prefix``…), so both read them the same way.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        """Read from ``env``, where systemd credentials stand in for unset secret variables."""
        self.env = with_credentials(env)
        self.problems: list[str] = []

    def problem(self, name: str, message: str) -> None:
        """Record that ``name`` is invalid; secrets a message might quote are redacted."""
        # Messages quote the bad value, and people paste tokens into the wrong variable.
        known = [self.env.get(var, "") for var in ("DISCORD_TOKEN", *ALWAYS_SECRET)]
        self.problems.append(redact(f"{name}: {message}", known))

    def raise_problems(self) -> None:
        """Raise :class:`SettingsError` with every problem found so far, if any."""
        if self.problems:
            raise SettingsError(self.problems)

    # ------------------------------------------------------------------ kinds of value

    def text(self, name: str) -> str | None:
        """The stripped value, or None when unset or blank."""
        value = self.env.get(name, "").strip()
        return value or None

    def raw(self, name: str) -> str | None:
        """The value exactly as given (for keys such as an HMAC secret), None when blank."""
        value = self.env.get(name, "")
        return value if value.strip() else None

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
            if _ENV_NAME.fullmatch(item) is None:
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
        """One Discord ID, or None when unset."""
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
        self, name: str, default: float, *, minimum: float = 0.0, maximum: float = MAX_SECONDS
    ) -> float:
        """A number of seconds within ``minimum`` and ``maximum``."""
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
        """An absolute path (``~`` expanded), or None when unset."""
        raw = self.text(name)
        if raw is None:
            return None
        path = Path(raw).expanduser()
        if not path.is_absolute():
            self.problem(name, f"must be an absolute path, got {raw!r}")
            return None
        return path

    def unit(self, name: str) -> str | None:
        """One systemd unit name (``.service`` added when it has no suffix)."""
        raw = self.text(name)
        if raw is None:
            return None
        try:
            return validate_unit_name(raw)
        except ValueError as exc:
            self.problem(name, str(exc))
            return None

    def units(self, name: str) -> tuple[str, ...]:
        """Unit names separated by commas or whitespace, each validated."""
        units: list[str] = []
        for item in _UNIT_SEPARATORS.split(self.text(name) or ""):
            if not item:
                continue
            try:
                units.append(validate_unit_name(item))
            except ValueError as exc:
                self.problem(name, str(exc))
        return tuple(dict.fromkeys(units))

    # ------------------------------------------------------------------ shared variables

    def redis_url(self) -> str | None:
        """``REDIS_URL``: ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``."""
        name = "REDIS_URL"
        raw = self.text(name)
        if raw is None:
            return None
        if is_sentinel_url(raw):
            try:
                parse_sentinel_url(raw)
            except ValueError as exc:
                self.problem(name, str(exc))
                return None
            return raw
        try:
            parts = urlsplit(raw)
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError:
            self.problem(name, "is not a valid URL")
            return None
        if parts.scheme not in _REDIS_SCHEMES:
            self.problem(name, "must start with redis://, rediss://, unix:// or redis+sentinel://")
            return None
        return raw

    def control_secret(self) -> str | None:
        """``OPS_CONTROL_SECRET``, used as given (not stripped): it is an HMAC key."""
        return self.raw("OPS_CONTROL_SECRET")

    def control_prefix(self) -> str:
        """``OPS_CONTROL_PREFIX``: the first part of every Redis key."""
        name = "OPS_CONTROL_PREFIX"
        prefix = self.text(name) or DEFAULT_KEY_PREFIX
        if KEY_PREFIX.fullmatch(prefix) is None:
            self.problem(name, f"must be {KEY_PREFIX_RULE}")
            return DEFAULT_KEY_PREFIX
        return prefix

    def identity(self) -> str | None:
        """``OPS_IDENTITY``: a control daemon's name in fleet results."""
        name = "OPS_IDENTITY"
        identity = self.text(name)
        if identity is not None and IDENTITY.fullmatch(identity) is None:
            self.problem(name, f"must be {IDENTITY_RULE}")
            return None
        return identity

    def state_dir(self) -> Path:
        """``OPS_STATE_DIR``, else systemd's state directory, else the XDG one."""
        return self.path("OPS_STATE_DIR") or default_state_dir(self.env)

    def lock_dir(self, state_dir: Path) -> Path:
        """``OPS_LOCK_DIR``: where the host-wide restart locks live; default ``state_dir``.

        The bot's and the daemon's users share one (``/run/admin-ops`` in deploy/) so that
        they lock the same file for the same unit (:func:`core.ops_exec.unit_restart_lock`).
        """
        return self.path("OPS_LOCK_DIR") or state_dir

    def pull_timeout(self) -> float:
        """``OPS_PULL_TIMEOUT``: seconds a pull may take before git is stopped."""
        return self.seconds("OPS_PULL_TIMEOUT", 60.0, minimum=1.0)

    def restart_delay(self) -> float:
        """``OPS_RESTART_DELAY``: seconds between the answer and a deferred self-restart."""
        return self.seconds("OPS_RESTART_DELAY", 1.0, maximum=60.0)

    def restart_min_interval(self) -> float:
        """``OPS_RESTART_MIN_INTERVAL``: seconds a unit must have run before a restart."""
        return self.seconds("OPS_RESTART_MIN_INTERVAL", DEFAULT_RESTART_MIN_INTERVAL)

    def requirements(self) -> str:
        """``OPS_REQUIREMENTS``: the file ``!bot_deps`` installs, a path inside the checkout."""
        name = "OPS_REQUIREMENTS"
        raw = self.text(name)
        if raw is None:
            return DEFAULT_REQUIREMENTS
        path = PurePosixPath(raw)
        # Relative and without "..": whatever the checkout holds, pip reads nothing outside it.
        if path.is_absolute() or ".." in path.parts or not path.parts or "\x00" in raw:
            self.problem(name, f"must be a path relative to the checkout, inside it, got {raw!r}")
            return DEFAULT_REQUIREMENTS
        return path.as_posix()

    def pip_timeout(self) -> float:
        """``OPS_PIP_TIMEOUT``: seconds ``!bot_deps`` gives pip before stopping it."""
        return self.seconds("OPS_PIP_TIMEOUT", DEFAULT_PIP_TIMEOUT, minimum=1.0)

    def healthy_after(self) -> float:
        """``OPS_HEALTHY_AFTER``: seconds ready and connected before a commit counts as good."""
        return self.seconds("OPS_HEALTHY_AFTER", DEFAULT_HEALTHY_AFTER, minimum=1.0)

    def systemctl(self) -> None:
        """``OPS_SYSTEMCTL``: read by ``core.ops_exec`` at each call; checked here at start."""
        try:
            systemctl_argv(self.env)
        except ValueError as exc:
            self.problem("OPS_SYSTEMCTL", str(exc).removeprefix("OPS_SYSTEMCTL "))

    def git_env_passthrough(self) -> tuple[str, ...]:
        """``OPS_GIT_ENV_PASSTHROUGH``: variables handed on to git (``SSH_AUTH_SOCK``…)."""
        name = "OPS_GIT_ENV_PASSTHROUGH"
        passed: list[str] = []
        never = _NEVER_PASSED | set(self.list("OPS_REDACT_ENV"))
        for item in self.names(name):
            if item in never:
                self.problem(name, f"{item} holds a secret and is never handed to git")
            else:
                passed.append(item)
        return tuple(passed)

    def pull_targets(self) -> tuple[PullTarget, ...]:
        """``OPS_PULL_TARGETS``: ``name=/abs/path`` pairs; ``bot`` is ``OPS_REPO_DIR``'s name."""
        name = "OPS_PULL_TARGETS"
        targets: dict[str, PullTarget] = {}
        for item in self.list(name):
            target = self._pull_target(name, item)
            if target is None:
                continue
            if target.name in targets:
                self.problem(name, f"target {target.name!r} is listed twice")
                continue
            targets[target.name] = target
        return tuple(targets.values())

    def _pull_target(self, name: str, item: str) -> PullTarget | None:
        label, sep, raw_path = item.partition("=")
        raw_path = raw_path.strip()
        if not sep or not label.strip() or not raw_path:
            self.problem(name, f"{item!r} is not of the form name=/path/to/checkout")
            return None
        checked = target_name(label)
        if checked is None:
            self.problem(name, f"target name {label.strip()!r} must be {TARGET_NAME_RULE}")
            return None
        if checked == DEFAULT_TARGET:
            self.problem(name, f"{DEFAULT_TARGET!r} is the bot's own checkout: set OPS_REPO_DIR")
            return None
        path = Path(raw_path).expanduser()
        if not path.is_absolute():
            self.problem(name, f"target {checked!r} needs an absolute path, got {raw_path!r}")
            return None
        return PullTarget(checked, path)

    def secret_values(self, redact_env: Iterable[str], *extra: str | None) -> tuple[str, ...]:
        """Every value to redact, at least ``MIN_SECRET_LENGTH`` long.

        ``extra`` (the token…), the Redis password, the control secret and the values of the
        variables named in ``redact_env`` (``OPS_REDACT_ENV``).
        """
        values = [*extra, *url_secrets(self.text("REDIS_URL"))]
        values += [self.env.get(name) for name in (*ALWAYS_SECRET, *redact_env)]
        # Shorter values would mangle ordinary output when redacted (a 2-character "secret"
        # matches everywhere); such values are not worth calling secrets.
        return tuple(dict.fromkeys(v for v in values if v and len(v) >= MIN_SECRET_LENGTH))

    def restart_mode(self) -> RestartMode:
        """``OPS_RESTART_MODE``: ``systemd`` or ``exit``."""
        name = "OPS_RESTART_MODE"
        raw = (self.text(name) or "systemd").lower()
        if raw == "systemd":
            return "systemd"
        if raw == "exit":
            return "exit"
        self.problem(name, f"must be 'systemd' or 'exit', got {raw!r}")
        return "systemd"


def environ_or(env: Mapping[str, str] | None) -> Mapping[str, str]:
    """``env``, or the process environment when None."""
    return os.environ if env is None else env
