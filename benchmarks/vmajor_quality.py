"""V-Major's loss on the shipped small model: schedules x steps, quality against the exact output and the ground
truth, and the slow-tier bytes each schedule saves. CPU ranks (gloo); no GPU needed.

    python benchmarks/vmajor_quality.py --out docs/benchmarks/DATE-vmajor/quality --steps 20 50

For every step count: one exact run (flat route, same topology: its images equal one process to fp32
rounding, and its bytes are the baseline) and one run per V-Major schedule, all on the same held-out crops
(inpainting: center quarter and random blocks unknown; plain generation), same seed. Rank 0 writes
`vmajor_quality.json`, `vmajor_quality.md` and `vmajor_quality.png` (PSNR against truth and against the
exact output over the slow-tier bytes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch

from cocodiff import ParallelConfig, VMajorConfig
from cocodiff.apps.launch import spawn
from cocodiff.apps.quality import _quality_rank, _row_metrics, evaluation_batch
from cocodiff.apps.smallmodel import default_model, inpaint

# name -> VMajorConfig keyword arguments (tiers follow the topology: "slow" on two tiers)
SCHEDULES = {
    "paper-linear 0->0.9": dict(warmup_steps=4, cache_ratio_start=0.0, cache_ratio_end=0.9, final_full_steps=0),
    "linear 0.5->0.9": dict(warmup_steps=4, cache_ratio_start=0.5, cache_ratio_end=0.9),
    "linear 0.5->0.9 heads": dict(warmup_steps=4, cache_ratio_start=0.5, cache_ratio_end=0.9, select_by="heads"),
    "linear 0.5->0.9 no-output": dict(warmup_steps=4, cache_ratio_start=0.5, cache_ratio_end=0.9, output=False),
    "linear 0.5->0.9 refresh10": dict(warmup_steps=4, cache_ratio_start=0.5, cache_ratio_end=0.9, refresh_every=10),
    "linear 0.3->0.95": dict(warmup_steps=4, cache_ratio_start=0.3, cache_ratio_end=0.95),
    "fixed 0.5": dict(warmup_steps=4, schedule="fixed", cache_ratio_start=0.5),
    "fixed 0.75": dict(warmup_steps=4, schedule="fixed", cache_ratio_start=0.75),
    "fixed 0.9": dict(warmup_steps=4, schedule="fixed", cache_ratio_start=0.9),
    "default": {},
    "default fp8": dict(fp8=True),
    "fixed 0.9 fp8": dict(warmup_steps=4, schedule="fixed", cache_ratio_start=0.9, fp8=True),
}


def run(steps: int, topology: str, world: int, schedules: dict, per_class: int, seed: int) -> dict:
    sm = default_model()
    tasks = ("center", "blocks", "generate")
    truth, known, labels, n = evaluation_batch(sm, per_class=per_class, tasks=tasks, seed=seed)
    reference = inpaint(sm, truth, known, labels, steps=steps, seed=seed)
    tiers = "slow" if "x" in topology else "all"
    configs = [("exact", ParallelConfig(topology=topology))]
    for name, kw in schedules.items():
        vm = VMajorConfig(**{"tiers": tiers, **kw})
        configs.append((name, ParallelConfig(topology=topology, v_first=True, v_major=vm)))
    opts = dict(configs=configs, model=None, images=truth, known=known, labels=labels, steps=steps, seed=seed)
    t0 = time.perf_counter()
    results = spawn(_quality_rank, world, opts, backend="gloo", timeout_s=7200)
    wall = time.perf_counter() - t0
    exact_bytes = results[0]["exact"]["stats"]["bytes_by_tier"]
    slow = list(exact_bytes)[-1]
    rows = []
    for label, cfg in configs:
        images = torch.as_tensor(results[0][label]["images"])
        per_rank_slow = [r[label]["stats"]["bytes_by_tier"][slow] for r in results]
        metrics = _row_metrics(images, reference, truth, known, tasks, n)
        rows.append(
            {
                "schedule": label,
                "v_major": None if cfg.v_major is None else {k: getattr(cfg.v_major, k) for k in _FIELDS},
                "metrics": metrics,
                "slow_tier_bytes_per_rank": per_rank_slow,
                "slow_tier_bytes_fraction": sum(per_rank_slow)
                / sum(r["exact"]["stats"]["bytes_by_tier"][slow] for r in results),
                "bytes_by_tier_rank0": results[0][label]["stats"]["bytes_by_tier"],
            }
        )
    return {
        "steps": steps,
        "topology": topology,
        "ranks": world,
        "slow_tier": slow,
        "crops_per_task": n,
        "wall_s": wall,
        "rows": rows,
        "tasks": list(tasks),
    }


_FIELDS = (
    "warmup_steps",
    "schedule",
    "cache_ratio_start",
    "cache_ratio_end",
    "max_cache_ratio",
    "refresh_every",
    "final_full_steps",
    "levels",
    "tiers",
    "output",
    "select_by",
)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def markdown(report: dict) -> str:
    lines = [
        "# V-Major on the shipped small model: quality against bytes",
        "",
        f"{report['date']}; {report['model']}; CPU ranks (gloo), torch {report['torch']}, diffusers "
        f"{report['diffusers']}, Python {report['python']}.",
        "PSNR in dB over whole 32x32 images (inpainting: known pixels are the truth's), mean over the crops; "
        "'vs exact' compares with the exact engine's output (= one process to fp32 rounding); 'hole' is PSNR over "
        "the unknown pixels only. Slow-tier bytes: all ranks over the whole run, as a fraction of the exact run's.",
        "",
    ]
    for run in report["runs"]:
        lines += [
            f"## {run['steps']} steps, {run['ranks']} ranks, topology {run['topology']} "
            f"(slow tier: {run['slow_tier']})",
            "",
            "| schedule | slow-tier bytes | center: vs truth / hole / vs exact | blocks: vs truth / hole / vs exact "
            "| generate: vs exact | SSIM center vs truth |",
            "|---|---|---|---|---|---|",
        ]
        for r in run["rows"]:
            m = r["metrics"]
            c, b, g = m["center"], m["blocks"], m["generate"]
            lines.append(
                f"| {r['schedule']} | {r['slow_tier_bytes_fraction']:.3f} "
                f"({1 / r['slow_tier_bytes_fraction']:.2f}x less) "
                f"| {_fmt(c['psnr_vs_truth'])} / {_fmt(c['psnr_hole_vs_truth'])} / {_fmt(c['psnr_vs_single'])} "
                f"| {_fmt(b['psnr_vs_truth'])} / {_fmt(b['psnr_hole_vs_truth'])} / {_fmt(b['psnr_vs_single'])} "
                f"| {_fmt(g['psnr_vs_single'])} | {c['ssim_vs_truth']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in report["runs"]:
        exact = next(r for r in run["rows"] if r["schedule"] == "exact")
        for r in run["rows"]:
            if r["schedule"] == "exact":
                continue
            x = r["slow_tier_bytes_fraction"]
            loss = exact["metrics"]["center"]["psnr_vs_truth"] - r["metrics"]["center"]["psnr_vs_truth"]
            marker = "o" if run["steps"] == report["runs"][0]["steps"] else "s"
            axes[0].scatter(x, loss, marker=marker)
            axes[0].annotate(f"{r['schedule']} ({run['steps']})", (x, loss), fontsize=6)
            vs = min(r["metrics"][t]["psnr_vs_single"] for t in run["tasks"])
            axes[1].scatter(x, vs, marker=marker)
            axes[1].annotate(f"{r['schedule']} ({run['steps']})", (x, vs), fontsize=6)
    axes[0].axhline(0.3, color="r", lw=0.8, ls="--", label="goal: loss <= 0.3 dB")
    axes[0].set_xlabel("slow-tier bytes / exact run's")
    axes[0].set_ylabel("PSNR loss vs truth, center task (dB)")
    axes[0].legend(fontsize=7)
    axes[1].axhline(30, color="r", lw=0.8, ls="--", label="goal: >= 30 dB")
    axes[1].set_xlabel("slow-tier bytes / exact run's")
    axes[1].set_ylabel("PSNR vs exact output, worst task (dB)")
    axes[1].legend(fontsize=7)
    fig.suptitle("V-Major on the small model (o: first step count, s: second)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    import diffusers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--topology", default="2x1", help="2x1: 2 nodes of 1 rank (all traffic crosses the slow tier)")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    world = math.prod(int(s) for s in args.topology.split("x"))
    schedules = {k: SCHEDULES[k] for k in args.schedules}
    sm = default_model()
    report = {
        "date": datetime.date.today().isoformat(),
        "model": "shipped trained small FLUX (256 image tokens)" if sm.trained else "RANDOM-WEIGHT small FLUX",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "runs": [],
    }
    for steps in args.steps:
        print(f"{steps} steps: {len(schedules) + 1} runs on {world} ranks ...", flush=True)
        report["runs"].append(run(steps, args.topology, world, schedules, args.per_class, args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(report, default=str).replace("Infinity", '"inf"'))
    (out / "vmajor_quality.json").write_text(json.dumps(clean, indent=1))
    (out / "vmajor_quality.md").write_text(markdown(report))
    plot(report, out / "vmajor_quality.png")
    print(markdown(report))
    print(f"wrote {out}/vmajor_quality.json, .md, .png")


if __name__ == "__main__":
    main()
