"""Decoding the files that image and audio pipelines take, in the model process."""

from __future__ import annotations

import io
import shutil
import wave
from typing import Any

import numpy as np


class InputTooLarge(ValueError):
    """An input over one of pipeserve's own size limits (a 413, not a 400)."""


def decode_image(data: bytes, max_pixels: int | None = None) -> Any:
    """An RGB PIL image from encoded bytes; ValueError (a 400) if it is not one, InputTooLarge
    (a 413) if it has more than `max_pixels` pixels: told by its header, before it is decoded
    (a few KB of PNG can declare gigabytes of pixels)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only image models need Pillow

    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = None  # Pillow's own bomb check (a warning, then a 400) gives way to ours
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise InputTooLarge(f"the image is {width}x{height} = {width * height} pixels; at most "
                                f"{max_pixels} (--max-image-pixels)")
        image.load()
    except InputTooLarge:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from None
    return image.convert("RGB")


def decode_audio(data: bytes, rate: int) -> np.ndarray:
    """Mono float32 samples at `rate` from WAV bytes (other formats through ffmpeg, if installed)."""
    try:
        with wave.open(io.BytesIO(data)) as handle:
            width, channels, source_rate = handle.getsampwidth(), handle.getnchannels(), handle.getframerate()
            frames = handle.readframes(handle.getnframes())
    except (wave.Error, EOFError):
        if shutil.which("ffmpeg") is None:
            raise ValueError("audio must be a WAV file (install ffmpeg to accept other formats)") from None
        from transformers.pipelines.audio_utils import ffmpeg_read  # noqa: PLC0415

        return np.asarray(ffmpeg_read(data, rate), dtype=np.float32)
    if width not in (1, 2, 4):
        raise ValueError(f"unsupported WAV sample width of {width} bytes")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    samples = np.frombuffer(frames, dtype=dtype).astype(np.float32)
    if width == 1:
        samples = samples - 128.0
    samples /= float(2 ** (8 * width - 1))
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    if source_rate != rate and len(samples) > 1:  # linear resampling: no torchaudio needed
        duration = len(samples) / source_rate
        target = np.linspace(0.0, duration, round(duration * rate), endpoint=False)
        samples = np.interp(target, np.arange(len(samples)) / source_rate, samples).astype(np.float32)
    return samples


def encode_wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()
