"""``!ops_reload``: reload loaded extensions, each atomically.

discord.py's ``reload_extension`` is atomic: when the new version fails to import or set up,
the old one is set up again and keeps running. So each extension ends either reloaded or on
its previous version, and the reply says which, one line each. Without names, every loaded
extension whose files changed since they were loaded is reloaded
(:mod:`core.chat.extensions`).

The cog's own extension may be reloaded from its own command: it goes last, and the
invocation that does it still replies and writes its record through the instance that is
being replaced (the cog defers closing its Redis client until its invocations are over).
"""

from __future__ import annotations

from collections.abc import Sequence

from discord.ext import commands

from core.chat.extensions import changed_since_loaded, note_loaded, refresh
from core.chat.invocation import Action, Invocation, NotConfigured, Outcome, Reply
from core.text import inline_code, one_line

__all__ = ["ExtensionReloads", "last_error_line"]

#: The longest error line shown for an extension that kept its previous version.
_ERROR_LIMIT = 300


def last_error_line(error: commands.ExtensionError) -> str:
    """The last line of what went wrong: ``SyntaxError: invalid syntax (x.py, line 3)``."""
    cause = getattr(error, "original", None) or error.__cause__ or error
    lines = f"{type(cause).__name__}: {cause}".strip().splitlines()
    return lines[-1] if lines else type(cause).__name__


class ExtensionReloads:
    """Reload the bot's extensions from chat."""

    def __init__(self, bot: commands.Bot, own_extension: str) -> None:
        """Reload ``bot``'s extensions; ``own_extension`` is the cog's (reloaded last)."""
        self.bot = bot
        self.own_extension = own_extension

    def configure(self, inv: Invocation, names: Sequence[str]) -> Action | NotConfigured:
        """Reload ``names`` (every changed extension when empty); unknown names are refused."""
        loaded = sorted(self.bot.extensions)
        unknown = [name for name in names if name not in self.bot.extensions]
        if unknown:
            listed = ", ".join(inline_code(name) for name in loaded) or "none"
            return NotConfigured(
                f"{inline_code(unknown[0])} is not a loaded extension. Loaded: {listed}."
            )
        wanted = list(dict.fromkeys(names))
        return lambda inv: self.reload(inv, wanted)

    async def reload(self, inv: Invocation, names: Sequence[str]) -> Outcome:
        """Reload each of ``names`` (or each changed one) and say how each ended."""
        note_loaded(self.bot.extensions)
        targets = list(names) or changed_since_loaded(sorted(self.bot.extensions))
        if not targets:
            reply = Reply("✅ No loaded extension changed since it was loaded: nothing reloaded.")
            return Outcome("ok", acted=False, detail="nothing changed", reply=reply)
        # The cog's own extension last: reloading it replaces this cog's instance.
        targets.sort(key=lambda name: name == self.own_extension)
        lines, kept = [], []
        for name in targets:
            try:
                await self.bot.reload_extension(name)
            except commands.ExtensionError as exc:
                kept.append(name)
                error = inline_code(one_line(last_error_line(exc), _ERROR_LIMIT), _ERROR_LIMIT)
                lines.append(f"❌ {inline_code(name)} kept the previous version: {error}")
            else:
                refresh(name)
                lines.append(f"✅ {inline_code(name)} reloaded")
        detail = f"kept the previous version: {', '.join(kept)}" if kept else "reloaded"
        return Outcome(
            "failed" if kept else "ok",
            detail=f"{detail} ({', '.join(targets)})",
            reply=Reply("\n".join(lines)),
        )
