"""Parameter checks in the front, against a schema as the model process declares it (in-process)."""

from __future__ import annotations

import pytest

from pipeserve.front import errors
from pipeserve.front.params import check_parameters, describe
from pipeserve.ipc import ParamSpec, ParamType
from pipeserve.model.tasks import TASKS

# The documented parameters of three real registry entries, as a loaded pipeline sends them.
SCHEMA = {spec.name: spec for task in ("text-generation", "zero-shot-classification",
                                       "token-classification", "fill-mask")
          for spec in TASKS[task].parameters}


@pytest.mark.parametrize("parameters, fragment", [
    ({"batch_size": 4}, "'batch_size' is set by the server"),
    ({"bogus": 1}, "unknown parameter 'bogus'; accepted: max_new_tokens, max_length"),
    ({"top_k": 0}, "'top_k' must be an integer >= 1"),
    ({"top_k": True}, "'top_k' must be an integer >= 1"),
    ({"max_new_tokens": "5"}, "'max_new_tokens' must be an integer >= 1"),
    ({"do_sample": "yes"}, "'do_sample' must be true or false"),
    ({"temperature": -1}, "'temperature' must be a number >= 0"),
    ({"candidate_labels": []}, "'candidate_labels' must be a string or a non-empty list of strings"),
    ({"hypothesis_template": "no braces"}, "containing {}"),
    ({"aggregation_strategy": "median"}, "one of none, simple, first, average, max"),
])
def test_bad_parameters_are_named(parameters: dict, fragment: str) -> None:
    with pytest.raises(errors.BadRequest, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        check_parameters(parameters, SCHEMA)


def test_good_parameters_give_an_order_independent_batch_key() -> None:
    first = check_parameters({"top_k": 2, "targets": ["a", "b"], "top_p": 0.5}, SCHEMA)
    second = check_parameters({"top_p": 0.5, "targets": ["a", "b"], "top_k": 2}, SCHEMA)
    assert first == second == '{"targets":["a","b"],"top_k":2,"top_p":0.5}'
    assert check_parameters({"top_k": None, "aggregation_strategy": "simple"}, SCHEMA) == \
        '{"aggregation_strategy":"simple","top_k":null}'
    # A choice is exactly one of its values, as the document's enum says.
    with pytest.raises(errors.BadRequest, match="one of none, simple"):
        check_parameters({"aggregation_strategy": "SIMPLE"}, SCHEMA)


def test_an_open_schema_passes_unknown_names_but_still_checks_known_ones() -> None:
    schema = {"top_k": ParamSpec("top_k", ParamType.INTEGER, minimum=1)}
    assert check_parameters({"anything": [1]}, schema, open_parameters=True) == '{"anything":[1]}'
    with pytest.raises(errors.BadRequest, match="'top_k' must be an integer >= 1"):
        check_parameters({"top_k": 0, "anything": 1}, schema, open_parameters=True)
    with pytest.raises(errors.BadRequest, match="this pipeline takes none"):
        check_parameters({"anything": 1}, {})


def test_every_registry_parameter_can_be_described() -> None:
    for task in TASKS.values():
        for spec in task.parameters:
            assert describe(spec) and spec.name.isidentifier(), (task.name, spec)
