#!/usr/bin/env bash
# One device session's worth of V-First evidence on one host (up to 4 GPUs): the GPU tests and the
# FLUX.1-sized step on 1 and P GPUs for each SDPA backend in $SDPA_LIST.
# Usage: benchmarks/run_overlap.sh OUT_DIR [configs...]   (SKIP_TESTS=1 leaves the tests out)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${1:?usage: run_overlap.sh OUT_DIR [configs...]}; shift
CONFIGS=${*:-flat vfirst-nooverlap vfirst ce-vfirst nocomm-vfirst}
here=$(dirname "$0")
P=$(python3 -c 'import torch; print(min(torch.cuda.device_count(), 4))')
mkdir -p "$OUT"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs >"$OUT/test_gpu.log" 2>&1
  echo "test_gpu rc=$?"; tail -3 "$OUT/test_gpu.log"
fi
for SDPA in ${SDPA_LIST:-default}; do
  REF=/tmp/cocodiff_ref_$SDPA
  ARGS="--graph --sdpa $SDPA --tag _$SDPA --ref-dir $REF --out $OUT ${STEP_ARGS:-}"
  timeout ${P1_TIMEOUT:-150} torchrun --standalone --nproc-per-node 1 "$here/flux_step.py" $ARGS
  echo "P1 $SDPA rc=$?"
  timeout ${P_TIMEOUT:-300} torchrun --standalone --nproc-per-node "$P" "$here/flux_step.py" $ARGS --configs $CONFIGS
  echo "P$P $SDPA rc=$?"
done
