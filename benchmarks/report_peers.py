"""A dated markdown table and a bar plot from the step benchmarks' JSON files, every engine and mode measured in
the same run on the same GPUs (`flux_step.py --peers`, `video_step.py`): ms per transformer step, the ratio to
the fastest one-GPU row and to the fastest peer row whose output is within bf16 rounding, first-call times,
relative error against one GPU.

    python benchmarks/report_peers.py OUT/flux_P1_1024.json OUT/flux_P2_1024.json --out DIR --title "..."

Rows whose relative error exceeds `--max-err` (default 5e-2) are listed but not used as the peer reference, and
say so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _best_ms(row: dict) -> float | None:
    times = [row.get(k) for k in ("graph_ms_median", "eager_ms_median") if row.get(k) is not None]
    return min(times) if times else None


def rows(paths: list[Path]) -> list[dict]:
    """One dict per (shape, engine row): P, shape, engine, mode, ms, rel_err, first-call seconds, error."""
    out = []
    for p in paths:
        d = json.loads(p.read_text())
        shapes = d.get("sizes") or d.get("resolutions") or {}
        for shape, entry in shapes.items():
            label = f"{shape}px" if shape.isdigit() else f"{shape} x {entry.get('frames')} frames"
            for name, row in entry.items():
                if not isinstance(row, dict):
                    continue
                found = row.items() if name == "diffusers" else [(None, row)]
                for mode, r in found:
                    engine = "diffusers" if name in ("single", "diffusers", "diffusers-ulysses") else "cocodiff"
                    if name == "xdit":
                        engine = "xDiT"
                    desc = mode if mode is not None else name
                    if name == "single":
                        desc = "plain model"
                    if name == "diffusers-ulysses":
                        desc = "Ulysses"
                    nocomm = "nocomm" in name
                    ms = _best_ms(r)
                    graph = r.get("graph_ms_median") is not None and ms == r.get("graph_ms_median")
                    out.append(
                        {
                            "family": d["family"],
                            "P": d["P"],
                            "shape": label,
                            "engine": engine,
                            "mode": desc + (" (CUDA graph)" if graph and name != "diffusers" else ""),
                            "ms": ms,
                            "rel_err": r.get("graph_rel_err_vs_1gpu", r.get("rel_err_vs_1gpu")),
                            "first_call_s": r.get("first_call_s"),
                            "capture_s": r.get("graph_first_call_s"),
                            "error": r.get("error") or r.get("graph_error"),
                            "bound": nocomm,
                            "gpu": d.get("gpu") or d.get("device"),
                            "versions": {k: d.get(k) for k in ("torch", "cuda", "nccl", "diffusers")},
                        }
                    )
    return out


def table(rs: list[dict], max_err: float) -> str:
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rs):
        group = [r for r in rs if r["shape"] == shape]
        one = [r["ms"] for r in group if r["P"] == 1 and r["ms"] is not None]
        best_one = min(one) if one else None
        lines += [
            f"### {group[0]['family']} {shape}",
            "",
            "| P | engine | mode | ms/step | vs best 1 GPU | vs best peer at this P | rel. error vs 1 GPU "
            "| first call (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for P in sorted({r["P"] for r in group}):
            at = [r for r in group if r["P"] == P]
            peers = [
                r["ms"]
                for r in at
                if r["engine"] != "cocodiff" and r["ms"] is not None and (r["rel_err"] or 0) <= max_err
            ]
            best_peer = min(peers) if peers else None
            for r in at:
                if r["ms"] is None:
                    lines.append(f"| {P} | {r['engine']} | {r['mode']} | not run: {r['error']} | | | | |")
                    continue
                note = " (bound: exchanges skipped, output wrong)" if r["bound"] else ""
                err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
                if r["rel_err"] is not None and r["rel_err"] > max_err:
                    err += " (above the bf16 rounding of the other rows; not used as the peer reference)"
                vs1 = f"{best_one / r['ms']:.2f}x" if best_one and not r["bound"] else ""
                vsp = (
                    f"{best_peer / r['ms']:.2f}x" if best_peer and r["engine"] == "cocodiff" and not r["bound"] else ""
                )
                first = "" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"
                if r["capture_s"] is not None:
                    first += f" + {r['capture_s']:.1f} capture"
                lines.append(
                    f"| {P} | {r['engine']} | {r['mode']}{note} | {r['ms']:.1f} | {vs1} | {vsp} | {err} | {first} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(rs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rs if r["ms"] is not None]
    shapes = list(dict.fromkeys(r["shape"] for r in shown))
    fig, axes = plt.subplots(
        1, len(shapes), figsize=(max(10, 7 * len(shapes)), 0.45 * max(8, len(shown) / len(shapes)) + 1.5)
    )
    axes = [axes] if len(shapes) == 1 else axes
    colors = {"cocodiff": "#1f77b4", "diffusers": "#ff7f0e", "xDiT": "#2ca02c"}
    for ax, shape in zip(axes, shapes):
        group = [r for r in shown if r["shape"] == shape]
        labels = [f"P={r['P']} {r['engine']} {r['mode']}" for r in group]
        bars = ax.barh(
            range(len(group)),
            [r["ms"] for r in group],
            color=[colors.get(r["engine"], "gray") for r in group],
            alpha=0.85,
        )
        for bar, r in zip(bars, group):
            if r["bound"]:  # the no-exchange bound: hatched, its output is wrong by design
                bar.set_hatch("//")
                bar.set_alpha(0.4)
        for i, r in enumerate(group):
            ax.text(r["ms"], i, f" {r['ms']:.0f}", va="center", fontsize=8)
        ax.set_yticks(range(len(group)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per transformer step (lower is better)")
        ax.set_title(f"{group[0]['family']} {shape}")
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="peers", help="file stem of the markdown table and the plot")
    ap.add_argument("--title", default="same run, same GPUs")
    ap.add_argument("--max-err", type=float, default=5e-2)
    args = ap.parse_args()
    rs = rows(args.json)
    args.out.mkdir(parents=True, exist_ok=True)
    first = rs[0]
    head = f"{first['gpu']}; " + ", ".join(f"{k} {v}" for k, v in first["versions"].items() if v)
    (args.out / f"{args.name}.md").write_text(f"{args.title}\n\n{head}\n\n{table(rs, args.max_err)}")
    plot(rs, args.out / f"{args.name}.png", f"{args.title} ({head})")
    print(table(rs, args.max_err))


if __name__ == "__main__":
    main()
