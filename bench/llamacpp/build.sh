#!/usr/bin/env bash
# llama.cpp's llama-server, the streamed-generation peer of bench/versus_llamacpp.py, built from
# the llama.cpp tree inside llama-cpp-python's source distribution on PyPI (issue #27 item 1),
# and a separate virtualenv for that tree's convert_hf_to_gguf.py. Idempotent; from the repo root
# (CPU-heavy: 11 minutes on a 2-core box under nice, beside other work):
#
#     nice -n 19 bash bench/llamacpp/build.sh
#
# Everything lands in bench/out/llamacpp/ (git-ignored, never committed):
#   llama_cpp_python-$VERSION.tar.gz   the sdist, exactly as PyPI serves it
#   llama_cpp_python-$VERSION/         unpacked; the tree is its vendor/llama.cpp/
#   build/bin/llama-server             the binary (the last line this script prints)
#   venv/                              torch, transformers, sentencepiece and the tree's own gguf-py,
#                                      for the conversion only (pipeserve's .venv is not touched)
#
# The build: Release, -DGGML_NATIVE=ON (this CPU's instruction set), -DLLAMA_CURL=OFF (as the
# issue asks; this tree has deprecated the option and ignores it, and its HTTP client is
# cpp-httplib), -DLLAMA_OPENSSL=OFF (the server needs no HTTPS), -DLLAMA_USE_PREBUILT_UI=OFF (the
# web UI would otherwise be fetched from a Hugging Face bucket at build time; the server then
# serves no UI, which the benchmark does not use), and only the llama-server target, -j2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
out=bench/out/llamacpp
venv=$out/venv
src=$out/llama_cpp_python-$version
tree=$src/vendor/llama.cpp
build=$out/build
jobs=${JOBS:-2}
started=$(date +%s)
mkdir -p "$out"

[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"

# 1. The sdist. pip prepares its metadata (scikit-build-core, in an isolated build env) but
#    compiles nothing here.
if [ ! -f "$out/llama_cpp_python-$version.tar.gz" ]; then
    "$venv/bin/python" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$out"
fi
[ -f "$tree/CMakeLists.txt" ] || tar -xzf "$out/llama_cpp_python-$version.tar.gz" -C "$out"

# 2. llama-server.
if [ ! -x "$build/bin/llama-server" ]; then
    cmake -S "$tree" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build "$build" --config Release --target llama-server -j "$jobs"
fi

# 3. The converter's dependencies: the tree's requirements-convert_hf_to_gguf.txt, except torch
#    (2.11 there, from download.pytorch.org; here the CPU 2.13.0 wheel that lies on this machine)
#    and gguf (the tree's own gguf-py instead of PyPI's, so that converter and library match).
requirements="$tree/requirements/requirements-convert_legacy_llama.txt"
if ! cmp -s "$requirements" "$venv/.installed"; then
    "$venv/bin/python" -m pip install --quiet torch==2.13.0 "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0" \
        "transformers==4.57.6" "protobuf>=4.21.0,<5.0.0" "$tree/gguf-py"
    cp "$requirements" "$venv/.installed"
fi

echo "built in $(( $(date +%s) - started )) s (0 when nothing was left to do)"
echo "next: .venv/bin/python bench/llamacpp/model.py (converts with $venv/bin/python bench/llamacpp/convert.py)"
realpath "$build/bin/llama-server"
