"""What a causal LM's config and tokenizer say about its sequences: how many positions a sequence
may take, and which tokens end one (the generation engine's limits, in the model process)."""

from __future__ import annotations

from typing import Any

# At or past this, a tokenizer's model_max_length is transformers' "none saved" (int(1e30)).
UNSET_LENGTH = 10**7


def max_positions(config: Any, tokenizer: Any) -> int:
    """The positions a sequence may take: the config's (a composite model's text config's), else
    the tokenizer's saved limit (Mamba and ALiBi models have no position table), else 2048."""
    configs = [config]
    try:  # the decoder's, as transformers' own cache asks (several text configs: a ValueError)
        configs.append(config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError):
        pass
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        for each in configs:
            value = getattr(each, name, None)
            if isinstance(value, int) and value > 0:
                return value
    saved = getattr(tokenizer, "model_max_length", None)  # huge (1e30) where none was saved
    return saved if isinstance(saved, int) and 0 < saved < UNSET_LENGTH else 2048


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return [-1]
    return list(configured) if isinstance(configured, (list, tuple)) else [int(configured)]

