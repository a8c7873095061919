#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with plain nvcc (no torch) for sm_80 and sm_90a. Fails loudly.
# Usage: tools/check_cuda.sh   (NVCC=/path/to/nvcc to override; runs from any directory)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  for c in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc /usr/local/cuda-13.0/bin/nvcc "$(command -v nvcc || true)"; do
    if [[ -n "$c" && -x "$c" ]]; then NVCC="$c"; break; fi
  done
fi
if [[ -z "$NVCC" ]]; then echo "check_cuda: FAILED: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 1; fi
shopt -s nullglob
files=("$ROOT"/csrc/cuda/*.cu)
if (( ${#files[@]} == 0 )); then echo "check_cuda: FAILED: no csrc/cuda/*.cu files" >&2; exit 1; fi
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
fail=0
for f in "${files[@]}"; do
  start=$(date +%s)
  if "$NVCC" -c -std=c++17 -O3 --use_fast_math -Werror all-warnings -I "$ROOT/csrc" -DQK_WITH_CUDA \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
      "$f" -o "$out/$(basename "$f").o"; then
    echo "check_cuda: ok   ${f#$ROOT/} ($(( $(date +%s) - start )) s)"
  else
    echo "check_cuda: FAILED ${f#$ROOT/}" >&2; fail=1
  fi
done
if (( fail )); then echo "check_cuda: FAILED (see errors above)" >&2; exit 1; fi
echo "check_cuda: all ${#files[@]} CUDA files compile for sm_80 and sm_90a ($("$NVCC" --version | tail -1))"
