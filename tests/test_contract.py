"""The contract in-process: one declaration decodes, refuses naming the field, and writes the schema."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from pipeserve.front import errors
from pipeserve.front.api import completions, contract, openai, tei, tgi
from pipeserve.front.api.openapi import Facts, _fill


def _refusal(body: bytes, kind: Any, **hints: str) -> errors.BadRequest:
    with pytest.raises(errors.BadRequest) as refused:
        contract.decode(body, kind, hints=hints)
    return refused.value


@pytest.mark.timeout(10)
def test_a_bad_field_is_a_400_that_names_it() -> None:
    refused = _refusal(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}', completions.ChatRequest)
    assert refused.message == '"temperature" must be a number <= 2.0'
    assert refused.param == "temperature"
    nested = _refusal(b'{"inputs": "x", "parameters": {"top_p": 0}}', tgi.Request)
    assert nested.message == '"parameters.top_p" must be a number > 0.0' and nested.param == "parameters"
    assert "unknown field" in _refusal(b'{"inputs": "x", "extra": 1}', tei.EmbedRequest).message
    assert _refusal(b'{}', tei.EmbedRequest).message == 'missing "inputs"'
    assert _refusal(b'{"inputs": ["ok", null]}', tei.EmbedRequest).message == '"inputs"[1] must be a string, not null'
    assert _refusal(b'{"inputs": ', tei.EmbedRequest).message.startswith("invalid JSON")
    # "stream": "false" (a string) is refused, not read as true.
    streamed = _refusal(b'{"prompt": "x", "stream": "false"}', completions.CompletionsRequest)
    assert streamed.param == "stream"
    assert _refusal(b'{"input": "x", "user": {}}', openai.EmbeddingsRequest).param == "user"


@pytest.mark.timeout(10)
def test_token_ids_get_the_dialects_hint() -> None:
    refused = _refusal(b'{"input": [[1, 2, 3]]}', openai.EmbeddingsRequest, input="send the texts")
    assert refused.message.endswith("(send the texts)") and refused.param == "input"


@pytest.mark.timeout(10)
def test_an_integral_float_is_an_integer_as_json_schema_reads_it() -> None:
    decoded = contract.decode(b'{"inputs": "x", "parameters": {"max_new_tokens": 4.0, "temperature": 0.5}}',
                              tgi.Request)
    assert decoded.parameters is not None and decoded.parameters.max_new_tokens == 4
    assert isinstance(decoded.parameters.max_new_tokens, int)
    # msgspec stops at the float; the second reading meets the syntax error after it: a 400 too.
    assert _refusal(b'{"inputs": "x", "parameters": {"max_new_tokens": 16.0}', tgi.Request
                    ).message.startswith("invalid JSON")
    assert "must be an integer or null, not a number" in _refusal(
        b'{"inputs": "x", "parameters": {"max_new_tokens": 4.5}}', tgi.Request).message


@pytest.mark.timeout(10)
def test_shared_rules_are_one_declaration() -> None:
    # temperature is bounded the same on every route that takes it: OpenAI's and TGI's.
    for kind, field in ((completions.Sampling, "temperature"), (tgi.Parameters, "temperature")):
        schema = msgspec.json.schema(kind)
        options = schema["$defs"][kind.__name__]["properties"][field]["anyOf"]
        assert {"type": "number", "minimum": 0, "maximum": contract.TEMPERATURE_MAX} in options


@pytest.mark.timeout(10)
def test_facts_fill_the_server_specific_parts() -> None:
    schema = {"type": "object", "properties": {
        "max_tokens": {"anyOf": [{"type": "integer", "minimum": 1, contract.FACT_KEY: "max_new_tokens"},
                                 {"type": "null"}]},
        "prompt_name": {"anyOf": [{"type": "string", contract.FACT_KEY: "parameter:prompt_name"}, {"type": "null"}]},
    }, "required": ["prompt_name"]}
    filled = _fill(schema, Facts(model_name="m", max_new_tokens=8, parameters={}))
    assert filled["properties"]["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 8}
    assert "prompt_name" not in filled["properties"] and filled["required"] == []  # the model takes none
