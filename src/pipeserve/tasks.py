"""How to call each kind of pipeline on a batch, and get back one plain output per input.

Runs in the model process. transformers pipelines nest one input and a list differently
(FillMaskPipeline returns `outputs[0]` for a one-element list) and pad batched per-token outputs
(feature-extraction); a `BatchCall` hides that, so one input's answer has the same shape, and
the same values, whether it ran alone or in a batch of 32.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

from pipeserve import ipc, outputs


class BatchCall:
    """A loaded pipeline: `call(inputs, parameters)` -> one plain output per input."""

    task = "custom"
    ready: ipc.Ready

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        results = list(self.run(inputs, parameters))
        if len(results) != len(inputs):
            raise RuntimeError(f"pipeline returned {len(results)} outputs for {len(inputs)} inputs")
        return [outputs.to_plain(result) for result in results]

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        return self.function(inputs, **parameters)  # type: ignore[no-any-return]

    def accepted_parameters(self) -> tuple[str, ...] | None:
        return keyword_names(self.function)

    def warmup_inputs(self) -> list[Any] | None:
        custom = getattr(self.function, "warmup_inputs", None)
        return list(custom) if custom is not None else None


# Text longer than the model's maximum is truncated by default where the task allows it, so an
# over-long input is never a crash (an index error in the position embeddings). fill-mask takes
# tokenizer options in a dict of their own.
_DEFAULT_PARAMETERS: dict[str, dict[str, Any]] = {
    "text-classification": {"truncation": True},
    "feature-extraction": {"truncation": True},
    "fill-mask": {"tokenizer_kwargs": {"truncation": True}},
}


class PipelineBatchCall(BatchCall):
    """A transformers Pipeline, called with the whole batch as a list and batch_size=len."""

    def __init__(self, pipe: Any, task: str) -> None:
        super().__init__(pipe)
        self.task = task
        # FillMaskPipeline returns outputs[0] for a one-element list: undo that.
        self._unwraps_single = type(pipe).__name__ == "FillMaskPipeline"
        self._defaults = _DEFAULT_PARAMETERS.get(task, {})
        _cap_tokenizer_length(pipe)

    def with_defaults(self, parameters: dict[str, Any]) -> dict[str, Any]:
        merged = dict(self._defaults)
        for name, value in parameters.items():
            default = merged.get(name)
            merged[name] = {**default, **value} if isinstance(default, dict) and isinstance(value, dict) else value
        return merged

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        parameters = self.with_defaults(parameters)
        results = self.function(inputs, batch_size=len(inputs), **parameters)
        return [results] if self._unwraps_single and len(inputs) == 1 else results  # type: ignore[no-any-return]

    def accepted_parameters(self) -> tuple[str, ...] | None:
        """The keywords the pipeline takes, so the front can reject unknown ones early.

        `_sanitize_parameters` names them, except what it forwards through `**kwargs`: to the
        tokenizer (`**tokenizer_kwargs`) or to `generate` (`**generate_kwargs`), whose keywords
        can be listed too. A pipeline that reads a bare `**kwargs` itself (zero-shot) validates
        its own input (None).
        """
        signature = inspect.signature(self.function._sanitize_parameters)
        names = list(explicit_keywords(self.function._sanitize_parameters, takes_inputs=False))
        forwarded = next((p.name for p in signature.parameters.values()
                          if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        if forwarded is None:
            return tuple(names)
        if "token" in forwarded and getattr(self.function, "tokenizer", None) is not None:
            names += explicit_keywords(type(self.function.tokenizer).__call__)
        elif "generate" in forwarded:
            from transformers import GenerationConfig  # noqa: PLC0415

            names += list(GenerationConfig().to_dict())
        else:
            return None
        return tuple(sorted(set(names)))

    def warmup_inputs(self) -> list[Any] | None:
        tokenizer = getattr(self.function, "tokenizer", None)
        if self.task == "fill-mask" and tokenizer is not None:
            return [f"Warm up the {tokenizer.mask_token} model."]
        return ["Warm up the model."]


class FeatureExtractionBatchCall(PipelineBatchCall):
    """Per-token embeddings without the padding a batch adds, as numpy arrays.

    A batched feature-extraction call pads every input to the longest one and returns the pad
    positions too; we cut each output back to its own token count. Asking the pipeline for
    tensors skips its conversion to nested Python lists (orjson writes arrays directly).
    """

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        results = super().run(inputs, {**parameters, "return_tensors": True})
        if len(inputs) == 1:
            return results
        lengths = self._token_counts(inputs, parameters)
        left = getattr(self.function.tokenizer, "padding_side", "right") == "left"
        return [result[:, -length:] if left else result[:, :length]
                for result, length in zip(results, lengths)]

    def _token_counts(self, inputs: list[Any], parameters: dict[str, Any]) -> list[int]:
        parameters = self.with_defaults(parameters)
        tokenize_kwargs = dict(parameters.get("tokenize_kwargs") or {})
        if parameters.get("truncation") is not None:
            tokenize_kwargs["truncation"] = parameters["truncation"]
        encoded = self.function.tokenizer(inputs, **tokenize_kwargs)
        return [len(ids) for ids in encoded["input_ids"]]

    def accepted_parameters(self) -> tuple[str, ...] | None:
        # The pipeline ignores unknown keywords silently; we reject them. return_tensors is ours.
        return ("tokenize_kwargs", "truncation")


def _cap_tokenizer_length(pipe: Any) -> None:
    """Make the tokenizer truncate at what the model's position embeddings can take.

    A tokenizer saved without `model_max_length` reports a huge one, and truncation then
    does nothing; the model's config knows the real limit.
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    config = getattr(getattr(pipe, "model", None), "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if tokenizer is None or not isinstance(positions, int):
        return
    # RoBERTa-style models reserve the first two positions (padding offset).
    usable = positions - 2 if "roberta" in str(getattr(config, "model_type", "")) else positions
    if tokenizer.model_max_length > usable:
        tokenizer.model_max_length = usable


# --- loading ----------------------------------------------------------------------------------


def load_custom(spec: ipc.WorkerSpec) -> BatchCall:
    """Call the --pipeline factory (with the WorkerSpec if it takes an argument)."""
    module_name, _, attr = (spec.pipeline or "").partition(":")
    factory: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    function = factory(spec) if inspect.signature(factory).parameters else factory()
    if not callable(function):
        raise TypeError(f"{spec.pipeline} returned {type(function).__name__}, not a callable")
    call = BatchCall(function)
    call.task = spec.task or "custom"
    return call


def load_transformers(spec: ipc.WorkerSpec, device: str, torch: Any) -> BatchCall:
    from transformers import pipeline  # noqa: PLC0415

    task = spec.task or infer_task(spec.model)
    kwargs: dict[str, Any] = {"device": device}
    if spec.dtype != "auto":
        kwargs["dtype"] = getattr(torch, spec.dtype)
    elif device != "cpu":
        kwargs["dtype"] = "auto"
    pipe = pipeline(task, model=spec.model, **kwargs)
    task = pipe.task or task
    if task == "feature-extraction":
        return FeatureExtractionBatchCall(pipe, task)
    return PipelineBatchCall(pipe, task)


_ARCHITECTURE_TASKS = (
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForAudioClassification", "audio-classification"),
    ("ForSpeechSeq2Seq", "automatic-speech-recognition"),
    ("ForCTC", "automatic-speech-recognition"),
)


def infer_task(model: str) -> str:
    """The task for a model: from its config's architectures when it is a local folder.

    transformers infers a task only through the hub, which a local path (or an offline machine)
    does not have. A sentence-transformers folder, or a bare encoder (`BertModel`), is served as
    feature-extraction.
    """
    if not os.path.isdir(model):
        from transformers.pipelines import get_task  # noqa: PLC0415 - a hub id: ask the hub

        return str(get_task(model))
    if os.path.exists(os.path.join(model, "modules.json")):
        return "feature-extraction"
    config_path = os.path.join(model, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError("no config.json in the model folder")
    with open(config_path) as handle:
        architectures = json.load(handle).get("architectures") or []
    for architecture in architectures:
        for suffix, task in _ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                return task
    if architectures and architectures[0].endswith("Model"):
        return "feature-extraction"
    raise ValueError(f"cannot infer a task from architectures {architectures}; pass --task")


# --- signatures -------------------------------------------------------------------------------


def keyword_names(function: Callable[..., Any]) -> tuple[str, ...] | None:
    """The keyword parameters a callable takes besides its inputs, or None if it takes **kwargs."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return explicit_keywords(function)


def explicit_keywords(function: Callable[..., Any], takes_inputs: bool = True) -> tuple[str, ...]:
    """The named keyword parameters of a callable, without self and its inputs parameter."""
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in inspect.signature(function).parameters.values()
             if p.kind in keyword_kinds]
    if names and names[0] == "self":
        names = names[1:]
    return tuple(names[1:] if takes_inputs else names)
