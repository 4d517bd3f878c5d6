"""V-Major's speed across an emulated slow tier: whole denoising loops of a FLUX.1-sized transformer.

    torchrun --nproc-per-node 2 benchmarks/vmajor_speed.py --out OUT --topology 2x1 --ctas 1 auto

Per slow-link calibration (NCCL CTA cap of the emulated inter-"node" link, measured in GB/s per rank first;
"auto" picks the cap closest to a 400 Gb/s NIC per GPU, 50 GB/s), per image size and per step count: one
whole loop (the transformer called once per step by diffusers' flow-matching scheduler, whose step index the
engine follows; no text encoders or VAE: embeddings are given) for each configuration, each replaying CUDA
graphs (`cuda_graph=True`): "flat" (the paper's baseline), "vfirst+fused" (V-First, the fused Q/K kernel),
"cocodiff" (the preset: V-First + V-Major, fused Q/K) and "nocomm" (every exchange a no-op: the compute-only
bound; wrong output, timing only). Timings: CUDA events around the loop, after one untimed loop that captures
the graphs, median of --reps. The exact configurations do the same work at every step, so they run one loop
of --exact-steps and their per-image time is that per-step time x steps (stated in the JSON); "cocodiff"'s
steps differ (its schedule), so it runs every loop length in --steps. Also: slow-tier bytes per rank, the
relative error of the final latents against the exact flat loop of the same length, and the Amdahl estimate
T_nocomm + (T_flat - T_nocomm) * bytes_left per step.
Rank 0 writes vmajor_speed.json. `--cpu` runs the same code on gloo CPU ranks with a tiny model (no graphs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cocodiff import ParallelConfig, SlowTierEmulation, parallelize
from cocodiff.apps import families as zoo
from cocodiff.apps.bench_a2a import calibrate_slow_link
from cocodiff.apps.launch import set_multi_gpu_env
from cocodiff.exchange import NoExchange
from cocodiff.timing import time_ms
from cocodiff.topology import Topology

TEXT_TOKENS = 512


def loop(model, inputs: dict, steps: int, dtype) -> tuple[torch.Tensor, int]:
    """One denoising loop; returns (final latents, bytes sent by this rank over the slow tier)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    engine = model.cocodiff
    engine.steps.follow(sched)
    x = inputs["hidden_states"].clone()
    slow = 0
    for t in sched.timesteps:
        tt = (t / 1000).expand(x.shape[0]).to(device=x.device, dtype=dtype)
        with torch.no_grad():
            v = model(**{**inputs, "hidden_states": x, "timestep": tt}, return_dict=False)[0]
        slow += engine.step_stats.bytes_by_tier[-1]
        x = sched.step(v, t, x, return_dict=False)[0]
    return x, slow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--topology", default="2x1")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    ap.add_argument("--ctas", nargs="+", default=["1", "auto"], help="CTA caps of the slow link ('auto': ~50 GB/s)")
    ap.add_argument("--configs", nargs="+", default=["flat", "vfirst+fused", "cocodiff", "nocomm"])
    ap.add_argument("--exact-steps", type=int, default=10, help="loop length of the exact configurations")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--cpu", action="store_true", help="gloo CPU ranks, tiny model, no graphs (a dry run)")
    args = ap.parse_args()

    cuda = not args.cpu
    if cuda:
        set_multi_gpu_env()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
        size_name, dtype = "full", torch.bfloat16
    else:
        dist.init_process_group("gloo")
        device, size_name, dtype = torch.device("cpu"), "tiny", torch.float32
    rank, world = dist.get_rank(), dist.get_world_size()
    topo = Topology.from_spec(args.topology, world)
    import diffusers

    result = {
        "what": "whole denoising loops, FLUX.1-sized transformer (random weights), emulated slow tier",
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "P": world,
        "topology": args.topology,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
        "reps": args.reps,
        "text_tokens": TEXT_TOKENS,
        "runs": [],
    }
    out_dir = Path(args.out)

    def save():
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "vmajor_speed.json").write_text(json.dumps(result, indent=1))

    cal = calibrate_slow_link(topo, dist.group.WORLD, device, [1, 2, 4, 8], 32.0, 10) if cuda else {1: {}}
    result["calibration_32MB"] = {str(k): v for k, v in cal.items()}
    for c in args.ctas:
        ctas = min(cal, key=lambda k: abs((cal[k].get("GBps_per_rank") or 0) - 50.0)) if c == "auto" else int(c)
        emu = SlowTierEmulation(
            max_ctas=ctas,
            stands_for="400 Gb/s NIC per GPU" if c == "auto" else f"the slowest emulated link ({ctas} CTA)",
        )
        for size in args.sizes:
            probe = zoo.build_model("flux", size_name, dtype=dtype, device=device, seed=0)
            rows, cols = zoo.image_tokens("flux", probe, size, size) if cuda else (8, 8)
            inputs = zoo.make_inputs(
                "flux", probe, rows=rows, cols=cols, n_txt=TEXT_TOKENS if cuda else 8, device=device, dtype=dtype
            )
            del probe
            finals = {}
            for name in args.configs:
                entry = {
                    "ctas": ctas,
                    "link_GBps_per_rank": cal.get(ctas, {}).get("GBps_per_rank"),
                    "stands_for": emu.stands_for,
                    "size": size,
                    "config": name,
                }
                try:
                    model = zoo.build_model("flux", size_name, dtype=dtype, device=device, seed=0)
                    fused = name != "flat" and cuda
                    common = dict(topology=args.topology, emulate_slow_tier=emu, cuda_graph=cuda, fuse_qk=fused)
                    if name == "cocodiff":
                        cfg = ParallelConfig.preset("cocodiff", **common)
                    else:
                        cfg = ParallelConfig(v_first=name != "flat", **common)
                    parallelize(model, cfg)
                    if name == "nocomm":
                        eng = model.cocodiff
                        eng.use_exchange(NoExchange(topology=eng.topology, rank=eng.rank, stats=eng.stats))
                    lengths = args.steps if cfg.v_major is not None else [args.exact_steps]
                    # the first loop captures every graph the timed loops replay; flat's runs the longest loop,
                    # whose latents are the exact reference of cocodiff's
                    first = max(args.steps) if name in ("flat", "cocodiff") else max(lengths)
                    t0 = time.perf_counter()
                    x_first, _ = loop(model, inputs, first, dtype)
                    entry["first_loop_s"] = time.perf_counter() - t0
                    finals[(name, first)] = x_first.float().cpu()
                    entry["graphs"] = len(model.cocodiff.graphs) if model.cocodiff.graphs is not None else 0
                    for steps in lengths:
                        got = {}

                        def run(steps=steps, got=got, model=model):
                            got["x"], got["slow"] = loop(model, inputs, steps, dtype)

                        ms = time_ms(run, warmup=0, iters=args.reps, cuda=cuda)
                        entry[f"loop_ms_{steps}"] = statistics.median(ms)
                        entry[f"step_ms_{steps}"] = statistics.median(ms) / steps
                        entry[f"slow_bytes_{steps}"] = got["slow"]
                        finals[(name, steps)] = got["x"].float().cpu()
                    if cfg.v_major is None:  # the same work every step: per image = per step x steps
                        per_step = entry[f"step_ms_{args.exact_steps}"]
                        for steps in args.steps:
                            entry[f"image_ms_{steps}"] = per_step * steps
                            entry[f"slow_bytes_{steps}"] = (
                                entry[f"slow_bytes_{args.exact_steps}"] / args.exact_steps * steps
                            )
                    else:
                        for steps in args.steps:
                            entry[f"image_ms_{steps}"] = entry[f"loop_ms_{steps}"]
                    del model
                except Exception as exc:  # a failed configuration is a row that says why
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:800]
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                result["runs"].append(entry)
                if rank == 0:
                    print(json.dumps({k: v for k, v in entry.items() if not k.startswith("first")}), flush=True)
                save()
            for entry in result["runs"]:
                if entry["size"] != size or entry["ctas"] != ctas:
                    continue
                for steps in set(args.steps) | {args.exact_steps}:
                    ref, x = finals.get(("flat", steps)), finals.get((entry["config"], steps))
                    if ref is not None and x is not None and entry["config"] != "nocomm":
                        entry[f"rel_err_vs_flat_{steps}"] = ((x - ref).norm() / ref.norm()).item()
            _amdahl(result, size, ctas, args.steps)
            save()
    from cocodiff.apps.launch import release_together

    release_together()  # graphs and buffers freed on every rank before the group goes (pytorch#115388)
    dist.destroy_process_group()


def _amdahl(result: dict, size: int, ctas: int, steps_list) -> None:
    """Per loop length: speedup over flat per image, the slow-tier bytes left, and the Amdahl estimate of the
    image time: compute-only time + flat's exchange time scaled by the bytes left."""
    rows = {e["config"]: e for e in result["runs"] if e["size"] == size and e["ctas"] == ctas and "error" not in e}
    flat, nocomm = rows.get("flat"), rows.get("nocomm")
    if flat is None or nocomm is None:
        return
    for e in rows.values():
        for s in steps_list:
            if f"image_ms_{s}" not in e or not flat.get(f"slow_bytes_{s}"):
                continue
            left = e[f"slow_bytes_{s}"] / flat[f"slow_bytes_{s}"]
            t_nc, t_flat = nocomm[f"image_ms_{s}"], flat[f"image_ms_{s}"]
            e[f"slow_bytes_fraction_{s}"] = left
            e[f"amdahl_image_ms_{s}"] = t_nc + (t_flat - t_nc) * left
            e[f"speedup_vs_flat_{s}"] = t_flat / e[f"image_ms_{s}"]


if __name__ == "__main__":
    main()
