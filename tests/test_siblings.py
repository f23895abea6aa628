"""Stacked projections (model/siblings.py): the layers a generator hands the same input, found by a
probe and multiplied as one, answer exactly what the separate layers answer, in every family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeserve.model import precision
from test_families import FAMILIES, _model

_VNNI = pytest.mark.skipif(not precision.has_vnni(), reason="8-bit activations need AVX-512 VNNI")
# How each kind of layer is made, by name: the layers served for --dtype int8 (both kinds) and
# for float32 or bfloat16 (packed for oneDNN).
LAYERS = [pytest.param("int8x8", marks=_VNNI), "int8-weight-only", "packed-float32", "packed-bfloat16"]


def _tokenizer(task_models: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(task_models["text-generation"])


def _swap(model: Any, kind: str, stacked: bool) -> None:
    import torch

    from pipeserve.model import prepack, siblings, weight_int8

    if kind.startswith("int8"):
        swap = siblings.swap if stacked else prepack.swap
        swap(model, torch, weight_int8._layer_class(torch, kind == "int8x8"))
        precision.cast(model, _rest(kind))  # as weight_int8.quantize leaves it
        return
    if kind == "packed-bfloat16":
        precision.cast(model, torch.bfloat16)
    (siblings.swap if stacked else prepack.swap)(model, torch)


def _rest(kind: str) -> Any:
    """The dtype of what is not a Linear layer, as served: float32 beside 8-bit activations."""
    import torch

    return torch.float32 if kind in ("int8x8", "packed-float32") else torch.bfloat16


def _names(group: list[tuple[Any, str]]) -> tuple[str, ...]:
    return tuple(name for _, name in group)


ATTENTION, MLP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
# The groups each family's layers form (in each of the 2 layers of the tiny configs).
GROUPS: dict[str, set[tuple[str, ...]]] = {
    "llama": {ATTENTION, MLP}, "qwen2": {ATTENTION, MLP}, "mistral-sliding-window": {ATTENTION, MLP},
    "gemma": {ATTENTION, MLP}, "opt": {ATTENTION},
    "lfm2-hybrid": {ATTENTION, ("w1", "w3")},  # its one attention layer; both layers' w1/w3
    "phi3": set(), "gpt-neox": set(),  # their query, key and value (and gate, up) are one layer already
    "mamba": set(),
}
# How many groups, and layers in them, each family's tiny config has.
COUNTS = {"llama": (4, 10), "qwen2": (4, 10), "mistral-sliding-window": (4, 10), "gemma": (4, 10), "opt": (2, 6),
          "lfm2-hybrid": (3, 7), "phi3": (0, 0), "gpt-neox": (0, 0), "mamba": (0, 0)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_probe_finds_the_layers_handed_one_input(family: str, task_models: dict[str, Path]) -> None:
    import torch

    from pipeserve.model import siblings

    model = _model(family, _tokenizer(task_models))
    groups = siblings.find(model, torch)
    assert {_names(group) for group in groups} == GROUPS[family]
    assert (len(groups), sum(len(group) for group in groups)) == COUNTS[family]
    assert all(len({id(parent) for parent, _ in group}) == 1 for group in groups)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("family", [name for name in FAMILIES if GROUPS[name]])
def test_stacked_layers_answer_exactly_what_separate_ones_answer(family: str, kind: str,
                                                                 task_models: dict[str, Path]) -> None:
    """Every output channel of a stacked product is its own layer's: the logits are bit for bit
    those of the same model with separate layers, over a prompt and over one-token steps on a cache."""
    import inspect

    import torch

    from pipeserve.model import kv_cache

    tokenizer = _tokenizer(task_models)
    logits = []
    for stacked in (False, True):
        model = _model(family, tokenizer)
        _swap(model, kind, stacked)
        members = [m for m in model.modules() if type(m).__name__ == "Sibling"]
        assert len(members) == (COUNTS[family][1] if stacked else 0)
        ids = tokenizer("hello world from the big city", return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
            keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            step = model(input_ids=ids[:, :1], use_cache=True, **{keyword: kv_cache.cache_of(out)})
        logits.append((out.logits, step.logits))
    assert torch.equal(logits[0][0], logits[1][0]) and torch.equal(logits[0][1], logits[1][1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", LAYERS)
def test_a_member_handed_another_input_computes_its_own(kind: str, task_models: dict[str, Path]) -> None:
    """A model calling its projections otherwise than in the probe still gets each one's answer;
    and once every member has had its slice, the group holds no product between steps."""
    import torch

    tokenizer = _tokenizer(task_models)
    separate, stacked = (_model("llama", tokenizer) for _ in range(2))
    _swap(separate, kind, stacked=False)
    _swap(stacked, kind, stacked=True)
    plain, fused = separate.model.layers[0].self_attn, stacked.model.layers[0].self_attn
    dtype = _rest(kind)
    x, y = torch.randn(2, 3, 32, dtype=dtype), torch.randn(2, 3, 32, dtype=dtype)
    with torch.inference_mode():
        answers = [fused.q_proj(x), fused.k_proj(y), fused.v_proj(x), fused.k_proj(x), fused.q_proj(x)]
        expected = [plain.q_proj(x), plain.k_proj(y), plain.v_proj(x), plain.k_proj(x), plain.q_proj(x)]
        for got, want in zip(answers, expected, strict=True):
            assert torch.equal(got, want)
        assert fused.q_proj.shared._output is None  # the last product answered q, k and v: released
        assert fused.q_proj.shared.missed == 2  # k(y) and v(x) each came while slices still waited
        fused.v_proj(x), fused.q_proj(x)
        assert fused.q_proj.shared._output is not None  # k's slice still waits
        fused.k_proj(x)
        assert fused.q_proj.shared._output is None


@pytest.mark.timeout(60)
def test_a_model_the_probe_cannot_run_keeps_separate_layers_and_is_still_packed() -> None:
    import torch

    from pipeserve.model import siblings

    class TwoInputs(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
            self.device = torch.device("cpu")

        def forward(self, input_ids: Any, required: Any) -> Any:
            return self.a(required) + self.b(required)

    model = TwoInputs()
    assert siblings.find(model, torch) == []
    swapped = siblings.swap(model, torch)
    assert [name for _, name, _ in swapped] == ["a", "b"]
    assert type(model.a).__name__ == "PackedLinear"


def _block_model(torch: Any, width: int, wide: int) -> Any:
    """A module whose forward hands one input to five projections, with and without a bias."""

    class Block(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(8, width)
            self.q = torch.nn.Linear(width, width, bias=True)
            self.k = torch.nn.Linear(width, width // 2, bias=False)
            self.v = torch.nn.Linear(width, width // 2, bias=True)
            self.gate, self.up = torch.nn.Linear(width, wide, bias=False), torch.nn.Linear(width, wide, bias=False)
            self.device = torch.device("cpu")

        def forward(self, input_ids: Any) -> Any:
            return self.project(self.embed(input_ids))

        def project(self, x: Any) -> list[Any]:
            return [self.q(x), self.k(x), self.v(x), self.gate(x), self.up(x)]

    torch.manual_seed(0)
    return Block().eval()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", LAYERS)
def test_stacked_layers_at_full_width_with_mixed_biases_answer_exactly(kind: str) -> None:
    """At the bench model's widths (768 in; 768, 384, 384 and 2 x 3072 out, one group of five),
    for a decoding step's rows and a prefill's: the float products split their sums the same way
    at the stacked width, and a member without a bias gets none."""
    import torch

    models = [_block_model(torch, 768, 3072) for _ in range(2)]
    for model, stacked in zip(models, (False, True), strict=True):
        _swap(model, kind, stacked)
    assert len([m for m in models[1].modules() if type(m).__name__ == "Sibling"]) == 5
    dtype = _rest(kind)
    for rows in (1, 4, 9, 64, 300):
        x = torch.randn(1, rows, 768, dtype=dtype)
        with torch.inference_mode():
            for got, want in zip(models[1].project(x), models[0].project(x), strict=True):
                assert torch.equal(got, want), (kind, rows)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["llama", "lfm2-hybrid"])
def test_the_engine_hands_each_group_one_input(family: str, task_models: dict[str, Path]) -> None:
    """Through the engine (prefills, a stream joining, one-token steps), every member is answered
    from its group's one product: no group ever computes it twice for one input."""
    from pipeserve import ipc
    from pipeserve.model.generation import Engine
    from test_families import GREEDY, _run

    tokenizer = _tokenizer(task_models)
    model = _model(family, tokenizer)
    _swap(model, "packed-bfloat16", stacked=True)
    engine = Engine(model, tokenizer, max_running=4)
    engine.add(ipc.Generate(1, "the good movie", GREEDY))
    _run(engine, steps=2)
    engine.add(ipc.Generate(2, "hello world this is a longer prompt", GREEDY))
    assert _run(engine)
    groups = {id(m.shared): m.shared for m in model.modules() if type(m).__name__ == "Sibling"}
    assert len(groups) == COUNTS[family][0]
    assert [group.missed for group in groups.values()] == [0] * len(groups)


@pytest.mark.timeout(60)
def test_a_model_that_flattens_a_projection_gets_copies() -> None:
    """Members hand out views of the group's product; a model whose code cannot take one (a
    .view that flattens it) fails the probe on the stacked model, and its members copy instead."""
    import torch

    from pipeserve.model import prepack, siblings

    class Flattens(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(8, 16)
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
            self.device = torch.device("cpu")

        def forward(self, input_ids: Any) -> Any:
            x = self.embed(input_ids)
            return self.a(x).view(-1) + self.b(x).view(-1)

    def model() -> Any:
        torch.manual_seed(0)
        return Flattens().eval()

    separate, stacked = model(), model()
    prepack.swap(separate, torch)
    siblings.swap(stacked, torch)
    assert type(stacked.a).__name__ == "Sibling" and stacked.a.shared.copies
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(stacked(ids), separate(ids))
    assert stacked.a.shared.missed == 0  # the failed probe's half-used product was forgotten


@pytest.mark.timeout(60)
def test_members_of_the_families_hand_out_views(task_models: dict[str, Path]) -> None:
    """No copy where the model takes a view: a prefill's members are strided slices of one product."""
    import torch

    model = _model("llama", _tokenizer(task_models))
    _swap(model, "packed-float32", stacked=True)
    attention = model.model.layers[0].self_attn
    assert not attention.q_proj.shared.copies
    x = torch.randn(1, 5, 32)
    with torch.inference_mode():
        q, _, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
    assert not q.is_contiguous() and q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
