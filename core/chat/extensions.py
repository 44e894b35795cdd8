"""The bot's loaded extensions by file: what the running bot imported, and what changed on disk.

An extension is its module and its submodules (what discord.py reloads together). Each is
fingerprinted (SHA-256 of every file) when first seen loaded and again after each reload, so
``!ops_reload`` without arguments reloads exactly those whose source changed since. The
fingerprints live at module level: reloading the cog itself (``cogs.admin_ops``) does not
reload this module, so they survive that too.

:func:`loaded_code` is the input of :func:`core.updates.classify_update`: which files belong to
which extension, and every file any imported module came from.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Final

from core.updates import LoadedCode

__all__ = ["changed_since_loaded", "extension_files", "loaded_code", "note_loaded", "refresh"]

#: A file that cannot be read (deleted, say) counts as changed.
_UNREADABLE: Final = "unreadable"
_CHUNK: Final = 1 << 16

# Extension name → {file: digest} as last loaded (or as first seen loaded).
_SEEN: dict[str, dict[str, str]] = {}


def _module_file(module: object) -> str | None:
    path = getattr(module, "__file__", None)
    return os.path.realpath(path) if isinstance(path, str) else None


def extension_files(name: str) -> frozenset[str]:
    """The files of ``name``'s loaded modules: the extension and its submodules."""
    prefix = name + "."
    modules = [m for key, m in list(sys.modules.items()) if key == name or key.startswith(prefix)]
    return frozenset(path for path in map(_module_file, modules) if path is not None)


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            while chunk := source.read(_CHUNK):
                sha.update(chunk)
    except OSError:
        return _UNREADABLE
    return sha.hexdigest()


def _fingerprint(name: str) -> dict[str, str]:
    return {path: _digest(path) for path in sorted(extension_files(name))}


def note_loaded(names: Iterable[str]) -> None:
    """Fingerprint the extensions in ``names`` not seen before (as they are on disk now)."""
    for name in names:
        if name not in _SEEN:
            _SEEN[name] = _fingerprint(name)


def refresh(name: str) -> None:
    """``name`` was just (re)loaded: its current files are what runs."""
    _SEEN[name] = _fingerprint(name)


def changed_since_loaded(names: Iterable[str]) -> list[str]:
    """The extensions of ``names`` whose source differs from what was loaded (or first seen)."""
    changed = []
    for name in names:
        seen = _SEEN.get(name)
        if seen is not None and seen != _fingerprint(name):
            changed.append(name)
    return changed


def loaded_code(extensions: Mapping[str, object] | Iterable[str]) -> LoadedCode:
    """What the running process imported: the files of each of ``extensions``, and all of them."""
    imported = {path for path in map(_module_file, list(sys.modules.values())) if path}
    return LoadedCode(
        extensions={name: extension_files(name) for name in extensions},
        imported=frozenset(imported),
    )
