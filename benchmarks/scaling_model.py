"""A step-time model for N nodes x G GPUs, calibrated on committed H200 measurements, checked against measurements
it was not fitted on, then used for predictions (labelled as such).

    python benchmarks/scaling_model.py --out docs/benchmarks/DATE-scaling

Model (one transformer step of Ulysses over P = N x G ranks, V-First, fused Q/K, CUDA graph, bf16):

    T(P, S, links) = C(P, S) + e * X(P, S, links)

- C, the per-rank compute (the no-exchange bound): (a S + b S^2) / P + c, S = image + text tokens. FLUX.1-sized:
  fitted exactly on four measured bounds (P = 1 and 4, 1024^2 and 2048^2). Wan-14B-sized: a, b from the two
  one-GPU steps (480p, 720p), c = 0 (steps take seconds).
- X, the time of the step's exchanges if nothing hid them: layers x 4 exchanges (Q, K, V, output), each a block
  all-to-all of S / P tokens x all heads per rank (bf16). Fast tier (NVLink): alpha_f + bytes / beta_f, fitted on
  `cocodiff bench a2a` over 4 H200 (graph-replayed); slow tier: the bytes leaving a node's GPU / beta_s; both
  tiers run at once (max).
- e, the exposed fraction of X: one number, fitted on one run (P = 2 over an emulated 40 GB/s link).
- Past the head count: Ulysses over a node's 8 GPUs x a ring across the nodes. The ring's hops (K and V of a
  block over the NIC) overlap the attention of the block in hand, and splitting the attention into R blocks
  merged in fp32 costs kappa x (R - 1) / R of the attention (quadratic) part (`ring_ms`). kappa is fitted on
  the one ring run measured (pure ring, P = 2, NVLink, FLUX.1-sized 2048^2); no other ring run checks it.
- V-Major: its slow-tier bytes scaled by the fraction it sends (measured on the small model: 1 / 2.73 at 50 steps).
- The `fast` preset (compiled blocks; `cocodiff bench e2e`): its own compute C_fast, fitted exactly on the e2e
  runs' one-rank steps (1024^2, 2048^2) and P = 2 no-exchange bound at 1024^2; the same e and X. Checked on the
  e2e rows it was not fitted on (the 2048^2 bound, both P = 2 steps); its predictions are a column of their own.

Inputs are the committed JSON files named in INPUTS; outputs: scaling.json, scaling.md, scaling.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import vmajor_levels  # (this folder: the script's own directory is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"
INPUTS = {
    "flux_1gpu": "2026-11-30-restructure/flux_P1.json",
    "flux_2gpu": "2026-11-30-restructure/flux_P2.json",
    "flux_4gpu": "2026-11-28-overlap/flux_P4.json",
    "flux_4gpu_emulated": "2026-11-28-overlap/flux_P4_2x2_emulated.json",
    "flux_2gpu_compiled_run": "2026-11-30-compiled/flux_P2_1024.json",
    "vmajor_speed": "2026-11-30-vmajor/vmajor_speed_1024.json",
    "a2a_nvlink": "2026-11-28-tapa/a2a_4_P4.json",
    "wan_1gpu": "2026-11-30-video/wan_P1.json",
    "wan_2gpu": "2026-11-30-video/wan_P2.json",
    "usp_2gpu": "2026-11-30-usp/usp_flux_P2.json",
    "e2e_1024": "2026-11-30-e2e/flux_sd3_1024/e2e.json",
    "e2e_2048": "2026-11-30-e2e/flux_2048/e2e.json",
    # the same command after the exchanges' pack copies were saved (later code than every fit above)
    "e2e_1024_copies": "2026-11-30-pack-copies/flux_1024/e2e.json",
    "e2e_2048_copies": "2026-11-30-pack-copies/flux_2048/e2e.json",
    # later still (head groups, off by default): one group is the same step; the emulated run has a 1-CTA slow link
    "e2e_1024_groups": "2026-11-30-head-groups/flux_1024/e2e.json",
    "e2e_2048_groups": "2026-11-30-head-groups/flux_2048/e2e.json",
    "e2e_emulated_groups": "2026-11-30-head-groups/emulated_head_groups/e2e.json",
    "e2e_emulated_vmajor": "2026-11-30-head-groups/emulated_vmajor/e2e.json",
    # compiled single-stream activations (later code again): NVLink rows and the emulated one-CTA tier
    "e2e_pieces": "2026-11-30-compiled-pieces/flux/e2e.json",
    "e2e_emulated_1cta": "2026-11-30-compiled-pieces/emulated_1cta/e2e.json",
    # V-Major's kernels compiled (later code again): image sizes the fits never saw (768, 1536, 2304), the emulated
    # slow tier at both calibrations (1 and 4 CTAs) with V-Major's step per cache level
    "e2e_sizes": "2026-11-30-sizes-slow-tier/flux_sizes/e2e.json",
    "e2e_emulated_1cta_pieces": "2026-11-30-sizes-slow-tier/emulated_1cta/e2e.json",
    "e2e_emulated_4cta_pieces": "2026-11-30-sizes-slow-tier/emulated_4cta/e2e.json",
}
MODELS = {  # attention layers, heads x head dim, text tokens, heads
    "FLUX.1": dict(layers=57, inner=3072, text=512, heads=24),
    "Wan2.1-14B": dict(layers=40, inner=5120, text=0, heads=40),  # text is cross-attention: not exchanged
}
VMAJOR_SLOW_FRACTION = 1 / 2.73  # slow-tier bytes V-Major sends, 50 steps, defaults (2026-11-30-vmajor)
ASSUMED_NIC_EFFICIENCY = 0.8  # a 400 Gb/s NIC's all-to-all throughput taken as 80% of line rate: an assumption
# The paper's machine (DESIGN.md): nodes of 6 GPUs x 2 tiles; tile<->tile ~185 GB/s, GPU<->GPU ~15, node<->node ~25.
# No Aurora measurement exists here: a tile's compute is the H200 fit scaled by peak dense bf16 (H200 989 TFLOPS,
# a Max 1550 tile ~420), an assumption that flatters the tile (peak, not achieved).
AURORA = {"tiles_per_gpu": 2, "tiles_per_node": 12, "GBps": (185.0, 15.0, 25.0), "compute_scale": 989.0 / 420.0}


def load(name: str) -> dict:
    return json.loads((DOCS / INPUTS[name]).read_text())


def graph_ms(d: dict, size: str, config: str) -> float:
    row = d["sizes"][size][config]
    return row.get("graph_ms_median") or row["eager_ms_median"]


class Link:
    """Hockney fit of the NVLink all-to-all (per exchange: alpha + bytes sent per rank / beta)."""

    def __init__(self, a2a: dict):
        m = np.array([r["MB_per_rank"] * 1e6 for r in a2a["rows"]])
        t = np.array([r["flat_graph_ms"] * 1e-3 for r in a2a["rows"]])
        slope, self.alpha = np.polyfit(m, t, 1)
        self.beta = 1.0 / slope  # bytes/s per rank

    def as_dict(self) -> dict:
        return {"alpha_us": self.alpha * 1e6, "beta_GBps_per_rank": self.beta / 1e9}


def exchange_ms(
    model: dict,
    P: int,
    S: int,
    link: Link,
    *,
    G: int | None = None,
    beta_slow: float | None = None,
    slow_fraction: float = 1.0,
) -> float:
    """X: the step's exchanges back to back (ms) over P ranks, G per node (None: one node of P)."""
    if P == 1:
        return 0.0
    per = S / P * model["inner"] * 2  # bytes of this rank's tokens, all heads, bf16
    n = model["layers"] * 4
    if G is None or G >= P or beta_slow is None:
        return n * (link.alpha + per * (P - 1) / P / link.beta) * 1e3
    fast = link.alpha + per * (G - 1) / P / link.beta if G > 1 else 0.0
    slow = per * (P - G) / P * slow_fraction / beta_slow
    return n * max(fast, slow) * 1e3


def ring_ms(
    model: dict,
    P: int,
    S: int,
    ulysses: int,
    beta_slow: float,
    quadratic_ms: float,
    kappa: float,
    slow_fraction: float = 1.0,
) -> float:
    """What a ring of R = P / ulysses adds to the step (Ulysses over `ulysses` GPUs of a node x a ring across
    nodes): the attention split into R blocks and merged (kappa x (R - 1) / R of its quadratic part), plus the
    part of the hops (R - 1 per layer, each a block's K and V: S / R tokens, this rank's heads, over the NIC)
    that the attention of the block in hand does not hide."""
    R = P // ulysses
    if R == 1:
        return 0.0
    hop = 2 * (S / R) * (model["inner"] / ulysses) * 2 * slow_fraction / beta_slow
    return kappa * quadratic_ms * (R - 1) / R + max(0.0, model["layers"] * (R - 1) * hop * 1e3 - quadratic_ms)


def fit_flux_compute() -> tuple[np.ndarray, list[dict]]:
    one, four = load("flux_1gpu"), load("flux_4gpu")
    pts = [
        (1, "1024", graph_ms(one, "1024", "single+fused")),
        (1, "2048", graph_ms(one, "2048", "single+fused")),
        (4, "1024", graph_ms(four, "1024", "nocomm-vfirst+fused")),
        (4, "2048", graph_ms(four, "2048", "nocomm-vfirst+fused")),
    ]
    S = {"1024": 4096 + 512, "2048": 16384 + 512}
    A = np.array([[S[s] / P, S[s] ** 2 / P, 1.0] for P, s, _ in pts])
    y = np.array([t for *_, t in pts])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    used = [{"P": P, "size": s, "ms": t} for P, s, t in pts]
    return coef, used


def e2e_row(d: dict, P: int, mode: str, family: str = "flux", size: int | None = None) -> dict:
    """The `bench e2e` row of cocodiff's `mode` preset at P ranks (of image size `size` when the run has several)."""
    return next(
        r
        for r in d["rows"]
        if (r["P"], r["engine"], r["mode"], r["family"]) == (P, "cocodiff", mode, family) and size in (None, r["size"])
    )


def fit_fast_compute() -> tuple[np.ndarray, list[dict]]:
    """C_fast = (a S + b S^2) / P + c of the `fast` preset, exact on three e2e points (FLUX.1-sized)."""
    e1, e2 = load("e2e_1024"), load("e2e_2048")
    pts = [
        (1, "1024", e2e_row(e1, 1, "fast")["ms_per_step"]),
        (1, "2048", e2e_row(e2, 1, "fast")["ms_per_step"]),
        (2, "1024", e2e_row(e1, 2, "fast")["no_exchange_ms"]),
    ]
    S = {"1024": 4096 + 512, "2048": 16384 + 512}
    A = np.array([[S[s] / P, S[s] ** 2 / P, 1.0] for P, s, _ in pts])
    coef = np.linalg.solve(A, np.array([t for *_, t in pts]))
    return coef, [{"P": P, "size": s, "ms": t} for P, s, t in pts]


def compute_ms(coef, P: int, S: int) -> float:
    a, b, c = coef
    return (a * S + b * S * S) / P + c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    link = Link(load("a2a_nvlink"))
    flux = MODELS["FLUX.1"]
    coef, fit_points = fit_flux_compute()
    fast_coef, fast_points = fit_fast_compute()
    S = {str(n): (n // 16) ** 2 + 512 for n in (768, 1024, 1536, 2048, 2304)}  # image + text tokens

    # e: fitted on one run, P = 2 over an emulated 40 GB/s slow link (2 nodes x 1 GPU), V-First + fused, 1024^2
    vm = load("vmajor_speed")
    runs = {(r["config"], r["ctas"]): r for r in vm["runs"]}
    fit_run = runs[("vfirst+fused", 4)]
    nocomm = runs[("nocomm", 4)]["step_ms_10"]
    x_fit = exchange_ms(flux, 2, S["1024"], link, G=1, beta_slow=fit_run["link_GBps_per_rank"] * 1e9)
    e = (fit_run["step_ms_10"] - nocomm) / x_fit

    # kappa: the one ring run (pure ring, P = 2 over NVLink, 2048^2): what it takes beyond the compute, over the
    # attention's share (its hops, 104 MB of K and V per layer over NVLink, hide under the block in hand)
    usp = load("usp_2gpu")
    ring_run = graph_ms(usp, "2048", "U1xR2")
    quad2 = coef[1] * S["2048"] ** 2 / 2
    kappa = (ring_run - compute_ms(coef, 2, S["2048"])) / (quad2 * (2 - 1) / 2)

    def predict(P, size, *, G=None, beta_slow=None, slow_fraction=1.0, ulysses=None):
        c = compute_ms(coef, P, S[size])
        U = ulysses or (P if P <= flux["heads"] else min(flux["heads"], G or P))  # past the heads: a ring too
        if U < P:
            quad = coef[1] * S[size] ** 2 / P
            return (
                c
                + e * exchange_ms(flux, U, S[size] * U // P, link)
                + ring_ms(flux, P, S[size], U, beta_slow or link.beta, quad, kappa, slow_fraction)
            )
        return c + e * exchange_ms(flux, P, S[size], link, G=G, beta_slow=beta_slow, slow_fraction=slow_fraction)

    # checks against measurements not used in any fit
    two, emu4 = load("flux_2gpu"), load("flux_4gpu_emulated")
    four = load("flux_4gpu")
    checks = [
        ("FLUX.1 P=2 NVLink 1024^2, V-First+fused", graph_ms(two, "1024", "vfirst+fused"), predict(2, "1024")),
        ("FLUX.1 P=2 NVLink 2048^2, V-First+fused", graph_ms(two, "2048", "vfirst+fused"), predict(2, "2048")),
        ("FLUX.1 P=4 NVLink 1024^2, V-First+fused", graph_ms(four, "1024", "vfirst+fused"), predict(4, "1024")),
        ("FLUX.1 P=4 NVLink 2048^2, V-First+fused", graph_ms(four, "2048", "vfirst+fused"), predict(4, "2048")),
        (
            "FLUX.1 P=2 NVLink 2048^2, V-First+fused (usp run, 2026-11-30)",
            graph_ms(usp, "2048", "U2xR1"),
            predict(2, "2048"),
        ),
        (
            "FLUX.1 P=2 no-exchange bound 1024^2 (compute model alone)",
            graph_ms(load("flux_2gpu_compiled_run"), "1024", "nocomm-vfirst+fused"),
            compute_ms(coef, 2, S["1024"]),
        ),
        (
            "FLUX.1 P=2, 2 emulated nodes at 19.1 GB/s, 1024^2",
            runs[("vfirst+fused", 1)]["step_ms_10"],
            predict(2, "1024", G=1, beta_slow=runs[("vfirst+fused", 1)]["link_GBps_per_rank"] * 1e9),
        ),
        (
            "FLUX.1 P=4, 2 emulated nodes x 2 (4 CTAs, ~40 GB/s), 1024^2",
            graph_ms(emu4, "1024", "vfirst+fused"),
            predict(4, "1024", G=2, beta_slow=40e9),
        ),
        (
            "FLUX.1 P=4, 2 emulated nodes x 2 (4 CTAs, ~40 GB/s), 2048^2",
            graph_ms(emu4, "2048", "vfirst+fused"),
            predict(4, "2048", G=2, beta_slow=40e9),
        ),
    ]
    # Wan-14B-sized: compute from the two one-GPU steps (c = 0), exchanges as above; check: P = 2
    wan1, wan2 = load("wan_1gpu"), load("wan_2gpu")
    wan = MODELS["Wan2.1-14B"]
    ws = {r: wan1["resolutions"][r]["video_tokens"] for r in ("480p", "720p")}
    w1 = {r: wan1["resolutions"][r]["single+fused"]["eager_ms_median"] for r in ws}
    A = np.array([[ws[r], ws[r] ** 2] for r in ws])
    wa, wb = np.linalg.solve(A, np.array([w1[r] for r in ws]))

    def wan_predict(P, res, *, G=None, beta_slow=None, slow_fraction=1.0):
        s = ws[res]
        c = (wa * s + wb * s * s) / P
        U = P if P <= wan["heads"] else min(wan["heads"], G or P)
        if U < P:
            return (
                c
                + e * exchange_ms(wan, U, s * U // P, link)
                + ring_ms(wan, P, s, U, beta_slow or link.beta, wb * s * s / P, kappa, slow_fraction)
            )
        return c + e * exchange_ms(wan, P, s, link, G=G, beta_slow=beta_slow, slow_fraction=slow_fraction)

    for res in ws:
        meas = wan2["resolutions"][res]["ce-vfirst+fused"]["eager_ms_median"]
        checks.append((f"Wan-14B P=2 NVLink {res} x 81 frames (copy engine)", meas, wan_predict(2, res)))

    def fast_predict(P, size, *, G=None, beta_slow=None, slow_fraction=1.0):
        """The `fast` preset: its compute, the same exposed exchange; Ulysses only (None past the head count)."""
        if P > flux["heads"]:
            return None
        x = exchange_ms(flux, P, S[size], link, G=G, beta_slow=beta_slow, slow_fraction=slow_fraction)
        return compute_ms(fast_coef, P, S[size]) + e * x

    e1, e2 = load("e2e_1024"), load("e2e_2048")
    checks += [
        (
            "FLUX.1 `fast` P=2 no-exchange bound 2048^2 (bench e2e; compute model alone)",
            e2e_row(e2, 2, "fast")["no_exchange_ms"],
            compute_ms(fast_coef, 2, S["2048"]),
        ),
        ("FLUX.1 `fast` P=2 NVLink 1024^2 (bench e2e)", e2e_row(e1, 2, "fast")["ms_per_step"], fast_predict(2, "1024")),
        ("FLUX.1 `fast` P=2 NVLink 2048^2 (bench e2e)", e2e_row(e2, 2, "fast")["ms_per_step"], fast_predict(2, "2048")),
    ]
    # runs of later code, against the model calibrated on the code before: the P=2 bound and step on NVLink, and
    # the step over the emulated slow tier (the link vmajor_speed measured at that CTA cap: 19.1 GB/s per rank at 1,
    # 40.0 at 4)

    def nvlink(later: str, rows: dict) -> list:
        out = []
        for size, row in rows.items():
            bound = compute_ms(fast_coef, 2, S[size])
            out += [
                (f"FLUX.1 `fast` P=2 no-exchange bound {size}^2 ({later})", row["no_exchange_ms"], bound),
                (f"FLUX.1 `fast` P=2 NVLink {size}^2 ({later})", row["ms_per_step"], fast_predict(2, size)),
            ]
        return out

    def emulated(later: str, row: dict, ctas: int = 1) -> tuple:
        what = f"FLUX.1 `fast` P=2, 2 emulated nodes ({ctas} CTA{'s' if ctas > 1 else ''}), 1024^2 ({later})"
        beta = runs[("vfirst+fused", ctas)]["link_GBps_per_rank"] * 1e9
        return what, row["ms_per_step"], fast_predict(2, "1024", G=1, beta_slow=beta)

    sizes = ("1024", "2048")
    # (the pack-copy run's 2048^2 row was one of --routes)
    copies = {s: e2e_row(load(f"e2e_{s}_copies"), 2, "fast" if s == "1024" else "fast@flat") for s in sizes}
    checks += nvlink("bench e2e after the pack-copy change", copies)
    later = "bench e2e, head-groups session"
    checks += nvlink(later, {s: e2e_row(load(f"e2e_{s}_groups"), 2, "fast/hc1") for s in sizes})
    checks += [
        emulated(f"{later}, fast/hc1", e2e_row(load("e2e_emulated_groups"), 2, "fast/hc1")),
        emulated(f"{later}, fast", e2e_row(load("e2e_emulated_vmajor"), 2, "fast")),
    ]
    later = "bench e2e, compiled-pieces session"
    checks += nvlink(
        f"{later}, compiled activations", {s: e2e_row(load("e2e_pieces"), 2, "fast", size=int(s)) for s in sizes}
    )
    checks.append(
        emulated(f"{later}, before the activations were compiled", e2e_row(load("e2e_emulated_1cta"), 2, "fast"))
    )
    later = "bench e2e, V-Major pieces session"
    sweep = load("e2e_sizes")
    sizes_new = ("768", "1536", "2304")  # sizes no fit used
    for size in sizes_new:
        one = e2e_row(sweep, 1, "fast", size=int(size))["ms_per_step"]
        checks.append((f"FLUX.1 `fast` one rank {size}^2 ({later}; compute model alone)", one, fast_predict(1, size)))
    checks += nvlink(f"{later}, sizes no fit used", {s: e2e_row(sweep, 2, "fast", size=int(s)) for s in sizes_new})
    for ctas in (1, 4):
        run = load(f"e2e_emulated_{ctas}cta_pieces")
        checks.append(emulated(later, e2e_row(run, 2, "fast"), ctas))
        # V-Major's term (the slow tier's bytes scaled by what a step sends) per cache level: the median step of
        # each level against the model at that level's bytes (vmajor_levels.py: fp8 rows' width, rows sent)
        beta = runs[("vfirst+fused", ctas)]["link_GBps_per_rank"] * 1e9
        for lv in vmajor_levels.levels(DOCS / Path(INPUTS[f"e2e_emulated_{ctas}cta_pieces"]).parent):
            checks.append(
                (
                    f"FLUX.1 `{lv['mode']}` P=2, 2 emulated nodes ({ctas} CTA), 1024^2, level {lv['level']} "
                    f"({lv['bytes_vs_exact']:.3f} of the slow-tier bytes; {later})",
                    lv["ms_median"],
                    fast_predict(2, "1024", G=1, beta_slow=beta, slow_fraction=lv["bytes_vs_exact"]),
                )
            )
    check_rows = [
        {"what": w, "measured_ms": m, "predicted_ms": p, "error_pct": 100 * (p - m) / m} for w, m, p in checks
    ]

    # predictions: H200 nodes of 8 GPUs, 400 Gb/s NIC per GPU
    nic = 50e9 * ASSUMED_NIC_EFFICIENCY
    preds = []
    for name, model, fn, shapes in (
        ("FLUX.1", flux, predict, ("1024", "2048")),
        ("Wan2.1-14B", wan, wan_predict, ("480p", "720p")),
    ):
        for shape in shapes:
            one = fn(1, shape)
            for nodes in (1, 2, 3, 4, 5, 8, 16):
                P = nodes * 8
                row = {"model": name, "shape": shape, "nodes": nodes, "gpus": P, "one_gpu_ms": one}
                g = None if nodes == 1 else 8
                row["ring"] = P > model["heads"]  # Ulysses inside each node, a ring across the nodes
                row["exact_ms"] = fn(P, shape, G=g, beta_slow=nic)
                row["vmajor_ms"] = fn(P, shape, G=g, beta_slow=nic, slow_fraction=VMAJOR_SLOW_FRACTION)
                if name == "FLUX.1":
                    row["fast_one_gpu_ms"] = fast_predict(1, shape)
                    row["fast_ms"] = fast_predict(P, shape, G=g, beta_slow=nic)
                preds.append(row)

    # predictions for the paper's setting: FLUX.1 on 1-8 Aurora nodes (12-96 tiles), flat Ulysses over the tiles
    # (a ring across nodes past the 24 heads), the same exposed fraction e
    def aurora_ms(P: int, tokens: int) -> float:
        c = compute_ms(coef, P, tokens) * AURORA["compute_scale"]
        if P == 1:
            return c
        tile_bw, gpu_bw, node_bw = (g * 1e9 for g in AURORA["GBps"])
        U = min(P, flux["heads"], AURORA["tiles_per_node"]) if P > flux["heads"] else P
        per = tokens / U * flux["inner"] * 2  # bytes of a rank's tokens, all heads, bf16 (its Ulysses group)
        in_node = min(U, AURORA["tiles_per_node"])
        tiers = [(min(U, AURORA["tiles_per_gpu"]) - 1, tile_bw), (in_node - min(U, 2), gpu_bw), (U - in_node, node_bw)]
        x = flux["layers"] * 4 * (link.alpha + max(per * n / U / bw for n, bw in tiers)) * 1e3
        ring = 0.0
        if U < P:
            ring = ring_ms(flux, P, tokens, U, node_bw, coef[1] * tokens**2 / P * AURORA["compute_scale"], kappa)
        return c + e * x + ring

    aurora = []
    for px in (768, 1536, 2304):
        tokens = (px // 16) ** 2 + flux["text"]
        one = aurora_ms(1, tokens)
        for nodes in (1, 2, 4, 8):
            P = nodes * AURORA["tiles_per_node"]
            t = aurora_ms(P, tokens)
            aurora.append(
                {"shape": px, "nodes": nodes, "tiles": P, "one_tile_ms": one, "ms": t, "ring": P > flux["heads"]}
            )

    result = {
        "inputs": INPUTS,
        "compute_fit_flux": {
            "a_ms_per_token": coef[0],
            "b_ms_per_token2": coef[1],
            "c_ms": coef[2],
            "points": fit_points,
        },
        "compute_fit_wan": {"a_ms_per_token": wa, "b_ms_per_token2": wb},
        "compute_fit_flux_fast": {
            "a_ms_per_token": fast_coef[0],
            "b_ms_per_token2": fast_coef[1],
            "c_ms": fast_coef[2],
            "points": fast_points,
        },
        "nvlink": link.as_dict(),
        "exposed_fraction_e": e,
        "ring_kappa": kappa,
        "ring_kappa_fitted_on": f"usp 2048^2 pure ring P=2 over NVLink: {ring_run:.1f} ms "
        "(no other ring run checks it)",
        "e_fitted_on": "vmajor_speed 1024^2 vfirst+fused, 2 emulated nodes x 1 GPU at "
        f"{fit_run['link_GBps_per_rank']:.1f} GB/s",
        "checks": check_rows,
        "assumptions": {
            "nic_GBps_per_gpu": nic / 1e9,
            "nic_efficiency": ASSUMED_NIC_EFFICIENCY,
            "vmajor_slow_fraction": VMAJOR_SLOW_FRACTION,
        },
        "predictions": preds,
        "aurora": {"assumptions": AURORA, "predictions": aurora},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (args.out / "scaling.md").write_text(text)
    plot(result, args.out / "scaling.png")
    print(text)


def report(r: dict) -> str:
    lines = [
        "# Step-time model: fit, checks, predictions",
        "",
        f"Exposed fraction e = {r['exposed_fraction_e']:.3f} (fitted on {r['e_fitted_on']}); NVLink all-to-all: "
        f"alpha {r['nvlink']['alpha_us']:.1f} us, {r['nvlink']['beta_GBps_per_rank']:.0f} GB/s per rank. Ring: "
        f"kappa = {r['ring_kappa']:.2f} ({r['ring_kappa_fitted_on']}).",
        "",
        "## Checks against measurements the fits did not use",
        "",
        "| run | measured ms | model ms | error |",
        "|---|---|---|---|",
    ]
    for c in r["checks"]:
        lines.append(f"| {c['what']} | {c['measured_ms']:.1f} | {c['predicted_ms']:.1f} | {c['error_pct']:+.1f}% |")
    errs = [abs(c["error_pct"]) for c in r["checks"]]
    lines += [
        "",
        f"Largest error {max(errs):.1f}%, mean {sum(errs) / len(errs):.1f}%.",
        "",
        "## Predictions (not measurements): H200 nodes of 8 GPUs, 400 Gb/s NIC per GPU "
        f"(all-to-all at {r['assumptions']['nic_GBps_per_gpu']:.0f} GB/s per GPU, an assumption)",
        "",
        "Exact and V-Major: V-First + fused Q/K + CUDA graph (the calibration of most runs); `fast`: the default",
        "preset with compiled blocks (calibrated on `bench e2e`), over its own one-rank step; Ulysses only.",
        "",
        "| model | shape | nodes x 8 | 1 GPU ms | exact ms | speed-up | V-Major ms | speed-up | `fast` ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in r["predictions"]:
        ring = " (Ulysses 8 x ring)" if p["ring"] else ""
        fast = (
            f"{p['fast_ms']:.1f} | {p['fast_one_gpu_ms'] / p['fast_ms']:.1f}x"
            if p.get("fast_ms") is not None
            else "- | -"
        )
        lines.append(
            f"| {p['model']} | {p['shape']} | {p['nodes']}{ring} | {p['one_gpu_ms']:.0f} | {p['exact_ms']:.1f} | "
            f"{p['one_gpu_ms'] / p['exact_ms']:.1f}x | {p['vmajor_ms']:.1f} | "
            f"{p['one_gpu_ms'] / p['vmajor_ms']:.1f}x | {fast} |"
        )
    lines += [
        "",
        "",
        "## Predictions for the paper's setting (not measurements; assumptions stated): FLUX.1 on Aurora",
        "",
        "Nodes of 6 GPUs x 2 tiles, links as DESIGN.md gives them (tile-tile "
        f"{r['aurora']['assumptions']['GBps'][0]:.0f}, GPU-GPU {r['aurora']['assumptions']['GBps'][1]:.0f}, "
        f"node-node {r['aurora']['assumptions']['GBps'][2]:.0f} GB/s); a tile's compute = the H200 fit x "
        f"{r['aurora']['assumptions']['compute_scale']:.2f} (peak bf16 ratio: no Aurora measurement exists here). Flat",
        "Ulysses over the tiles; past the 24 heads, Ulysses in a node x a ring across nodes.",
        "",
        "| px | nodes | tiles | 1 tile ms | ms | speed-up |",
        "|---|---|---|---|---|---|",
        *(
            f"| {a['shape']} | {a['nodes']} | {a['tiles']}{' (ring)' if a['ring'] else ''} | {a['one_tile_ms']:.0f} | "
            f"{a['ms']:.1f} | {a['one_tile_ms'] / a['ms']:.1f}x |"
            for a in r["aurora"]["predictions"]
        ),
        "",
        "Past the head count the rows use Ulysses inside each node x a ring across nodes; the ring term is fitted",
        "on one pure-ring run at P = 2 and checked by none. Not modelled: TAPA's phases (flat routing only), the SM",
        "contention of NCCL's kernels with the compute (the NVLink checks show its size), and anything measured on",
        "Aurora (its rows above rest on assumptions). The compute fit's constant term is assumed per step at any P.",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    c = r["checks"]
    ax = axes[0]
    ax.scatter([x["measured_ms"] for x in c], [x["predicted_ms"] for x in c])
    top = max(max(x["measured_ms"], x["predicted_ms"]) for x in c) * 1.1
    ax.plot([1, top], [1, top], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms per step")
    ax.set_ylabel("model ms per step")
    ax.set_title("checks (runs not used in the fits)")
    ax = axes[1]
    for model, shape in dict.fromkeys((p["model"], p["shape"]) for p in r["predictions"]):
        pts = [p for p in r["predictions"] if (p["model"], p["shape"]) == (model, shape)]
        if not pts:
            continue
        ax.plot(
            [p["gpus"] for p in pts], [p["one_gpu_ms"] / p["exact_ms"] for p in pts], "o-", label=f"{model} {shape}"
        )
        ax.plot(
            [p["gpus"] for p in pts],
            [p["one_gpu_ms"] / p["vmajor_ms"] for p in pts],
            "x--",
            alpha=0.6,
            label=f"{model} {shape}, V-Major",
        )
    ax.set_xlabel("GPUs (nodes of 8, 400 Gb/s NIC per GPU)")
    ax.set_ylabel("predicted speed-up over 1 GPU")
    ax.set_title("PREDICTIONS, not measurements")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
