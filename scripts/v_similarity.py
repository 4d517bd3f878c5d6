"""Adjacent-step similarity of V on the shipped small model and on random weights, side by side.

    python scripts/v_similarity.py --steps 20 --out docs/smallmodel

Writes v_similarity.json, v_similarity.png and v_similarity.md (single process, CPU).
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


def _markdown(results: dict, steps: int, batch: int) -> str:
    lines = [
        "# Adjacent-step similarity of V (premise of V-Major)",
        "",
        f"Single process, `generate` with {steps} Euler steps, batch {batch} (one image per class, seed 0). For",
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


def main(argv=None) -> int:
    from cocodiff.apps.probes import v_step_change
    from cocodiff.apps.smallmodel import load_small_model, random_small_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", default=None, help="small model directory (default: shipped)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "smallmodel"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    trained = load_small_model(args.model)
    rand = random_small_model(classes=trained.classes, image_size=trained.image_size)
    labels = torch.arange(len(trained.classes))
    results = {
        "trained (shipped)": v_step_change(trained, labels, steps=args.steps, seed=0),
        "random weights": v_step_change(rand, labels, steps=args.steps, seed=0),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "v_similarity.json").write_text(json.dumps(results, indent=1))
    _plot(results, out / "v_similarity.png")
    (out / "v_similarity.md").write_text(_markdown(results, args.steps, len(labels)))
    print((out / "v_similarity.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
