"""Turn flux_step.py's JSON files into a markdown table and a plot (ms/step vs GPUs, eager and graph).

python benchmarks/report_flux_step.py DIR   # reads DIR/<family>_P*.json, writes DIR/table.md, DIR/step_ms.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# diffusers 0.42.1 native Ulysses and xDiT 0.7.0 on the same 4xH200 host (shared/reference/h200-measurements.md)
REFERENCE = {
    "flux": {
        "diffusers": {"1024": {1: 174.3, 2: 127.1, 4: 166.6}, "2048": {1: 861.2, 2: 485.2, 4: 251.0}},
        "xdit": {"1024": {2: 141.3, 4: 152.8}, "2048": {2: 499.6, 4: 260.2}},
    }
}


def load(directory: Path, family: str) -> dict[int, dict]:
    runs = {}
    for f in sorted(directory.glob(f"{family}_P*.json")):
        d = json.loads(f.read_text())
        runs[d["P"]] = d
    return runs


def table(runs: dict[int, dict], family: str) -> str:
    ref = REFERENCE.get(family, {})
    lines = [
        "| size | GPUs | config | eager ms | graph ms | speedup vs 1 GPU (graph) | rel. err vs 1 GPU "
        "| MB sent/rank/step | diffusers ms | xDiT ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = sorted({s for d in runs.values() for s in d["sizes"]}, key=int)
    for size in sizes:
        base = runs.get(1, {}).get("sizes", {}).get(size, {}).get("single", {})
        base_ms = base.get("graph_ms_median") or base.get("eager_ms_median")
        for P in sorted(runs):
            entry = runs[P]["sizes"].get(size, {})
            for name, row in entry.items():
                if not isinstance(row, dict):
                    continue
                g = row.get("graph_ms_median")
                mb = row.get("bytes_per_step", {}).get("total_bytes")
                err = row.get("rel_err_vs_1gpu")
                d_ms = ref.get("diffusers", {}).get(size, {}).get(P)
                x_ms = ref.get("xdit", {}).get(size, {}).get(P)
                lines.append(
                    f"| {size}² | {P} | {name} | {row['eager_ms_median']:.1f} | "
                    f"{'—' if g is None else f'{g:.1f}'} | "
                    f"{'—' if (g is None or not base_ms) else f'{base_ms / g:.2f}x'} | "
                    f"{'—' if err is None else f'{err:.1e}'} | {'—' if mb is None else f'{mb / 1e6:.0f}'} | "
                    f"{'—' if d_ms is None else f'{d_ms:.0f}'} | {'—' if x_ms is None else f'{x_ms:.0f}'} |"
                )
    return "\n".join(lines) + "\n"


def plot(runs: dict[int, dict], family: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({s for d in runs.values() for s in d["sizes"]}, key=int)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4))
    axes = [axes] if len(sizes) == 1 else axes
    ref = REFERENCE.get(family, {})
    for ax, size in zip(axes, sizes):
        Ps = sorted(runs)
        for name, style in (("flat", "o-"), ("vfirst", "s-")):
            for mode, ls in (("eager", ":"), ("graph", "-")):
                xs, ys = [], []
                for P in Ps:
                    row = runs[P]["sizes"].get(size, {}).get("single" if P == 1 else name)
                    if row and row.get(f"{mode}_ms_median"):
                        xs.append(P)
                        ys.append(row[f"{mode}_ms_median"])
                if len(xs) > 1:
                    ax.plot(xs, ys, style[0] + ls, label=f"cocodiff {name} {mode}")
        for eng, marker in (("diffusers", "x--"), ("xdit", "^--")):
            pts = ref.get(eng, {}).get(size, {})
            if pts:
                ax.plot(
                    sorted(pts),
                    [pts[p] for p in sorted(pts)],
                    marker,
                    color="gray" if eng == "diffusers" else "brown",
                    label=f"{eng} (reference run)",
                )
        ax.set_title(f"{family} {size}x{size}: one transformer step")
        ax.set_xlabel("GPUs (H200, NVLink)")
        ax.set_ylabel("ms / step (median)")
        ax.set_xticks(Ps)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    directory = Path(sys.argv[1])
    family = sys.argv[2] if len(sys.argv) > 2 else "flux"
    runs = load(directory, family)
    (directory / "table.md").write_text(table(runs, family))
    plot(runs, family, directory / "step_ms.png")
    print(table(runs, family))


if __name__ == "__main__":
    main()
