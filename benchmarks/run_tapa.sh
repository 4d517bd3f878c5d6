#!/usr/bin/env bash
# TAPA evidence on one 4-GPU host: a2a microbenchmarks (real single tier, real 2x2, emulated 2x2) and the
# FLUX.1-sized step flat vs TAPA on the real and the emulated 2x2 topology.
# Usage: benchmarks/run_tapa.sh OUT_DIR
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${1:?usage: run_tapa.sh OUT_DIR}
REF=${REF_DIR:-/tmp/cocodiff_ref}
here=$(dirname "$0")
export PYTHONPATH="$here/../src:${PYTHONPATH:-}"
run="torchrun --standalone --nproc-per-node 4"
$run -m cocodiff bench a2a --topology 4 --out "$OUT"
$run -m cocodiff bench a2a --topology 2x2 --out "$OUT"
$run -m cocodiff bench a2a --topology 2x2 --emulate --max-ctas auto --out "$OUT"
CTAS=$(python3 -c "import json,sys; print(json.load(open('$OUT/a2a_2x2_emulated_P4.json'))['emulation']['max_ctas'])")
echo "emulated slow link: max_ctas=$CTAS"
[ -f "$REF/flux_1024.pt" ] || torchrun --standalone --nproc-per-node 1 "$here/flux_step.py" --ref-dir "$REF" --out "$OUT/ref" --iters 3
$run "$here/flux_step.py" --ref-dir "$REF" --out "$OUT" --topology 2x2 --configs flat tapa-phases tapa --graph --tag _2x2
$run "$here/flux_step.py" --ref-dir "$REF" --out "$OUT" --topology 2x2 --emulate --max-ctas "$CTAS" \
    --configs flat vfirst tapa-phases tapa tapa-vfirst --graph --tag _2x2_emulated
