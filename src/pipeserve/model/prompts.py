"""A request's prompt tokens (its text, or its chat messages through the model's template),
tokenizing only as much of an over-long prompt's end as the model keeps."""

from __future__ import annotations

import re
from typing import Any

from pipeserve import ipc
from pipeserve.ipc import DEFAULT_MAX_NEW_TOKENS

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


def prompt_ids(tokenizer: Any, request: ipc.Generate, max_positions: int) -> list[int]:
    """The prompt's tokens, its end kept where it is longer than the positions left; a ValueError
    says why a prompt cannot be served."""
    max_new_tokens = int(request.parameters.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    room = max_positions - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the "
                         f"model's {max_positions} positions")
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        try:
            text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template is the model's; the messages are the request's
            # Templates refuse messages they do not take by raising (`raise_exception`: "roles
            # must alternate", no system role): jinja2's TemplateError, not a ValueError.
            raise ValueError(f"the model's chat template refused these messages: {exc}") from exc
        ids = tail_ids(tokenizer, text, room, add_special_tokens=False)
    else:
        ids = tail_ids(tokenizer, request.prompt or "", room, add_special_tokens=True)
    if not ids:  # an empty prompt: generate from the start of a text, as transformers does
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the prompt is empty, and this model has no token to start a text from")
        ids = [int(start)]
    return ids[-room:]  # keep the end of an over-long prompt
