"""How to call each kind of pipeline on a batch, and get back one plain output per input.

Runs in the model process. transformers pipelines nest one input and a list differently
(FillMaskPipeline returns `outputs[0]` for a one-element list) and pad batched per-token outputs
(feature-extraction); an adapter hides that, so one input's answer has the same shape, and the
same values, whether it ran alone or in a batch of 32. Which adapter a task uses is declared in
its registry entry (tasks.py).
"""

from __future__ import annotations

import inspect
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeserve.ipc import GENERATION_TASK, InputKind, ParamSpec
from pipeserve.model import media, model_limits
from pipeserve.model.generation import Engine
from pipeserve.model.outputs import to_plain
from pipeserve.model.tasks import Task

WARMUP_TEXT = "Warm up the model."


class BatchCall:
    """A loaded callable: `call(inputs, parameters)` -> one plain output per input.

    The base class serves a --pipeline factory's callable as it is.
    """

    input_kind = InputKind.TEXT

    def __init__(self, function: Callable[..., Any], task: str = "custom") -> None:
        self.function = function
        self.task = task

    def __call__(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        results = list(self.run(inputs, parameters))
        if len(results) != len(inputs):
            raise RuntimeError(f"pipeline returned {len(results)} outputs for {len(inputs)} inputs")
        return [to_plain(result) for result in results]

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        return self.function(inputs, **parameters)  # type: ignore[no-any-return]

    def _max_input_length(self, tokenizer: Any, config: Any) -> int | None:
        """The tokenizer's limit; a generator's is its engine's (model_limits.max_positions). A
        tokenizer saved without one reports 10**30, which no JSON integer holds (/info was a 500):
        where nothing else knows the limit, None."""
        if tokenizer is None:
            return None
        if self.task == GENERATION_TASK and config is not None:
            return model_limits.max_positions(config, tokenizer)
        saved = tokenizer.model_max_length
        return int(saved) if isinstance(saved, int) and saved < model_limits.UNSET_LENGTH else None

    def schema(self) -> tuple[tuple[ParamSpec, ...], bool]:
        """(the keywords the callable takes, whether it also takes any other keyword)."""
        try:
            signature = inspect.signature(self.function)
        except (TypeError, ValueError):
            return (), True
        open_ = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        return tuple(ParamSpec(name) for name in explicit_keywords(self.function)), open_

    def warmup(self) -> tuple[list[Any], dict[str, Any]] | None:
        """Inputs and parameters for one warm-up call, or None to skip it."""
        custom = getattr(self.function, "warmup_inputs", None)
        return (list(custom), {}) if custom is not None else None

    def agreement_inputs(self, texts: list[str]) -> tuple[list[Any], dict[str, Any]] | None:
        """Inputs and parameters for --dtype auto's float32 comparison, or None: not checkable."""
        return None

    def token_counts(self) -> list[int] | None:
        """The token count of each input of the last call, where the adapter knows it."""
        return None

    def tokenize(self, texts: list[str], parameters: dict[str, Any]) -> list[Any]:
        raise ValueError("this pipeline has no tokenizer")

    def decode(self, ids: list[list[int]], parameters: dict[str, Any]) -> list[Any]:
        raise ValueError("this pipeline has no tokenizer")

    def details(self) -> dict[str, Any]:
        """Facts of the loaded model that the front's API dialects report (plain JSON values)."""
        return {"has_tokenizer": False}

    def engine(self, max_running: int, prefix_cache_bytes: int, prefill_tokens: int) -> Engine | None:
        """The continuous-batching engine for streamed generation, where the task generates text."""
        return None


class PipelineCall(BatchCall):
    """A transformers Pipeline, called with the whole batch as a list and batch_size=len."""

    def __init__(self, pipe: Any, task: Task) -> None:
        super().__init__(pipe, task.name)
        self.pipe: Any = pipe  # the same object, typed for its attributes
        self.entry = task
        self.input_kind = task.input_kind
        _cap_tokenizer_length(pipe)

    def with_defaults(self, parameters: dict[str, Any]) -> dict[str, Any]:
        merged = dict(self.entry.defaults)
        for name, value in parameters.items():
            default = merged.get(name)
            both_dicts = isinstance(default, dict) and isinstance(value, dict)
            merged[name] = {**default, **value} if both_dicts else value  # type: ignore[dict-item]
        return merged

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        results = self.function(inputs, batch_size=len(inputs), **self.with_defaults(parameters))
        shape = OUTPUT_SHAPES.get(self.entry.output)
        return [shape(result) for result in results] if shape else list(results)

    def tokenize(self, texts: list[str], parameters: dict[str, Any]) -> list[Any]:
        """Each text's tokens as text-embeddings-inference's /tokenize gives them."""
        tokenizer = self._tokenizer()
        add_special = bool(parameters.get("add_special_tokens", True))
        encoded = tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=True,
                            return_special_tokens_mask=True, truncation=True)
        answers = []
        for index, text in enumerate(texts):
            ids = encoded["input_ids"][index]
            tokens = []
            for token_id, (start, stop), special in zip(
                    ids, encoded["offset_mapping"][index], encoded["special_tokens_mask"][index], strict=True):
                if special:
                    tokens.append({"id": token_id, "text": tokenizer.convert_ids_to_tokens(token_id),
                                   "special": True, "start": None, "stop": None})
                else:
                    tokens.append({"id": token_id, "text": text[start:stop], "special": False,
                                   "start": start, "stop": stop})
            answers.append(tokens)
        return answers

    def decode(self, ids: list[list[int]], parameters: dict[str, Any]) -> list[Any]:
        tokenizer = self._tokenizer()
        skip = bool(parameters.get("skip_special_tokens", True))
        if any(not 0 <= token < len(tokenizer) for sequence in ids for token in sequence):
            raise ValueError(f"token ids must be from 0 to {len(tokenizer) - 1}")
        return [tokenizer.decode(sequence, skip_special_tokens=skip) for sequence in ids]

    def _tokenizer(self) -> Any:
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return tokenizer

    def details(self) -> dict[str, Any]:
        config = getattr(getattr(self.pipe, "model", None), "config", None)
        tokenizer = getattr(self.pipe, "tokenizer", None)
        id2label = getattr(config, "id2label", None) or {}
        return {
            "has_tokenizer": tokenizer is not None,
            "max_input_length": self._max_input_length(tokenizer, config),
            "labels": [str(id2label[key]) for key in sorted(id2label)],
            "hidden_size": getattr(config, "hidden_size", None),
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "vocab_size": len(tokenizer) if tokenizer is not None else None,  # /decode's bound on token ids
        }

    def schema(self) -> tuple[tuple[ParamSpec, ...], bool]:
        """The task's documented parameters; for a task with none documented (one transformers
        knows and the registry does not), the keywords the pipeline names (unchecked).

        `_sanitize_parameters` names them, except what it forwards through `**kwargs`: to the
        tokenizer (`**tokenizer_kwargs`) or to `generate` (`**generate_kwargs`), whose keywords
        can be listed too; a pipeline that reads any other bare `**kwargs` is open.
        """
        documented = {spec.name: spec for spec in self.entry.parameters}
        # A registered task serves its documented (typed, checked) parameters only: the other
        # keywords transformers takes are unchecked, and a bad value of one fails deep in the
        # pipeline (or dumps its tokenizer's repr into the message).
        if not self.entry.introspect or documented:
            return tuple(documented.values()), False
        sanitize = self.pipe._sanitize_parameters
        names = list(explicit_keywords(sanitize, takes_inputs=False))
        forwarded = next((p.name for p in inspect.signature(sanitize).parameters.values()
                          if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        open_ = False
        if forwarded is not None:
            if "token" in forwarded and getattr(self.pipe, "tokenizer", None) is not None:
                names += explicit_keywords(type(self.pipe.tokenizer).__call__)
            elif "generate" in forwarded:
                from transformers import GenerationConfig  # noqa: PLC0415

                names += list(GenerationConfig().to_dict())
            else:
                open_ = True
        for name in names:
            documented.setdefault(name, ParamSpec(name))
        return tuple(sorted(documented.values(), key=lambda spec: spec.name)), open_

    def warmup(self) -> tuple[list[Any], dict[str, Any]] | None:
        return [WARMUP_TEXT], dict(self.entry.warmup_parameters)

    def agreement_inputs(self, texts: list[str]) -> tuple[list[Any], dict[str, Any]] | None:
        if self.input_kind is not InputKind.TEXT:
            return None
        if not self.entry.defaults.get("truncation"):
            texts = self._fitting(texts, room=0)
        return texts, dict(self.entry.agreement_parameters)

    def _fitting(self, texts: list[str], room: int) -> list[str]:
        """The texts that fit the model's positions untruncated, with `room` tokens to spare."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            return texts
        limit = int(tokenizer.model_max_length) - room
        return [text for text in texts if len(tokenizer(text)["input_ids"]) <= limit]


class FillMaskCall(PipelineCall):
    """FillMaskPipeline returns outputs[0] for a one-element list: undo that."""

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        results = super().run(inputs, parameters)
        return [results] if len(inputs) == 1 else results

    def warmup(self) -> tuple[list[Any], dict[str, Any]] | None:
        return [f"Warm up the {self.pipe.tokenizer.mask_token} model."], {}

    def details(self) -> dict[str, Any]:
        return {**super().details(), "mask_token": str(self.pipe.tokenizer.mask_token)}

    def agreement_inputs(self, texts: list[str]) -> tuple[list[Any], dict[str, Any]] | None:
        # First, so that truncating a long text never cuts the mask off.
        return [f"{self.pipe.tokenizer.mask_token} {text}" for text in texts], dict(self.entry.agreement_parameters)


class TextGenerationCall(PipelineCall):
    """Batched generation pads on the left, and needs a pad token (the EOS token will do).

    Streamed generation (TGI's and OpenAI's routes) runs on the continuous-batching engine.
    """

    def __init__(self, pipe: Any, task: Task) -> None:
        super().__init__(pipe, task)
        tokenizer = getattr(pipe, "tokenizer", None)
        if tokenizer is not None:
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"

    def engine(self, max_running: int, prefix_cache_bytes: int, prefill_tokens: int) -> Engine | None:
        return Engine(self.pipe.model, self.pipe.tokenizer, max_running, prefix_cache_bytes, prefill_tokens)

    def agreement_inputs(self, texts: list[str]) -> tuple[list[Any], dict[str, Any]] | None:
        parameters = dict(self.entry.agreement_parameters)
        return self._fitting(texts, room=int(parameters["max_new_tokens"])), parameters


class ImageCall(PipelineCall):
    """Image tasks: each input arrives as the bytes of an encoded image (PNG, JPEG, …)."""

    max_pixels: int | None = None  # --max-image-pixels

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        return super().run([media.decode_image(item, self.max_pixels) for item in inputs], parameters)

    def warmup(self) -> tuple[list[Any], dict[str, Any]] | None:
        from PIL import Image  # noqa: PLC0415 - only image models need Pillow

        side = min(64, math.isqrt(self.max_pixels)) if self.max_pixels else 64  # within --max-image-pixels
        buffer = io.BytesIO()
        Image.new("RGB", (side, side), (127, 127, 127)).save(buffer, format="PNG")
        return [buffer.getvalue()], dict(self.entry.warmup_parameters)


class AudioCall(PipelineCall):
    """Audio tasks: each input arrives as the bytes of a WAV file (any format with ffmpeg)."""

    def __init__(self, pipe: Any, task: Task) -> None:
        super().__init__(pipe, task)
        self.sampling_rate = int(getattr(pipe.feature_extractor, "sampling_rate", 16000))

    def run(self, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        return super().run([media.decode_audio(item, self.sampling_rate) for item in inputs], parameters)

    def warmup(self) -> tuple[list[Any], dict[str, Any]] | None:
        silence = media.encode_wav(np.zeros(self.sampling_rate, dtype=np.float32), self.sampling_rate)
        return [silence], dict(self.entry.warmup_parameters)


def _label_list(result: Any) -> list[Any]:
    """text-classification: every input answers a list of {label, score}, best first."""
    labels = result if isinstance(result, list) else [result]
    return sorted(labels, key=lambda item: -float(item["score"]))


def _zero_shot_labels(result: Any) -> list[dict[str, Any]]:
    """zero-shot: the pipeline's {sequence, labels, scores} as [{label, score}], best first."""
    return [{"label": label, "score": score}
            for label, score in zip(result["labels"], result["scores"], strict=True)]


OUTPUT_SHAPES: dict[str, Callable[[Any], Any]] = {
    "label_list": _label_list,
    "zero_shot_labels": _zero_shot_labels,
}


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
    tokenizer.model_max_length = min(tokenizer.model_max_length, usable)


def explicit_keywords(function: Callable[..., Any], takes_inputs: bool = True) -> tuple[str, ...]:
    """The named keyword parameters of a callable, without self and its inputs parameter."""
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in inspect.signature(function).parameters.values()
             if p.kind in keyword_kinds]
    if names and names[0] == "self":
        names = names[1:]
    return tuple(names[1:] if takes_inputs else names)
