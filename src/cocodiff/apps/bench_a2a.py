"""`cocodiff bench a2a`: the all-to-all microbenchmark (paper Fig. 11): flat vs TAPA over message sizes.

For each message size (bytes each rank sends in one all-to-all) it times every route of the same block
all-to-all (flat; TAPA with 1, 2 and 4 pipeline chunks) and records which one the automatic plan picks,
with latency, algorithm bandwidth (bytes per rank / time) and the number and size of slow-tier messages per
rank. Under slow-tier emulation it first calibrates the emulated link: the GB/s that inter-"node" traffic
actually achieves for several NCCL CTA caps, and (with --max-ctas auto) keeps the cap closest to the
stated real link. Rank 0 writes JSON and a PNG plot.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ParallelConfig, SlowTierEmulation
from ..exchange import CommStats, FlatExchange, TapaExchange, build_exchange, needs_groups
from ..timing import time_ms
from ..topology import Topology, build_groups, parse_topology_spec, slow_link_options
from .launch import set_multi_gpu_env, spawn

GPU_SIZES = [0.0625, 0.25, 1, 2, 4, 8, 16, 32, 64]
CPU_SIZES = [0.0625, 0.25, 1, 4]  # gloo through host memory: the GPU sizes take minutes on two cores


def _time(fn, warmup: int, iters: int, cuda: bool) -> list[float]:
    return time_ms(fn, warmup=warmup, iters=iters, cuda=cuda)


def _time_graph(fn, iters: int) -> float | None:
    """GPU-side time of `fn` (ms): `iters` calls captured in one CUDA graph, replayed; no host in the loop."""
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        g.replay()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) / iters
    except Exception as exc:
        print(f"graph timing failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def calibrate_slow_link(topo: Topology, group, device, ctas_list, mb: float, iters: int) -> dict:
    """GB/s per rank of inter-node traffic over a CTA-capped communicator (what the emulated link achieves)."""
    rank, world = dist.get_rank(group), topo.world_size
    parent = dist.get_process_group_ranks(group)
    local = world // topo.sizes[-1]
    node = rank // local
    splits = [0 if r // local == node else 1 for r in range(world)]
    remote = world - local
    cols = max(1, int(mb * 1e6 / 2 / max(remote, 1)))
    send = torch.randn(remote, cols, device=device).to(torch.bfloat16)
    recv = torch.empty_like(send)
    out = {}
    for ctas in ctas_list:
        g = dist.new_group(parent, pg_options=slow_link_options(group, ctas))

        def fn():
            dist.all_to_all_single(recv, send, output_split_sizes=splits, input_split_sizes=splits, group=g)

        t = statistics.median(_time(fn, 2, iters, device.type == "cuda"))
        out[ctas] = {"ms": t, "GBps_per_rank": send.numel() * 2 / t / 1e6}
    return out


def _bench_rank(opts: dict) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    topo = Topology.resolve(opts["topology"], world)
    group = dist.group.WORLD
    result = {
        "topology": topo.spec,
        "tiers": [t.name for t in topo.tiers],
        "world": world,
        "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "iters": opts["iters"],
        "dtype": "bfloat16",
        "sizes_MB_per_rank": opts["sizes"],
        "emulation": None,
    }
    emu = None
    if opts["emulate"] and cuda:
        ctas = opts["max_ctas"]
        cal = calibrate_slow_link(topo, group, device, opts["calibrate_ctas"], 32.0, opts["iters"])
        if ctas == "auto":
            ctas = min(cal, key=lambda c: abs(cal[c]["GBps_per_rank"] - opts["target_GBps"]))
        emu = SlowTierEmulation(max_ctas=int(ctas), target_GBps=opts["target_GBps"])
        result["emulation"] = {
            "stands_for": emu.stands_for,
            "target_GBps": emu.target_GBps,
            "max_ctas": emu.max_ctas,
            "calibration_32MB": {str(k): v for k, v in cal.items()},
            "achieved_GBps_per_rank": cal.get(emu.max_ctas, {}).get("GBps_per_rank"),
        }
    elif opts["emulate"]:  # gloo has no CTA cap: the route changes, every link stays host memory
        emu = SlowTierEmulation()
        result["emulation"] = {
            "stands_for": None,
            "note": "CPU ranks (gloo): routes as on a cluster, but no link is slowed; the times are host memory's",
        }
    if rank == 0:
        print(
            f"bench a2a: {world} ranks ({result['backend']}, {result['device']}), topology {topo.spec}, "
            f"{len(opts['sizes'])} sizes {opts['sizes'][0]:g}-{opts['sizes'][-1]:g} MB per rank, "
            f"{opts['iters']} timed iterations each"
            + (f"; slow tier: {_emulation_label(result['emulation'])}" if emu is not None else ""),
            flush=True,
        )
    cfg = ParallelConfig(all_to_all="tapa", topology=topo.spec, emulate_slow_tier=emu)
    groups = build_groups(topo, group, **needs_groups(cfg))
    auto = build_exchange(cfg, topo, groups, rank)
    stats = auto.stats
    flat, tapa1, tapa4 = auto.candidates
    tapa2 = TapaExchange(topology=topo, tier_groups=groups.tiers, rank=rank, stats=stats, chunks=2)
    routes = {"flat": flat, "tapa": tapa1, "tapa/2": tapa2, "tapa/4": tapa4}
    if emu is not None:
        routes["flat (real links)"] = FlatExchange(
            group=group, topology=topo, rank=rank, stats=CommStats(stats.tier_names)
        )
    rows = []
    for mb in opts["sizes"]:
        cols = max(1, int(mb * 1e6 / 2 / world))
        send = torch.randn(world, cols, device=device).to(torch.bfloat16)
        row = {"MB_per_rank": send.numel() * 2 / 1e6}
        reference = flat.start(send).wait().clone()
        for name, route in routes.items():
            stats.reset()
            got = route.start(send).wait()
            row[f"{name}_equals_flat"] = bool(torch.equal(got, reference))
            row[f"{name}_msgs_by_tier"] = list(stats.messages_by_tier)
            row[f"{name}_bytes_by_tier"] = list(stats.bytes_by_tier)
            times = _time(lambda: route.start(send).wait(), 3, opts["iters"], cuda)
            t = statistics.median(times)
            row[f"{name}_ms"] = t
            row[f"{name}_GBps"] = send.numel() * 2 / t / 1e6
            if cuda:
                row[f"{name}_graph_ms"] = _time_graph(lambda: route.start(send).wait(), 10)
        row["auto_choice"] = auto.choose(send).name
        row["auto_ms"] = row[f"{row['auto_choice']}_ms"]
        row["tapa_best_ms"] = min(row["tapa_ms"], row["tapa/2_ms"], row["tapa/4_ms"])
        row["auto_vs_flat"] = row["flat_ms"] / row["auto_ms"]
        row["tapa_vs_flat"] = row["flat_ms"] / row["tapa_best_ms"]
        if cuda and row.get("flat_graph_ms"):
            gt = [row.get(f"{n}_graph_ms") for n in ("tapa", "tapa/2", "tapa/4")]
            gt = [t for t in gt if t]
            if gt:
                row["tapa_vs_flat_graph"] = row["flat_graph_ms"] / min(gt)
        rows.append(row)
        if rank == 0:
            print(
                f"{row['MB_per_rank']:7.2f} MB  flat {row['flat_ms']:.3f} ms  tapa {row['tapa_ms']:.3f}  "
                f"tapa/2 {row['tapa/2_ms']:.3f}  tapa/4 {row['tapa/4_ms']:.3f}  auto={row['auto_choice']} "
                f"({row['auto_vs_flat']:.2f}x flat)"
                + (
                    f" | graph: flat {row['flat_graph_ms']:.3f} tapa {row.get('tapa_graph_ms') or float('nan'):.3f} "
                    f"tapa/4 {row.get('tapa/4_graph_ms') or float('nan'):.3f}"
                    if cuda
                    else ""
                )
                + ("" if all(v for k, v in row.items() if k.endswith("_equals_flat")) else "  MISMATCH"),
                flush=True,
            )
    result["rows"] = rows
    if rank != 0:
        return None
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    tag = f"a2a_{topo.spec}{'_emulated' if emu else ''}_P{world}"
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    plot_a2a(result, out / f"{tag}.png")
    result["files"] = [str(out / f"{tag}.json"), str(out / f"{tag}.png")]
    return result


def _emulation_label(emu: dict) -> str:
    if emu.get("stands_for") is None:
        return "routed as on a cluster, not slowed (gloo)"
    achieved = emu.get("achieved_GBps_per_rank")
    speed = f" ({achieved:.0f} GB/s)" if achieved else ""
    return f"{emu['max_ctas']}-CTA NCCL{speed} standing for a {emu['stands_for']}"


def plot_a2a(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    mb = [r["MB_per_rank"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [
        k[:-3]
        for k in rows[0]
        if k.endswith("_ms") and not k.endswith("graph_ms") and k not in ("auto_ms", "tapa_best_ms")
    ]
    for name in names:
        ax.plot(mb, [r[f"{name}_ms"] for r in rows], "o-" if name.startswith("tapa") else "s--", label=name)
    ax.plot(mb, [r["auto_ms"] for r in rows], "k:", lw=2, label="auto plan")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("MB sent per rank")
    ax.set_ylabel("latency, ms (median)")
    emu = result.get("emulation")
    title = f"all-to-all, {result['world']} ranks, topology {result['topology']}"
    if emu:
        title += f"\nslow tier: {_emulation_label(emu)}"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.plot(mb, [r["tapa_vs_flat"] for r in rows], "o-", label="best TAPA / flat")
    ax2.plot(mb, [r["auto_vs_flat"] for r in rows], "k:", lw=2, label="auto plan / flat")
    if any("tapa_vs_flat_graph" in r for r in rows):
        ax2.plot(mb, [r.get("tapa_vs_flat_graph") for r in rows], "^-", label="best TAPA / flat, graph-replayed")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("MB sent per rank")
    ax2.set_ylabel("speedup over flat (x)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_parser(sub, formatter_class=None) -> None:
    bench = sub.add_parser("bench", help="microbenchmarks", formatter_class=formatter_class)
    bsub = bench.add_subparsers(dest="bench", required=True, parser_class=type(bench))
    p = bsub.add_parser(
        "a2a", help="all-to-all: flat vs TAPA over message sizes (JSON + PNG)", formatter_class=formatter_class
    )
    p.add_argument("--topology", default=None, help="tier spec, outermost first (e.g. 2x2); default: launcher")
    p.add_argument("--emulate", action="store_true", help="emulate a slow outermost tier (one host)")
    p.add_argument("--max-ctas", default="auto", help="CTA cap of the emulated slow link, or 'auto' (calibrate)")
    p.add_argument("--calibrate-ctas", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--target-GBps", type=float, default=50.0, help="per-GPU bandwidth of the emulated real link")
    p.add_argument(
        "--sizes",
        type=float,
        nargs="+",
        default=None,
        help=f"MB per rank (default: {' '.join(map(str, GPU_SIZES))} on GPUs, {' '.join(map(str, CPU_SIZES))} on CPU)",
    )
    p.add_argument("--iters", type=int, default=None, help="timed iterations per size (default: 20 on GPUs, 5 on CPU)")
    p.add_argument(
        "--ranks", type=int, default=None, help="ranks to start without a launcher (default: all local GPUs, or 4 CPU)"
    )
    p.add_argument("--cpu", action="store_true", help="CPU ranks (gloo) even when GPUs are present")
    p.add_argument("--out", default="cocodiff-out/bench", help="output folder")
    from . import bench_e2e

    bench_e2e.add_parser(bsub, formatter_class)


def run_bench(args) -> int:
    """The `bench a2a` subcommand: options checked before any rank starts."""
    import math

    from .cli import UsageError
    from .launch import run_launched, under_launcher

    cuda = torch.cuda.is_available() and not args.cpu
    gpus = torch.cuda.device_count() if cuda else 0
    if under_launcher():
        world = int(os.environ["WORLD_SIZE"])
    else:
        world = args.ranks if args.ranks is not None else (gpus or 4)
        if world < 1 or (gpus and world > gpus):
            raise UsageError(f"--ranks {world}: use 1 to {gpus or 'any number of'} ranks")
    if args.topology is not None:
        try:
            need = math.prod(parse_topology_spec(args.topology))
        except ValueError as exc:
            raise UsageError(f"--topology: {exc}") from None
        if need != world:
            raise UsageError(f"--topology {args.topology}: its tiers hold {need} ranks, this run has {world}")
    if args.emulate and (args.topology is None or len(parse_topology_spec(args.topology)) < 2):
        raise UsageError("--emulate needs a topology of two tiers or more, e.g. --topology 2x2")
    opts = dict(
        topology=args.topology,
        emulate=args.emulate,
        max_ctas=args.max_ctas,
        calibrate_ctas=args.calibrate_ctas,
        target_GBps=args.target_GBps,
        sizes=sorted(args.sizes or (GPU_SIZES if cuda else CPU_SIZES)),
        iters=args.iters or (20 if cuda else 5),
        out=args.out,
    )
    if under_launcher():
        result = run_launched(_bench_rank, opts, cuda=cuda, collective_timeout_s=600)
    else:
        if cuda:
            set_multi_gpu_env()
        result = spawn(_bench_rank, world, opts, backend="nccl" if cuda else "gloo", timeout_s=3600)[0]
    if result is not None:
        print(f"wrote {', '.join(result['files'])}")
    return 0
