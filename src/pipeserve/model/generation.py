"""Continuous batching for text generation, in the model process.

Running sequences share one forward pass per step over a left-padded key/value cache. A new
sequence is prefilled on its own and joins at the next step (its cache is padded and stacked
onto the batch's); a finished or cancelled one leaves at once (its row is dropped, and columns
no row needs any more are trimmed). Each sequence has its own parameters: max_new_tokens,
greedy or sampled (temperature, top_p, top_k) with its own seeded generator, stop sequences.

Models whose cache is not a plain DynamicCache (sliding windows, hybrid or recurrent layers)
still stream, but without joining: a new sequence waits until the running ones have finished
(static batches with per-row streaming).
"""

from __future__ import annotations

import inspect
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipeserve import ipc
from pipeserve.ipc import ErrorKind

log = logging.getLogger("pipeserve.worker")

DEFAULT_MAX_NEW_TOKENS = 64


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

    @property
    def max_new_tokens(self) -> int:
        return int(self.parameters.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)


class Engine:
    """Runs generated sequences step by step; `step()` returns what the front must be told."""

    def __init__(self, model: Any, tokenizer: Any, max_running: int) -> None:
        import torch  # noqa: PLC0415 - the model process only

        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self.max_running = max_running
        self.device = model.device
        self.eos_ids = _eos_ids(model, tokenizer)
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0)
                                 or getattr(model.config, "n_positions", 0) or 2048)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, columns]: 1 where a row has a real token
        self.joinable = True  # False once a cache shows it cannot be stacked (see module doc)
        forward_parameters = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache (the old name warns, then goes away).
        self._cache_keyword = "cache" if "cache" in forward_parameters else "past_key_values"
        # A prefill needs the next-token logits of the last position only; the others would cost
        # a vocabulary-wide projection per prompt token (GPT-2: as much as the rest of the model).
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}

    @property
    def active(self) -> bool:
        return bool(self.waiting or self.running)

    # --- requests ---------------------------------------------------------------------------

    def add(self, request: ipc.Generate) -> ipc.StreamEnd | None:
        """Queue a sequence; a StreamEnd at once when its prompt cannot be served."""
        try:
            prompt_ids = self._prompt_ids(request)
        except (ValueError, TypeError, KeyError) as exc:
            return ipc.StreamEnd(request.stream_id, "error", 0, 0,
                                 error=ipc.Failed(ErrorKind.BAD_INPUT, ipc.public_message(str(exc))))
        seed = request.parameters.get("seed")
        if seed is None and request.parameters.get("do_sample"):
            seed = random.randrange(2**63)
        generator = None
        if seed is not None:
            generator = self.torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
        self.waiting.append(Sequence(request.stream_id, prompt_ids, dict(request.parameters), generator, seed))
        return None

    def cancel(self, stream_id: int) -> None:
        for sequence in [*self.waiting, *self.running]:
            if sequence.stream_id == stream_id:
                sequence.cancelled = True

    def _prompt_ids(self, request: ipc.Generate) -> list[int]:
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this model has no chat template")
            text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(self.tokenizer(request.prompt or "")["input_ids"])
        if not ids:
            bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_ids[0]
            ids = [bos]
        room = self.max_positions - int(request.parameters.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if room < 1:
            raise ValueError(f"max_new_tokens must leave room in the model's {self.max_positions} positions")
        return ids[-room:]  # keep the end of an over-long prompt

    # --- one step ---------------------------------------------------------------------------

    def step(self) -> ipc.Step:
        """Prefill the waiting sequences that fit, or else decode one token for every running one."""
        ended = self._drop_cancelled()
        admit = self._admissible()
        with self.torch.inference_mode():
            if admit:
                tokens = self._prefill(admit)
            elif self.running:
                tokens = self._decode()
            else:
                tokens = []
        ended += self._drop_finished()
        return ipc.Step(tokens, ended)

    def _admissible(self) -> list[Sequence]:
        if not self.waiting or (self.running and not self.joinable):
            return []
        room = self.max_running - len(self.running)
        return [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]

    def _prefill(self, sequences: list[Sequence]) -> list[ipc.Token]:
        torch = self.torch
        width = max(len(s.prompt_ids) for s in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in sequences],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in sequences],
                            device=self.device)
        output = self.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                            **self._last_logits_only)
        self._join(_cache_of(output), mask)
        self.running.extend(sequences)
        return self._sample(output.logits[:, -1, :], sequences)

    def _decode(self) -> list[ipc.Token]:
        torch = self.torch
        last = torch.tensor([[s.generated[-1]] for s in self.running], device=self.device)
        positions = self.mask.sum(dim=-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        output = self.model(input_ids=last, attention_mask=self.mask, position_ids=positions,
                            use_cache=True, **{self._cache_keyword: self.cache})
        self.cache = _cache_of(output)
        return self._sample(output.logits[:, -1, :], self.running)

    def _join(self, cache: Any, mask: Any) -> None:
        """Stack a prefilled cache onto the running batch's (left-padding the shorter one)."""
        torch = self.torch
        if self.cache is None:
            self.cache, self.mask = cache, mask
            self.joinable = _stackable(cache)
            if self.joinable:
                _grow_in_place(cache)
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for index, (old, new) in enumerate(zip(self.cache.layers, cache.layers, strict=True)):
            keys = torch.cat([_left_pad(old.keys, length, dim=2), _left_pad(new.keys, length, dim=2)])
            values = torch.cat([_left_pad(old.values, length, dim=2), _left_pad(new.values, length, dim=2)])
            self.cache.layers[index] = _growing_layer(keys, values)
        self.mask = torch.cat([_left_pad(self.mask, length, dim=1), _left_pad(mask, length, dim=1)])

    def _sample(self, logits: Any, sequences: list[Sequence]) -> list[ipc.Token]:
        torch = self.torch
        logits = logits.float()
        chosen = logits.argmax(dim=-1).tolist()  # greedy rows, all at once
        for row, sequence in enumerate(sequences):
            if sequence.parameters.get("do_sample") and sequence.parameters.get("temperature") != 0:
                chosen[row] = _choose(torch, logits[row], sequence.parameters, sequence.generator)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen_logprobs = logprobs[torch.arange(len(chosen)), torch.tensor(chosen)].tolist()
        special_ids = self._special_ids
        tokens = []
        for sequence, token_id, logprob in zip(sequences, chosen, chosen_logprobs, strict=True):
            sequence.generated.append(token_id)
            piece = self._next_piece(sequence)
            sequence.text += piece
            tokens.append(ipc.Token(sequence.stream_id, token_id, piece, logprob, token_id in special_ids))
        return tokens

    def _next_piece(self, sequence: Sequence) -> str:
        """The text the newest token adds, decoding a few tokens rather than the whole sequence.

        Decoding the window from the token before the unread ones keeps the joining space (and
        a byte-level character split over tokens) right; a piece ending in U+FFFD is an
        incomplete character, held back until a later token completes it.
        """
        decode = self.tokenizer.decode
        read = decode(sequence.generated[sequence.prefix_offset:sequence.read_offset], skip_special_tokens=True)
        both = decode(sequence.generated[sequence.prefix_offset:], skip_special_tokens=True)
        if len(both) <= len(read) or both.endswith("\ufffd"):
            return ""
        sequence.prefix_offset, sequence.read_offset = sequence.read_offset, len(sequence.generated)
        return str(both[len(read):])

    # --- leaving ----------------------------------------------------------------------------

    def _drop_cancelled(self) -> list[ipc.StreamEnd]:
        ended = [self._end(s, "cancelled") for s in self.waiting if s.cancelled]
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        ended += [self._end(s, "cancelled") for s in self.running if s.cancelled]
        self._keep([s for s in self.running if not s.cancelled])
        return ended

    def _drop_finished(self) -> list[ipc.StreamEnd]:
        ended, keep = [], []
        for sequence in self.running:
            reason = self._finish_reason(sequence)
            if reason is None:
                keep.append(sequence)
            else:
                ended.append(self._end(sequence, reason))
        self._keep(keep)
        return ended

    def _finish_reason(self, sequence: Sequence) -> str | None:
        if not sequence.generated:
            return None
        if sequence.generated[-1] in self.eos_ids and not sequence.parameters.get("ignore_eos"):
            return "eos_token"
        for stop in sequence.parameters.get("stop") or ():
            if stop and stop in sequence.text:
                return "stop_sequence"
        if len(sequence.generated) >= sequence.max_new_tokens:
            return "length"
        return None

    def _keep(self, keep: list[Sequence]) -> None:
        """Drop the rows of sequences that left, and the leading columns no row needs."""
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self.cache, self.mask, self.joinable = [], None, None, True
            return
        torch = self.torch
        rows = torch.tensor([self.running.index(s) for s in keep], device=self.device)
        if not self.joinable:
            self.cache.batch_select_indices(rows)
            self.mask = self.mask[rows]
            self.running = keep
            return
        self.mask = self.mask[rows]
        first = int(self.mask.any(dim=0).nonzero()[0])
        for index, layer in enumerate(self.cache.layers):
            self.cache.layers[index] = _growing_layer(layer.keys[rows, :, first:], layer.values[rows, :, first:])
        self.mask = self.mask[:, first:]
        self.running = keep

    def _end(self, sequence: Sequence, reason: str) -> ipc.StreamEnd:
        return ipc.StreamEnd(sequence.stream_id, reason, len(sequence.generated), len(sequence.prompt_ids),
                             sequence.seed)

    def fail_all(self, error: ipc.Failed) -> list[ipc.StreamEnd]:
        """End every sequence with an error (the step raised); the engine starts afresh."""
        ended = [ipc.StreamEnd(s.stream_id, "error", len(s.generated), len(s.prompt_ids), s.seed, error)
                 for s in [*self.waiting, *self.running]]
        self.waiting.clear()
        self.running, self.cache, self.mask, self.joinable = [], None, None, True
        return ended


def _choose(torch: Any, logits: Any, parameters: dict[str, Any], generator: Any) -> int:
    """Greedy, or a sample after temperature, top-k and top-p, from the sequence's own generator."""
    temperature = parameters.get("temperature")
    if not parameters.get("do_sample") or temperature == 0:
        return int(logits.argmax())
    logits = logits / float(temperature or 1.0)
    top_k = parameters.get("top_k")
    if top_k:
        threshold = torch.topk(logits, min(int(top_k), logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    top_p = parameters.get("top_p")
    if top_p is not None and 0 < top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        cut = cumulative - torch.softmax(ordered, dim=-1) > top_p  # keep the first token past p
        logits = logits.masked_fill(torch.zeros_like(cut).scatter(0, order, cut), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _positions(mask: Any) -> Any:
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def _left_pad(tensor: Any, length: int, dim: int) -> Any:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    import torch  # noqa: PLC0415

    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def _stackable(cache: Any) -> bool:
    """A plain DynamicCache of full-attention layers: rows can be stacked and dropped."""
    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(type(layer).__name__ in ("DynamicLayer", "GrowingLayer") for layer in layers)


_GROWING: Any = None
GROWTH = 64  # token positions of room added at a time


def _growing_layer(keys: Any, values: Any) -> Any:
    """A cache layer whose keys and values are views of buffers with room to grow.

    transformers' DynamicLayer appends a step's key and value with torch.cat, copying the whole
    cache every step (16 % of a step at 16 rows x 100 positions, measured, and more as it grows);
    this one writes the step in place and copies only when it runs out of room.
    """
    global _GROWING  # noqa: PLW0603 - the class is made once, when torch is importable
    if _GROWING is None:
        import torch  # noqa: PLC0415
        from transformers.cache_utils import DynamicLayer  # noqa: PLC0415

        class GrowingLayer(DynamicLayer):  # type: ignore[misc]
            def adopt(self, keys: Any, values: Any) -> None:
                batch, heads, length, dim = keys.shape
                self._keys = torch.empty((batch, heads, length + GROWTH, dim), dtype=keys.dtype, device=keys.device)
                self._values = torch.empty((batch, heads, length + GROWTH, values.shape[-1]), dtype=values.dtype,
                                           device=values.device)
                self._keys[:, :, :length] = keys
                self._values[:, :, :length] = values
                self._length = length
                self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]
                self.is_initialized, self.device = True, keys.device

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                added = key_states.shape[-2]
                if self._length + added > self._keys.shape[2]:
                    self.adopt(self.keys, self.values)  # copies into a buffer with fresh room
                self._keys[:, :, self._length:self._length + added] = key_states
                self._values[:, :, self._length:self._length + added] = value_states
                self._length += added
                self.keys = self._keys[:, :, :self._length]
                self.values = self._values[:, :, :self._length]
                return self.keys, self.values

        _GROWING = GrowingLayer
    layer = _GROWING()
    layer.adopt(keys, values)
    return layer


def _grow_in_place(cache: Any) -> None:
    for index, layer in enumerate(cache.layers):
        cache.layers[index] = _growing_layer(layer.keys, layer.values)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return [-1]
    return list(configured) if isinstance(configured, (list, tuple)) else [int(configured)]

