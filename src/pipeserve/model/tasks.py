"""The task registry: each task pipeserve knows, declared once.

One `Task` entry holds everything task-specific: what one input is, the adapter that calls the
pipeline on a batch and shapes its outputs, the parameter defaults, the warm-up, the documented
parameters with their checks (sent to the front in `Ready`, which validates requests against
them), and the model architectures it is inferred from. Adding a task is one entry here plus
its test. Runs in the model process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeserve.ipc import GENERATION_ARCHITECTURES, GENERATION_TASK, InputKind, ParamSpec, ParamType

# --- documented parameters, each declared once and shared by the tasks that take it -----------


def _integer(name: str, minimum: int) -> ParamSpec:
    return ParamSpec(name, ParamType.INTEGER, minimum=minimum)


def _number(name: str) -> ParamSpec:
    return ParamSpec(name, ParamType.NUMBER, minimum=0)


def _boolean(name: str) -> ParamSpec:
    return ParamSpec(name, ParamType.BOOLEAN)


def _choice(name: str, *choices: str) -> ParamSpec:
    return ParamSpec(name, ParamType.CHOICE, choices=choices)


TOP_K = _integer("top_k", 1)
TRUNCATION = _boolean("truncation")
FUNCTION_TO_APPLY = _choice("function_to_apply", "sigmoid", "softmax", "none")
TARGETS = ParamSpec("targets", ParamType.STRINGS)
AGGREGATION_STRATEGY = _choice("aggregation_strategy", "none", "simple", "first", "average", "max")
CANDIDATE_LABELS = ParamSpec("candidate_labels", ParamType.STRINGS)
HYPOTHESIS_TEMPLATE = ParamSpec("hypothesis_template", ParamType.STRING, contains="{}")
MULTI_LABEL = _boolean("multi_label")
POOLING_MODES = ("mean", "cls", "max", "none")
POOLING = _choice("pooling", *POOLING_MODES)
NORMALIZE = _boolean("normalize")
DIMENSIONS = _integer("dimensions", 1)  # Matryoshka: keep the first N values, then re-normalise
TRUNCATION_DIRECTION = _choice("truncation_direction", "left", "right")
PROMPT_NAME = ParamSpec("prompt_name", ParamType.STRING)  # a key of the model's sentence-transformers prompts
GENERATION = (
    _integer("max_new_tokens", 1), _integer("max_length", 1), _integer("min_new_tokens", 0),
    _integer("num_beams", 1), _integer("num_return_sequences", 1), _boolean("do_sample"),
    _boolean("return_full_text"), _number("temperature"), _number("top_p"),
    _number("repetition_penalty"), TOP_K,
)


# --- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One task: how to serve it, declared in one place."""

    name: str
    # The adapter class's name in pipeserve.model.adapters (or embeddings: FeatureExtractionCall),
    # a name, so that this table stays data.
    adapter: str = "PipelineCall"
    input_kind: InputKind = InputKind.TEXT
    # Merged under the client's parameters: text longer than the model's maximum is truncated
    # by default, so an over-long input is never a crash in the position embeddings.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    warmup_parameters: Mapping[str, Any] = field(default_factory=dict)
    # How the answers to --dtype auto's check inputs are asked for (model/precision.py): one
    # top label where answers are ranked, greedy tokens where they are generated.
    agreement_parameters: Mapping[str, Any] = field(default_factory=dict)
    # Documented parameters and their checks; the front validates requests against them.
    parameters: tuple[ParamSpec, ...] = ()
    # With no documented parameters: accept (unchecked) the keywords the pipeline's
    # _sanitize_parameters names.
    introspect: bool = True
    # Model class-name suffixes from which this task is inferred for a local folder.
    architectures: tuple[str, ...] = ()
    # How each input's output is reshaped to the Hugging Face Inference API's shape for the task
    # (a name in adapters.OUTPUT_SHAPES; "" keeps the pipeline's own).
    output: str = ""
    # Text in, answers the warm-up check can compare: the Linear layers may be packed for the
    # CPU once, at load (model/prepack.py).
    packs_weights: bool = False


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("feature-extraction", adapter="FeatureExtractionCall", defaults={"truncation": True},
         parameters=(POOLING, NORMALIZE, TRUNCATION, DIMENSIONS, TRUNCATION_DIRECTION, PROMPT_NAME),
         introspect=False, packs_weights=True),
    # Each input answers a list of {label, score}, best first, even with top_k=1.
    Task("text-classification", defaults={"truncation": True},
         parameters=(TOP_K, FUNCTION_TO_APPLY, TRUNCATION), agreement_parameters={"top_k": 1},
         architectures=("ForSequenceClassification",), output="label_list", packs_weights=True),
    Task("token-classification", parameters=(AGGREGATION_STRATEGY,),
         architectures=("ForTokenClassification",), packs_weights=True),
    # fill-mask takes tokenizer options in a dict of their own.
    Task("fill-mask", adapter="FillMaskCall", defaults={"tokenizer_kwargs": {"truncation": True}},
         parameters=(TOP_K, TARGETS), agreement_parameters={"top_k": 1}, architectures=("ForMaskedLM",),
         packs_weights=True),
    # The zero-shot pipeline reads a bare **kwargs itself: only its documented keywords.
    Task("zero-shot-classification", parameters=(CANDIDATE_LABELS, HYPOTHESIS_TEMPLATE, MULTI_LABEL),
         introspect=False, warmup_parameters={"candidate_labels": ["warm", "up"]},
         agreement_parameters={"candidate_labels": ["news", "question", "opinion"]},
         output="zero_shot_labels", packs_weights=True),
    # The generated text without the prompt, as TGI and the Inference API answer by default.
    Task(GENERATION_TASK, adapter="TextGenerationCall", parameters=GENERATION,
         defaults={"return_full_text": False},
         warmup_parameters={"max_new_tokens": 1}, agreement_parameters={"max_new_tokens": 8, "do_sample": False},
         architectures=GENERATION_ARCHITECTURES, packs_weights=True),
    Task("image-classification", adapter="ImageCall", input_kind=InputKind.IMAGE,
         parameters=(TOP_K, FUNCTION_TO_APPLY), architectures=("ForImageClassification",)),
    Task("audio-classification", adapter="AudioCall", input_kind=InputKind.AUDIO,
         parameters=(TOP_K,), architectures=("ForAudioClassification",)),
    Task("automatic-speech-recognition", adapter="AudioCall", input_kind=InputKind.AUDIO,
         architectures=("ForSpeechSeq2Seq", "ForCTC")),
    *(Task(name, adapter="ImageCall", input_kind=InputKind.IMAGE) for name in (
        "image-segmentation", "object-detection", "image-to-text", "depth-estimation",
        "image-feature-extraction")),
)}


def task_for(name: str) -> Task:
    """The registry entry, or a plain text entry for a task transformers knows and we don't."""
    return TASKS.get(name) or Task(name)


def task_for_architecture(architecture: str) -> str | None:
    for task in TASKS.values():
        if any(architecture.endswith(suffix) for suffix in task.architectures):
            return task.name
    return None
