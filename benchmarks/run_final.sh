#!/usr/bin/env bash
# V-First evidence on one 4-GPU host, after the step benchmark (run_overlap.sh): GPU tests, the profiled
# timeline through cuda_graph=True, the emulated 2x2 topology, and the demo on GPUs. Usage: run_final.sh OUT
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${1:?usage: run_final.sh OUT_DIR}
here=$(dirname "$0")
mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs >"$OUT/test_gpu.log" 2>&1
echo "test_gpu rc=$?"; tail -4 "$OUT/test_gpu.log"
timeout 150 torchrun --standalone --nproc-per-node 4 "$here/vfirst_profile.py" --graph --fuse-qk --skip-eq2 \
  --out "$OUT" 2>&1 | grep -v '^W1' | tail -25
echo "profile rc=$?"
timeout 200 torchrun --standalone --nproc-per-node 4 "$here/flux_step.py" --graph --topology 2x2 --emulate \
  --max-ctas 4 --configs flat vfirst+fused tapa-vfirst+fused --tag _2x2_emulated --ref-dir /tmp/ref --out "$OUT"
echo "emulated rc=$?"
timeout 150 python3 -m cocodiff demo --v-first --fuse-qk --cuda-graph --steps 20 --out "$OUT/demo" 2>&1 | tail -14
echo "demo rc=$?"; rm -f "$OUT/demo/report.md"  # printed above; keeps the files that come back few
