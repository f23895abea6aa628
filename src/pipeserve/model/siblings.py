"""Linear layers that read the same input, multiplied as one: a generator's query, key and value
projections, its MLP's gate and up projections. In the model process, for text generation.

A decoding step multiplies a few rows by every matrix of the model, one call per matrix: for one
stream, each call's fixed cost (its dispatch, the quantisation of its activations for int8) is a
good part of the step. Layers of one parent that are handed the very same input tensor can be one
call on their weights stacked: on bench/LLAMACPP.md's model (12 layers, int8 with 8-bit
activations, 2 cores), the q/k/v and gate/up products took 5.8 -> 4.3 ms for one row, 11.2 -> 8.4
for 16 and 16.0 -> 11.9 for 32 (scratch measurement, weights streaming from memory).

Which layers read the same input is not guessed from their names: one forward pass of a few
tokens, with a hook on every layer, records which input each was handed; layers of one parent
handed the same tensor object, once each, form a group. Each keeps its place in the model as a
`Sibling` that answers its own slice of the group's product. Every output channel of the stacked
product is its own layer's: the same weights, the same input, the same per-channel scales. With
8-bit activations the int32 sums are exact, so the answers are bit for bit the separate layers'.
A float product (oneDNN's, or weight-only int8's converted weights above its kernel's rows) is
wider than each member's, and a library may split its sums differently for another width: bit
for bit the same at the tests' shapes and the bench model's, but only the warm-up check guards
other shapes (as it guards packing itself).

The first member a step calls computes the group's product and keeps it for the others, who are
answered from it only when handed that same tensor object; the product is dropped once every member
has had its slice. A member handed any other input computes the whole group's product on it
(correct, with the other members' share of the work wasted) and a warning says so once: a model
calling its projections otherwise than in the probe still gets its answers.

Each member's output is a view of the group's product, strided where it has several rows (one
row's slice is contiguous): no copy, and the group's activations held once. Every family tested
only splits a projection's last dimension, which a view allows; a model whose code needs the
output contiguous (a .view that flattens it) fails a second probe pass on the stacked model at
load, and its members copy their slices out instead. On bench/LLAMACPP.md's model, in-process,
three rounds, a prefill (1 prompt of 2,000 tokens; 8 of 500) stacked against separate: bf16
0-6 % slower with views (1-13 % with copies), int8 from 1 % faster to 17 % slower, within
this box's noise: the gain is the decoding steps'. At load the group's weights are concatenated, in
float32, before the stacked layer is made from them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeserve.model import prepack

log = logging.getLogger("pipeserve.model")

# The probe's input: a few token ids every vocabulary has.
PROBE_IDS = [1, 2, 3]

Group = list[tuple[Any, str]]  # (parent module, attribute name) of each member, in call order


def swap(model: Any, torch: Any, make: Callable[[Any, Any], Any] | None = None) -> prepack.Swapped:
    """prepack.swap, with the groups of layers that read the same input stacked into one layer
    each (`make` of the stacked weights); (parent, name, replaced layer) for each, for
    prepack.restore."""
    make = make or prepack.packed_linear_class(torch)
    swapped, stacked = fuse(model, torch, make, find(model, torch))
    try:
        swapped += prepack.swap(model, torch, make)
        _copies_where_needed(model, torch, stacked)
    except BaseException:
        prepack.restore(swapped)
        raise
    return swapped


def _copies_where_needed(model: Any, torch: Any, stacked: list[Shared]) -> None:
    """Members hand out views of the group's product; where the model's own code cannot take one
    (it flattens a projection's output with .view), the probe fails on the stacked model, and
    members copy their slices out instead."""
    if not stacked:
        return
    try:
        _probe(model, torch)
    except Exception as exc:  # noqa: BLE001 - any failure on views means copies; the caller's
        # own check (packing's, int8's agreement) then runs the model with them
        log.info("stacked projections hand out copies: the model failed on views of them (%s)", type(exc).__name__)
        for shared in stacked:
            shared.copies = True
            shared.forget()  # the failed pass left a product waiting for members never called


def find(model: Any, torch: Any) -> list[Group]:
    """The groups of Linear layers of one parent handed the same input tensor, once each, in a
    forward pass of PROBE_IDS; none where that pass fails (a model that needs more inputs)."""
    handed: dict[int, Group] = {}
    kept: list[Any] = []  # the inputs, alive, so that no id is reused during the pass
    calls: dict[int, int] = {}
    handles = []

    def record(parent: Any, name: str, layer: Any, args: tuple[Any, ...]) -> None:
        if args:
            kept.append(args[0])
            handed.setdefault(id(args[0]), []).append((parent, name))
        calls[id(layer)] = calls.get(id(layer), 0) + 1

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if prepack.linear_weight(child, torch) is not None:
                handles.append(child.register_forward_pre_hook(
                    lambda layer, args, parent=parent, name=name: record(parent, name, layer, args)))
    try:
        _probe(model, torch)
    except Exception as exc:  # noqa: BLE001 - no probe, no groups: every layer stays its own
        log.info("no stacked projections: a forward pass of %d tokens failed (%s)", len(PROBE_IDS),
                 type(exc).__name__)
        return []
    finally:
        for handle in handles:
            handle.remove()
    return [group for members in handed.values() for group in _by_parent(members)
            if all(calls[id(getattr(parent, name))] == 1 for parent, name in group)]


def _probe(model: Any, torch: Any) -> None:
    with torch.inference_mode():
        model(input_ids=torch.tensor([PROBE_IDS], device=model.device))


def _by_parent(members: Group) -> list[Group]:
    """Members of one input split by parent: two or more under one parent form a group."""
    parents: dict[int, Group] = {}
    for parent, name in members:
        parents.setdefault(id(parent), []).append((parent, name))
    return [group for group in parents.values() if len(group) >= 2]


def fuse(model: Any, torch: Any, make: Callable[[Any, Any], Any],
         groups: list[Group]) -> tuple[prepack.Swapped, list[Shared]]:
    """Replace each group's layers with Siblings of one `make(stacked weights, stacked bias)`:
    the layers replaced (for prepack.restore), and each group's Shared."""
    sibling = _sibling_class(torch)
    swapped: prepack.Swapped = []
    made: list[Shared] = []
    try:
        for group in groups:
            layers = [getattr(parent, name) for parent, name in group]
            weights: list[Any] = [prepack.linear_weight(layer, torch) for layer in layers]
            stacked = make(torch.cat([weight.detach() for weight in weights]), _stacked_bias(layers, weights, torch))
            shared = Shared(stacked, len(group), "/".join(name for _, name in group))
            made.append(shared)
            start = 0
            for member, ((parent, name), layer, weight) in enumerate(zip(group, layers, weights, strict=True)):
                setattr(parent, name, sibling(shared, member, start, start + weight.shape[0]))
                swapped.append((parent, name, layer))
                start += weight.shape[0]
    except BaseException:
        prepack.restore(swapped)
        raise
    if groups:
        log.info("stacked %d groups of linear layers that read the same input (%d layers)", len(groups),
                 len(swapped))
    return swapped, made


def _stacked_bias(layers: list[Any], weights: list[Any], torch: Any) -> Any:
    """The members' biases end to end, zeros for a member without one; None where none has one."""
    if all(layer.bias is None for layer in layers):
        return None
    return torch.cat([layer.bias.detach() if layer.bias is not None
                      else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                      for layer, weight in zip(layers, weights, strict=True)])


class Shared:
    """A group's stacked layer, and its last product until every member has had its slice."""

    def __init__(self, layer: Any, members: int, names: str) -> None:
        self.layer = layer
        self.members = members
        self.names = names
        self._input: Any = None
        self._output: Any = None
        self._waiting: set[int] = set()  # members not yet answered from _output
        self.copies = False  # members copy their slices out (the model cannot take views)
        self.missed = 0  # products computed while members still waited for the last one's slices

    def forget(self) -> None:
        self._input = self._output = None
        self._waiting = set()

    def output_for(self, member: int, x: Any) -> Any:
        if x is self._input and member in self._waiting:
            output = self._output
            self._waiting.discard(member)
        else:
            if self._waiting:
                self.missed += 1
                if self.missed == 1:
                    log.warning("stacked layers %s were handed different inputs: each call computes the "
                                "whole group's product", self.names)
            output = self.layer(x)
            self._input, self._output = x, output
            self._waiting = set(range(self.members)) - {member}
        if not self._waiting:  # every member answered: hold nothing between steps
            self.forget()
        return output


def _sibling_class(torch: Any) -> Any:
    class Sibling(torch.nn.Module):  # type: ignore[misc]
        """One member of a stacked group: its output channels of the group's product."""

        def __init__(self, shared: Shared, member: int, start: int, stop: int) -> None:
            super().__init__()
            # Registered once under each member: the model's .to() and casts reach the stacked layer.
            self.stacked = shared.layer
            self.shared = shared
            self.member = member
            self.start, self.stop = start, stop
            self.out_features = stop - start

        def forward(self, x: Any) -> Any:
            # A view: copies cost more per prefill (see the module doc) and held the group's
            # activations twice. One row's slice is contiguous anyway.
            output = self.shared.output_for(self.member, x)[..., self.start:self.stop]
            return output.contiguous() if self.shared.copies else output

    return Sibling
