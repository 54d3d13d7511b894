#!/usr/bin/env bash
# The bench venv for the llama.cpp peer row (bench/bench_llamacpp.py): llama-cpp-python
# built from its sdist, CPU only, in a venv outside the repository's tracked files.
#
#   bash bench/llamacpp_venv.sh          # builds once (~15 min on 2 cores), prints the path
#   "$(bash bench/llamacpp_venv.sh)/bin/python" bench/bench_llamacpp.py --gguf /tmp/gemma.gguf
#
# Idempotent: when llama_cpp already imports in the venv it only prints the path.
# Environment: EDGEMIND_BENCH_VENV (the venv path), PYTHON (the interpreter to base it on).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
VENV="${EDGEMIND_BENCH_VENV:-$HOME/.cache/edgemind/bench-venv}"
PYTHON="${PYTHON:-python3}"

# Progress goes to stderr so stdout is only the venv path (usable in "$(...)").
if [ -x "$VENV/bin/python" ] \
	&& "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
	echo "$VENV"
	exit 0
fi

mkdir -p "$(dirname "$VENV")"
if [ ! -x "$VENV/bin/python" ]; then
	"$PYTHON" -m venv "$VENV" >&2
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2

# CPU only, tuned for this machine (GGML_NATIVE); no BLAS, no GPU back end, and no curl
# (llama.cpp's model downloader, which needs libcurl headers and is not used here).
# The build is long: nice it so it does not starve other work on a shared machine.
start_s=$(date +%s)
echo "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION into $VENV (about 15 minutes)" >&2
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF}" \
	CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
	nice -n 19 "$VENV/bin/python" -m pip install --disable-pip-version-check \
	--no-cache-dir "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
echo "built in $(($(date +%s) - start_s)) s" >&2

"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)" >&2
echo "$VENV"
