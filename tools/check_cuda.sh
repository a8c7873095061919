#!/usr/bin/env bash
# Compile-check every CUDA kernel file (they include no torch headers) for sm_80 and sm_90a.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "check_cuda: no .cu files"; exit 0; fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in "${files[@]}"; do
  start=$SECONDS
  "$NVCC" -c "$f" -o "$out/$(basename "$f").o" -std=c++17 -O3 -Icsrc -DQK_WITH_CUDA \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
  echo "check_cuda: $f ok (sm_80, sm_90a) in $((SECONDS - start))s"
done
