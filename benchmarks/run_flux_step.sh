#!/usr/bin/env bash
# FLUX.1-sized step on 1, 2 and 4 GPUs (one node). Usage: benchmarks/run_flux_step.sh OUT_DIR [extra args]
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${1:?usage: run_flux_step.sh OUT_DIR [extra args]}; shift
REF=${REF_DIR:-/tmp/cocodiff_ref}
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
here=$(dirname "$0")
torchrun --standalone --nproc-per-node 1 "$here/flux_step.py" --ref-dir "$REF" --out "$OUT" "$@"
for P in 2 4; do
  if [ "$P" -le "$GPUS" ]; then
    torchrun --standalone --nproc-per-node "$P" "$here/flux_step.py" --ref-dir "$REF" --out "$OUT" "$@"
  fi
done
