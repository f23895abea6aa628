"""Prefix reuse: the keys and values of sequences that ended, kept to skip prefilling them again.

A chat client sends the whole conversation every turn: the same system prompt, the earlier
turns, then the new message. When a sequence leaves the engine, its tokens' keys and values
(prompt and reply, all but the last token, whose keys were never computed) are copied out of
the running batch's cache and kept here. New prompts that start with the tokens of kept
entries prefill only the rest, together, on a copy of the entries' keys and values.

Exact: a kept position's keys and values are those its own tokens and position gave, the same
whether the model computed them in a prefill or one step at a time (up to float rounding, as
for any change of batch shape; greedy outputs are tested equal with and without reuse).

Bounded by bytes per model process (`--prefix-cache-bytes`), least recently used first out. An
entry a newer one extends (the same conversation one turn on) is dropped when that one is kept,
so a conversation holds one entry, not one per turn. Entries live in host memory, also where the
model runs on a GPU: its memory is the running batch's (a prefix is copied back when reused).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A shared prefix shorter than this is prefilled with the other newcomers' whole prompts: prompts
# reusing a prefix are prefilled apart from those, which costs a pass.
MIN_TOKENS = 32
_COMPARE_BLOCK = 256  # tokens compared at a time by list equality (C speed) before one by one


@dataclass
class Entry:
    tokens: list[int]
    layers: list[tuple[Any, Any]]  # per layer, keys and values [1, heads, len(tokens), head_dim]
    nbytes: int


@dataclass(frozen=True)
class Hit:
    """Reuse the first `length` tokens' keys and values of an entry."""

    entry: Entry
    length: int

    def layers(self) -> list[tuple[Any, Any]]:
        return [(keys[:, :, :self.length], values[:, :, :self.length]) for keys, values in self.entry.layers]


def kept(hit: Hit | None) -> int:
    """The prompt tokens a hit serves (none without one)."""
    return hit.length if hit is not None else 0


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # by id, oldest use first
        self.nbytes = 0
        self._next_id = 0

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The kept entry sharing the longest prefix with `prompt`, leaving it at least one token
        to prefill (its logits give the first new token)."""
        best_id, best_length = None, 0
        for entry_id, entry in self.entries.items():
            length = common_prefix(prompt, entry.tokens)
            if length > best_length:
                best_id, best_length = entry_id, length
        best_length = min(best_length, len(prompt) - 1)
        if best_id is None or best_length < MIN_TOKENS:
            return None
        self.entries.move_to_end(best_id)
        return Hit(self.entries[best_id], best_length)

    def keep(self, tokens: list[int], nbytes: int, copy: Callable[[], list[tuple[Any, Any]]]) -> None:
        """Keep these tokens' keys and values (`nbytes` of them), copied out of the live cache by
        `copy` only if they are to be kept."""
        if len(tokens) < MIN_TOKENS or nbytes > self.max_bytes:
            return
        for entry_id, entry in list(self.entries.items()):
            if common_prefix(tokens, entry.tokens) == len(tokens):  # nothing new: already held
                self.entries.move_to_end(entry_id)
                return
        for entry_id, entry in list(self.entries.items()):
            if common_prefix(tokens, entry.tokens) == len(entry.tokens):  # extended by this one
                self._drop(entry_id)
        while self.entries and self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
        self.entries[self._next_id] = Entry(list(tokens), copy(), nbytes)
        self._next_id += 1
        self.nbytes += nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def _drop(self, entry_id: int) -> None:
        self.nbytes -= self.entries.pop(entry_id).nbytes


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two lists share."""
    limit = min(len(a), len(b))
    start = 0
    while start < limit:
        end = min(start + _COMPARE_BLOCK, limit)
        if a[start:end] == b[start:end]:
            start = end
            continue
        while a[start] == b[start]:
            start += 1
        return start
    return limit
