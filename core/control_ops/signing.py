"""Signing primitives of the fleet's wire format: canonical JSON and HMAC-SHA256.

Standard library only. :mod:`core.control_ops.wire` says what each kind of entry signs; this
module says how bytes are made canonical and signed, once for all of them.
"""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii as json_string
from typing import Any

__all__ = ["canonical_json", "hmac_hex", "json_string", "same_signature"]


def canonical_json(fields: Mapping[str, str]) -> bytes:
    """The bytes a signature covers: ``fields`` as canonical JSON (docs/fleet-protocol.md §3).

    Keys in code point order, no whitespace, every string escaped to printable ASCII: what
    ``json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` writes.
    """
    if all(isinstance(name, str) and isinstance(value, str) for name, value in fields.items()):
        # Byte for byte what the json.dumps below gives for string values (the same C string
        # encoder, the keys in sorted order, no spaces), without its generic machinery: every
        # daemon computes this for every command, every publisher for every answer.
        # A list, not a generator: join() builds one from a generator first anyway.
        body = ",".join(
            [f"{json_string(name)}:{json_string(fields[name])}" for name in sorted(fields)]
        )
        return ("{" + body + "}").encode()
    return json.dumps(
        dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode()


@functools.lru_cache(maxsize=8)
def _keyed(secret: str) -> Any:
    """HMAC-SHA256 keyed with ``secret``, ready to copy: the key is prepared once, not per call."""
    return hmac.new(secret.encode(), digestmod="sha256")


def hmac_hex(secret: str, payload: bytes) -> str:
    """Lower-case hex HMAC-SHA256 of ``payload``, keyed with the UTF-8 bytes of ``secret``."""
    mac = _keyed(secret).copy()
    mac.update(payload)
    return str(mac.hexdigest())


def same_signature(expected: str, given: str) -> bool:
    """Constant-time comparison of a computed signature with an untrusted one."""
    # Compare bytes: compare_digest refuses non-ASCII str, and the given value is untrusted.
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))
