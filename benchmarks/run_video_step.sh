#!/usr/bin/env bash
# Video DiT step (Wan2.1-14B- and HunyuanVideo-sized, 480p and 720p at 81 frames) on 1 GPU, then 2, 4 and 8 GPUs
# where the host has them, with diffusers' own Ulysses alongside.
# Usage: benchmarks/run_video_step.sh OUT_DIR [extra args, e.g. --graph --configs flat vfirst vfirst+fused]
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${1:?usage: run_video_step.sh OUT_DIR [extra args]}; shift
REF=${REF_DIR:-/tmp/cocodiff_video_ref}
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
here=$(dirname "$0")
torchrun --standalone --nproc-per-node 1 "$here/video_step.py" --ref-dir "$REF" --out "$OUT" --single-fused "$@"
for P in 2 4 8; do
  if [ "$P" -le "$GPUS" ]; then
    torchrun --standalone --nproc-per-node "$P" "$here/video_step.py" --ref-dir "$REF" --out "$OUT" "$@"
  fi
done
