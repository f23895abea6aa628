"""One generated sequence's own state: its prompt, its tokens and text so far, and why it ends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeserve import ipc
from pipeserve.ipc import DEFAULT_MAX_NEW_TOKENS


@dataclass
class Sequence:
    stream_id: int
    prompt_ids: list[int]
    parameters: dict[str, Any]
    generator: Any
    seed: int | None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    cancelled: bool = False
    prefix_offset: int = 0  # generated[prefix_offset:read_offset] is text already sent
    read_offset: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed
    failed: ipc.Failed | None = None  # why it ends with an error at the end of this step
    # A prompt too long for one pass: its first tokens' keys and values, from earlier chunks (a Hit).
    computed: Any = None

    @property
    def max_new_tokens(self) -> int:
        return int(self.parameters.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)

    def next_piece(self, decode: Callable[..., str], final: bool = False) -> str:
        """The text the newest token adds, decoding a few tokens rather than the whole sequence.

        Decoding the window from the token before the unread ones keeps the joining space (and
        a byte-level character split over tokens) right; a piece ending in U+FFFD is an
        incomplete character, held back until a later token completes it, unless the sequence
        ends there (`final`): then it is sent as decode() writes it, or the text would be
        shorter than its tokens'.
        """
        read = decode(self.generated[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        both = decode(self.generated[self.prefix_offset:], skip_special_tokens=True)
        if len(both) <= len(read) or (both.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.generated)
        return str(both[len(read):])

    def finish_reason(self, eos_ids: list[int]) -> str | None:
        """Why the sequence ends after its newest token, or None while it goes on."""
        if self.failed is not None:
            return "error"
        if not self.generated:
            return None
        if self.generated[-1] in eos_ids and not self.parameters.get("ignore_eos"):
            return "eos_token"
        for stop in self.parameters.get("stop") or ():
            if stop and stop in self.text:
                return "stop_sequence"
        if len(self.generated) >= self.max_new_tokens:
            return "length"
        return None
