"""Continuous batching for text generation, in the model process.

Running sequences share one forward pass per step over a left-padded key/value cache
(kv_cache.py). A new sequence is prefilled on its own and joins at the next step (its rows are
written, left-padded, into the cache's free rows); a finished or cancelled one leaves at once
(the rows after it move up, and once many leading columns are needed by no row, they are
dropped). Each sequence has its own parameters: max_new_tokens, greedy or sampled
(temperature, top_p, top_k) with its own seeded generator, stop sequences.

A prompt that starts with the tokens of a sequence that ended earlier (a chat's system prompt
and earlier turns) prefills only the rest, on that sequence's kept keys and values
(prefix_cache.py).

A prompt longer than one step's budget is prefilled in chunks, one a step, each on the keys and
values of the chunks before it; after each, the prompts behind it that fit are prefilled and
the running sequences decode.

Models whose cache is not a plain DynamicCache (sliding windows, hybrid or recurrent layers)
still stream, but without joining, prefix reuse or chunks: a new sequence waits until the
running ones have finished (static batches with per-row streaming).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import random
from collections import deque
from typing import Any

from pipeserve import ipc
from pipeserve.ipc import ErrorKind
from pipeserve.model import attention, kv_cache, lean_decode, model_limits, prefill_groups, prompts
from pipeserve.model.prefix_cache import Entry, Hit, PrefixCache, kept
from pipeserve.model.sampling import sample_one, samples
from pipeserve.model.sequence import Sequence

log = logging.getLogger("pipeserve.worker")

# Prompt tokens (rows x the longest, padding included) one step prefills at most by default
# (--max-batch-prefill-tokens, TGI's default): running streams wait for a prefill, and a burst
# of long prompts in one pass could outlast --batch-timeout, whose watchdog restarts the worker.
# A longer prompt is prefilled this many tokens a step (chunked).
PREFILL_TOKENS = 4096


class Engine:
    """Runs generated sequences step by step; `step()` returns what the front must be told."""

    def __init__(self, model: Any, tokenizer: Any, max_running: int, prefix_cache_bytes: int = 0,
                 prefill_tokens: int = PREFILL_TOKENS) -> None:
        import torch  # noqa: PLC0415 - the model process only

        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self.max_running = max_running
        self.prefill_tokens = prefill_tokens
        self.device = model.device
        self.eos_ids = model_limits.eos_ids(model, tokenizer)
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self.max_positions = model_limits.max_positions(model.config, tokenizer)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, columns]: 1 where a row has a real token
        self.joinable = True  # False once a cache shows it cannot be stacked (see module doc)
        # Whether caches cannot be stacked (None until the first is seen, or the lean path's check
        # below stacked one), for good. A static batch is prefilled whole, in one pass: a prompt
        # left out would wait for the whole batch.
        self.static: bool | None = None
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._decode_next = False  # a chunk of a long prompt was prefilled: the running streams' turn
        attention.use_for_decoding(model)
        forward_parameters = inspect.signature(model.forward).parameters
        self._cache_keyword = kv_cache.keyword(model)
        # A prefill needs the next-token logits of the last position only; the others would cost
        # a vocabulary-wide projection per prompt token (GPT-2: as much as the rest of the model).
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}
        self._lean = lean_decode.verified(model, torch)  # None: transformers' steps
        if self._lean is not None:
            # Its check stacked a cache: a first burst of prompts is prefilled by length, as later ones.
            self.static = False

    def details(self) -> dict[str, Any]:
        """What /info reports of the engine (plain JSON values)."""
        return {"decoding_steps": "transformers" if self._lean is None else
                f"lean ({'fused' if self._lean.fused_norms else 'own'} norms)"}

    @property
    def active(self) -> bool:
        return bool(self.waiting or self.running)

    # --- requests ---------------------------------------------------------------------------

    def add(self, request: ipc.Generate) -> ipc.StreamEnd | None:
        """Queue a sequence; a StreamEnd at once when its prompt cannot be served."""
        try:
            prompt_ids = prompts.prompt_ids(self.tokenizer, request, self.max_positions)
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

    # --- one step ---------------------------------------------------------------------------

    def step(self) -> ipc.Step:
        """Prefill the waiting sequences that fit, or else decode one token for every running one;
        after a chunk of a long prompt, prefill the others that fit and decode."""
        with self.torch.inference_mode():  # rows leave in place: the cache's tensors are inference tensors
            ended = self._drop_cancelled()
            between_chunks, self._decode_next = self._decode_next, False
            admit = self._admissible(between_chunks)
            tokens = self._prefill(admit) if admit else []
            if self.running and (between_chunks or not admit):
                if admit:  # one that ends at its first token decodes no more
                    ended += self._drop_finished()
                tokens += self._decode() if self.running else []
            ended += self._drop_finished()
        return ipc.Step(tokens, ended)

    def _admissible(self, between_chunks: bool = False) -> list[tuple[Sequence, Hit | None]]:
        """The waiting sequences, in order, that this step prefills (each with its kept prefix):
        as many as there are free rows, while their padded tokens to compute stay within
        prefill_tokens (the first always goes, or the next chunk of it where it is longer: not
        between two chunks, when the others that fit go instead)."""
        if not self.waiting or (self.running and not self.joinable):
            return []
        admitted: list[tuple[Sequence, Hit | None]] = []
        widest = 0
        for sequence in itertools.islice(self.waiting, self.max_running - len(self.running)):
            hit = sequence.computed
            if hit is None and self.prefixes is not None:
                hit = self.prefixes.lookup(sequence.prompt_ids)
            rest = len(sequence.prompt_ids) - kept(hit)
            if rest > self.prefill_tokens and self.static is None:  # learn it now: one pass could be too long
                self.static = not kv_cache.stacks(self.model, sequence.prompt_ids[:1], self.device)
            if between_chunks and sequence.computed is not None:
                continue  # its next chunk (or its last rest) after this step's decoding
            if self._chunked(sequence, hit):
                return admitted or [(sequence, hit)]  # a chunk of it, alone, once those before it went
            widest = max(widest, rest)
            if admitted and (len(admitted) + 1) * widest > self.prefill_tokens and not self.static:
                break
            admitted.append((sequence, hit))
        return admitted

    def _prefill(self, sequences: list[tuple[Sequence, Hit | None]]) -> list[ipc.Token]:
        """Prefill newcomers: whole new prompts in passes of similar length, longest first (so
        later passes write into the cache's free rows; prefill_groups.py) once caches are known
        to stack, those reusing a kept prefix in one pass of their own (a whole prompt would pad
        every short rest to its length). Each leaves `waiting` when its pass is done."""
        for sequence, hit in sequences:
            if sequence.computed is None:  # only the kept prefix counts as reused, not earlier chunks
                sequence.cached_tokens = kept(hit)
        if len(sequences) == 1 and self._chunked(*sequences[0]):
            return self._prefill_chunk(*sequences[0])
        fresh: list[tuple[Sequence, Hit | None]] = [(sequence, None) for sequence, hit in sequences if hit is None]
        groups = [list(range(len(fresh)))] if self.static is not False else prefill_groups.by_length(
            [len(sequence.prompt_ids) for sequence, _ in fresh])[::-1]
        passes = [[fresh[index] for index in group] for group in groups if group]
        passes.append([(sequence, hit) for sequence, hit in sequences if hit is not None])
        tokens: list[ipc.Token] = []
        for newcomers in filter(None, passes):
            tokens += self._prefill_on(newcomers)
            done = {id(sequence) for sequence, _ in newcomers}
            self.waiting = deque(sequence for sequence in self.waiting if id(sequence) not in done)
        return tokens

    def _chunked(self, sequence: Sequence, hit: Hit | None) -> bool:
        """Whether the prompt's rest after this kept prefix is prefilled in chunks (one pass too long)."""
        return self.static is False and len(sequence.prompt_ids) - kept(hit) > self.prefill_tokens

    def _prefill_chunk(self, sequence: Sequence, hit: Hit | None) -> list[ipc.Token]:
        """Compute the next prefill_tokens of a prompt too long for one pass, on its keys and values
        so far; it stays waiting, and the running streams get a decoding step before its next."""
        done = kept(hit)
        end = done + self.prefill_tokens
        output, _ = self._forward([(sequence, hit)], [sequence.prompt_ids[done:end]])
        layers = [(layer.keys[:, :, :end].clone(), layer.values[:, :, :end].clone())
                  for layer in kv_cache.cache_of(output).layers]
        sequence.computed = Hit(Entry(sequence.prompt_ids[:end], layers, 0), end)
        self._decode_next = bool(self.running) or len(self.waiting) > 1  # else: the next chunk at once
        return []

    def _prefill_on(self, newcomers: list[tuple[Sequence, Hit | None]]) -> list[ipc.Token]:
        """Prefill each prompt's tokens after its kept prefix (if any) and join the running batch."""
        rests = [s.prompt_ids[kept(hit):] for s, hit in newcomers]
        output, mask = self._forward(newcomers, rests)
        sequences = [sequence for sequence, _ in newcomers]
        self._join(kv_cache.cache_of(output), mask)
        self.running.extend(sequences)
        for sequence in sequences:  # joined: its chunks' keys and values are in the batch's cache now
            sequence.computed = None
        return self._sample(output.logits[:, -1, :], sequences)

    def _forward(self, newcomers: list[tuple[Sequence, Hit | None]], rests: list[list[int]]) -> tuple[Any, Any]:
        """One prefill pass of these tokens after each kept prefix, on a copy of the prefixes' keys
        and values, each row left-padded: [padding, prefix, padding, rest]. (output, its mask)"""
        torch = self.torch
        lengths = [kept(hit) for _, hit in newcomers]
        before, width = max(lengths), max(len(rest) for rest in rests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        ids = torch.tensor([[pad] * (width - len(rest)) + rest for rest in rests], device=self.device)
        mask = torch.tensor([[0] * (before - length) + [1] * length + [0] * (width - len(rest)) + [1] * len(rest)
                             for length, rest in zip(lengths, rests, strict=True)], device=self.device)
        hits = [[(keys.to(self.device), values.to(self.device)) for keys, values in hit.layers()]
                for _, hit in newcomers if hit is not None]
        past = {self._cache_keyword: kv_cache.past(hits, before)} if hits else {}
        output = self.model(input_ids=ids, attention_mask=mask, position_ids=kv_cache.positions(mask)[:, before:],
                            use_cache=True, **past, **self._last_logits_only)
        return output, mask

    def _decode(self) -> list[ipc.Token]:
        torch = self.torch
        last = torch.tensor([[s.generated[-1]] for s in self.running], device=self.device)
        positions = self.mask.sum(dim=-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        if self._lean is not None and self.joinable:  # the growing cache, whose check passed at load
            return self._sample(self._lean(last, self.mask, positions, self.cache)[:, -1, :], self.running)
        # transformers' generate() also gives attention-free models no mask after the prompt.
        mask = None if kv_cache.attention_free(self.cache) else self.mask
        output = self.model(input_ids=last, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{self._cache_keyword: self.cache})
        self.cache = kv_cache.cache_of(output)
        return self._sample(output.logits[:, -1, :], self.running)

    def _join(self, cache: Any, mask: Any) -> None:
        """Stack a prefilled cache onto the running batch's (left-padding the shorter one)."""
        torch = self.torch
        if self.cache is None:
            self.cache, self.mask = cache, mask
            self.joinable = kv_cache.stackable(cache)
            self.static = bool(self.static) or not self.joinable
            if self.joinable:
                kv_cache.grow_in_place(cache, self.max_running)
            return
        length = max(self.mask.shape[1], mask.shape[1])
        layers = zip(self.cache.layers, cache.layers, strict=True)
        if length == self.mask.shape[1] and self.cache.layers[0].room_for(mask.shape[0]):
            for old, new in layers:  # the common case: only the newcomers' rows are written
                old.append_rows(new.keys, new.values)
        else:  # a longer prompt: every row moves right
            for index, (old, new) in enumerate(layers):
                self.cache.layers[index] = kv_cache.growing_layer(
                    [old.keys, new.keys], [old.values, new.values], length, self.max_running)
        self.mask = torch.cat([kv_cache.left_pad(self.mask, length, dim=1), kv_cache.left_pad(mask, length, dim=1)])

    def _sample(self, logits: Any, sequences: list[Sequence]) -> list[ipc.Token]:
        torch = self.torch
        logits = logits.float()
        chosen = logits.argmax(dim=-1).tolist()  # greedy rows, all at once
        # A row whose scores overflowed (float16) ends alone: sampling it would raise for the step.
        broken = ((logits.isnan() | logits.isposinf()).any(dim=-1) | logits.isneginf().all(dim=-1)).tolist()
        for row, sequence in enumerate(sequences):
            if broken[row]:
                sequence.failed = ipc.Failed(ErrorKind.INTERNAL, "the model's scores for the next token were not "
                                             "finite (an overflow: try --dtype float32)")
            elif samples(sequence.parameters):
                chosen[row] = sample_one(torch, logits[row], sequence.parameters, sequence.generator)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen_logprobs = logprobs[torch.arange(len(chosen)), torch.tensor(chosen)].tolist()
        special_ids = self._special_ids
        tokens = []
        for sequence, token_id, logprob in zip(sequences, chosen, chosen_logprobs, strict=True):
            if sequence.failed is not None:
                continue
            sequence.generated.append(token_id)
            piece = sequence.next_piece(self.tokenizer.decode)
            if not piece and sequence.finish_reason(self.eos_ids) is not None:
                piece = sequence.next_piece(self.tokenizer.decode, final=True)  # it ends mid-character
            sequence.text += piece
            tokens.append(ipc.Token(sequence.stream_id, token_id, piece, logprob, token_id in special_ids))
        return tokens

    # --- leaving ----------------------------------------------------------------------------

    def _drop_cancelled(self) -> list[ipc.StreamEnd]:
        ended = [self._end(s, "cancelled") for s in self.waiting if s.cancelled]
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        leaving = [s for s in self.running if s.cancelled]
        ended += [self._end(s, "cancelled") for s in leaving]
        self._remember(leaving)
        self._keep([s for s in self.running if not s.cancelled])
        return ended

    def _drop_finished(self) -> list[ipc.StreamEnd]:
        ended, keep, leaving = [], [], []
        for sequence in self.running:
            reason = sequence.finish_reason(self.eos_ids)
            if reason is None:
                keep.append(sequence)
            else:
                ended.append(self._end(sequence, reason))
                leaving.append(sequence)
        self._remember(leaving)
        self._keep(keep)
        return ended

    def _remember(self, leaving: list[Sequence]) -> None:
        """Keep the keys and values of sequences leaving the batch, for prompts that start with them."""
        if self.prefixes is None or not self.joinable or not leaving:
            return
        for sequence in leaving:
            if sequence.failed is not None:  # its keys and values may hold the overflow
                continue
            tokens = sequence.prompt_ids + sequence.generated[:-1]  # the last token was never fed back
            row = self.running.index(sequence)
            if int(self.mask[row].sum()) != len(tokens):
                continue
            self.prefixes.keep(tokens, len(tokens) * self._bytes_per_position(),
                               functools.partial(self._copy_row, row))

    def _copy_row(self, row: int) -> list[tuple[Any, Any]]:
        """A row's real positions (a prefix reused in a batch left a gap in it), in host memory."""
        real = self.mask[row].nonzero().squeeze(1)
        return [(layer.keys[row:row + 1].index_select(2, real).to("cpu"),
                 layer.values[row:row + 1].index_select(2, real).to("cpu")) for layer in self.cache.layers]

    def _bytes_per_position(self) -> int:
        return sum((layer.keys.shape[1] * layer.keys.shape[3] + layer.values.shape[1] * layer.values.shape[3])
                   * layer.keys.element_size() for layer in self.cache.layers)

    def _keep(self, keep: list[Sequence]) -> None:
        """Drop the rows of sequences that left, and the leading columns no row needs."""
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self.cache, self.mask, self.joinable = [], None, None, True
            return
        torch = self.torch
        kept = [self.running.index(s) for s in keep]
        rows = torch.tensor(kept, device=self.device)
        if not self.joinable:
            # reorder_cache: every layer kind has it (recurrent states too), batch_select_indices not.
            self.cache.reorder_cache(rows)
            self.mask = self.mask[rows]
            self.running = keep
            return
        self.mask = self.mask[rows]
        first = int(self.mask.any(dim=0).nonzero()[0])
        if first < kv_cache.GROWTH:  # a few columns no row needs are cheaper to keep (masked) than to copy away
            first = 0
        for index, layer in enumerate(self.cache.layers):
            if first:
                keys, values = layer.keys[rows, :, first:], layer.values[rows, :, first:]
                self.cache.layers[index] = kv_cache.growing_layer([keys], [values], keys.shape[2], self.max_running)
            else:
                layer.keep_rows(kept)
        self.mask = self.mask[:, first:]
        self.running = keep

    def _end(self, sequence: Sequence, reason: str) -> ipc.StreamEnd:
        return ipc.StreamEnd(sequence.stream_id, reason, len(sequence.generated), len(sequence.prompt_ids),
                             sequence.seed, sequence.failed, cached_tokens=sequence.cached_tokens)

    def fail_all(self, error: ipc.Failed) -> list[ipc.StreamEnd]:
        """End every sequence with an error (the step raised); the engine starts afresh."""
        every = {id(s): s for s in [*self.waiting, *self.running]}  # one admitted as the step raised is in both
        ended = [ipc.StreamEnd(s.stream_id, "error", len(s.generated), len(s.prompt_ids), s.seed, error)
                 for s in every.values()]
        self.waiting.clear()
        self.running, self.cache, self.mask, self.joinable, self._decode_next = [], None, None, True, False
        if self.prefixes is not None:
            self.prefixes.clear()
        return ended
