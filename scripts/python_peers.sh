#!/usr/bin/env bash
# Makes (once) and prints the path of a Python virtual environment holding the peers that the
# served-teacher tests talk to: the official `openai` client and llama.cpp's OpenAI-compatible
# server (`llama-cpp-python[server]`, built from source: several minutes on 2 cores). Pinned
# versions; the environment is cached and reused while its stamp matches them.
#
#   venv=$(bash scripts/python_peers.sh); "$venv/bin/python" -m llama_cpp.server --help
#
# Cache: $BURN_DISTILL_CACHE, else $XDG_CACHE_HOME/burn-distill, else ~/.cache/burn-distill.
set -euo pipefail
cache="${BURN_DISTILL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/burn-distill}"
venv="$cache/python-peers"
packages=(openai==3.63.0 "llama-cpp-python[server]==0.3.36")
# Portable x86-64 kernels (AVX2, FMA, F16C) without OpenMP: a native build with OpenMP and AMX
# segfaulted in llama_decode on the first request here, and an AVX-512 build dies with an
# illegal instruction on the AMD machines CI also gets.
cmake_args="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF}"
stamp="${packages[*]} $cmake_args"
if [ -f "$venv/stamp" ] && [ "$(cat "$venv/stamp")" = "$stamp" ]; then
  echo "$venv"
  exit 0
fi
rm -rf "$venv"
mkdir -p "$cache"
echo "making $venv (${packages[*]}; llama.cpp compiles from source)" >&2
python3 -m venv "$venv" >&2
# No pip cache: pip keys a wheel it built by the package's version, not by CMAKE_ARGS, so a
# cached one may have been built with other flags.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" CMAKE_ARGS="$cmake_args" \
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "${packages[@]}" >&2
echo "$stamp" > "$venv/stamp"
echo "$venv"
