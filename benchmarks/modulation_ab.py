"""Sharded against replicated AdaLN modulation (`ParallelConfig.shard_modulation`), side by side in one launch.

Per family and size, rank 0 of a torchrun launch builds the full-size model (random bf16 weights) twice: one copy
parallelised with the preset as it is (modulation sharded: each rank computes 1/P of the blocks' modulation GEMVs,
one all-gather), one with `shard_modulation=False` (every rank computes all of them). It times the two in
alternating rounds (`config_ab.time_alternating`: CUDA events, warm-up excluded; the median of every round's
calls per copy; the order rotates every round), so clock drift under the power cap falls on both alike, and gives
the relative error between their outputs (the two are the same computation: 0 in eager mode; with compiled blocks
the `silu` before the GEMVs is eager in one and inductor's in the other). Writes OUT/modulation_ab_P{P}.json and a
markdown table.

    torchrun --nproc-per-node 2 benchmarks/modulation_ab.py --out OUT --runs flux:1024 flux:2048 sd3:1024
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def measure(args) -> dict:
    import copy

    import torch
    import torch.distributed as dist

    from cocodiff import ParallelConfig, parallelize, release
    from cocodiff.apps import families as zoo
    from config_ab import header, image_step, time_alternating  # (this folder: run as a script)

    cuda = not args.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    world = dist.get_world_size()
    result = header(args, world, device, cuda)
    for spec in args.runs:
        family, size = spec.split(":")
        size = int(size)
        base = zoo.build_model(family, args.model_size, dtype=dtype, device=device, seed=0)
        models = {"sharded": base, "replicated": copy.deepcopy(base)}
        for name, model in models.items():
            parallelize(model, ParallelConfig.preset(args.preset, shard_modulation=name == "sharded"))
        step = image_step(family, base, size, cuda=cuda, device=device, dtype=dtype)
        from torch._dynamo.utils import counters

        outs, traced = {}, {}
        for name, model in models.items():
            start = counters["stats"]["unique_graphs"]
            for _ in range(3):  # compile, capture, warm up
                outs[name] = step(model)
            traced[name] = counters["stats"]["unique_graphs"] - start  # graphs TorchDynamo traced for this copy
        times = time_alternating(
            {name: (lambda m=model: step(m)) for name, model in models.items()},
            rounds=args.rounds,
            iters=args.iters,
            cuda=cuda,
        )
        a, b = outs["sharded"].float(), outs["replicated"].float()
        mod = base.cocodiff.modulation
        row = {
            "family": family,
            "size": size,
            "ms": {name: statistics.median(t) for name, t in times.items()},
            "ms_all": times,
            "rel_error_between": ((a - b).norm() / b.norm()).item(),
            "bit_equal": bool(torch.equal(outs["sharded"], outs["replicated"])),
            "layers_sharded": mod.layers if mod is not None else 0,
            "layers_this_rank": len(mod.mine) if mod is not None else 0,
            "graphs_traced": traced,
        }
        row["saved_ms"] = row["ms"]["replicated"] - row["ms"]["sharded"]
        result["runs"].append(row)
        if dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "ms_all"}), flush=True)
        for model in models.values():
            release(model)
        del models, base, outs
        if cuda:
            torch.cuda.empty_cache()
    return result


def markdown(result: dict) -> str:
    lines = [
        f"# Sharded against replicated modulation, P={result['world']}, preset `{result['preset']}`",
        "",
        f"{result['gpu']}, torch {result['torch']}; median of {result['rounds']} alternating rounds x "
        f"{result['iters']} calls per copy.",
        "",
        "| family, size | replicated ms | sharded ms | saved ms | layers (this rank) | rel. error between |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        error = "0 (bit-equal)" if r["bit_equal"] else f"{r['rel_error_between']:.1e}"
        lines.append(
            f"| {r['family']}, {r['size']}^2 | {r['ms']['replicated']:.1f} | {r['ms']['sharded']:.1f} | "
            f"{r['saved_ms']:+.2f} | {r['layers_sharded']} ({r['layers_this_rank']}) | {error} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Replicated against sharded ms per family and size, the saving written on each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.7 * len(runs), 3.6))
    x = range(len(runs))
    rep = [r["ms"]["replicated"] for r in runs]
    sha = [r["ms"]["sharded"] for r in runs]
    ax.bar([i - 0.2 for i in x], rep, 0.4, label="replicated (every rank computes every layer)", color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], sha, 0.4, label="sharded (1/P per rank + one all-gather)", color="#3b7dd8")
    for i, r in enumerate(runs):
        ax.text(i, max(rep[i], sha[i]) * 1.01, f"{r['saved_ms']:+.1f} ms", ha="center", fontsize=8)
    ax.set_xticks(list(x), [f"{r['family']}\n{r['size']}^2" for r in runs])
    ax.set_yscale("log")
    ax.set_ylabel("ms per transformer step (log)")
    ax.set_title(f"AdaLN modulation, P={result['world']}, preset {result['preset']} ({result['gpu']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", nargs="+", default=["flux:1024"], help="family:size")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--model-size", default="full", help="families' config size (tiny: with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="gloo CPU ranks (with --preset vfirst, --model-size tiny)")
    ap.add_argument("--report", metavar="JSON", help="only write the markdown and plot of a run's JSON into --out")
    args = ap.parse_args()
    if args.report:
        result = json.loads(Path(args.report).read_text())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"modulation_ab_P{result['world']}.md").write_text(markdown(result))
        plot(result, out / f"modulation_ab_P{result['world']}.png")
        return
    import os

    from cocodiff.apps.launch import run_launched

    result = run_launched(measure, args, cuda=not args.cpu, collective_timeout_s=300)
    if int(os.environ.get("RANK", 0)) == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"modulation_ab_P{result['world']}.json").write_text(json.dumps(result, indent=1))
        (out / f"modulation_ab_P{result['world']}.md").write_text(markdown(result))
        plot(result, out / f"modulation_ab_P{result['world']}.png")


if __name__ == "__main__":
    main()
