"""A prompt's tokens, tokenizing only as much of an over-long prompt's end as the model keeps."""

from __future__ import annotations

import re
from typing import Any

# A prompt longer than the model's positions keeps only its last tokens. Tokenizing all of it
# would cost time in proportion to its length on the loop that steps every other stream (a
# 200 KB prompt: ~100 ms, bench/PROMPT_JOIN.md); only its tail is tokenized: a window of this
# many characters per token kept, cut at a whitespace (the tokenizers served split text into
# words there before merging, so the cut cannot change the tokens after it), used if it gives
# the kept tokens with this many to spare. A window with no whitespace near its start (a long
# run of one character, text without spaces) is not cut: the whole prompt is tokenized.
_TAIL_CHARACTERS_PER_TOKEN = 16
_TAIL_SPARE_TOKENS = 32
_WHITESPACE = re.compile(r"\s")


def tail_ids(tokenizer: Any, text: str, room: int, add_special_tokens: bool) -> list[int]:
    """The tokens of `text` (the last `room` of them exactly as the whole text's), tokenizing only
    as much of its end as needed."""
    window = (room + _TAIL_SPARE_TOKENS) * _TAIL_CHARACTERS_PER_TOKEN
    if len(text) > window:
        cut = _WHITESPACE.search(text, len(text) - window, len(text) - window // 2)
        if cut is not None:
            ids = list(tokenizer(text[cut.start():], add_special_tokens=add_special_tokens)["input_ids"])
            if len(ids) >= room + _TAIL_SPARE_TOKENS:
                return ids
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
