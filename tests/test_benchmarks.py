"""The committed reports that are derived from committed JSON alone (no GPU) are what their scripts make today."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"


def _run(script: str, *args: str) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def _close(a, b) -> bool:
    """Equal JSON, floats to 1e-9 (least squares on another machine's BLAS may differ in the last bits)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_scaling_model_reproduces_its_committed_report(tmp_path):
    _run("scaling_model.py", "--out", str(tmp_path))
    want = json.loads((DOCS / "2026-11-30-scaling" / "scaling.json").read_text())
    assert _close(json.loads((tmp_path / "scaling.json").read_text()), want)
    assert len(want["checks"]) == 56


def test_vmajor_levels_reproduces_its_committed_table(tmp_path):
    # V-Major's step per cache level against its Amdahl estimate, from the bench e2e runs committed beside it
    report = DOCS / "2026-11-30-sizes-slow-tier"
    runs = [DOCS / "2026-11-30-compiled-pieces" / "emulated_1cta", report / "emulated_1cta", report / "emulated_4cta"]
    _run("vmajor_levels.py", str(tmp_path), *map(str, runs))
    got = json.loads((tmp_path / "levels.json").read_text())
    assert _close(got, json.loads((report / "levels" / "levels.json").read_text()))
    # 50-step runs with the defaults: four levels of 11, 11, 11 and 12 selective steps
    rows = [x for x in got if x["run"].endswith("sizes-slow-tier/emulated_1cta") and x["mode"] == "fast+vmajor"]
    assert [x["steps"] for x in rows] == [11, 11, 11, 12]
    assert [round(x["rows_sent"], 2) for x in rows] == [0.5, 0.37, 0.23, 0.1]


def test_sharding_cost_reproduces_its_committed_comparisons(tmp_path):
    # one GPU against one rank of two, kernel by kernel, from the profiles committed beside the report
    report = DOCS / "2026-11-30-sharding-cost"
    pairs = [report / "runs" / f"flux_{s}" / f"sharding_cost_P{p}.json" for s in (1024, 2048) for p in (1, 2)]
    _run("sharding_cost.py", "--out", str(tmp_path), "--compare", *map(str, pairs))
    for size in (1024, 2048):
        name = f"sharding_cost_flux_{size}_P2.json"
        got = json.loads((tmp_path / name).read_text())
        assert _close(got, json.loads((report / name).read_text()))
        # the categories add up to the kernel sums, and nothing of the no-exchange step is NCCL's
        cats = got["by_category"]
        assert math.isclose(sum(c["excess_ms"] for c in cats.values()), got["kernel_excess_ms"], rel_tol=1e-9)
        assert math.isclose(sum(c["rank_ms"] for c in cats.values()), got["rank_kernel_sum_ms"], rel_tol=1e-9)
        assert cats.get("nccl", {"rank_ms": 0.0})["rank_ms"] < 0.1
    assert (tmp_path / "sharding_cost.png").stat().st_size > 0


def test_sharding_cost_kernel_categories():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from sharding_cost import category
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert category("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "nccl"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128") == "attention"
    assert category("nvjet_sm90_tst_144x128_64x6_1x2_h_bz_coopA_bias_TNN") == "gemm"
    assert category("triton_poi_fused_copy_copy__gelu_0") == "triton"
    assert category("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda") == "copy"
    assert category("Memset (Unknown)") == "other"
