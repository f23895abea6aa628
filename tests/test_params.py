"""Parameter checks in the front, in-process."""

from __future__ import annotations

import pytest

from pipeserve import errors
from pipeserve.params import check_parameters


@pytest.mark.parametrize("parameters, fragment", [
    ({"batch_size": 4}, "'batch_size' is set by the server"),
    ({"bogus": 1}, "unknown parameter 'bogus'; accepted: top_k, max_new_tokens"),
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
    accepted = ("top_k", "max_new_tokens", "do_sample", "temperature", "candidate_labels",
                "hypothesis_template", "aggregation_strategy")
    with pytest.raises(errors.BadRequest, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        check_parameters(parameters, accepted)


def test_good_parameters_give_an_order_independent_batch_key() -> None:
    accepted = None  # the pipeline takes any keyword
    first = check_parameters({"top_k": 2, "targets": ["a", "b"], "top_p": 0.5}, accepted)
    second = check_parameters({"top_p": 0.5, "targets": ["a", "b"], "top_k": 2}, accepted)
    assert first == second
    assert check_parameters({"top_k": None, "function_to_apply": "SIGMOID"}, accepted)
