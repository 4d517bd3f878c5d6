"""Plot of a profiled `fast` step (from `vfirst_profile.py --preset fast` runs): where compute sits idle, by the
all-to-all in flight, and the step time against NCCL's CTA count.

    python benchmarks/plot_profile.py docs/benchmarks/2026-11-30-head-groups/profile
reads profile_fast_P2.json and nccl_ctas.json there, writes profile_fast_P2.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(folder)
    prof = json.loads((d / "profile_fast_P2.json").read_text())
    ctas = json.loads((d / "nccl_ctas.json").read_text())
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    sizes = sorted(prof, key=int)
    keys = list(dict.fromkeys(k for s in sizes for k in prof[s]["profiled_replay"]["idle_by_exchange_in_flight"]))
    width = 0.8 / len(sizes)
    for i, s in enumerate(sizes):
        idle = prof[s]["profiled_replay"]["idle_by_exchange_in_flight"]
        vals = [idle.get(k, {}).get("idle_us", 0.0) / 1e3 for k in keys]
        a.barh([y + i * width for y in range(len(keys))], vals, height=width, label=f"{s}^2")
    a.set_yticks([y + width * (len(sizes) - 1) / 2 for y in range(len(keys))], keys, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("ms per step with no compute kernel running")
    a.set_title("fast, P=2: compute idle, by the all-to-all in flight (one replay)", fontsize=9)
    a.legend(fontsize=8)
    for s in sizes:
        rows = sorted((r for r in ctas["rows"] if str(r["size"]) == s), key=lambda r: r["sendrecv_grid_ctas"][0])
        xs = [r["sendrecv_grid_ctas"][0] for r in rows]
        b.plot(xs, [r["step_ms_median_of_7"] for r in rows], "o-", label=f"{s}^2")
        for x, r in zip(xs, rows):
            b.annotate(f"{r['step_ms_median_of_7']:.1f}", (x, r["step_ms_median_of_7"]), fontsize=7)
    b.set_xscale("log", base=2)
    b.set_xlabel("CTAs of NCCL's all-to-all kernel (32: NCCL's default here)")
    b.set_ylabel("ms per step (median of 7)")
    b.set_title("fast, P=2: step time against NCCL's CTAs", fontsize=9)
    b.legend(fontsize=8)
    fig.suptitle(f"FLUX.1-sized, 2x H200, torch {ctas['torch']}, NCCL {ctas['nccl']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(d / "profile_fast_P2.png", dpi=120)


if __name__ == "__main__":
    main(sys.argv[1])
