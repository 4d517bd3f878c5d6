"""Adjacent-step similarity of V on shipped trained models and on random weights, side by side, and the drift
of what V-Major's receivers hold against the value last sent.

    python scripts/v_similarity.py --steps 20 --out docs/smallmodel
    python scripts/v_similarity.py --models small,flux128 --device cuda --steps 50 --out docs/flux128/v_similarity_50

Writes v_similarity.json, v_similarity.png, v_drift.png and v_similarity.md (single process).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), sharey=True, squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        steps = range(2, r["steps"] + 1)
        for k, layer in enumerate(r["layers"]):
            short = layer.replace("single_transformer_blocks.", "single").replace("transformer_blocks.", "dual")
            short = short.replace(".attn.", " ")
            (line,) = ax.plot(steps, r["median"][k], lw=1, label=short)
            ax.plot(steps, r["p90"][k], lw=0.7, ls="--", color=line.get_color())
        ax.set_yscale("log")
        ax.set_xlabel("denoising step (vs the previous step)")
        ax.set_title(f"{name}: median (solid), p90 (dashed)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("per-token ||V_t - V_t-1||_1 / ||V_t-1||_1")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _markdown(results: dict, steps: int) -> str:
    lines = [
        "# Adjacent-step similarity of V (premise of V-Major)",
        "",
        f"Single process, `generate` with {steps} Euler steps, one image per class of the model, seed 0. For",
        "every V projection (`to_v`; `add_v_proj` = text tokens of the dual-stream blocks) and every step t >= 2:",
        "per-token relative L1 change r = ||V_t - V_t-1||_1 / ||V_t-1||_1 over channels; median and 90th",
        "percentile over tokens. Plot: v_similarity.png; numbers: v_similarity.json.",
        "",
        "| weights | median r (all layers, steps) | p90 r | tokens with r < 0.05 | r < 0.1 | r < 0.2 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        f = r["frac_tokens_below"]
        lines.append(
            f"| {name} | {r['overall_median']:.3f} | {r['overall_p90']:.3f} | {f['0.05']:.1%} | "
            f"{f['0.1']:.1%} | {f['0.2']:.1%} |"
        )
    lines += [
        "",
        "Per layer, median r over steps (first step pair / middle / last step pair):",
        "",
        "| layer | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    first = next(iter(results.values()))
    for k, layer in enumerate(first["layers"]):
        cells = []
        for r in results.values():
            m = r["median"][k]
            cells.append(f"{m[0]:.3f} / {m[len(m) // 2]:.3f} / {m[-1]:.3f}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_drift(drift: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, d in drift.items():
        steps = range(2, d["steps"] + 1)
        (line,) = ax.plot(steps, d["drift_vs_sent_median"], lw=1.2, label=f"{name}: drift vs last sent (median)")
        ax.plot(steps, d["stale_error_p90"], lw=0.9, ls="--", color=line.get_color(), label=f"{name}: held error p90")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("relative L1 per token")
    ax.set_title("V-Major (default schedule): V vs the value last sent / the value receivers hold", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _drift_markdown(drift: dict) -> list[str]:
    first = next(iter(drift.values()))
    lines = [
        "",
        f"## Drift against the value last sent (V-Major's selection simulated at {first['ranks']} ranks)",
        "",
        "Each rank's block of tokens sends its K most-changed tokens (relative L1 change against the value it last",
        "sent, as `VMajor.select` ranks them) at the cache ratio of `VMajorConfig()`'s default schedule; the others",
        "keep the value last sent. `drift` = a token's V against the value last sent, before selecting; `held` = the",
        "error of the value receivers then use (0 on full steps). Medians / p90 over selective steps and tokens of",
        "all layers; the trajectory itself is exact.",
        "",
        "| model | selective steps | sent fraction (mean) | drift median | drift p90 | held median | held p90 "
        "| held max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in drift.items():
        sel = [i for i, full in enumerate(d["full_step"]) if not full]
        if not sel:
            lines.append(f"| {name} | 0 | - | - | - | - | - | - |")
            continue

        def mid(key, idx=sel):
            vals = sorted(d[key][i] for i in idx)
            return vals[len(vals) // 2]

        lines.append(
            f"| {name} | {len(sel)} of {d['steps']} | {sum(d['sent_fraction'][i] for i in sel) / len(sel):.2f} | "
            f"{mid('drift_vs_sent_median'):.3f} | {mid('drift_vs_sent_p90'):.3f} | {mid('stale_error_median'):.3f} | "
            f"{mid('stale_error_p90'):.3f} | {max(d['stale_error_max'][i] for i in sel):.2f} |"
        )
    return lines


def main(argv=None) -> int:
    from cocodiff.apps.probes import v_drift_vs_sent, v_step_change
    from cocodiff.apps.smallmodel import load_small_model, random_small_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--models",
        default="small",
        help="comma-separated trained models: shipped names (small, flux128) or folders; each gets a random-weight "
        "twin of its architecture",
    )
    ap.add_argument("--model", default=None, help="(older spelling) one model folder; overrides --models")
    ap.add_argument("--ranks", type=int, default=4, help="ranks whose blocks V-Major's simulated selection uses")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "docs" / "smallmodel"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [args.model] if args.model else [m.strip() for m in args.models.split(",") if m.strip()]

    results, drift = {}, {}
    for name in names:
        trained = load_small_model(name, device=args.device)
        rand = random_small_model(
            classes=trained.classes,
            image_size=trained.image_size,
            config=dict(trained.transformer.config),
            n_text_tokens=trained.conditioner.n_tokens,
            device=args.device,
        )
        labels = torch.arange(len(trained.classes))
        tag = f"{Path(name).name} ({(trained.image_size // trained.patch) ** 2} tok)"
        results[f"trained {tag}"] = v_step_change(trained, labels, steps=args.steps, seed=0)
        results[f"random {tag}"] = v_step_change(rand, labels, steps=args.steps, seed=0)
        drift[f"trained {tag}"] = v_drift_vs_sent(trained, labels, steps=args.steps, seed=0, ranks=args.ranks)
        print(f"{name}: done", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "v_similarity.json").write_text(json.dumps({**results, "v_major_drift": drift}, indent=1))
    _plot(results, out / "v_similarity.png")
    _plot_drift(drift, out / "v_drift.png")
    md = _markdown(results, args.steps) + "\n".join(_drift_markdown(drift)) + "\n"
    (out / "v_similarity.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
