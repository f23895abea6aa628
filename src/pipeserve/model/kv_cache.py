"""The generation engine's key/value cache: rows that join and leave without copying the others.

A plain DynamicCache of full-attention layers is turned into GrowingLayers: buffers with room
for more positions and for every row the engine may run, so that a decoding step writes its
keys and values in place, a newcomer is written into free rows, and a leaving row's place is
closed up by moving only the rows after it.
"""

from __future__ import annotations

from typing import Any


def stackable(cache: Any) -> bool:
    """A plain DynamicCache of full-attention layers: rows can be stacked and dropped."""
    kinds = _layer_kinds(cache)
    return bool(kinds) and kinds <= {"DynamicLayer", "GrowingLayer"}


def stacks(model: Any, first_token: list[int], device: Any) -> bool:
    """Whether the model's caches can be stacked, from a one-token pass (before a first prompt
    too long for one pass, which can be chunked only if they can)."""
    import torch  # noqa: PLC0415

    return stackable(cache_of(model(input_ids=torch.tensor([first_token], device=device), use_cache=True)))


def keyword(model: Any) -> str:
    """The forward's cache argument: transformers 5 renamed past_key_values to cache (the old name
    warns, then goes away)."""
    import inspect  # noqa: PLC0415

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """A forward's cache (transformers 5 renamed past_key_values to cache)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def attention_free(cache: Any) -> bool:
    """Only recurrent states (Mamba's): no layer attends, so a decoding step's attention mask is
    of no use to the model, and Mamba-style mixers would multiply their one new position by it
    (the mask's length, not the step's), as if the mask marked padding."""
    return _layer_kinds(cache) == {"LinearAttentionLayer"}


def _layer_kinds(cache: Any) -> set[str]:
    """The class names of the cache's layers (none for a cache without layers)."""
    return {type(layer).__name__ for layer in getattr(cache, "layers", None) or []}


_GROWING: Any = None
GROWTH = 64  # token positions of room added at a time


def growing_layer(keys: list[Any], values: list[Any], length: int, max_rows: int) -> Any:
    """A cache layer of these row blocks (each left-padded to `length`), with room to grow.

    transformers' DynamicLayer appends a step's key and value with torch.cat, copying the whole
    cache every step (16 % of a step at 16 rows x 100 positions, measured, and more as it grows);
    this one writes the step in place and copies only when it runs out of room. Its buffer has
    room for `max_rows` rows, so a newcomer whose prompt is no longer than the running rows is
    written into free rows, and rows that leave are closed up in place: neither copies the
    others (at 31 rows x 156 positions of GPT-2 small, a join went from 69 to ~1 ms and a leave
    from 70 to 18 ms, in-process).
    """
    global _GROWING  # noqa: PLW0603 - the class is made once, when torch is importable
    if _GROWING is None:
        import torch  # noqa: PLC0415
        from transformers.cache_utils import DynamicLayer  # noqa: PLC0415

        class GrowingLayer(DynamicLayer):  # type: ignore[misc]
            def adopt(self, keys: list[Any], values: list[Any], length: int, max_rows: int,
                      room: int = GROWTH) -> None:
                self._keys = _stack_left_padded(torch, keys, length, max_rows, room)
                self._values = _stack_left_padded(torch, values, length, max_rows, room)
                self._rows = sum(block.shape[0] for block in keys)
                self._length = length
                self._view()
                self.is_initialized, self.device = True, keys[0].device

            def _view(self) -> None:
                self.keys = self._keys[:self._rows, :, :self._length]
                self.values = self._values[:self._rows, :, :self._length]

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                added = key_states.shape[-2]
                if self._length + added > self._keys.shape[2]:
                    # Fresh room, for a whole prompt's rest where one is prefilled onto kept keys.
                    self.adopt([self.keys], [self.values], self._length, self._keys.shape[0], max(GROWTH, added))
                self._keys[:self._rows, :, self._length:self._length + added] = key_states
                self._values[:self._rows, :, self._length:self._length + added] = value_states
                self._length += added
                self._view()
                return self.keys, self.values

            def room_for(self, rows: int) -> bool:
                return bool(self._rows + rows <= self._keys.shape[0])

            def append_rows(self, keys: Any, values: Any) -> None:
                """Write rows no longer than this layer's, left-padded, into its free rows."""
                _place(self._keys, self._rows, keys, self._length)
                _place(self._values, self._rows, values, self._length)
                self._rows += keys.shape[0]
                self._view()

            def keep_rows(self, rows: list[int]) -> None:
                """Keep these rows (ascending), moving each down to its new index in place."""
                for new, old in enumerate(rows):
                    if new != old:
                        self._keys[new, :, :self._length] = self._keys[old, :, :self._length]
                        self._values[new, :, :self._length] = self._values[old, :, :self._length]
                self._rows = len(rows)
                self._view()

        _GROWING = GrowingLayer
    layer = _GROWING()
    layer.adopt(keys, values, length, max_rows)
    return layer


def _stack_left_padded(torch: Any, blocks: list[Any], length: int, max_rows: int, room: int = GROWTH) -> Any:
    """A buffer [max_rows, heads, length + room, dim] holding the blocks, each right-aligned at length.

    Each block is copied once.
    """
    first = blocks[0]
    rows = sum(block.shape[0] for block in blocks)
    buffer = torch.empty((row_capacity(rows, max_rows, first.device.type), first.shape[1], length + room,
                          first.shape[3]), dtype=first.dtype, device=first.device)
    row = 0
    for block in blocks:
        _place(buffer, row, block, length)
        row += block.shape[0]
    return buffer


def row_capacity(rows: int, max_rows: int, device_type: str) -> int:
    """Rows a layer's buffer is made with. On a CPU, room for `max_rows`: pages never written are
    never committed, so room costs nothing until used. A GPU commits the whole buffer at once (one
    stream of a 30k-token context on a Llama-3-8B-shaped model would take ~123 GB for 32 rows, and
    run out of memory where ~4 GB serves it), so there room doubles with need, up to `max_rows`."""
    if device_type == "cpu":
        return max(rows, max_rows)
    return max(rows, min(max_rows, 2 * rows))


def _place(buffer: Any, row: int, block: Any, length: int) -> None:
    """Copy a block of rows into the buffer from `row` on, right-aligned at `length`.

    Only its left padding is zeroed: it is masked out, but never garbage (a NaN there would
    survive the mask).
    """
    count, pad = block.shape[0], length - block.shape[2]
    buffer[row:row + count, :, :pad].zero_()
    buffer[row:row + count, :, pad:length] = block


def past(prefixes: list[list[tuple[Any, Any]]], length: int) -> Any:
    """A cache of kept prefixes' keys and values (per row, per layer), each row left-padded to
    `length`: a copy, which the prefill of the prompts' rests then writes into."""
    from transformers.cache_utils import DynamicCache  # noqa: PLC0415

    cache = DynamicCache()
    cache.layers = [growing_layer([row[layer][0] for row in prefixes], [row[layer][1] for row in prefixes],
                                  length, len(prefixes)) for layer in range(len(prefixes[0]))]
    return cache


def grow_in_place(cache: Any, max_rows: int) -> None:
    for index, layer in enumerate(cache.layers):
        cache.layers[index] = growing_layer([layer.keys], [layer.values], layer.keys.shape[2], max_rows)


def positions(mask: Any) -> Any:
    """Each real token's position in its left-padded row (padding at 0)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def left_pad(tensor: Any, length: int, dim: int) -> Any:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    import torch  # noqa: PLC0415

    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)
