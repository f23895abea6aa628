#!/usr/bin/env bash
# Start infinity-emb (bench/.venv-infinity) on one model folder that setup.sh exported; the rest of
# the arguments go to `infinity_emb v2`:
#
#     bench/infinity/serve.sh bench/.models/minilm-onnx --engine optimum --pooling-method mean --port 8000
#
# It runs inside the model folder with `--model-id .`: infinity 0.0.78 hands optimum the ONNX
# file's path relative to --model-id, and optimum matches that against bare file names, so any
# other folder path fails ("Could not find any ONNX files with target file name ...").
# Its caches go to bench/.models/.cache/<folder>, one per model: the ONNX graph that infinity
# optimises on its first start is written to $HF_HOME/hub/infinity_onnx/<provider>/<model id>,
# which with `--model-id .` would be one path for every model.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
model="$(cd "$1" && pwd)"
shift
cache="$(dirname "$model")/.cache/$(basename "$model")"
mkdir -p "$cache"
# Offline and untracked: the model is local, and nothing outside this machine can be reached.
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 INFINITY_ANONYMOUS_USAGE_STATS=0
export HF_HOME="$cache" INFINITY_HOME="$cache"
cd "$model"
exec "$here/../.venv-infinity/bin/infinity_emb" v2 --model-id . "$@"
