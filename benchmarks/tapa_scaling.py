"""A latency-bandwidth (Hockney) model of flat vs TAPA all-to-all, calibrated on measured links, used to
predict where TAPA beats flat at more nodes than we can measure. Predictions, not measurements.

Inputs (graph-replayed, GPU-side timings from `cocodiff bench a2a`):
  * a2a_2x2_emulated_P4.json: flat over 2 emulated nodes x 2 GPUs. Its slow part (2 remote blocks per rank
    over the CTA-capped link) gives the slow link's alpha_s (per message) and beta_s (bytes/s per rank).
  * a2a_2x2_P4.json: TAPA on the real 2x2 (both phases over NVLink) gives the cost of one 2-rank phase,
    alpha_p + m / beta_p, m = bytes per rank in the phase.
Validation: the model's TAPA time on the emulated 2x2 (NVLink phase + slow phase, parameters from the two
fits above, not from this data) against the measured TAPA time there; the error is reported.

Model for N nodes x L GPUs, P = N * L, each rank sending b bytes to every rank (M = P * b per rank):
  flat  = max(alpha_f + b / beta_f,  (P - L) * alpha_s + (P - L) * b / beta_s)        (links run concurrently)
  tapa  = [alpha_p + (L - 1) * N * b / beta_p] + [(N - 1) * alpha_s + (N - 1) * L * b / beta_s]  (phases in turn)
Both move the same bytes over the slow tier; TAPA sends N - 1 messages there instead of P - L, which is
what it can win, and pays the fast phase for it.

    python benchmarks/tapa_scaling.py docs/benchmarks/2026-11-28-tapa
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def fit_line(x, y):
    a, c = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)[::-1]
    return a, c  # y = a + c * x


def main() -> None:
    d = Path(sys.argv[1])
    emu = json.loads((d / "a2a_2x2_emulated_P4.json").read_text())
    real = json.loads((d / "a2a_2x2_P4.json").read_text())
    single = json.loads((d / "a2a_4_P4.json").read_text())
    P, L = 4, 2
    # slow link: flat emulated = 2 remote blocks per rank over the capped link (the NVLink block is hidden)
    m = [r["MB_per_rank"] * 1e6 for r in emu["rows"]]
    t = [r["flat_graph_ms"] * 1e-3 for r in emu["rows"]]
    a, c = fit_line([x * (P - L) / P for x in m], t)  # x = remote bytes per rank
    alpha_s, beta_s = a / (P - L), 1 / c
    # one 2-rank NVLink phase: real-2x2 TAPA = two such phases, each moving M/2 per rank
    m2 = [r["MB_per_rank"] * 1e6 / 2 for r in real["rows"]]
    t2 = [r["tapa_graph_ms"] * 1e-3 / 2 for r in real["rows"]]
    alpha_p, cp = fit_line(m2, t2)
    beta_p = 1 / cp
    # flat over NVLink, 4 ranks
    m4 = [r["MB_per_rank"] * 1e6 * 3 / 4 for r in single["rows"]]
    t4 = [r["flat_graph_ms"] * 1e-3 for r in single["rows"]]
    alpha_f, cf = fit_line(m4, t4)
    beta_f = 1 / cf / 3  # per peer link: 3 peers concurrently

    def flat_model(N, Lg, b):
        Pn = N * Lg
        return max(alpha_f + b / beta_f, (Pn - Lg) * alpha_s + (Pn - Lg) * b / beta_s)

    def tapa_model(N, Lg, b):
        return (alpha_p + (Lg - 1) * N * b / beta_p) + ((N - 1) * alpha_s + (N - 1) * Lg * b / beta_s)

    validation = []
    for r in emu["rows"]:
        M = r["MB_per_rank"] * 1e6
        b = M / P
        validation.append(
            {
                "MB_per_rank": r["MB_per_rank"],
                "tapa_measured_ms": r["tapa_graph_ms"],
                "tapa_model_ms": tapa_model(2, 2, b) * 1e3,
                "flat_measured_ms": r["flat_graph_ms"],
                "flat_model_ms": flat_model(2, 2, b) * 1e3,
            }
        )
    errs = [abs(v["tapa_model_ms"] / v["tapa_measured_ms"] - 1) for v in validation]
    ferrs = [abs(v["flat_model_ms"] / v["flat_measured_ms"] - 1) for v in validation]

    # predictions: FLUX.1 (24 heads, so P <= 24) per-rank message of one Q/K/V exchange, and a sweep
    preds = []
    for Lg in (4, 8):
        for N in (2, 3, 4, 6, 8, 12, 16, 24, 32):
            for label, tokens in (("flux 1024^2", 4608), ("flux 2048^2", 16896)):
                Pn = N * Lg
                M = tokens / Pn * 3072 * 2  # (S/P) tokens x 24 heads x 128 x bf16
                b = M / Pn
                f, tp = flat_model(N, Lg, b), tapa_model(N, Lg, b)
                preds.append(
                    {
                        "gpus_per_node": Lg,
                        "nodes": N,
                        "P": Pn,
                        "case": label,
                        "MB_per_rank": M / 1e6,
                        "flat_ms": f * 1e3,
                        "tapa_ms": tp * 1e3,
                        "tapa_speedup": f / tp,
                        "heads_allow": 24 % Pn == 0,
                    }
                )
    out = {
        "note": "PREDICTIONS of a Hockney model calibrated on one 4xH200 host; the slow link is NVLink capped "
        "to 4 NCCL CTAs standing in for a 400 Gb/s NIC, so alpha_s is that link's, not a real NIC's.",
        "params": {
            "alpha_s_us": alpha_s * 1e6,
            "beta_s_GBps": beta_s / 1e9,
            "alpha_phase_us": alpha_p * 1e6,
            "beta_phase_GBps": beta_p / 1e9,
            "alpha_f_us": alpha_f * 1e6,
            "beta_f_GBps_per_link": beta_f / 1e9,
        },
        "validation_emulated_2x2": validation,
        "tapa_model_error_max": max(errs),
        "tapa_model_error_median": float(np.median(errs)),
        "flat_model_error_max": max(ferrs),
        "predictions": preds,
    }
    (d / "tapa_scaling.json").write_text(json.dumps(out, indent=1))
    plot(out, d / "tapa_scaling.png")
    print(json.dumps(out["params"], indent=1))
    print(
        f"TAPA model error on the emulated 2x2: median {out['tapa_model_error_median']:.0%}, max {max(errs):.0%}; "
        f"flat model max {max(ferrs):.0%}"
    )
    for p in preds:
        if p["case"] == "flux 1024^2":
            print(
                f"L={p['gpus_per_node']} N={p['nodes']:2d} P={p['P']:3d} {p['MB_per_rank']:.2f} MB: flat "
                f"{p['flat_ms']:.3f} tapa {p['tapa_ms']:.3f} -> {p['tapa_speedup']:.2f}x"
            )


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    v = out["validation_emulated_2x2"]
    mb = [x["MB_per_rank"] for x in v]
    ax.plot(mb, [x["tapa_measured_ms"] for x in v], "o", label="TAPA measured")
    ax.plot(mb, [x["tapa_model_ms"] for x in v], "-", label="TAPA model")
    ax.plot(mb, [x["flat_measured_ms"] for x in v], "s", label="flat measured")
    ax.plot(mb, [x["flat_model_ms"] for x in v], "--", label="flat model")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("MB per rank")
    ax.set_ylabel("ms (graph-replayed)")
    ax.set_title(f"model check, emulated 2x2 (TAPA error max {out['tapa_model_error_max']:.0%})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for Lg, style in ((4, "o-"), (8, "s-")):
        for case, ls in (("flux 1024^2", ""), ("flux 2048^2", "--")):
            pts = [p for p in out["predictions"] if p["gpus_per_node"] == Lg and p["case"] == case]
            ax2.plot(
                [p["nodes"] for p in pts],
                [p["tapa_speedup"] for p in pts],
                style[0] + (ls or "-"),
                label=f"{Lg} GPUs/node, {case}",
            )
    ax2.axhline(1, color="gray", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("nodes")
    ax2.set_ylabel("predicted TAPA speedup over flat (x)")
    ax2.set_title("PREDICTION (Hockney model, emulated-link parameters)", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
