"""Loading what the model process serves: a transformers pipeline, or a --pipeline factory.

Runs in the model process; the only module that imports transformers at load time.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
from typing import Any

from pipeserve import ipc
from pipeserve.ipc import GENERATION_TASK
from pipeserve.model import adapters, embeddings, generation_dtype, pooling, precision, prepack, siblings, weight_int8
from pipeserve.model.tasks import task_for, task_for_architecture

log = logging.getLogger("pipeserve.model")


def load_custom(spec: ipc.WorkerSpec) -> adapters.BatchCall:
    """Call the --pipeline factory (with the WorkerSpec if it takes an argument)."""
    module_name, _, attr = (spec.pipeline or "").partition(":")
    factory: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    function = factory(spec) if inspect.signature(factory).parameters else factory()
    if not callable(function):
        raise TypeError(f"{spec.pipeline} returned {type(function).__name__}, not a callable")
    return adapters.BatchCall(function, spec.task or "custom")


REDUCED_DTYPES = ("float16", "bfloat16")


def load(spec: ipc.WorkerSpec, device: str, torch: Any) -> tuple[adapters.BatchCall, ipc.Precision]:
    """What the worker serves, and the precision it computes in (see model/precision.py)."""
    call, chosen = _load_in_precision(spec, device, torch)
    if prepack.suits(call) and prepack.pays(device, chosen.dtype, torch):
        swapper = siblings.swap if call.task == GENERATION_TASK else prepack.swap
        log.info("linear layers packed for oneDNN once: %d", prepack.apply(call, torch, swapper))
    return call, chosen


def _load_in_precision(spec: ipc.WorkerSpec, device: str, torch: Any
                       ) -> tuple[adapters.BatchCall, ipc.Precision]:
    if spec.pipeline:
        note = "" if spec.dtype == "auto" else "passed to the --pipeline factory"
        return load_custom(spec), ipc.Precision(spec.dtype, spec.dtype, note=note)
    if spec.dtype == "int8":
        call = load_transformers(spec, device, torch, "float32")
        if call.task == GENERATION_TASK:  # no floor: served either way (model/weight_int8.py)
            return call, weight_int8.apply(call, device, torch)
        return call, precision.quantize_int8(call, device, torch)
    if spec.dtype != "auto":
        return load_transformers(spec, device, torch, spec.dtype), ipc.Precision(spec.dtype, spec.dtype)
    own = checkpoint_dtype(spec.model)
    if own is not None and computes_natively(own, device, torch):
        # Its authors ship it reduced (most large checkpoints): a float32 copy to check against
        # would double the memory of the biggest models for nothing.
        call = load_transformers(spec, device, torch, own)
        return call, ipc.Precision("auto", own, note="the checkpoint's own dtype")
    call = load_transformers(spec, device, torch, "float32")
    if call.task == GENERATION_TASK:  # decoding speed depends on the machine: measured, not ruled
        return call, generation_dtype.choose(call, device, torch, spec.max_running_sequences)
    return call, precision.choose(call, device, torch)


def computes_natively(dtype: str, device: str, torch: Any) -> bool:
    """Whether a GPU computes in this reduced dtype natively: float16 every GPU does, bfloat16
    only those that have it (a V100 or T4 emulates it, slowly, and lacks kernels for some of it).
    A bfloat16 checkpoint there takes the checked path instead: float16 where its answers agree
    with float32's (its range is bfloat16's less), float32 where they do not."""
    if not device.startswith("cuda") or dtype not in REDUCED_DTYPES:
        return False
    return dtype == "float16" or precision.native_reduced_dtype(device, torch) == dtype


def checkpoint_dtype(model: str) -> str | None:
    """The dtype a local model folder's config declares, if any."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        config = json.load(handle)
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value) if value else None


def load_transformers(spec: ipc.WorkerSpec, device: str, torch: Any, dtype: str) -> adapters.PipelineCall:
    """A transformers pipeline for the model in `dtype`, wrapped in its task's adapter."""
    from transformers import pipeline  # noqa: PLC0415

    kwargs: dict[str, Any] = {"device": device, "dtype": getattr(torch, dtype)}
    pipe = pipeline(spec.task or infer_task(spec.model), model=spec.model, **kwargs)
    task = task_for(str(pipe.task))
    if task.adapter == embeddings.FeatureExtractionCall.__name__:  # with the folder's own pooling
        local = os.path.isdir(spec.model)
        sentence = pooling.read_sentence_pooling(spec.model) if local else pooling.SentencePooling()
        return embeddings.FeatureExtractionCall(pipe, task, sentence)
    call: adapters.PipelineCall = getattr(adapters, task.adapter)(pipe, task)
    if isinstance(call, adapters.ImageCall):
        call.max_pixels = spec.max_image_pixels
    return call


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
        task = task_for_architecture(architecture)
        if task is not None:
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
