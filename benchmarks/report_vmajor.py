"""Tables and a plot from `vmajor_speed.py`'s JSON files (one per run): per image size and slow-link
calibration, ms per step and per image for each configuration, speedup over flat, the slow-tier bytes left and
the Amdahl estimate.

    python benchmarks/report_vmajor.py docs/benchmarks/DATE-vmajor/vmajor_speed_*.json --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        d = json.loads(p.read_text())
        for r in d["runs"]:
            if "error" not in r:
                out.append({**r, "gpu": d["gpu"], "P": d["P"], "topology": d["topology"]})
    return out


def table(runs: list[dict]) -> str:
    lines = [
        "| size | slow link (GB/s per GPU) | config | ms/step (50 steps) | s/image, 28 steps | s/image, 50 steps "
        "| vs flat, 50 steps | slow-tier bytes left | Amdahl estimate, s/image (50) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["size"], r["ctas"], r["config"])):
        per_step = (
            r.get("step_ms_50")
            or r.get(f"step_ms_{r.get('exact_steps', 10)}")
            or next((v for k, v in r.items() if k.startswith("step_ms_")), None)
        )
        i28, i50 = (r.get(f"image_ms_{n}") for n in (28, 50))
        s28, s50 = ("" if i is None else f"{i / 1e3:.2f}" for i in (i28, i50))
        lines.append(
            f"| {r['size']}^2 | {r['link_GBps_per_rank']:.1f} ({r['ctas']} CTA: {r['stands_for']}) | {r['config']} "
            f"| {per_step:.1f} | {s28} | {s50} "
            f"| {r.get('speedup_vs_flat_50', float('nan')):.2f}x | {r.get('slow_bytes_fraction_50', float('nan')):.3f} "
            f"| {r.get('amdahl_image_ms_50', float('nan')) / 1e3:.2f} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["size"], r["ctas"], r["link_GBps_per_rank"]) for r in runs})
    configs = ["flat", "vfirst+fused", "cocodiff", "nocomm"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(configs)
    for i, cfg in enumerate(configs):
        xs, ys = [], []
        for g, (size, ctas, _) in enumerate(groups):
            r = next((r for r in runs if (r["size"], r["ctas"], r["config"]) == (size, ctas, cfg)), None)
            if r is not None and "image_ms_50" in r:
                xs.append(g + (i - 1.5) * width)
                ys.append(r["image_ms_50"] / 1e3)
        bars = ax.bar(xs, ys, width, label=cfg + (" (no exchange: bound)" if cfg == "nocomm" else ""))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}^2, slow link {gb:.0f} GB/s ({c} CTA)" for s, c, gb in groups], fontsize=8)
    ax.set_ylabel("seconds per image, 50 steps")
    ax.set_title("FLUX.1-sized transformer, 2 H200 as 2 emulated nodes x 1 GPU, CUDA graphs", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = rows([Path(p) for p in args.json])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_table.md").write_text(table(runs) + "\n")
    plot(runs, out / "speed.png")
    print(table(runs))


if __name__ == "__main__":
    main()
