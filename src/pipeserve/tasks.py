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
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeserve import ipc, media, outputs


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

    input_kind = "text"

    def warmup(self) -> tuple[list[Any], dict[str, Any]] | None:
        """Inputs and parameters for one warm-up call, or None to skip it."""
        custom = getattr(self.function, "warmup_inputs", None)
        return (list(custom), {}) if custom is not None else None


# Text longer than the model's maximum is truncated by default where the task allows it, so an
# over-long input is never a crash (an index error in the position embeddings). fill-mask takes
# tokenizer options in a dict of their own.
_DEFAULT_PARAMETERS: dict[str, dict[str, Any]] = {
    "text-classification": {"truncation": True},
    "feature-extraction": {"truncation": True},
    "fill-mask": {"tokenizer_kwargs": {"truncation": True}},
}


_WARMUP_PARAMETERS: dict[str, dict[str, Any]] = {
    "zero-shot-classification": {"candidate_labels": ["warm", "up"]},
    "text-generation": {"max_new_tokens": 1},
}
# Pipelines that read a bare **kwargs themselves: the keywords they document.
_KNOWN_PARAMETERS: dict[str, tuple[str, ...]] = {
    "zero-shot-classification": ("candidate_labels", "hypothesis_template", "multi_label"),
}


class PipelineBatchCall(BatchCall):
    """A transformers Pipeline, called with the whole batch as a list and batch_size=len."""

    def __init__(self, pipe: Any, task: str) -> None:
        super().__init__(pipe)
        self.pipe: Any = pipe  # the same object, typed for its attributes
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
        signature = inspect.signature(self.pipe._sanitize_parameters)
        names = list(explicit_keywords(self.pipe._sanitize_parameters, takes_inputs=False))
        forwarded = next((p.name for p in signature.parameters.values()
                          if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        if self.task in _KNOWN_PARAMETERS:
            return tuple(sorted(set(names) | set(_KNOWN_PARAMETERS[self.task])))
        if forwarded is None:
            return tuple(names)
        if "token" in forwarded and getattr(self.pipe, "tokenizer", None) is not None:
            names += explicit_keywords(type(self.pipe.tokenizer).__call__)
        elif "generate" in forwarded:
            from transformers import GenerationConfig  # noqa: PLC0415

            names += list(GenerationConfig().to_dict())
        else:
            return None
        return tuple(sorted(set(names)))

    def warmup(self) -> tuple[list[Any], dict[str, Any]] | None:
        """One input the task can take (zero-shot needs labels, fill-mask a mask token)."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if self.task == "fill-mask" and tokenizer is not None:
            return [f"Warm up the {tokenizer.mask_token} model."], {}
        return ["Warm up the model."], _WARMUP_PARAMETERS.get(self.task, {})


POOLING_MODES = ("mean", "cls", "max", "none")


@dataclass(frozen=True)
class SentencePooling:
    """How a sentence-transformers model turns token vectors into one sentence vector."""

    mode: str = "none"
    normalize: bool = False
    max_seq_length: int | None = None


def read_sentence_pooling(model: str) -> SentencePooling:
    """The pooling a sentence-transformers folder ships (modules.json, 1_Pooling/config.json)."""
    modules_path = os.path.join(model, "modules.json")
    if not os.path.isfile(modules_path):
        return SentencePooling()
    with open(modules_path) as handle:
        modules = json.load(handle)
    mode, normalize = "none", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            with open(os.path.join(model, module.get("path", ""), "config.json")) as handle:
                pooling = json.load(handle)
            for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                              ("pooling_mode_max_tokens", "max")):
                if pooling.get(key):
                    mode = name
                    break
    max_seq_length = None
    bert_config = os.path.join(model, "sentence_bert_config.json")
    if os.path.isfile(bert_config):
        with open(bert_config) as handle:
            max_seq_length = json.load(handle).get("max_seq_length")
    return SentencePooling(mode, normalize, max_seq_length)


class FeatureExtractionBatchCall(PipelineBatchCall):
    """Embeddings: per-token without the padding a batch adds, or pooled into one vector.

    A batched feature-extraction call pads every input to the longest one and returns the pad
    positions too; we cut each output back to its own token count, so a per-token answer, and
    a mean over tokens, never depends on what else was in the batch. `pooling` (mean, cls, max,
    none) and `normalize` default to the model's own sentence-transformers configuration, as the
    Hugging Face Inference API does, and to per-token output otherwise. Asking the pipeline for
    tensors skips its conversion to nested Python lists (orjson writes arrays directly).
    """

    def __init__(self, pipe: Any, task: str, pooling: SentencePooling) -> None:
        super().__init__(pipe, task)
        self.pooling = pooling
        if pooling.max_seq_length and pipe.tokenizer.model_max_length > pooling.max_seq_length:
            pipe.tokenizer.model_max_length = pooling.max_seq_length

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        options = dict(parameters)
        mode = options.pop("pooling", self.pooling.mode)
        normalize = options.pop("normalize", self.pooling.normalize)
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, not {mode!r}")
        if not isinstance(normalize, bool):
            raise ValueError("normalize must be true or false")
        results = [np.asarray(outputs.to_plain(r))
                   for r in super().run(inputs, {**options, "return_tensors": True})]
        if len(inputs) > 1:
            lengths = self._token_counts(inputs, options)
            left = getattr(self.pipe.tokenizer, "padding_side", "right") == "left"
            results = [r[:, -n:] if left else r[:, :n] for r, n in zip(results, lengths)]
        return [_pool(tokens, mode, normalize) for tokens in results]

    def _token_counts(self, inputs: list[Any], parameters: dict[str, Any]) -> list[int]:
        parameters = self.with_defaults(parameters)
        tokenize_kwargs = dict(parameters.get("tokenize_kwargs") or {})
        if parameters.get("truncation") is not None:
            tokenize_kwargs["truncation"] = parameters["truncation"]
        encoded = self.pipe.tokenizer(inputs, **tokenize_kwargs)
        return [len(ids) for ids in encoded["input_ids"]]

    def accepted_parameters(self) -> tuple[str, ...] | None:
        # The pipeline silently ignores keywords it does not name; we reject them instead.
        return ("normalize", "pooling", "tokenize_kwargs", "truncation")


def _pool(tokens: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """tokens: [1, T, H] for one input -> [H] (or [1, T, H] for "none"), optionally unit length."""
    if mode == "mean":
        vector = tokens[0].mean(axis=0)
    elif mode == "cls":
        vector = tokens[0, 0]
    elif mode == "max":
        vector = tokens[0].max(axis=0)
    else:
        vector = tokens
    if normalize:
        norm = np.linalg.norm(vector, axis=-1, keepdims=True)
        vector = vector / np.maximum(norm, 1e-12)
    return np.ascontiguousarray(vector, dtype=np.float32)


IMAGE_TASKS = frozenset({"image-classification", "image-segmentation", "object-detection",
                         "image-to-text", "depth-estimation", "image-feature-extraction"})
AUDIO_TASKS = frozenset({"audio-classification", "automatic-speech-recognition"})


class ImageBatchCall(PipelineBatchCall):
    """Image tasks: each input arrives as the bytes of an encoded image (PNG, JPEG, …)."""

    input_kind = "image"

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        return super().run([media.decode_image(item) for item in inputs], parameters)

    def warmup(self) -> tuple[list[Any], dict[str, Any]] | None:
        import io  # noqa: PLC0415

        from PIL import Image  # noqa: PLC0415

        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (127, 127, 127)).save(buffer, format="PNG")
        return [buffer.getvalue()], {}


class AudioBatchCall(PipelineBatchCall):
    """Audio tasks: each input arrives as the bytes of a WAV file (any format with ffmpeg)."""

    input_kind = "audio"

    def __init__(self, pipe: Any, task: str) -> None:
        super().__init__(pipe, task)
        self.sampling_rate = int(getattr(pipe.feature_extractor, "sampling_rate", 16000))

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        return super().run([media.decode_audio(item, self.sampling_rate) for item in inputs], parameters)

    def warmup(self) -> tuple[list[Any], dict[str, Any]] | None:
        return [media.encode_wav(np.zeros(self.sampling_rate, dtype=np.float32), self.sampling_rate)], {}


def _prepare_generation(pipe: Any) -> None:
    """Batched generation pads on the left, and needs a pad token (the EOS token will do)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


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
    pipe = pipeline(task, model=spec.model, **kwargs)  # type: ignore[call-overload]
    task = pipe.task or task
    if task == "feature-extraction":
        pooling = read_sentence_pooling(spec.model) if os.path.isdir(spec.model) else SentencePooling()
        return FeatureExtractionBatchCall(pipe, task, pooling)
    if task in IMAGE_TASKS:
        return ImageBatchCall(pipe, task)
    if task in AUDIO_TASKS:
        return AudioBatchCall(pipe, task)
    if task == "text-generation":
        _prepare_generation(pipe)
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
    if _has_audio_feature_extractor(model) and any(a.endswith("ForSequenceClassification")
                                                   for a in architectures):
        return "audio-classification"  # e.g. Wav2Vec2ForSequenceClassification
    for architecture in architectures:
        for suffix, task in _ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                return task
    if architectures and architectures[0].endswith("Model"):
        return "feature-extraction"
    raise ValueError(f"cannot infer a task from architectures {architectures}; pass --task")


def _has_audio_feature_extractor(model: str) -> bool:
    path = os.path.join(model, "preprocessor_config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as handle:
        preprocessor = json.load(handle)
    return "sampling_rate" in preprocessor and "image_processor_type" not in preprocessor


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
