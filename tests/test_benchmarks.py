"""The committed reports that are derived from committed JSON alone (no GPU) are what their scripts make today."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
        stem = f"sharding_cost_flux_{size}_P2"
        assert _close(
            json.loads((tmp_path / f"{stem}.json").read_text()), json.loads((report / f"{stem}.json").read_text())
        )
        assert (tmp_path / f"{stem}.md").read_text() == (report / f"{stem}.md").read_text()
    assert (tmp_path / "sharding_cost.png").stat().st_size > 0
    # a pair in the wrong order is refused, naming what it got
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sharding_cost.py"), "--out", str(tmp_path), "--compare"]
        + [str(pairs[1]), str(pairs[0])],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "P=2 and P=1" in r.stderr


def _kernels(run: dict, pattern: str) -> tuple[float, int]:
    import re

    hits = [v for name, v in run["kernels"].items() if re.search(pattern, name)]
    return sum(v["ms"] for v in hits), sum(v["n"] for v in hits)


def test_sharding_cost_report_figures_are_the_data():
    # the figures the report quotes, recomputed from the raw profiles (not from the script under test)
    runs = DOCS / "2026-11-30-sharding-cost" / "runs"
    one, two = (
        {s: json.loads((runs / f"flux_{s}" / f"sharding_cost_P{p}.json").read_text()) for s in (1024, 2048)}
        for p in (1, 2)
    )
    want = {1024: (7.4, 1.7, 1.0, 0.223, 0.270, 0.241), 2048: (8.7, 5.7, 1.1, 2.86, 2.95, 2.81)}
    for size, (cost, copies, modulation, ideal_attn, attn_noex, attn_exact) in want.items():
        p1, p2 = one[size]["modes"]["exact"], two[size]["modes"]
        assert round(p2["no_exchange"]["ms"] - p1["ms"] / 2, 1) == cost
        c1, c2 = p1["by_category_ms"]["copy"], p2["no_exchange"]["by_category_ms"]["copy"]
        assert round(c2 - c1 / 2, 1) == copies
        # the main copy kernel: 133 launches per rank against 38 on one GPU; with the others 155 against 79
        assert _kernels(p1, r"elementwise_kernel<128, 4.*direct_copy")[1] == 38
        assert _kernels(p2["no_exchange"], r"elementwise_kernel<128, 4.*direct_copy")[1] == 133
        assert _kernels(p1, "direct_copy|CatArray")[1] == 79
        assert _kernels(p2["no_exchange"], "direct_copy|CatArray")[1] == 155
        m1, m2 = _kernels(p1, "192x8"), _kernels(p2["no_exchange"], "192x8")
        assert m1[1] == m2[1] == 76 and round(m2[0] - m1[0] / 2, 1) == modulation
        per_call = [_kernels(r, "cudnn_generated") for r in (p1, p2["no_exchange"], p2["exact"])]
        got = [t / n for t, n in per_call]
        digits = 3 if size == 1024 else 2
        assert [round(got[0] / 2, digits), round(got[1], digits), round(got[2], digits)] == [
            ideal_attn,
            attn_noex,
            attn_exact,
        ]


def test_attention_and_v_pack_report_figures_are_the_data():
    report = DOCS / "2026-11-30-sharding-cost"
    rows = []
    for name in ("d128_flux_flux2", "d64_sd35", "d128_wan"):
        rows += json.loads((report / "attention" / f"{name}.json").read_text())["rows"]
    assert all(r["fastest"] == "cudnn" for r in rows)
    flash = [r["ms"]["flash"] / r["ms"]["cudnn"] for r in rows]
    eff = [r["ms"]["efficient"] / r["ms"]["cudnn"] for r in rows]
    assert (round(min(flash), 1), round(max(flash), 1), round(min(eff), 1), round(max(eff), 1)) == (1.2, 2.5, 2.2, 4.0)
    per_head = {(r["heads"], r["seq"], r["degree"]): round(r["per_head_vs_first_degree"]["cudnn"], 2) for r in rows}
    assert [per_head[(24, 4608, p)] for p in (2, 4, 8)] == [1.35, 1.41, 1.74]
    assert [per_head[(48, 4608, p)] for p in (2, 4, 8)] == [1.04, 1.22, 1.34]
    assert [per_head[(38, 4429, p)] for p in (2, 4, 8)] == [1.11, 1.18, 1.69]
    v = {(r["hidden"], r["L"], r["P"]): r for r in json.loads((report / "v_pack" / "v_pack.json").read_text())}
    quoted = {
        (2304, 2): (0.120, 0.094, 0.106, 0.122),
        (8448, 2): (0.305, 0.234, 0.287, 0.267),
        (2304, 8): (0.118, 0.094, 0.115, 0.351),
    }
    for (L, P), figures in quoted.items():
        r = v[(3072, L, P)]
        assert tuple(round(r[k], 3) for k in ("mm+copy", "mm", "bmm", "loop")) == figures
    assert all(r["max_diff_loop"] == 0.0 for r in v.values()) and all(r["max_diff_bmm"] > 0 for r in v.values())


def _sharding_cost():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sharding_cost
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return sharding_cost


def test_sharding_cost_reports_the_gpu_clock_when_sampled():
    # later runs sample the SM clock during the timed calls and the profiled one; the report says both
    sc = _sharding_cost()
    s = json.loads((DOCS / "2026-11-30-sharding-cost" / "sharding_cost_flux_1024_P2.json").read_text())
    assert "SM clock" not in sc.report(s)  # these runs predate the sampler
    s["clocks"]["one_gpu"]["clock_timed"] = {"sm_clock_mhz_median": 1755.0}
    s["clocks"]["rank_no_exchange"]["clock_profiled"] = {"sm_clock_mhz_median": 1980.0}
    assert "(timed calls / profiled call): one GPU 1755 / -, one rank - / 1980" in sc.report(s)
    with sc.ClockSampler(0) as clock:  # without nvidia-smi (CPU machines): no samples, no error
        pass
    assert clock.summary() == {} or clock.summary()["samples"] >= 0


def test_sharding_cost_kernel_categories():
    category = _sharding_cost().category
    assert category("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "nccl"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128") == "attention"
    assert category("nvjet_sm90_tst_144x128_64x6_1x2_h_bz_coopA_bias_TNN") == "gemm"
    assert category("triton_poi_fused_copy_copy__gelu_0") == "triton"
    assert category("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda") == "copy"
    assert category("Memset (Unknown)") == "other"


def test_sharded_modulation_report_figures_are_the_data(tmp_path):
    report = DOCS / "2026-11-30-sharded-modulation"
    result = json.loads((report / "modulation_ab_P2.json").read_text())
    # the committed table is what the script's report mode makes of the JSON
    _run("modulation_ab.py", "--report", str(report / "modulation_ab_P2.json"), "--out", str(tmp_path))
    assert (tmp_path / "modulation_ab_P2.md").read_text() == (report / "modulation_ab_P2.md").read_text()
    text = (report / "README.md").read_text()
    want = {("flux", 1024): (81.6, 80.3), ("sd3", 1024): (43.9, 43.3)}
    for r in result["runs"]:
        # medians of every call, recomputed
        med = {k: sorted(v)[len(v) // 2 - 1 : len(v) // 2 + 1] for k, v in r["ms_all"].items()}
        got = tuple(round(sum(med[k]) / 2, 1) for k in ("replicated", "sharded"))
        assert got == want[(r["family"], r["size"])]
        assert f"| {got[0]} | **{got[1]}** |" in text
        assert r["graphs_traced"]["sharded"] < 10  # one set of graphs per block class, not per block
    assert sorted((r["family"], r["size"]) for r in result["runs"]) == sorted(want)
    # the clock table, from the sampled profiles
    sc = report / "sharding_cost"
    one = json.loads((sc / "sharding_cost_P1.json").read_text())["modes"]["exact"]
    two = json.loads((sc / "sharding_cost_P2.json").read_text())["modes"]
    rows = [(one, "one GPU"), (two["no_exchange"], "P=2 no-exchange"), (two["exact"], "P=2 exact")]
    for mode, name in rows:
        t, p = mode["clock_timed"], mode["clock_profiled"]
        line = (
            f"| {name} | {mode['ms']:.1f} | {t['sm_clock_mhz_median']:.0f} ({t['sm_clock_mhz_min']:.0f}) MHz | "
            f"{t['power_w_median']:.0f} W | {p['sm_clock_mhz_median']:.0f} MHz |"
        )
        assert line in text, line
    cold, warm = (json.loads((report / f"first_call_flux_{k}.json").read_text()) for k in ("cold", "warm"))
    assert f"{cold['first_call_s']:.1f} s" in text and f"**{warm['first_call_s']:.1f} s**" in text


def test_split_gemms_report_is_the_data(tmp_path):
    report = DOCS / "2026-11-30-sharded-modulation"
    _run("split_gemms.py", "--report", str(report / "split_gemms.json"), "--out", str(tmp_path))
    assert (tmp_path / "split_gemms.md").read_text() == (report / "split_gemms.md").read_text()
    rows = json.loads((report / "split_gemms.json").read_text())["rows"]
    cost = {(r["family"], r["size"], r["P"]): r["sliced_ms"] / r["whole_ms"] - 1 for r in rows}
    text = (report / "README.md").read_text()
    for family, name in (("flux", "FLUX.1"), ("flux2", "FLUX.2")):
        for size in (1024, 2048):
            cells = [f"{100 * cost[(family, size, p)]:+.1f}%" for p in (1, 2, 4, 8)]
            line = " | ".join(f"**{c}**" if abs(float(c[:-1])) > 5 else c for c in cells)
            assert (
                f"| {name}, {size}^2{': sliced against whole' if (family, size) == ('flux', 1024) else ''} | {line} |"
                in text
            ), (family, size, line)
    one = {
        (r["family"], r["engine"], r["mode"]): r
        for r in json.loads((report / "one_gpu" / "e2e.json").read_text())["rows"]
    }
    for family, name in (("flux2", "FLUX.2-dev"), ("flux", "FLUX.1")):
        ms = [one[(family, "diffusers", m)]["ms_per_step"] for m in ("eager", "regional-compile")]
        ms.append(one[(family, "cocodiff", "fast")]["ms_per_step"])
        assert f"| {name} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[2]:.1f} (" in text


def test_sharded_modulation_e2e_figures_are_the_data():
    report = DOCS / "2026-11-30-sharded-modulation"
    rows = json.loads((report / "e2e_1024" / "e2e.json").read_text())["rows"]
    ms = {(r["family"], r["P"], r["engine"], r["mode"]): r for r in rows if r.get("ms_per_step")}
    text = (report / "README.md").read_text()
    best, plain, over_best, over_plain = {}, {}, [], []
    for family in ("flux", "sd3", "qwenimage", "flux2"):
        one = [v["ms_per_step"] for k, v in ms.items() if k[0] == family and k[1] == 1]
        best[family], plain[family] = min(one), ms[(family, 1, "diffusers", "eager")]["ms_per_step"]
        row = ms[(family, 2, "cocodiff", "fast")]
        step, bound = row["ms_per_step"], row["no_exchange_ms"]
        assert f"| **{step:.1f}** | {bound:.1f} (+{step - bound:.1f}) |" in text, family
        over_best.append(f"{best[family] / step:.2f}x")
        over_plain.append(f"{plain[family] / step:.2f}x")
    assert "FLUX.1 {}, SD3.5 {}, Qwen-Image {}, FLUX.2 {}".format(*over_best) in text
    assert "{}, {}, {}, {}".format(*over_plain) in text
    q = ms[("qwenimage", 2, "diffusers", "regional-compile")]["ms_per_step"]
    assert f"Qwen-Image {q / ms[('qwenimage', 2, 'cocodiff', 'fast')]['ms_per_step']:.2f}x" in text
    errors = [ms[(f, 2, "cocodiff", "fast")]["rel_err_vs_1gpu"] for f in ("flux", "sd3", "qwenimage", "flux2")]
    errors = [f"{e:.1e}".replace("e-0", "e-") for e in errors]
    assert "{} (FLUX.1), {} (SD3.5), {}\n  (Qwen-Image), {} (FLUX.2)".format(*errors) in text


def test_final_code_report_figures_are_the_data(tmp_path):
    report = DOCS / "2026-11-30-final-code"
    text = (report / "README.md").read_text()
    # the A/B tables are what config_ab's report mode makes of their JSON, and the README's route table is it
    for stem in ("config_ab_P2_routes", "config_ab_P2_head_start"):
        _run("config_ab.py", "--report", str(report / f"{stem}.json"), "--out", str(tmp_path))
        assert (tmp_path / f"{stem}.md").read_text() == (report / f"{stem}.md").read_text()
    routes = {r["family"]: r["ms"] for r in json.loads((report / "config_ab_P2_routes.json").read_text())["runs"]}
    for family, name, unit in (("flux2", "FLUX.2-sized", " ms"), ("flux", "FLUX.1-sized", "")):
        ms = routes[family]
        line = f"| {name} | {ms['nccl']:.1f}{unit} | **{ms['copy_engine']:.1f}** | {ms['nccl_high']:.1f} |"
        assert line in text, line
    head = {r["family"]: r["ms"] for r in json.loads((report / "config_ab_P2_head_start.json").read_text())["runs"]}
    hs = head["flux2"]
    assert (
        f"{hs['head_start128']:.1f} / {hs['head_start256']:.1f} / {hs['head_start512']:.1f} ms with 128 / 256 / 512 "
        f"rows first, against v0's {hs['off']:.1f}" in text
    )
    hf = head["flux"]
    cells = " / ".join(f"{hf[f'head_start{n}']:.1f}" for n in (128, 256, 512))
    assert f"{cells} against {hf['off']:.1f}" in text
    assert f"{routes['flux']['nccl']:.1f} and {hf['off']:.1f} ms in this session's two A/B launches" in text
    # bench e2e on the final code
    rows = json.loads((report / "e2e_1024" / "e2e.json").read_text())["rows"]
    ms = {(r["family"], r["P"], r["engine"], r["mode"]): r for r in rows if r.get("ms_per_step")}
    for family, name in (("flux", "FLUX.1-sized"), ("qwenimage", "Qwen-Image-sized"), ("sd3", "SD3.5-large-sized")):
        one = min(v["ms_per_step"] for k, v in ms.items() if k[0] == family and k[1] == 1)
        row = ms[(family, 2, "cocodiff", "fast")]
        step, bound = row["ms_per_step"], row["no_exchange_ms"]
        plain = ms[(family, 1, "diffusers", "eager")]["ms_per_step"]
        line = f"| {name} | {plain:.1f} | {one:.1f} (cocodiff) | "
        assert line in text, line
        assert f"| **{step:.1f}** | {bound:.1f} (+{step - bound:.1f}) | {one / step:.2f}x |" in text, family
    # the profiles' idle time per exchange in flight, and the compute union
    for version, bold, unit in (
        ("v0_gate_then_up", "", " ms"),
        ("head_start256", "", ""),
        ("v1_gemms_then_activation", "O", ""),
        ("v2_hidden_halves", "c", ""),
    ):
        folder = report / "profile_flux2" / version
        gaps = json.loads((folder / "compute_gaps_flux2_fast_1024.json").read_text())
        step = json.loads((folder / "vfirst_overlap_flux2_fast_1024.json").read_text())["step_ms_median_of_7"]
        by = gaps["idle_by_exchange_in_flight"]
        k, o = (f"{by[f'single {x}']['idle_us'] / 1e3:.2f}" for x in "KO")
        compute = f"{gaps['compute_us'] / 1e3:.1f}"
        o, compute = (f"**{o}**" if bold == "O" else o), (f"**{compute}**" if bold == "c" else compute)
        line = f"| {step:.1f}{unit} | {k} / {o}{unit} | {compute}{unit} |"
        assert line in text, line
    # the v0 timeline of single block 20: K's all-to-all waits for the gate GEMM's tail
    import gzip

    events = json.loads(
        gzip.open(report / "profile_flux2/v0_gate_then_up/trace_rank0_kernels_flux2_fast_1024.json.gz", "rt").read()
    )
    kernels = sorted((e for e in events if "dur" in e), key=lambda e: e["ts"])
    a2a = [e for e in kernels if "nccl" in e["name"].lower() and "allgather" not in e["name"].lower()]
    t0, k_a2a = a2a[4 * 28]["ts"], a2a[4 * 28 + 2]
    gate = max((e for e in kernels if "nvjet" in e["name"] and e["ts"] < k_a2a["ts"]), key=lambda e: e["ts"])
    assert f"| {gate['ts'] - t0:.1f}-{gate['ts'] + gate['dur'] - t0:.1f} | the SwiGLU gate GEMM" in text
    assert f"| **{k_a2a['ts'] - t0:.1f}-{k_a2a['ts'] + k_a2a['dur'] - t0:.1f}** | **K's all-to-all" in text


def test_config_ab_runs_variants_side_by_side_on_cpu_ranks(tmp_path):
    # two gloo ranks, tiny FLUX.2: the preset, V-First switched off, and head groups; exact variants agree
    script = str(ROOT / "benchmarks" / "config_ab.py")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
         "--cpu", "--model-size", "tiny", "--preset", "vfirst", "--runs", "flux2:64", "--rounds", "1", "--iters", "1",
         "--variants", "base=", "flat=v_first:False", "groups=head_chunks:2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "config_ab_P2.json").read_text())
    (run,) = result["runs"]
    assert set(run["ms"]) == {"base", "flat", "groups"} and all(len(t) == 1 for t in run["ms_all"].values())
    assert run["labels"] == {"base": "vfirst", "flat": "vfirst+no_vfirst", "groups": "vfirst+chunks2"}
    assert all(e < 1e-5 for e in run["rel_error_vs_reference"].values()), run
    assert run["weights_shared"] is True  # one set of weights, a module tree per variant
    assert "| flux2, 64^2 |" in (tmp_path / "config_ab_P2.md").read_text()


def test_config_ab_refuses_bad_variants_before_launching(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_ab", ROOT / "benchmarks" / "config_ab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_variant("ce=all_to_all:copy_engine,head_chunks:2") == (
        "ce",
        {"all_to_all": "copy_engine", "head_chunks": 2},
    )
    assert mod.parse_variant("plain=") == ("plain", {})
    for bad, words in (("noequals", "NAME=KEY:VALUE"), ("x=v_first", "KEY:VALUE"), ("x=nccl_stream:low", "high")):
        with pytest.raises(ValueError, match=words):
            mod.parse_variant(bad)
    # the whole list, as main checks it before any rank starts
    assert list(mod.parse_variants(["a=", "b=head_chunks:2"], "vfirst", cpu=True)) == ["a", "b"]
    for specs, words in (
        (["a=", "a=head_chunks:2"], "given twice"),
        (["a="], "at least two"),
        (["a=", "b=nccl_stream:high"], "needs NCCL"),
        (["a=", "b=head_chunks:0"], "head_chunks=0"),
    ):
        with pytest.raises(ValueError, match=words):
            mod.parse_variants(specs, "vfirst", cpu=True)
    with pytest.raises(TypeError, match="no_such_field"):
        mod.parse_variants(["a=", "b=no_such_field:1"], "vfirst", cpu=False)
    assert mod.label("fast+fuse_qk", {"nccl_stream": "high"}) == "fast+fuse_qk+nccl_high"
