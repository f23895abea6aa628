"""The API's contract: each body is one typed declaration, and each shared rule is named once.

A request body is a `Body` (a msgspec.Struct): `decode` turns the bytes into it (types, bounds,
enums, unknown and missing fields checked in one pass, in C) or answers a 400 that names the
field; `openapi.py` writes the JSON Schema of the same declaration. A response body is declared
the same way, for the document (the handlers build it with orjson, which writes numpy arrays
without copying; schemathesis's conformance check in the suite holds the two together).

What depends on the server rather than the dialect (the served model's name, --max-new-tokens,
the bounds of a pipeline parameter the loaded model reports in Ready) is marked with `fact`, and
filled in when the document is written (openapi.Facts).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import orjson

from pipeserve.front import errors

FACT_KEY = "x-pipeserve-fact"


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body: an object whose fields are exactly those declared.

    Keyword-only, so that required fields may follow optional ones; msgspec does not inherit
    that, so a subclass that adds required fields says `kw_only=True` again.
    """


class Answer(msgspec.Struct, kw_only=True):
    """A response body's declaration (for the document)."""


def fact(name: str, **schema: Any) -> msgspec.Meta:
    """A schema whose server-specific part (`name`, see openapi.Facts) is filled in per server."""
    return msgspec.Meta(extra_json_schema={FACT_KEY: name, **schema})


def describe(text: str, **schema: Any) -> msgspec.Meta:
    return msgspec.Meta(description=text, extra_json_schema=schema or None)


def exact_schemas() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """{body type's name: ({field: schema}, {keyword: schema})} for what a Body's handler checks
    beyond what msgspec decodes, so that the document says it too: a field whose union msgspec
    takes more loosely (two list shapes in one field), in its `exact` class variable; a rule
    across fields (stream needs one prompt), in `across`, added to the object's schema."""
    found: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    todo: list[type] = [Body]
    while todo:
        kind = todo.pop()
        todo.extend(kind.__subclasses__())
        fields, rules = getattr(kind, "exact", None) or {}, getattr(kind, "across", None) or {}
        if fields or rules:
            found[kind.__name__] = (fields, rules)
    return found


def neutral(value: Any) -> msgspec.Meta:
    """Accepted at one value only (a client may send the field; anything else is refused): a
    number by its bounds, which decoding checks; a boolean by the document's `const`, which its
    handler checks (msgspec has no constraint for a boolean)."""
    described = f"accepted only as {orjson.dumps(value).decode()}"
    if isinstance(value, bool):
        return msgspec.Meta(description=described, extra_json_schema={"const": value})
    return msgspec.Meta(ge=value, le=value, description=described)


# --- the rules two routes share, each named once ------------------------------------------------

Text = str
NonEmptyText = Annotated[str, msgspec.Meta(min_length=1)]
# A text, or a non-empty list of texts: every dialect's inputs (token ids are not served).
Texts = Text | Annotated[list[Text], msgspec.Meta(min_length=1)]
# Sampling temperature, on every route: OpenAI's bound (TGI declares none; above 2 the
# distribution is nearly uniform, so nothing useful is refused).
TEMPERATURE_MAX = 2.0
Temperature = Annotated[float, msgspec.Meta(ge=0, le=TEMPERATURE_MAX)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
TopK = Annotated[int, msgspec.Meta(ge=0)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# At least 1; at most --max-new-tokens (checked by common.generation_parameters, filled in the document).
MaxNewTokens = Annotated[int, msgspec.Meta(ge=1), fact("max_new_tokens")]
STOP_SEQUENCES_MAX = 4
StopList = Annotated[list[NonEmptyText], msgspec.Meta(max_length=STOP_SEQUENCES_MAX)]
# TEI spells the direction capitalised, the pipeline lower-case: both are taken.
TruncationDirection = Literal["left", "right", "Left", "Right"]
Dimensions = Annotated[int, msgspec.Meta(ge=1), fact("parameter:dimensions")]
PromptName = Annotated[str, fact("parameter:prompt_name")]
TokenId = Annotated[int, msgspec.Meta(ge=0), fact("token_id")]  # below the tokenizer's vocabulary size


def taken(name: str) -> msgspec.Meta:
    """A field that is the loaded model's pipeline parameter `name`: absent from the document
    where the model does not take it (and refused there, as an unknown parameter)."""
    return fact(f"taken:{name}")


def truncation_direction(value: str | None) -> str | None:
    return value.lower() if value is not None else None


# --- decoding ----------------------------------------------------------------------------------

B = TypeVar("B")
_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def decode(body: bytes, kind: type[B], hints: Mapping[str, str] | None = None) -> B:
    """The body as `kind` declares it, or a 400 naming the field (with the dialect's hint for it).

    A JSON number without a fraction is an integer (JSON Schema's reading): such a body is
    decoded again with its integral floats as ints, off the fast path.
    """
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        if "got `float`" in str(exc):
            try:
                return msgspec.convert(_integral(orjson.loads(body)), kind)
            except msgspec.ValidationError as again:
                raise invalid(again, kind, hints) from None
            except orjson.JSONDecodeError as broken:  # msgspec stopped at the float, before the syntax error
                raise errors.BadRequest(f"invalid JSON: {broken}") from None
        raise invalid(exc, kind, hints) from None
    except msgspec.DecodeError as exc:
        raise errors.BadRequest(f"invalid JSON: {exc}") from None


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    return value


_NAMES = {"str": "a string", "array": "a list", "int": "an integer", "float": "a number", "bool": "true or false",
          "object": "an object", "null": "null"}
_MISMATCH = re.compile(r"^Expected `(?P<expected>[^`]+)`, got `(?P<got>\w+)`$")
_BOUND = re.compile(r"^Expected `(?P<kind>\w+)` (?P<op>>=|<=|>|<) (?P<value>\S+)$")
_LENGTH = re.compile(r"^Expected `(?P<kind>\w+)` of length (?P<op>>=|<=) (?P<value>\d+)$")


def invalid(exc: msgspec.ValidationError, kind: Any = None, hints: Mapping[str, str] | None = None
            ) -> errors.BadRequest:
    """A 400 from msgspec's refusal, in words: `"temperature" must be ..., not ...`, the field
    also in `param` (OpenAI's envelope has it), with the dialect's hint for that field."""
    text = str(exc)
    match = _AT.search(text)
    problem = text[:match.start()] if match else text
    path = match["path"].lstrip(".") if match else ""
    field = re.split(r"[.\[]", path, maxsplit=1)[0]
    # "inputs"[1], "parameters.top_p", "messages"[0].role: the field's name quoted, indexes after it.
    where = re.sub(r"^([^\[]+)", r'"\1"', path) if path else "the body"
    mismatch = _MISMATCH.match(problem)
    if problem.startswith("Object missing required field"):
        field = problem.split("`")[1]
        message = f'missing "{field}"'
    elif problem.startswith("Object contains unknown field"):
        field = problem.split("`")[1]
        known = ", ".join(getattr(kind, "__struct_fields__", ()))
        message = f"unknown field {field!r}" + (f"; expected {known}" if known else "")
    elif mismatch:
        expected = " or ".join(_NAMES.get(name, name) for name in mismatch["expected"].split(" | "))
        message = f"{where} must be {expected}, not {_NAMES.get(mismatch['got'], mismatch['got'])}"
    elif problem == "Expected `array` of length >= 1":
        message = f"{where} is an empty list"
    elif bound := _BOUND.match(problem):
        message = f"{where} must be {_NAMES.get(bound['kind'], bound['kind'])} {bound['op']} {bound['value']}"
    elif length := _LENGTH.match(problem):
        unit = "characters" if length["kind"] == "str" else "items"
        most = "at least" if length["op"] == ">=" else "at most"
        message = f"{where} must have {most} {length['value']} {unit}"
    else:
        message = f"{where}: {problem.replace('`', '')}"
    hint = (hints or {}).get(field)
    return errors.BadRequest(message + (f" ({hint})" if hint else ""), param=field or None)

