"""V-Major's step per cache level against its Amdahl estimate, from `cocodiff bench e2e --v-major` runs over an
emulated slow tier.

    python benchmarks/vmajor_levels.py OUT DIR [DIR ...]

reads DIR/e2e.json (an exact cocodiff row at P=2 with its no-exchange bound, and its V-Major rows); for each V-Major
row and cache level: the median of the steps at that level (`ms_per_step_all`, each step placed by
`cocodiff.vmajor.step_ratio` with the row's `VMajorConfig`), the fraction of each far block's rows sent
(`active_rows`), the slow-tier bytes of such a step against an exact one (fp8 rows: their message width over
bf16's), and the estimate: no-exchange bound + exposed exchange x that bytes fraction, where the exposed exchange is
the exact row's step minus its bound (the same launch). Above the estimate: what the selection and the smaller
messages cost beyond their bytes. Writes OUT/levels.json, OUT/levels.md, OUT/levels.png.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from cocodiff.apps.bench_e2e import VMAJOR_VARIANTS
from cocodiff.apps.families import TEXT_TOKENS_IMAGE
from cocodiff.config import VMajorConfig
from cocodiff.vmajor import active_rows, step_ratio

HEAD_DIM = {"flux": 128, "flux2": 128, "qwenimage": 128}  # full-size configs (sd3's 2x2 patches at 8x: not here)


def levels(run: Path) -> list[dict]:
    result = json.loads((run / "e2e.json").read_text())
    out = []
    for exact in (r for r in result["rows"] if r["P"] == 2 and r["engine"] == "cocodiff" and "no_exchange_ms" in r):
        bound, exposed = exact["no_exchange_ms"], exact["ms_per_step"] - exact["no_exchange_ms"]
        family, size = exact["family"], exact["size"]
        if family not in HEAD_DIM:
            raise ValueError(f"vmajor_levels: family {family!r} is not one of {sorted(HEAD_DIM)}")
        tokens = (size // 16) ** 2 + TEXT_TOKENS_IMAGE[family]  # 8x VAE, 2x2 packing; bench e2e's text length
        l_max = -(-tokens // 2)
        for row in result["rows"]:
            if (row["family"], row["size"], row["P"]) != (family, size, 2) or "+vmajor" not in row["mode"]:
                continue
            if not row["mode"].startswith(exact["mode"] + "+vmajor") or "ms_per_step_all" not in row:
                continue
            variant = row["mode"].partition("+vmajor")[2].removeprefix("-") or "default"
            cfg = VMajorConfig(**VMAJOR_VARIANTS[variant])
            width = (1 + 4 / HEAD_DIM[family]) / 2 if cfg.fp8 else 1.0  # e4m3 values + one fp32 scale per head
            times = row["ms_per_step_all"]
            by_level: dict = {}
            for step, ms in enumerate(times):
                sched = step_ratio(cfg, step, len(times))
                if sched is not None:
                    by_level.setdefault(sched, []).append(ms)
            for (ratio, level), ms in sorted(by_level.items(), key=lambda kv: kv[0][1]):
                sent = active_rows(ratio, l_max) / l_max
                estimate = bound + exposed * sent * width
                median = statistics.median(ms)
                out.append(
                    {
                        "run": f"{run.parent.name}/{run.name}",
                        "mode": row["mode"],
                        "config": row.get("config"),
                        "level": level,
                        "cache_ratio": ratio,
                        "rows_sent": sent,
                        "bytes_vs_exact": sent * width,
                        "steps": len(ms),
                        "ms_median": median,
                        "no_exchange_ms": bound,
                        "exact_ms": exact["ms_per_step"],
                        "estimate_ms": estimate,
                        "above_estimate_ms": median - estimate,
                    }
                )
    return out


def main(out: str, *runs: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for r in runs for x in levels(Path(r))]
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "levels.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| run | mode | level | rows sent | slow-tier bytes vs exact | steps | ms (median) | estimate | above |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['run']} | {x['mode']} | {x['level']} | {x['rows_sent']:.3f} | {x['bytes_vs_exact']:.3f} | "
            f"{x['steps']} | {x['ms_median']:.1f} | {x['estimate_ms']:.1f} | {x['above_estimate_ms']:+.1f} |"
        )
    (dest / "levels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    run_names = list(dict.fromkeys(x["run"] for x in rows))
    fig, axes = plt.subplots(1, len(run_names), figsize=(6 * len(run_names), 4.2), squeeze=False)
    for ax, run in zip(axes[0], run_names):
        modes = list(dict.fromkeys(x["mode"] for x in rows if x["run"] == run))
        for mode, color in zip(modes, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")):
            pts = sorted((x for x in rows if (x["run"], x["mode"]) == (run, mode)), key=lambda x: x["bytes_vs_exact"])
            bound, exact = pts[0]["no_exchange_ms"], pts[0]["exact_ms"]
            # the estimate is a line from the bound (nothing sent) to the exact step (every byte sent)
            ax.plot([0, 1], [bound, exact], "--", color=color, lw=0.8)
            ax.plot(
                [x["bytes_vs_exact"] for x in pts] + [1],
                [x["ms_median"] for x in pts] + [exact],
                "o-",
                color=color,
                label=f"{mode} (dashed: estimate)",
            )
        ax.set_xlabel("slow-tier bytes of a step, vs an exact step (1: the exact step)")
        ax.set_ylabel("ms per step (median per level)")
        ax.set_title(run, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest / "levels.png", dpi=120)
    print(f"wrote {dest / 'levels.json'}, {dest / 'levels.md'}, {dest / 'levels.png'}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
