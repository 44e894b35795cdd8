"""Reading Redis streams anyone can write to: bounded reads, and how long a read may block.

Stream replies come in two shapes (RESP2 lists, RESP3 dicts) and the Redis client is the
caller's; these helpers accept both.

Anyone who can write to Redis can append entries of any size to a stream we read (the command
stream, a result stream). A blocking read (XREAD, XREADGROUP) hands over whole entries, and Lua
cannot block; so readers wait with a blocking read of a small COUNT, look at each entry's size
before decoding it (:func:`checked_entries`), and read everything else with the Lua script of
:func:`bounded_read_lua`, which hands over a bounded number of entries and bytes per call and an
entry larger than the limit as its id alone. The collector (result streams) and the daemon (its
consumer group on the command stream) both read this way: one home for the rule.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

from core.ops_exec import as_text

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "FIELD_COST",
    "MAX_BLOCK_SECONDS",
    "POLL_INTERVAL",
    "SCAN_BYTES",
    "Entry",
    "bounded_entries",
    "bounded_read_lua",
    "checked_entries",
    "entry_size",
    "raw_stream_client",
    "read_block_seconds",
    "short_field",
    "stream_entries",
    "stream_pairs",
]

#: The longest blocking stream read. XREADGROUP BLOCK must stay below the client's socket
#: timeout, or redis-py reports a timeout on a healthy idle connection (redis-py does not
#: stretch the read timeout for stream reads).
MAX_BLOCK_SECONDS: Final = 5.0


def _entries_per_stream(response: Any) -> Iterable[Any]:
    """Each stream's entry list: RESP2 replies are ``[[stream, entries], ...]``, RESP3 a dict."""
    if not response:
        return ()
    if isinstance(response, dict):
        return response.values()
    return (entries for _stream, entries in response)


def stream_pairs(response: Any) -> Iterator[tuple[Any, Any]]:
    """Each ``(entry id, fields)`` of an XREAD/XREADGROUP reply, as the client returned them.

    Nothing is decoded: a reader can look at the sizes first.
    """
    for entries in _entries_per_stream(response):
        if entries and isinstance(entries[0], list):
            entries = [entry for group in entries for entry in group]
        yield from entries or ()


def stream_entries(response: Any) -> list[tuple[str, dict[str, str]]]:
    """Flatten an XREAD/XREADGROUP reply into ``(entry id, fields)``.

    redis-py returns a list of ``[stream, entries]`` with RESP2 and a dict with RESP3 (where
    each value may be wrapped in one more list); the client is the caller's, so accept both.
    A trimmed entry that is still pending comes back with no fields.
    """
    return [
        (as_text(entry_id), {as_text(k): as_text(v) for k, v in (raw or {}).items()})
        for entry_id, raw in stream_pairs(response)
    ]


def _socket_timeout(client: aioredis.Redis) -> float | None:
    """The read timeout the client's connections use, including redis-py's own default.

    ``connection_kwargs`` holds only what the caller passed, so the default (5 s in redis-py 8)
    is read from the connection class, where it lives.
    """
    pool = client.connection_pool
    if "socket_timeout" in pool.connection_kwargs:
        value = pool.connection_kwargs["socket_timeout"]
        return None if value is None else float(value)
    for cls in pool.connection_class.__mro__:
        init = vars(cls).get("__init__")
        if init is None:
            continue
        param = inspect.signature(init).parameters.get("socket_timeout")
        if param is not None and param.default is not inspect.Parameter.empty:
            return None if param.default is None else float(param.default)
    return 1.0  # unknown client: assume a short timeout rather than risk a spurious one


def read_block_seconds(client: aioredis.Redis) -> float:
    """How long a blocking stream read may wait: half the socket timeout, at most 5 s."""
    timeout = _socket_timeout(client)
    if not timeout:
        return MAX_BLOCK_SECONDS
    return max(0.01, min(MAX_BLOCK_SECONDS, timeout / 2))


# ---------------------------------------------------------------------------------------------
# Bounded reads
# ---------------------------------------------------------------------------------------------

#: One entry of a bounded read: its id, and its fields (None: larger than the limit, not read).
Entry = tuple[str, dict[str, str] | None]

#: What an entry's size counts for each field name and each value beyond its bytes: an entry of
#: a million empty fields is as costly to transfer and parse as megabytes, and is as oversized.
FIELD_COST: Final = 16
#: How often a reader that stopped blocking (it saw an oversized entry) reads again.
POLL_INTERVAL: Final = 0.05
#: The most bytes one script call looks at on the server, oversized entries included: a stream
#: of huge entries costs Redis a bounded amount of work per call too.
SCAN_BYTES: Final = 8 * 1024 * 1024
# Entries are read a few at a time while they are small, then one at a time once an oversized
# one was seen, so the script holds few of an attacker's in memory.
_BATCH: Final = 16

# The script's reply is flat: 1 if the read stopped at a limit (there may be more), else 0;
# then per entry its id and the named fields only, in the order given (no other field is
# signed): a missing field is ''. An entry larger than the limit is its id and one nil per
# name. Flat and fixed, it costs the client the fewest reply elements to parse; a writer that
# writes the fields in that very order takes the fast path.
# KEYS: the stream. ARGV: where to read from, most entries, byte budget, largest entry, scan
# budget; for a group read also the group and the consumer. Where to read from: for XRANGE the
# last id read; for XREADGROUP ">" (new entries) or the last pending id read ("0" at first).
_READ_HEAD: Final = """local batch = {batch}
local last = ARGV[1]
local most, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local largest, scan_budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local field_cost = {field_cost}
local out, count, used, scanned = {{0}}, 0, 0, 0
local n = #names
local function in_order(fields)
  if #fields ~= 2 * n then return false end
  for i = 1, n do
    if fields[2 * i - 1] ~= names[i] then return false end
  end
  return true
end
"""
_RANGE_READ: Final = """local function read(wanted)
  return redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', wanted)
end
"""
# XREADGROUP delivers what it returns (into the pending list): a group read never stops in the
# middle of a batch, or entries would be delivered and not handed over.
_GROUP_READ: Final = """local function read(wanted)
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[6], ARGV[7], 'COUNT', wanted,
    'STREAMS', KEYS[1], last)
  if not reply then return {{}} end
  return reply[1][2]
end
"""
_READ_LOOP: Final = """while count < most and used < budget and scanned < scan_budget do
  local wanted = math.min(batch, most - count)
  local entries = read(wanted)
  for _, entry in ipairs(entries) do
    if last ~= '>' then last = entry[1] end
    count = count + 1
    local fields, size = entry[2] or {{}}, 0
    for i = 1, #fields do size = size + #fields[i] + field_cost end
    scanned = scanned + size
    out[#out + 1] = entry[1]
    if size > largest then
      for _ = 1, n do out[#out + 1] = false end
      batch = 1
    elseif in_order(fields) then
      for i = 1, n do out[#out + 1] = fields[2 * i] end
      used = used + size
    else
      local by_name = {{}}
      for i = 1, #fields - 1, 2 do by_name[fields[i]] = fields[i + 1] end
      for _, name in ipairs(names) do out[#out + 1] = by_name[name] or '' end
      used = used + size
    end
    {stop}
  end
  if #entries < wanted then break end  -- the end of the stream
end
if count >= most or used >= budget or scanned >= scan_budget then
  out[1] = 1  -- stopped at a limit: there may be more
end
return out
"""


def bounded_read_lua(names: Sequence[str], *, group: bool = False) -> str:
    """The bounded read script for entries with the fields ``names`` (see the comments above).

    ``group``: read through a consumer group (XREADGROUP), else with XRANGE.
    """
    quoted = ", ".join(f"'{name}'" for name in names)
    stop = "" if group else "if used >= budget or scanned >= scan_budget then break end"
    return (
        f"local names = {{{quoted}}}\n"
        + _READ_HEAD.format(batch=_BATCH, field_cost=FIELD_COST)
        + (_GROUP_READ if group else _RANGE_READ).format()
        + _READ_LOOP.format(stop=stop)
    )


def bounded_entries(reply: Any, names: Sequence[str]) -> tuple[list[Entry], bool]:
    """The script's flat reply as entries, and whether it stopped at a limit."""
    raw = reply or (0,)
    stride = 1 + len(names)
    texts = [as_text(value) for value in raw]  # one pass; a nil (oversized) becomes ""
    entries: list[Entry] = []
    for i in range(1, len(raw) - stride + 1, stride):
        if raw[i + 1] is None:
            entries.append((texts[i], None))
        else:
            entries.append((texts[i], dict(zip(names, texts[i + 1 : i + stride], strict=True))))
    return entries, bool(int(raw[0]))


def raw_stream_client(client: aioredis.Redis) -> aioredis.Redis:
    """A client on ``client``'s connections whose XREAD and XREADGROUP replies stay as sent.

    redis-py turns each entry's flat list of fields into a dict, where a name written twice
    counts once: an entry padded under a repeated name would pass a size check made on the
    dict. :func:`checked_entries` measures the flat list instead.
    """
    raw = type(client)(connection_pool=client.connection_pool)
    for command in ("XREAD", "XREADGROUP"):
        raw.response_callbacks.pop(command, None)
    return raw


def _raw_pairs(response: Any) -> Iterator[tuple[Any, Any]]:
    """Each ``(entry id, flat fields)`` of a raw XREAD/XREADGROUP reply (RESP2 or RESP3).

    Each stream's entries are ``[id, [name, value, ...]]``; a trimmed, still pending entry has
    no fields (nil).
    """
    for entries in _entries_per_stream(response):
        for entry in entries or ():
            yield entry[0], entry[1]


def entry_size(fields: Sequence[Any]) -> int:
    """An entry's size as the bounded reads count it: its bytes and FIELD_COST per element."""
    return sum(len(value) + FIELD_COST for value in fields)


def checked_entries(response: Any, names: Sequence[str], largest: int) -> list[Entry]:
    """A raw blocking read's entries (:func:`raw_stream_client`), the named fields only.

    One larger than ``largest`` (:func:`entry_size`, over every element Redis sent, repeated
    names included) is not decoded. Where a name repeats, its last value counts, as in the
    bounded read script.
    """
    entries: list[Entry] = []
    for entry_id, raw in _raw_pairs(response):
        flat = list(raw or ())
        if entry_size(flat) > largest:
            entries.append((as_text(entry_id), None))
            continue
        # An odd element out (no value) cannot come from Redis; strict=False ignores it anyway.
        pairs = zip(flat[::2], flat[1::2], strict=False)
        decoded = {as_text(name): value for name, value in pairs}
        entries.append(
            (as_text(entry_id), {name: as_text(decoded.get(name, "")) for name in names})
        )
    return entries


# The value of one field of one entry, if it is at most ARGV[3] bytes, else '' (also when the
# entry or the field is gone). KEYS: the stream. ARGV: the entry id, the field's name, the size.
_SHORT_FIELD_LUA: Final = """
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])[1]
if not entry or not entry[2] then return '' end
local fields, most = entry[2], tonumber(ARGV[3])
for i = 1, #fields - 1, 2 do
  if fields[i] == ARGV[2] then
    if #fields[i + 1] <= most then return fields[i + 1] end
    return ''
  end
end
return ''
"""


async def short_field(client: aioredis.Redis, key: str, entry_id: str, name: str, most: int) -> str:
    """Field ``name`` of entry ``entry_id``, if at most ``most`` bytes (else ""): never the rest.

    How a reader learns, say, the command id of an entry too large to read.
    """
    return as_text(await client.eval(_SHORT_FIELD_LUA, 1, key, entry_id, name, str(most)))
