"""Issue #24's first question, measured in-process: what does decoding and validating a request
body cost with a typed declaration (msgspec.Struct, a pydantic model) against today's orjson
plus hand-written checks, on the front's hot path?

    python -m venv /tmp/spike && /tmp/spike/bin/pip install msgspec pydantic orjson
    /tmp/spike/bin/python bench/contract_decode.py      # prints a table; results in bench/CONTRACT.md

Three bodies: TEI /embed with 1 and with 32 short texts, and an OpenAI chat request. Each way
decodes the bytes into a validated value (unknown fields refused, types and bounds checked) and
is timed as the median of 7 runs of N decodes; the ratio is against today's way.
"""

from __future__ import annotations

import statistics
import time
from typing import Annotated, Any, Literal

import msgspec
import orjson
import pydantic

TEXTS = [f"document number {i} about the weather and cats" for i in range(32)]
BODIES = {
    "/embed, 1 text": orjson.dumps({"inputs": "a sentence to embed", "normalize": True, "truncate": False}),
    "/embed, 32 texts": orjson.dumps({"inputs": TEXTS, "normalize": True, "truncate": False}),
    "chat, 3 messages": orjson.dumps({"model": "m", "messages": [
        {"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"}], "temperature": 0.7, "max_tokens": 64, "stream": True}),
}


# --- today: orjson + hand-written checks (the shape of routes.parse_object + the dialect's own) ---

def today(body: bytes) -> Any:
    document = orjson.loads(body)
    if not isinstance(document, dict):
        raise ValueError("object")
    if "messages" in document:
        allowed = {"model", "messages", "temperature", "max_tokens", "stream"}
        if set(document) - allowed:
            raise ValueError("unknown")
        for message in document["messages"]:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                    or message.get("role") not in ("system", "user", "assistant", "developer"):
                raise ValueError("message")
        temperature = document.get("temperature")
        if temperature is not None and (isinstance(temperature, bool) or not 0 <= temperature <= 2):
            raise ValueError("temperature")
        max_tokens = document.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError("max_tokens")
        if not isinstance(document.get("stream", False), bool):
            raise ValueError("stream")
        return document
    if set(document) - {"inputs", "normalize", "truncate"}:
        raise ValueError("unknown")
    inputs = document["inputs"]
    if isinstance(inputs, list):
        if not inputs or not all(isinstance(text, str) for text in inputs):
            raise ValueError("inputs")
    elif not isinstance(inputs, str):
        raise ValueError("inputs")
    for name in ("normalize", "truncate"):
        if not isinstance(document.get(name, True), bool):
            raise ValueError(name)
    return document


# --- msgspec -------------------------------------------------------------------------------------

class MsEmbed(msgspec.Struct, forbid_unknown_fields=True):
    inputs: str | Annotated[list[str], msgspec.Meta(min_length=1)]
    normalize: bool = True
    truncate: bool = False


class MsMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class MsChat(msgspec.Struct, forbid_unknown_fields=True):
    messages: Annotated[list[MsMessage], msgspec.Meta(min_length=1)]
    model: str | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stream: bool = False


MS_EMBED = msgspec.json.Decoder(MsEmbed)
MS_CHAT = msgspec.json.Decoder(MsChat)


def with_msgspec(body: bytes) -> Any:
    return (MS_CHAT if b'"messages"' in body else MS_EMBED).decode(body)


# --- pydantic ------------------------------------------------------------------------------------

class PdEmbed(pydantic.BaseModel, extra="forbid", strict=True):
    inputs: str | Annotated[list[str], pydantic.Field(min_length=1)]
    normalize: bool = True
    truncate: bool = False


class PdMessage(pydantic.BaseModel, extra="forbid", strict=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class PdChat(pydantic.BaseModel, extra="forbid", strict=True):
    messages: Annotated[list[PdMessage], pydantic.Field(min_length=1)]
    model: str | None = None
    temperature: Annotated[float, pydantic.Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, pydantic.Field(ge=1)] | None = None
    stream: bool = False


def with_pydantic(body: bytes) -> Any:
    return (PdChat if b'"messages"' in body else PdEmbed).model_validate_json(body)


def median_us(decode: Any, body: bytes, count: int = 20_000) -> float:
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(count):
            decode(body)
        runs.append((time.perf_counter() - started) / count * 1e6)
    return statistics.median(runs)


def main() -> None:
    print(f"msgspec {msgspec.__version__}, pydantic {pydantic.__version__}, orjson {orjson.__version__}")
    print("| body | today µs | msgspec µs (ratio) | pydantic µs (ratio) |")
    print("|---|---|---|---|")
    for name, body in BODIES.items():
        base = median_us(today, body)
        ms = median_us(with_msgspec, body)
        pd = median_us(with_pydantic, body)
        print(f"| {name} | {base:.2f} | {ms:.2f} ({ms / base:.2f}x) | {pd:.2f} ({pd / base:.2f}x) |")
    # Every way refuses what the others refuse, on a few bad bodies.
    for bad in (b'{"inputs": 5}', b'{"inputs": []}', b'{"inputs": "x", "extra": 1}', b'{"inputs": "x", "normalize": "yes"}',
                b'{"messages": [{"role": "bot", "content": "x"}]}', b'{"messages": [], "stream": true}',
                b'{"messages": [{"role": "user", "content": "x"}], "temperature": 3}',
                b'{"messages": [{"role": "user", "content": "x"}], "stream": "false"}'):
        outcomes = []
        for decode in (today, with_msgspec, with_pydantic):
            try:
                decode(bad)
                outcomes.append("accepted")
            except (ValueError, KeyError, TypeError, msgspec.ValidationError, pydantic.ValidationError):
                outcomes.append("refused")
        print(bad.decode(), outcomes)


if __name__ == "__main__":
    main()
