"""Plot of docs/benchmarks/2026-11-28-overlap: ms/step per configuration (graph replay), 1024^2 and 2048^2.

python benchmarks/plot_overlap.py docs/benchmarks/2026-11-28-overlap
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROWS = [  # (file, config, label)
    ("flux_P1.json", "single", "1 GPU\ndiffusers"),
    ("flux_P1.json", "single+fused", "1 GPU\nfuse_qk"),
    ("flux_P4.json", "flat", "4 GPU\nflat"),
    ("flux_P4.json", "vfirst", "4 GPU\nV-First"),
    ("flux_P4.json", "vfirst+fused", "4 GPU\nV-First\n+fuse_qk"),
    ("flux_P4.json", "ce-vfirst+fused", "4 GPU\ncopy engine\n+V-First\n+fuse_qk"),
    ("flux_P4.json", "nocomm-vfirst+fused", "4 GPU\nno exchange\n(bound)"),
]
TARGETS = {"1024": 50.0, "2048": 225.0}


def main(folder: str) -> None:
    d = Path(folder)
    data = {f: json.loads((d / f).read_text()) for f in {r[0] for r in ROWS}}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, size in zip(axes, ("1024", "2048")):
        vals = [data[f]["sizes"][size][c]["graph_ms_median"] for f, c, _ in ROWS]
        colors = ["#999999", "#666666", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#cccccc"]
        bars = ax.bar(range(len(vals)), vals, color=colors)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(TARGETS[size], color="k", ls="--", lw=1)
        ax.text(len(vals) - 0.5, TARGETS[size], f"target {TARGETS[size]:.0f} ms", ha="right", va="bottom", fontsize=8)
        ax.set_xticks(range(len(vals)), [r[2] for r in ROWS], fontsize=7)
        ax.set_ylabel("ms / step (CUDA-graph replay, median)")
        ax.set_title(f"FLUX.1-sized step, {size}x{size}, 4x H200")
        if size == "1024":
            ax.set_ylim(0, 180)
    fig.tight_layout()
    fig.savefig(d / "ms_per_step.png", dpi=120)


if __name__ == "__main__":
    main(sys.argv[1])
