"""Outputs of `cocodiff quality`: JSON, a markdown table, a metrics plot and an image grid.

Kept apart from `quality.py` so the harness (what runs) and the report (how it is shown) change separately.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if v == "inf":
        return "inf"
    return f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    """The report as markdown: one table of image metrics, one of bytes and time."""
    lines = [
        "# cocodiff quality: communication modes vs the single-process run",
        "",
        f"- model: {report['model']}; classes: {', '.join(report['classes'])}",
        f"- {report['image_size']}x{report['image_size']} px ({report['tokens']} image tokens), {report['steps']} "
        f"Euler flow-matching steps, seed {report['seed']}, {report['crops_per_task']} held-out crops per task",
        "- tasks: center = central quarter unknown; blocks = four random rectangles unknown; generate = no "
        "pixel known (no ground truth, compared with the single-process output only)",
        "- PSNR / SSIM (scikit-image, images in [0, 1]) averaged over crops; PSNR(hole) counts only the unknown "
        "pixels; `inf` = identical to the reference",
        f"- LPIPS: {report['lpips']}",
        "",
        "| mode | ranks | task | PSNR vs truth | PSNR(hole) vs truth | SSIM vs truth | PSNR vs single | "
        "SSIM vs single | max abs diff vs single |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            continue
        for task, m in r["metrics"].items():
            lines.append(
                f"| {r['mode']} | {r['ranks']} | {task} | {_fmt(m.get('psnr_vs_truth'))} | "
                f"{_fmt(m.get('psnr_hole_vs_truth'))} | {_fmt(m.get('ssim_vs_truth'), 4)} | "
                f"{_fmt(m['psnr_vs_single'])} | {_fmt(m['ssim_vs_single'], 6)} | {m['max_abs_diff_vs_single']:.2e} |"
            )
    lines += [
        "",
        "Bytes sent over the whole run (all tasks in one batch, all steps):",
        "",
        "| mode | ranks | MB per rank, by tier | MB per rank per step | MB all ranks "
        f"| ms/step ({'CPU, shared cores' if report['device'].startswith('cpu') else 'GPU'}) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] == "ok":
            tiers = ", ".join(f"{k}: {v / 1e6:.2f}" for k, v in r["bytes_per_rank"].items()) or "-"
            per_step = sum(r["bytes_per_rank"].values()) / report["steps"] / 1e6
            lines.append(
                f"| {r['mode']} | {r['ranks']} | {tiers} | {per_step:.3f} | {r['bytes_all_ranks'] / 1e6:.2f} | "
                f"{r['ms_per_step']:.0f} | {r['note']} |"
            )
        else:
            lines.append(f"| {r['mode']} | {r['ranks']} | - | - | - | - | skipped: {r['note']} |")
    return "\n".join(lines) + "\n"


def plot_metrics(report: dict, path: Path) -> None:
    """PSNR vs truth (inpainting tasks), PSNR vs single process and bytes per rank, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    names = [r["mode"] if r["mode"] == "single" else f"{r['mode']} P={r['ranks']}" for r in rows]
    tasks = report["tasks"]
    # one panel per row of the figure, wide enough for a slanted label per bar
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 0.45 * len(rows) + 2), 10), sharex=True)
    width = 0.8 / max(1, len(tasks))
    for k, task in enumerate(tasks):
        xs = [i + (k - (len(tasks) - 1) / 2) * width for i in range(len(rows))]
        truth = [r["metrics"][task].get("psnr_vs_truth") for r in rows]
        if task != "generate":
            axes[0].bar(xs, truth, width, label=task)
        single = [r["metrics"][task]["psnr_vs_single"] for r in rows]
        capped = [100.0 if v == "inf" else min(float(v), 100.0) for v in single]
        axes[1].bar(xs, capped, width, label=task)
    axes[0].set_title("PSNR vs ground truth (dB)")
    axes[1].set_title("PSNR vs single process (dB, capped at 100; inf = identical)")
    mb = [r["bytes_all_ranks"] / 1e6 for r in rows]
    axes[2].bar(range(len(rows)), mb, color="gray")
    axes[2].set_title("MB moved, all ranks, whole run")
    for ax in axes:
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, fontsize=8, rotation=40, ha="right", rotation_mode="anchor")
        ax.tick_params(axis="x", labelbottom=ax is axes[-1])
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:2]:
        ax.legend(fontsize=7, title="task", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"cocodiff quality: {report['model']}, {report['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_images(
    outputs: dict[str, torch.Tensor],
    truth: torch.Tensor,
    known: torch.Tensor,
    tasks: list[str],
    n: int,
    path: Path,
    max_cols: int = 3,
) -> None:
    """Grid: per task a block of columns (crops), rows = truth, masked input, the single-process output and
    each mode's output at the largest rank count run (smaller counts are in the metrics, not the picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, max_cols)
    stride = max(1, n // cols)
    picks = [k * n + (j * stride + k) % n for k in range(len(tasks)) for j in range(cols)]  # vary crops by task
    masked = truth * known + (1 - known) * 0.0  # unknown pixels shown mid-gray
    top = max((int(k.rsplit("@", 1)[1]) for k in outputs if "@" in k), default=1)
    shown = [(k, v) for k, v in outputs.items() if "@" not in k or k.endswith(f"@{top}")]
    rows = [("truth", truth), ("input", masked)] + shown
    fig, axes = plt.subplots(
        len(rows), len(picks), figsize=(0.75 * len(picks) + 1, 0.8 * len(rows) + 0.4), squeeze=False
    )
    for r, (name, imgs) in enumerate(rows):
        for c, i in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(((imgs[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
            if r == 0 and c % cols == 0:
                ax.set_title(tasks[c // cols], fontsize=7, loc="left")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def write_outputs(
    report: dict, outputs: dict[str, torch.Tensor], truth: torch.Tensor, known: torch.Tensor, n: int, out: Path
) -> list[Path]:
    """quality.json, quality.md, quality.png (metrics) and quality_images.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    (out / "quality.md").write_text(markdown(report))
    plot_metrics(report, out / "quality.png")
    plot_images(outputs, truth, known, report["tasks"], n, out / "quality_images.png")
    return [out / name for name in ("quality.json", "quality.md", "quality.png", "quality_images.png")]
