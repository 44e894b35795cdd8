"""What an update of a checkout brings and what it needs, before or after it is applied.

Standard library only. :func:`classify_update` is pure: the files an update changes and the code
the running bot has loaded go in, what the update needs comes out (install dependencies, reload
extensions, restart). :func:`fetch_preview` fetches under the checkout's lock (a pull's git
hardening, timeout and lock) and says what a pull would bring, changing neither ``HEAD`` nor the
working tree; :func:`commits_between`, :func:`changed_files` and :func:`reset_keep` serve the
rollbacks.
"""

from __future__ import annotations

import codecs
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Literal, NamedTuple

from core.env_reader import DEFAULT_REQUIREMENTS
from core.ops_exec import (
    CheckoutRefusal,
    HeldCheckout,
    git_failure_summary,
    git_read,
    locked_checkout,
    run_checkout_git,
    stale_index_lock,
)

__all__ = [
    "MAX_LISTED_COMMITS",
    "Commit",
    "FetchPreview",
    "LoadedCode",
    "UpdateNeeds",
    "changed_files",
    "classify_update",
    "commits_between",
    "describe_needs",
    "diffstat",
    "fetch_preview",
    "is_dependency_file",
    "reset_keep",
]

#: Incoming or removed commits listed by name; the rest are counted.
MAX_LISTED_COMMITS: Final = 15
#: Files named in one line of what an update needs; the rest are counted.
_MAX_NAMED_FILES: Final = 5
#: Local git commands (log, diff, reset) finish in well under this.
_LOCAL_GIT_TIMEOUT: Final = 30.0
#: Files that say which packages the code needs, wherever they are in the checkout.
_DEPENDENCY_NAMES: Final = frozenset(
    {
        "pyproject.toml",
        "setup.cfg",
        "setup.py",
        "Pipfile",
        "Pipfile.lock",
        "poetry.lock",
        "pdm.lock",
        "uv.lock",
        "pylock.toml",
    }
)
_DEPENDENCY_PATTERN: Final = re.compile(r"(requirements|constraints)[\w.-]*\.(txt|in|lock)")
# git's --shortstat: " 7 files changed, 120 insertions(+), 30 deletions(-)", parts optional.
_SHORTSTAT: Final = {
    "files": re.compile(r"(\d+) files? changed"),
    "added": re.compile(r"(\d+) insertions?\(\+\)"),
    "removed": re.compile(r"(\d+) deletions?\(-\)"),
}
# What `git reset --keep` says about each file whose local changes it would lose.
_KEEP_CONFLICT: Final = re.compile(r"^error: Entry '(.+)' (?:not uptodate|would be overwritten)")


class Commit(NamedTuple):
    """One commit as listed in chat: short hash, author, subject."""

    short: str
    author: str
    subject: str

    def line(self) -> str:
        """``abc1234 Alice: Fix the thing``."""
        return f"{self.short} {self.author}: {self.subject}"


class LoadedCode(NamedTuple):
    """What the running bot has imported, by file (absolute real paths)."""

    #: Each loaded extension and the files of its modules (the extension and its submodules).
    extensions: Mapping[str, frozenset[str]]
    #: Every file any imported module was loaded from.
    imported: frozenset[str]


class UpdateNeeds(NamedTuple):
    """What an update needs before the running bot runs its code.

    Paths are relative to the checkout.
    """

    #: Changed dependency files: install with ``!bot_deps``.
    dependencies: tuple[str, ...] = ()
    #: Loaded extensions whose files changed: reload them.
    reload: tuple[str, ...] = ()
    #: Changed files the bot imported outside its extensions: restart.
    restart: tuple[str, ...] = ()

    @property
    def anything(self) -> bool:
        """Whether the update needs anything at all."""
        return bool(self.dependencies or self.reload or self.restart)

    def headline(self) -> str:
        """A few words for a reply's headline: ``dependencies changed, restart needed``."""
        parts = ["dependencies changed"] if self.dependencies else []
        if self.restart:
            parts.append("restart needed")
        elif self.reload:
            parts.append("reload needed")
        return ", ".join(parts) if parts else "nothing to reload or restart"


def is_dependency_file(path: str, requirements: str = DEFAULT_REQUIREMENTS) -> bool:
    """Whether ``path`` (relative to the checkout) says which packages the code needs."""
    name = posixpath.basename(path)
    return (
        posixpath.normpath(path) == posixpath.normpath(requirements)
        or name in _DEPENDENCY_NAMES
        or _DEPENDENCY_PATTERN.fullmatch(name) is not None
        or (posixpath.basename(posixpath.dirname(path)) == "requirements" and name.endswith(".txt"))
    )


def classify_update(
    checkout: str,
    changed: Iterable[str],
    loaded: LoadedCode,
    *,
    requirements: str = DEFAULT_REQUIREMENTS,
) -> UpdateNeeds:
    """What an update of ``checkout`` that changes ``changed`` needs, given ``loaded``.

    Pure. ``checkout`` is the checkout's absolute real path and ``changed`` are paths relative
    to it, as git names them. A dependency file needs ``!bot_deps``; a file of a loaded
    extension needs that extension reloaded; any other file the bot imported (``bot.py``,
    ``core/…``, a module an extension imports from outside itself) needs a restart. Files the
    bot never imported (docs, tests, an extension that is not loaded) need nothing.
    """
    owner = {path: name for name, paths in loaded.extensions.items() for path in paths}
    dependencies: list[str] = []
    reload: dict[str, None] = {}
    restart: list[str] = []
    for path in dict.fromkeys(changed):
        if is_dependency_file(path, requirements):
            dependencies.append(path)
        absolute = os.path.normpath(os.path.join(checkout, path))
        extension = owner.get(absolute)
        if extension is not None:
            reload[extension] = None
        elif absolute in loaded.imported:
            restart.append(path)
    return UpdateNeeds(tuple(dependencies), tuple(sorted(reload)), tuple(restart))


def _named(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_MAX_NAMED_FILES])
    more = len(paths) - _MAX_NAMED_FILES
    return f"{shown} and {more} more" if more > 0 else shown


def describe_needs(needs: UpdateNeeds, *, prefix: str = "!", target: str = "bot") -> list[str]:
    """One line per need, naming the command that meets it (``!bot_deps worker``)."""
    argument = "" if target == "bot" else f" {target}"
    lines = []
    if needs.dependencies:
        lines.append(
            f"dependencies changed ({_named(needs.dependencies)}): run {prefix}bot_deps{argument}"
        )
    if needs.restart:
        lines.append(f"restart needed ({_named(needs.restart)} changed): {prefix}bot_restart")
    elif needs.reload:
        lines.append(f"reload with {prefix}ops_reload {' '.join(needs.reload)}")
    if not lines:
        lines.append("nothing to reload or restart: no file the running bot loaded changed")
    return lines


# ------------------------------------------------------------------------------------ git


async def _git(repo: str, *args: str) -> tuple[bool, str]:
    result = await git_read(repo, *args, timeout=_LOCAL_GIT_TIMEOUT)
    return result.ok, result.stdout


async def commits_between(
    repo: str, base: str, tip: str, *, limit: int = MAX_LISTED_COMMITS
) -> tuple[tuple[Commit, ...], int]:
    """The newest ``limit`` commits in ``tip`` but not in ``base``, and how many there are."""
    span = f"{base}..{tip}"
    ok, count = await _git(repo, "rev-list", "--count", span)
    total = int(count.strip()) if ok and count.strip().isdigit() else 0
    ok, listing = await _git(
        repo, "log", "--no-color", f"--max-count={limit}", "--format=%h%x09%an%x09%s", span, "--"
    )
    commits = []
    # Tab-separated: the runner keeps tabs and newlines of a child's output, no other control.
    for line in listing.splitlines() if ok else []:
        parts = line.split("\t", 2)
        if len(parts) == 3:
            commits.append(Commit(*parts))
    return tuple(commits), max(total, len(commits))


async def changed_files(repo: str, *revs: str) -> tuple[str, ...]:
    """Paths (relative to the checkout) that differ between the two commits ``revs`` name.

    ``base tip``, or git's ``base...tip`` (from where they forked to ``tip``).
    """
    ok, out = await _git(
        repo, "-c", "core.quotePath=false", "diff", "--no-renames", "--name-only", *revs, "--"
    )
    return tuple(_unquoted(path) for path in out.splitlines() if path) if ok else ()


def _unquoted(path: str) -> str:
    """A path as git lists it one per line: in C quotes when it holds a tab, quote or newline."""
    if len(path) < 2 or not path.startswith('"') or not path.endswith('"'):
        return path
    raw = codecs.escape_decode(path[1:-1].encode())[0]
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else path


async def diffstat(repo: str, *revs: str) -> str:
    """One line for the difference ``revs`` name (as :func:`changed_files`).

    ``7 files changed, +120 −30``.
    """
    ok, out = await _git(repo, "diff", "--no-renames", "--shortstat", *revs, "--")
    found = {key: pattern.search(out) if ok else None for key, pattern in _SHORTSTAT.items()}
    files, added, removed = (int(m.group(1)) if m else 0 for m in found.values())
    noun = "file" if files == 1 else "files"
    return f"{files} {noun} changed, +{added} −{removed}"


async def reset_keep(
    held: HeldCheckout, commit: str, *, refused: str = "Not rolled back", timeout: float = 60.0
) -> str | None:
    """Move the checkout to ``commit`` as ``git reset --keep`` does; None when done, else why not.

    ``--keep`` refuses, changing nothing, when a file with local changes differs between
    ``HEAD`` and ``commit``; local changes to other files stay.
    """
    stale = stale_index_lock(held, refused)
    if stale is not None:
        return stale
    result = await run_checkout_git(held, "reset", "--quiet", "--keep", commit, timeout=timeout)
    if result.ok:
        return None
    lost = [m.group(1) for line in result.stderr.splitlines() if (m := _KEEP_CONFLICT.match(line))]
    if lost and not result.timed_out:
        return (
            f"{refused}: local changes to {_named(lost)} would be lost. Commit, stash or "
            "discard them first; nothing was changed."
        )
    return git_failure_summary(result, timeout=timeout, refused=refused, what="git reset")


# ------------------------------------------------------------------------------------ fetch

FetchStatus = Literal["up to date", "incoming", "diverged", "blocked", "skipped", "failed"]


class FetchPreview(NamedTuple):
    """What a pull of a freshly fetched checkout would bring, and whether it would go through."""

    status: FetchStatus
    #: Why nothing can be shown, or why a pull would refuse (one sentence); else empty.
    summary: str = ""
    #: Whether git fetch ran (it may have updated the remote-tracking branch).
    fetched: bool = False
    upstream: str = ""
    commits: tuple[Commit, ...] = ()
    #: Commits a pull would bring, and local commits the upstream does not have.
    incoming: int = 0
    local: int = 0
    diffstat: str = ""
    #: Files the update changes (relative to the checkout), for :func:`classify_update`.
    changed: tuple[str, ...] = ()
    #: The checkout's real path.
    path: str = ""


async def fetch_preview(
    repo_dir: str | os.PathLike[str],
    *,
    holder: str = "",
    timeout: float = 60.0,
    env_passthrough: Iterable[str] = (),
    secrets: Sequence[str] = (),
) -> FetchPreview:
    """Fetch the upstream of ``repo_dir``'s branch and say what a pull would bring.

    Under the checkout's host-local lock, with a pull's hardening and ``timeout``; neither
    ``HEAD`` nor the working tree changes.
    """
    async with locked_checkout(repo_dir, holder=holder, refused="Not fetched") as held:
        if isinstance(held, CheckoutRefusal):
            if held.busy:
                who = f" ({held.holder})" if held.holder else ""
                summary = f"Skipped: another process on this host{who} is working in it."
                return FetchPreview("skipped", summary)
            return FetchPreview("failed", held.summary)
        ok, upstream = await _git(
            held.path, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}"
        )
        if held.head is None:
            return FetchPreview("failed", "Not fetched: the checkout has no commit yet.")
        if not ok or not upstream.strip():
            return FetchPreview(
                "failed",
                "Not fetched: the current branch has no upstream to fetch from "
                "(set one with `git branch --set-upstream-to`).",
                path=held.path,
            )
        result = await run_checkout_git(
            held, "fetch", "--quiet", "--no-recurse-submodules", timeout=timeout,
            env_passthrough=env_passthrough, network=True,
        )  # fmt: skip
        if not result.ok:
            summary = git_failure_summary(
                result, timeout=timeout, refused="Not fetched", what="git fetch", secrets=secrets
            )
            return FetchPreview("failed", summary, fetched=result.returncode is not None)
        return await _preview(held, upstream.strip())


async def _preview(held: HeldCheckout, upstream: str) -> FetchPreview:
    """What a pull from ``upstream`` (just fetched) would do to the held checkout."""
    ok, counts = await _git(held.path, "rev-list", "--left-right", "--count", "HEAD...@{upstream}")
    numbers = counts.split() if ok else []
    local, incoming = (int(n) for n in numbers) if len(numbers) == 2 else (0, 0)
    preview = FetchPreview(
        "up to date", fetched=True, upstream=upstream, local=local, incoming=incoming,
        path=held.path,
    )  # fmt: skip
    if incoming == 0:
        return preview
    # What a pull would bring: from where the branches forked to the upstream's tip.
    span = "HEAD...@{upstream}"
    commits, _ = await commits_between(held.path, "HEAD", "@{upstream}")
    preview = preview._replace(
        status="incoming",
        commits=commits,
        changed=await changed_files(held.path, span),
        diffstat=await diffstat(held.path, span),
    )
    if local:
        noun = "commit is" if local == 1 else "commits are"
        return preview._replace(
            status="diverged",
            summary=f"A pull would refuse: the branch has diverged from {upstream} ({local} "
            f"local {noun} not upstream), and a pull only fast-forwards, it never merges.",
        )
    blocked = await _blocking_changes(held, preview.changed)
    if blocked:
        return preview._replace(
            status="blocked",
            summary=f"A pull would refuse: local changes to {_named(blocked)} would be "
            "overwritten. Commit, stash or discard them first.",
        )
    return preview


async def _blocking_changes(held: HeldCheckout, changed: Sequence[str]) -> list[str]:
    """The files with local changes (or untracked) that an update of ``changed`` would overwrite."""
    quoted = ("-c", "core.quotePath=false")
    _, modified = await _git(held.path, *quoted, "diff", "--name-only", "HEAD", "--")
    _, untracked = await _git(held.path, *quoted, "ls-files", "--others", "--exclude-standard")
    local = {_unquoted(path) for path in (modified + "\n" + untracked).splitlines() if path}
    return [path for path in changed if path in local]
