"""The real ``python bot.py`` as a child process, talking to a :class:`FakeDiscord`.

The bot is unmodified: the test-only ``sitecustomize`` in ``fake_discord_site/`` (on the child's
``PYTHONPATH``) points discord.py's own base URLs at the fake. Waits are event-driven (the fake
wakes its waiters on every request and gateway message, on every chunk of the process's output,
and when the process ends) and bounded; a process is only ever signalled by its own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.support import ROOT
from tests.support.fake_discord import FakeDiscord, Recorded
from tests.support.fake_discord_gateway import GatewaySession

T = TypeVar("T")
#: The directory holding the test-only ``sitecustomize.py``.
SITE_DIR = Path(__file__).resolve().parent / "fake_discord_site"
#: The variables that ``sitecustomize.py`` reads.
BASE_VARIABLE = "ADMIN_OPS_TEST_DISCORD_BASE"
GATEWAY_VARIABLE = "ADMIN_OPS_TEST_DISCORD_GATEWAY"
#: A log line of the cog's audit logger in discord.py's log format (colours removed first).
AUDIT_LINE = re.compile(r"cogs\.admin_ops\.audit:? (\{.*\})$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: How much of the bot's output is read at a time.
OUTPUT_CHUNK = 1 << 16
#: What a test's bot gets from the test's own environment (an isolated HOME and git config).
PASSED_THROUGH = ("PATH", "HOME", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_NOSYSTEM", "LANG", "LC_ALL")


def discord_site_env(base: str, gateway: str | None = None) -> dict[str, str]:
    """The variables that point a Python process's discord.py at ``base`` (and ``gateway``)."""
    env = {"PYTHONPATH": str(SITE_DIR), BASE_VARIABLE: base}
    if gateway is not None:
        env[GATEWAY_VARIABLE] = gateway
    return env


def bot_env(fake: FakeDiscord, state_dir: Path, **settings: str) -> dict[str, str]:
    """A whole environment for ``bot.py`` against ``fake``: its token, ``alice``'s role, its guild.

    ``settings`` (``OPS_*`` variables) are added last and win.
    """
    env = {key: os.environ[key] for key in PASSED_THROUGH if key in os.environ}
    env.update(discord_site_env(fake.base_url, fake.gateway_url))
    env.update(
        PYTHONUNBUFFERED="1",
        DISCORD_TOKEN=fake.token,
        OPS_STATE_DIR=str(state_dir),
        OPS_ADMIN_ROLE_IDS=str(fake.ops_role.id),
        OPS_GUILD_IDS=str(fake.guild.id),
    )
    env.update(settings)
    return env


@dataclass
class BotProcess:
    """One running ``bot.py``; its output goes to ``log_path``."""

    process: asyncio.subprocess.Process
    fake: FakeDiscord
    log_path: Path
    _watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The process's ID."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has ended (negative: killed by that signal)."""
        return self.process.returncode

    def output(self) -> str:
        """Everything it wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def audit_records(self) -> list[dict[str, Any]]:
        """The audit records it logged so far (one JSON object per log line), in order."""
        found = (AUDIT_LINE.search(ANSI.sub("", line)) for line in self.output().splitlines())
        return [json.loads(match.group(1)) for match in found if match]

    async def wait_audit(self, count: int, *, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Its first ``count`` audit records, once it has logged them.

        A record is written just after the reply it follows: a test that saw the reply waits
        for the record here rather than hoping it is already there.
        """
        records = await self.until(
            lambda: (found := self.audit_records())[count - 1 :] and found,
            timeout=timeout,
            what=f"{count} audit record(s)",
        )
        return records[:count]

    async def wait_logged(self, pattern: str, *, timeout: float = 20.0) -> str:
        """The first line of its output matching the regular expression ``pattern``."""
        wanted = re.compile(pattern)

        def line() -> str | None:
            plain = (ANSI.sub("", text) for text in self.output().splitlines())
            return next((text for text in plain if wanted.search(text)), None)

        return await self.until(line, timeout=timeout, what=f"a log line matching {pattern!r}")

    async def wait_synced(self, *, timeout: float = 20.0) -> str:
        """The cog's start-up sync of its slash commands, once over (synced, or unchanged).

        Before it, Discord does not know the commands yet (an invocation would name none the
        bot has in its tree for the guild); the line is logged once the hash of what was synced
        is kept in the state dir.
        """
        return await self.wait_logged(
            r"slash commands (synced in server|unchanged in \d+ server)", timeout=timeout
        )

    def _alive(self) -> None:
        """Raise when the process has ended (:meth:`until` adds its output)."""
        if self.process.returncode is not None:
            raise AssertionError(f"bot.py (pid {self.pid}) exited with {self.process.returncode}")

    async def until(
        self, condition: Callable[[], T | None], *, timeout: float = 20.0, what: str = "it"
    ) -> T:
        """:meth:`FakeDiscord.wait_until`, failing at once if the process ends first."""

        def check() -> T | None:
            found = condition()
            if not found:
                self._alive()
            return found

        try:
            return await self.fake.wait_until(check, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nbot.py output:\n{self.output()[-4000:]}") from None

    async def wait_ready(self, *, after: int = 0, timeout: float = 30.0) -> GatewaySession:
        """Its gateway session (numbered above ``after``) once READY and the guilds are sent."""
        return await self.until(
            lambda: next(
                (
                    s
                    for s in self.fake.gateway.sessions
                    if s.number > after and s.ready and not s.closed
                ),
                None,
            ),
            timeout=timeout,
            what=f"ready gateway session after #{after}",
        )

    async def reply_to(self, message: Mapping[str, Any], *, timeout: float = 20.0) -> Recorded:
        """The first message the bot sent in reply to ``message``."""
        message_id = int(message["id"])
        return await self.until(
            lambda: next(iter(self.fake.replies_to(message_id)), None),
            timeout=timeout,
            what=f"reply to message {message_id}",
        )

    async def wait_exit(self, *, timeout: float = 20.0) -> int:
        """Its exit status, once it has ended by itself (fails after ``timeout``).

        Its output is all in :meth:`output` by then (what was left in the pipe is read).
        """
        try:
            async with asyncio.timeout(timeout):
                status = await self.process.wait()
                if self._watcher is not None:
                    await asyncio.shield(self._watcher)
                return status
        except TimeoutError:
            raise AssertionError(
                f"bot.py (pid {self.pid}) still running after {timeout:g} s:\n"
                f"{self.output()[-4000:]}"
            ) from None

    async def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 10.0) -> int:
        """Send ``sig`` to this process (by PID) and return its exit status."""
        if self.process.returncode is None:
            os.kill(self.pid, sig)
        return await self.wait_exit(timeout=timeout)

    async def kill(self) -> None:
        """SIGKILL it (by PID) if it still runs, and reap it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            await self.process.wait()
        if self._watcher is not None:
            await self._watcher


async def start_bot(
    fake: FakeDiscord,
    env: Mapping[str, str],
    log_path: Path,
    *,
    argv: Sequence[str] | None = None,
    cwd: Path = ROOT,
) -> BotProcess:
    """Start ``python bot.py`` (this interpreter, the checkout's ``bot.py``) with exactly ``env``.

    ``argv`` runs another program instead (another bot against the same fake), in ``cwd``. A
    session of its own, so a terminal's Ctrl-C reaches only the test runner.
    """
    argv = argv or [sys.executable, str(ROOT / "bot.py")]
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    bot = BotProcess(process=process, fake=fake, log_path=log_path)

    async def watch() -> None:
        # Through a pipe rather than straight into the file: each chunk wakes the waiters, so
        # a test waits for a log line (an audit record) as it waits for a request.
        assert process.stdout is not None
        with open(log_path, "ab") as log:
            while chunk := await process.stdout.read(OUTPUT_CHUNK):
                log.write(chunk)
                log.flush()
                await fake.poke()
        await process.wait()
        await fake.poke()  # waiters on the fake learn at once that the bot is gone

    bot._watcher = asyncio.create_task(watch(), name=f"bot.py {process.pid}")
    return bot


#: A test's way to start a bot: ``await start(**settings)`` (see tests/e2e/conftest.py).
StartBot = Callable[..., Awaitable[BotProcess]]
