"""Where the sharded step's compute goes beyond 1/P of one GPU's: kernel by kernel.

The `fast` preset's P-rank step has a no-exchange bound (every exchange a no-op) above one GPU's step / P: at
1024^2 on 2 H200 72.9 ms against 130.2 / 2 = 65.1 (FLUX.1-sized). This script finds where that "sharding
cost" is. Run it once per rank count (same family, size and machine); rank 0 profiles one call of each mode
and writes OUT/sharding_cost_P{P}.json:

- `exact` (every P): the preset's step as a user runs it (one rank: its exchanges are no-ops already);
- `no_exchange` (P > 1): the same step with every exchange a no-op (`NoExchange`: wrong output, no byte moves).

Each mode has its CUDA-event time (median of `--iters` after warm-up) and the profiler's device time per kernel
name and per category. `--compare P1.json P2.json` then lines up each kernel name's time on one GPU against P x
its time on one rank of P: the excess per category and the largest kernels. Overlapped kernels on different
streams both count in a profile (a sum of kernel times, not a step time).

    torchrun --nproc-per-node 1 benchmarks/sharding_cost.py --out OUT --family flux --size 1024
    torchrun --nproc-per-node 2 benchmarks/sharding_cost.py --out OUT --family flux --size 1024
    python benchmarks/sharding_cost.py --compare OUT/sharding_cost_P1.json OUT/sharding_cost_P2.json --out OUT

(with two folders of runs, `--compare` takes the pairs one after the other and draws them side by side)
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
from pathlib import Path

CATEGORIES = (  # first match wins
    ("nccl", r"nccl"),
    ("attention", r"fmha|flash|cudnn_generated|sdpa|attention_kernel"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|sm90_"),
    ("triton", r"triton"),
    ("copy", r"Memcpy|CatArray|direct_copy|copy_kernel"),
)


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return "other"


def profile_kernels(fn, align=None) -> dict:
    """Device time (ms) and launches per kernel name over one call of `fn` (`align`: called just before it, e.g. a
    barrier, so that a collective in the call does not time another rank's lateness)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    if align is not None:
        align()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:  # keyed by the whole name: templates differ late
            kernels[e.name][0] += e.device_time_total / 1e3
            kernels[e.name][1] += 1
    return {name: {"ms": v[0], "n": v[1]} for name, v in kernels.items()}


def by_category(kernels: dict) -> dict:
    out = collections.defaultdict(float)
    for name, v in kernels.items():
        out[category(name)] += v["ms"]
    return dict(out)


class ClockSampler:
    """The GPU's SM clock (MHz) and power draw (W), polled by `nvidia-smi` every 20 ms while `with` is open: were
    the timed calls and the profiled one run at the same clock? Empty where `nvidia-smi` is missing."""

    def __init__(self, index: int):
        self.index = index
        self.samples: list[tuple[float, float]] = []

    def __enter__(self):
        import shutil
        import subprocess

        self._proc = None
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", f"--id={self.index}", "--query-gpu=clocks.sm,power.draw"]
            cmd += ["--format=csv,noheader,nounits", "--loop-ms=20"]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        for line in out.splitlines():
            try:
                clock, power = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((clock, power))

    def summary(self) -> dict:
        if not self.samples:
            return {}
        clocks, powers = zip(*self.samples)
        return {
            "sm_clock_mhz_median": statistics.median(clocks),
            "sm_clock_mhz_min": min(clocks),
            "power_w_median": statistics.median(powers),
            "samples": len(clocks),
        }


def measure(args) -> dict:
    """One rank's share: the step's time and kernels per mode (every rank runs the same calls)."""
    import torch
    import torch.distributed as dist

    from cocodiff import ParallelConfig, parallelize
    from cocodiff.apps import families as zoo
    from cocodiff.exchange import NoExchange
    from cocodiff.timing import time_ms

    device = torch.device("cuda", torch.cuda.current_device())
    model = zoo.build_model(args.family, "full", dtype=torch.bfloat16, device=device, seed=0)
    parallelize(model, ParallelConfig.preset(args.preset))
    rows, cols = zoo.image_tokens(args.family, model, args.size, args.size)
    n_txt = zoo.TEXT_TOKENS_IMAGE[args.family]
    inputs = zoo.make_inputs(
        args.family, model, rows=rows, cols=cols, n_txt=n_txt, device=device, dtype=torch.bfloat16, seed=1
    )

    def step():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    eng = model.cocodiff
    world = dist.get_world_size()
    result = {
        "family": args.family,
        "size": args.size,
        "preset": args.preset,
        "world": world,
        "gpu": torch.cuda.get_device_name(device),
        "sms": torch.cuda.get_device_properties(device).multi_processor_count,
        "torch": torch.__version__,
        "modes": {},
    }
    for mode in ["exact"] + (["no_exchange"] if world > 1 else []):
        if mode == "no_exchange":
            eng.use_exchange(NoExchange(topology=eng.topology, rank=eng.rank, stats=eng.stats))
        for _ in range(3):  # compile, capture, warm up
            step()
        with ClockSampler(device.index) as timed_clock:
            times = time_ms(step, warmup=2, iters=args.iters)
        with ClockSampler(device.index) as profiled_clock:
            kernels = profile_kernels(step, align=dist.barrier)
        result["modes"][mode] = {
            "ms": statistics.median(times),
            "ms_all": times,
            "clock_timed": timed_clock.summary(),  # the GPU's clock during the timed calls and the profiled one
            "clock_profiled": profiled_clock.summary(),
            "kernel_sum_ms": sum(v["ms"] for v in kernels.values()),
            "by_category_ms": by_category(kernels),
            "kernels": kernels,
        }
        if dist.get_rank() == 0:
            print(mode, f"{statistics.median(times):.2f} ms", by_category(kernels), flush=True)
    eng.use_exchange("auto")
    return result


def run(args) -> None:
    import os

    from cocodiff.apps.launch import run_launched

    result = run_launched(measure, args, cuda=True, collective_timeout_s=300)
    if int(os.environ.get("RANK", 0)) == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"sharding_cost_P{result['world']}.json").write_text(json.dumps(result, indent=1))


def compare(one: dict, many: dict, top: int = 20) -> dict:
    """Kernel by kernel: one GPU's time against P x one rank's, in the P-rank run's `no_exchange` mode. Kernel
    sums leave NCCL's kernels out (in the no-exchange step only the output's gather is left, and its time is
    mostly waiting for the other rank); the categories list them."""
    if one["world"] != 1 or many["world"] < 2 or "no_exchange" not in many["modes"]:
        raise ValueError(
            f"sharding_cost --compare: give one GPU's run, then a P > 1 run (got P={one['world']} and "
            f"P={many['world']})"
        )
    if (one["family"], one["size"], one["preset"]) != (many["family"], many["size"], many["preset"]):
        raise ValueError(
            "sharding_cost --compare: the two runs differ: "
            f"{one['family']} {one['size']} {one['preset']} vs {many['family']} {many['size']} {many['preset']}"
        )
    p = many["world"]
    k1 = one["modes"]["exact"]["kernels"]
    kp = many["modes"]["no_exchange"]["kernels"]
    names = sorted(set(k1) | set(kp))  # a fixed order: the sums are the same on every run
    rows = []
    for name in names:
        a = k1.get(name, {"ms": 0.0, "n": 0})
        b = kp.get(name, {"ms": 0.0, "n": 0})
        rows.append(
            {
                "kernel": name,
                "category": category(name),
                "one_gpu_ms": a["ms"],
                "one_gpu_n": a["n"],
                "rank_ms": b["ms"],
                "rank_n": b["n"],
                "excess_ms": b["ms"] - a["ms"] / p,  # per rank, over the ideal 1/P share
            }
        )
    cats = collections.defaultdict(lambda: {"one_gpu_ms": 0.0, "rank_ms": 0.0, "excess_ms": 0.0})
    for r in rows:
        c = cats[r["category"]]
        c["one_gpu_ms"] += r["one_gpu_ms"]
        c["rank_ms"] += r["rank_ms"]
        c["excess_ms"] += r["excess_ms"]
    m1, mp = one["modes"]["exact"], many["modes"]["no_exchange"]

    def kernel_sum(kernels: dict) -> float:
        return sum(v["ms"] for name, v in kernels.items() if category(name) != "nccl")

    summary = {
        "family": one["family"],
        "size": one["size"],
        "world": p,
        "one_gpu_ms": m1["ms"],
        "no_exchange_ms": mp["ms"],
        "exact_ms": many["modes"]["exact"]["ms"],
        "ideal_ms": m1["ms"] / p,
        "sharding_cost_ms": mp["ms"] - m1["ms"] / p,
        "one_gpu_kernel_sum_ms": kernel_sum(k1),
        "rank_kernel_sum_ms": kernel_sum(kp),
        "kernel_excess_ms": kernel_sum(kp) - kernel_sum(k1) / p,
        "idle_one_gpu_ms": m1["ms"] - kernel_sum(k1),
        "idle_rank_ms": mp["ms"] - kernel_sum(kp),
        "by_category": dict(cats),
        "exact_by_category_ms": many["modes"]["exact"]["by_category_ms"],
        "clocks": {  # runs from before the clock sampler have none
            "one_gpu": {k: m1.get(k) for k in ("clock_timed", "clock_profiled")},
            "rank_no_exchange": {k: mp.get(k) for k in ("clock_timed", "clock_profiled")},
        },
        "largest_excess": sorted(rows, key=lambda r: -abs(r["excess_ms"]))[:top],
    }
    return summary


def report(s: dict) -> str:
    p = s["world"]
    lines = [
        f"# Sharding cost, {s['family']} {s['size']}^2, P={p}",
        "",
        f"- one GPU step {s['one_gpu_ms']:.1f} ms; ideal share {s['ideal_ms']:.1f}; P={p} no-exchange step "
        f"{s['no_exchange_ms']:.1f} (sharding cost {s['sharding_cost_ms']:+.1f}); exact step {s['exact_ms']:.1f}",
        f"- kernel sums (NCCL's left out): one GPU {s['one_gpu_kernel_sum_ms']:.1f} ms, one rank "
        f"{s['rank_kernel_sum_ms']:.1f} "
        f"(excess over 1/P {s['kernel_excess_ms']:+.1f}); step minus kernel sum (idle or launch gaps; negative "
        f"= overlapped streams): one GPU {s['idle_one_gpu_ms']:+.1f}, one rank {s['idle_rank_ms']:+.1f}",
    ]
    clocks = s.get("clocks", {})
    if any(v for run in clocks.values() for v in run.values()):

        def mhz(run: str, when: str) -> str:
            c = clocks[run].get(when) or {}
            return f"{c['sm_clock_mhz_median']:.0f}" if c else "-"

        lines.append(
            f"- SM clock, median MHz (timed calls / profiled call): one GPU {mhz('one_gpu', 'clock_timed')} / "
            f"{mhz('one_gpu', 'clock_profiled')}, one rank {mhz('rank_no_exchange', 'clock_timed')} / "
            f"{mhz('rank_no_exchange', 'clock_profiled')}"
        )
    lines += [
        "",
        "| category | one GPU ms | one rank ms | excess over 1/P ms |",
        "|---|---|---|---|",
    ]
    for cat, c in sorted(s["by_category"].items(), key=lambda kv: -kv[1]["excess_ms"]):
        lines.append(f"| {cat} | {c['one_gpu_ms']:.2f} | {c['rank_ms']:.2f} | {c['excess_ms']:+.2f} |")
    lines += ["", "| kernel | category | one GPU ms (n) | one rank ms (n) | excess ms |", "|---|---|---|---|---|"]
    for r in s["largest_excess"]:
        lines.append(
            f"| `{r['kernel'][:90]}` | {r['category']} | {r['one_gpu_ms']:.2f} ({r['one_gpu_n']}) | "
            f"{r['rank_ms']:.2f} ({r['rank_n']}) | {r['excess_ms']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], path: Path) -> None:
    """Per size: each category's kernel time, one GPU's / P beside one rank's (no-exchange step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 3.6), squeeze=False)
    for ax, s in zip(axes[0], summaries):
        p = s["world"]
        cats = sorted(s["by_category"], key=lambda c: -s["by_category"][c]["one_gpu_ms"])
        cats = [c for c in cats if s["by_category"][c]["one_gpu_ms"] + s["by_category"][c]["rank_ms"] > 0.2]
        x = range(len(cats))
        ideal = [s["by_category"][c]["one_gpu_ms"] / p for c in cats]
        rank = [s["by_category"][c]["rank_ms"] for c in cats]
        ax.bar([i - 0.2 for i in x], ideal, width=0.4, label=f"one GPU / {p}", color="#999999")
        ax.bar([i + 0.2 for i in x], rank, width=0.4, label=f"one rank of {p} (no exchange)", color="#1f77b4")
        for i, (a, b) in enumerate(zip(ideal, rank)):
            ax.annotate(f"{b - a:+.1f}", (i + 0.2, b), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), cats)
        ax.set_ylabel("kernel time per step, ms")
        ax.set_title(
            f"{s['family']} {s['size']}^2: step {s['no_exchange_ms']:.1f} vs {s['ideal_ms']:.1f} ideal "
            f"({s['sharding_cost_ms']:+.1f} ms)",
            fontsize=9,
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--family", default="flux")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument(
        "--compare",
        nargs="+",
        metavar="JSON",
        help="pairs of files: one GPU's, then the P-rank run's (of one family and size); each pair's comparison "
        "is written as JSON and markdown, all of them in one plot",
    )
    args = ap.parse_args()
    if args.compare:
        if len(args.compare) % 2:
            ap.error(f"--compare takes pairs of files (one GPU's, the P-rank run's); got {len(args.compare)}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summaries = []
        for one_path, many_path in zip(args.compare[::2], args.compare[1::2]):
            s = compare(json.loads(Path(one_path).read_text()), json.loads(Path(many_path).read_text()))
            stem = f"sharding_cost_{s['family']}_{s['size']}_P{s['world']}"
            (out / f"{stem}.json").write_text(json.dumps(s, indent=1))
            (out / f"{stem}.md").write_text(report(s))
            print(report(s))
            summaries.append(s)
        plot(summaries, out / "sharding_cost.png")
        return
    run(args)


if __name__ == "__main__":
    main()
