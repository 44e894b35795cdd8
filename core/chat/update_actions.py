"""``!bot_fetch``, ``!bot_deps`` and ``!bot_rollback``, and what ``!bot_pull`` says a pull needs.

Each command takes a target like ``!bot_pull`` (the bot's own checkout by default). What they
do lives in the standard-library modules: :mod:`core.updates` (the fetch preview and the
classification of what an update needs), :mod:`core.pull_history` (the pulls this bot made,
and taking the last one back), :mod:`core.deps` (pip, in the bot's virtual environment only).
Here they become replies: what changed, what it needs and the command that does it.

What an update needs is judged against what this process has loaded
(:func:`core.chat.extensions.loaded_code`): a changed file of a loaded extension needs a
reload, any other file the bot imported a restart, a dependency file ``!bot_deps``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence

from discord.ext import commands

from core.chat.extensions import loaded_code
from core.chat.invocation import Action, Invocation, NotConfigured, Outcome, Plan, Reply
from core.chat.replies import Replies
from core.deps import install_requirements
from core.names import DEFAULT_TARGET
from core.ops_exec import PullOutcome
from core.pull_history import HISTORY_FILE, PullHistory, RecordedPull, roll_back_last_pull
from core.settings import PullTarget, Settings
from core.text import inline_code
from core.updates import (
    Commit,
    FetchPreview,
    UpdateNeeds,
    changed_files,
    classify_update,
    describe_needs,
    fetch_preview,
)

__all__ = ["UpdateActions", "commit_lines"]


def commit_lines(commits: Sequence[Commit], total: int) -> list[str]:
    """One line per commit, then ``… and N more`` for those not listed."""
    lines = [commit.line() for commit in commits]
    if total > len(commits):
        lines.append(f"… and {total - len(commits)} more")
    return lines


def _commits(count: int) -> str:
    return f"{count} commit" if count == 1 else f"{count} commits"


class UpdateActions:
    """See what a pull brings, install what it needs, take it back."""

    def __init__(
        self,
        *,
        bot: commands.Bot,
        settings: Settings,
        replies: Replies,
        instance_id: str,
        python: str | None = None,
    ) -> None:
        """``python`` installs dependencies (default: this process's own interpreter)."""
        self.bot = bot
        self.settings = settings
        self.replies = replies
        self.instance_id = instance_id
        self.python = python or sys.executable
        self.history = PullHistory(settings.state_dir / HISTORY_FILE)

    def _target(self, inv: Invocation, typed: str) -> PullTarget | NotConfigured:
        target = self.settings.target(typed or DEFAULT_TARGET)
        if target is None:
            known = ", ".join(t.name for t in self.settings.pull_targets)
            return NotConfigured(
                f"Unknown target {inline_code(typed)} for {inv.shown}. Configured targets: {known}."
            )
        return target

    def _needs(self, target: PullTarget, changed: Sequence[str]) -> UpdateNeeds:
        return classify_update(
            os.path.realpath(target.path),
            changed,
            loaded_code(self.bot.extensions),
            requirements=self.settings.requirements,
        )

    def _need_lines(self, inv: Invocation, target: PullTarget, needs: UpdateNeeds) -> list[str]:
        return describe_needs(needs, prefix=inv.ctx.clean_prefix, target=target.name)

    # ------------------------------------------------------------------ !bot_fetch

    def configure_fetch(self, inv: Invocation, typed: str) -> Action | NotConfigured:
        """Fetch the target called ``typed`` (the bot's own checkout when empty)."""
        target = self._target(inv, typed)
        if isinstance(target, NotConfigured):
            return target
        return lambda inv: self.fetch(inv, target)

    async def fetch(self, inv: Invocation, target: PullTarget) -> Outcome:
        """Fetch, and say what a pull would bring and need; ``HEAD`` does not move."""
        async with self.replies.typing(inv.ctx):
            preview = await fetch_preview(
                target.path,
                holder=self.instance_id,
                timeout=self.settings.pull_timeout,
                env_passthrough=self.settings.git_env_passthrough,
                secrets=self.replies.secrets,
            )
        name = inline_code(target.name)
        if preview.status == "skipped":
            headline = f"⏭️ {name} skipped: another service on this host is working in it"
            return Outcome("skipped", acted=False, detail=preview.summary, reply=Reply(headline))
        if preview.status == "failed":
            reply = Reply(f"❌ {name} fetch failed", preview.summary)
            return Outcome("failed", acted=preview.fetched, detail=preview.summary, reply=reply)
        upstream = inline_code(preview.upstream)
        if preview.status == "up to date":
            ahead = f"{_commits(preview.local)} here not upstream" if preview.local else None
            reply = Reply(f"✅ {name} already up to date with {upstream}", ahead)
            return Outcome("ok", detail="up to date", reply=reply)
        return Outcome("ok", detail=preview.status, reply=self._fetch_reply(inv, target, preview))

    def _fetch_reply(self, inv: Invocation, target: PullTarget, preview: FetchPreview) -> Reply:
        name, upstream = inline_code(target.name), inline_code(preview.upstream)
        needs = self._needs(target, preview.changed)
        count = _commits(preview.incoming)
        lines = [f"{count} to pull from {preview.upstream}:"]
        lines += commit_lines(preview.commits, preview.incoming)
        lines += ["", preview.diffstat, *self._need_lines(inv, target, needs)]
        if preview.status != "incoming":
            headline = f"⚠️ {name}: {count} from {upstream}, but a pull would refuse"
            return Reply(headline, "\n".join([preview.summary, "", *lines]))
        headline = f"📥 {name}: {count} to pull from {upstream} ({preview.diffstat})"
        return Reply(f"{headline} — {needs.headline()}", "\n".join(lines))

    # ------------------------------------------------------------------ !bot_pull

    async def after_pull(self, inv: Invocation, target: PullTarget, outcome: PullOutcome) -> str:
        """Record a pull that moved ``HEAD``; say what it needs, one line each."""
        before, after = outcome.head_before, outcome.head_after
        if not outcome.updated or before is None or after is None:
            return ""
        author = inv.ctx.author
        pull = RecordedPull(before, after, f"{author} ({author.id})", time.time())
        path = os.path.realpath(target.path)
        try:
            await asyncio.to_thread(self.history.record, path, pull)
        except OSError as exc:
            note = f"(not recorded for !bot_rollback: {exc.strerror or exc})"
        else:
            note = ""
        needs = self._needs(target, await changed_files(path, before, after))
        lines = [*self._need_lines(inv, target, needs), note]
        return "\n".join(line for line in lines if line)

    # ------------------------------------------------------------------ !bot_deps

    def configure_deps(self, inv: Invocation, typed: str) -> Action | NotConfigured:
        """Install the requirements of the target called ``typed`` (the bot's own by default)."""
        target = self._target(inv, typed)
        if isinstance(target, NotConfigured):
            return target
        return lambda inv: self.deps(inv, target)

    async def deps(self, inv: Invocation, target: PullTarget) -> Outcome:
        """``pip install -r`` the target's requirements with the bot's interpreter."""
        async with self.replies.typing(inv.ctx):
            outcome = await install_requirements(
                self.python,
                target.path,
                self.settings.requirements,
                timeout=self.settings.pip_timeout,
                secrets=self.replies.secrets,
            )
        name = inline_code(target.name)
        icon = {"installed": "📦", "unchanged": "✅"}.get(outcome.status, "❌")
        reply = Reply(f"{icon} {name}: {outcome.summary}", outcome.output or None, attach=True)
        if outcome.status in ("installed", "unchanged"):
            return Outcome("ok", detail=outcome.summary, reply=reply)
        return Outcome("failed", acted=outcome.acted, detail=outcome.summary, reply=reply)

    # ------------------------------------------------------------------ !bot_rollback

    def configure_rollback(self, inv: Invocation, typed: str) -> Plan | NotConfigured:
        """Roll back the last recorded pull of the target called ``typed``."""
        target = self._target(inv, typed)
        if isinstance(target, NotConfigured):
            return target
        prompt = f"Roll {inline_code(target.name)} back to where its last recorded pull found it?"
        return Plan(lambda inv: self.rollback(inv, target), prompt=prompt)

    async def rollback(self, inv: Invocation, target: PullTarget) -> Outcome:
        """Move the checkout back to where its last recorded pull found it."""
        async with self.replies.typing(inv.ctx):
            done = await roll_back_last_pull(
                target.path,
                self.history,
                holder=self.instance_id,
                timeout=self.settings.pull_timeout,
            )
        name = inline_code(target.name)
        if done.status == "nothing":
            reply = Reply(f"✅ {name}: nothing to roll back (no recorded pull moved it)")
            return Outcome("ok", acted=False, detail="nothing to roll back", reply=reply)
        if done.status == "skipped":
            headline = f"⏭️ {name} skipped: another service on this host is working in it"
            return Outcome("skipped", acted=False, detail=done.summary, reply=Reply(headline))
        if not done.acted or done.pull is None:
            reply = Reply(f"❌ {name} not rolled back", done.summary)
            return Outcome("failed", acted=False, detail=done.summary, reply=reply)
        needs = self._needs(target, done.changed)
        pull = done.pull
        lines = [f"Taken out ({_commits(done.removed)} of the pull by {pull.who}):"]
        lines += commit_lines(done.commits, done.removed)
        lines += ["", *self._need_lines(inv, target, needs)]
        lines.append(f"A later {inv.ctx.clean_prefix}bot_pull brings them back.")
        headline = f"⏪ {name} rolled back {pull.after[:7]} → {pull.before[:7]}"
        reply = Reply(f"{headline} — {needs.headline()}", "\n".join(lines))
        return Outcome("ok", detail=done.summary, reply=reply)
