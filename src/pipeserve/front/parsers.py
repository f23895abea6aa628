"""Parsers for settings: str -> value, raising ValueError with a message a user can act on."""

from __future__ import annotations

import re
from collections.abc import Callable


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise ValueError("must be an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise ValueError("must be an integer >= 0")
    return value


def integer(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"must be an integer, not {text!r}") from None


def port(text: str) -> int:
    value = integer(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0-65535 (0 = any free port)")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number, not {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number >= 0")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise ValueError("must be a number > 0")
    return value


def optional_positive_float(text: str) -> float | None:
    return None if text.strip().lower() in ("", "0", "none", "off") else positive_float(text)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive(text: str) -> float | None:
    """Seconds, as Ollama's keep_alive reads: "5m", "30s", "1h", "250ms", a plain number of
    seconds; "forever" (or -1) never unloads."""
    text = text.strip().lower()
    if text in ("forever", "-1", "none", "off"):
        return None
    unit = next((unit for unit in ("ms", "s", "m", "h") if text.endswith(unit)), "")
    return non_negative_float(text[:len(text) - len(unit)] or "x") * _UNITS.get(unit, 1.0)


def secret_from_file(text: str) -> str:
    """The contents of a file (e.g. a systemd credential), without the trailing newline."""
    try:
        with open(text, encoding="utf-8") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {text!r}: {exc.strerror}") from None
    if not secret:
        raise ValueError(f"{text!r} is empty")
    return secret


def fraction(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise ValueError("must be a number from 0 to 1")
    return value


def optional_fraction(text: str) -> float | None:
    """A fraction, or None for "auto" (the device's default)."""
    return None if text.strip().lower() in ("", "auto") else fraction(text)


def choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {text!r}")
        return lowered

    return parse


def devices(text: str) -> tuple[str, ...] | None:
    if not text.strip():
        return None
    devices = tuple(device(part) for part in text.split(","))
    if "auto" in devices:
        raise ValueError("list concrete devices (cpu, cuda:N), not auto")
    return devices


def device(text: str) -> str:
    lowered = text.strip().lower()
    if lowered in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", lowered):
        return lowered
    raise ValueError(f"must be auto, cpu, cuda or cuda:N; got {text!r}")


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """'4G', '512M', '1048576' -> bytes (binary units; an optional trailing 'B' or 'iB')."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"must be a size such as 512M or 4G, not {text!r}")
    number, unit = match.groups()
    value = int(float(number) * _SIZE_UNITS[unit])
    if value < 1:
        raise ValueError("must be a size > 0")
    return value


def optional_size(text: str) -> int | None:
    return None if text.strip().lower() in ("", "0", "none", "off") else parse_size(text)


def size_or_off(text: str) -> int:
    """A size, or 0 for off ('0', '0M', 'off', 'none', '')."""
    zero = re.fullmatch(r"\s*0+(?:\.0*)?\s*[KMGT]?(?:I?B)?\s*", text.upper())
    if zero or text.strip().lower() in ("", "none", "off"):
        return 0
    return parse_size(text)


def text(text: str) -> str:
    return text


def optional_text(text: str) -> str | None:
    return text or None


def pipeline_ref(text: str) -> str | None:
    if not text:
        return None
    if not re.fullmatch(r"[\w.]+:[\w.]+", text):
        raise ValueError(f"must be module:function, e.g. mypkg.pipes:make; got {text!r}")
    return text
