"""One transformer step of a full-size DiT (random bf16 weights) on 1..P GPUs: ms/step and error vs 1 GPU.

Launch once per GPU count with torchrun; the 1-GPU run (no parallelism) writes the reference outputs that
the parallel runs compare against:

    torchrun --nproc-per-node 1 benchmarks/flux_step.py --ref-dir REF --out OUT
    torchrun --nproc-per-node 4 benchmarks/flux_step.py --ref-dir REF --out OUT --configs flat vfirst

Timings: CUDA events around one forward, warm-up excluded, median (and min) of --iters runs; eager and
(with --graph) the step replayed as a CUDA graph. Rank 0 writes OUT/<family>_P<P>.json.

Configs are a route/schedule name (CONFIGS) with suffixes: `+fused` (fuse_qk), `+compiled` (compile_blocks:
inductor-compiled blocks around the sharded attention; listed last, the blocks stay compiled). Compiled rows
record `first_call_s` (compilation of the shape) and `graph_first_call_s` (warm-up + capture). `--peers` adds
diffusers on the same GPUs and shapes, each mode timed the same way: its Ulysses (`enable_parallelism`) at
P > 1, plain diffusers on 1 GPU; eager, regional compile and torch.compile(mode="reduce-overhead").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cocodiff import ParallelConfig, parallelize
from cocodiff.apps import families as zoo
from cocodiff.apps.launch import set_multi_gpu_env
from cocodiff.config import SlowTierEmulation
from cocodiff.exchange import NoExchange
from cocodiff.graph import GraphedStep
from cocodiff.timing import rel_err, release_memory, time_ms

TEXT_TOKENS = {"flux": 512, "sd3": 333, "qwenimage": 256, "flux2": 512}

# name -> (exchange route, v_first, overlap_output); None: follow v_first
CONFIGS = {
    "flat": ("flat", False, None),
    "vfirst": ("flat", True, None),  # V, then Q, then K; output exchange under single-block MLPs
    "vfirst-nooverlap": ("flat", True, False),  # V-First alone (output exchange exposed)
    "tapa": ("auto", False, None),
    "tapa-vfirst": ("auto", True, None),
    "tapa-phases": ("tapa", False, None),
    "ce": ("copy_engine", False, None),
    "ce-vfirst": ("copy_engine", True, None),
    "nocomm-vfirst": ("none", True, None),  # lower bound: exchanges replaced by no-ops (wrong output)
}


FLAGS = {"fused", "compiled"}  # config suffixes: +fused (fuse_qk), +compiled (compile_blocks; put these last)


def _flags(name: str) -> list[str]:
    return name.split("+")[1:]


KERNEL_CATEGORIES = (  # first match wins
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_")),
)


def kernel_breakdown(fn) -> dict:
    """GPU time per kernel category of one call of `fn` (torch.profiler trace; sums of kernel durations, so
    concurrent kernels both count), plus the span from the first kernel's start to the last one's end."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    ms: dict[str, float] = {}
    count: dict[str, int] = {}
    by_name: dict[str, float] = {}
    first, last = float("inf"), 0.0
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset") or "dur" not in e:
            continue
        name = e["name"].lower()
        cat = (
            "memcpy/memset"
            if e["cat"] != "kernel"
            else next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        )
        ms[cat] = ms.get(cat, 0.0) + e["dur"] / 1e3
        count[cat] = count.get(cat, 0) + 1
        if cat == "other":
            by_name[e["name"][:120]] = by_name.get(e["name"][:120], 0.0) + e["dur"] / 1e3
        first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
    top = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:15])
    return {"kernel_ms": ms, "kernels": count, "span_ms": (last - first) / 1e3, "top_other_ms": top}


def time_fn(fn, warmup: int, iters: int) -> list[float]:
    return time_ms(fn, warmup=warmup, iters=iters)


PEER_MODES = ("eager", "regional-compile", "reduce-overhead")


class DiffusersPeer:
    """diffusers at its own best on the same GPUs and shapes: `enable_parallelism(ContextParallelConfig(
    ulysses_degree=P))` (P > 1; plain diffusers on 1 GPU), timed eager, with regional compilation (diffusers'
    `compile_repeated_blocks(fullgraph=True)`) and under `torch.compile(mode="reduce-overhead")` (inductor with
    CUDA graphs). One copy of the model, built once; each compiled mode is undone after its rows."""

    def __init__(self, family: str, world: int, device: torch.device):
        import diffusers

        self.error = None
        cls = zoo.model_class(family)
        if world > 1 and getattr(cls, "_cp_plan", None) is None:
            self.error = f"diffusers {diffusers.__version__} has no context-parallel plan (_cp_plan) for {cls.__name__}"
            return
        self.model = zoo.build_model(family, "full", dtype=torch.bfloat16, device=device, seed=0)
        if world > 1:
            from diffusers import ContextParallelConfig

            self.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    def callable(self, mode: str):
        """(the call to time, an undo) for `mode`."""
        model = self.model
        if mode == "eager":
            return model, lambda: None
        if mode == "reduce-overhead":
            compiled = torch.compile(model, mode="reduce-overhead")
            return compiled, torch._dynamo.reset
        model.compile_repeated_blocks(fullgraph=True)

        def undo():
            for m in model.modules():
                if getattr(m, "_compiled_call_impl", None) is not None:
                    m._compiled_call_impl = None
            torch._dynamo.reset()

        return model, undo

    def rows(self, inputs: dict, ref_path: Path, args, rank: int, world: int, size: int) -> dict:
        if self.error is not None:
            return {mode: {"error": self.error} for mode in PEER_MODES}
        out_rows = {}
        for mode in args.peer_modes:
            fn, undo = self.callable(mode)

            def call():
                with torch.no_grad():
                    return fn(**inputs, return_dict=False)[0]

            row: dict = {}
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                call()
                torch.cuda.synchronize()
                row["first_call_s"] = time.perf_counter() - t0
                times = time_fn(call, args.warmup, args.iters)
                out = call()
                row.update(eager_ms_median=statistics.median(times), eager_ms_min=min(times), eager_ms_all=times)
                if ref_path.exists():
                    row["rel_err_vs_1gpu"] = rel_err(out, torch.load(ref_path))
                del out
            except Exception as exc:  # a peer that cannot run this shape or mode is a row that says why
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            finally:
                undo()
                release_memory()
            out_rows[mode] = row
            if rank == 0:
                ms = row.get("eager_ms_median")
                print(f"[P={world}] {size}px diffusers {mode}: " + (f"{ms:.1f} ms" if ms else row.get("error", "")))
        return out_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="flux", choices=zoo.FAMILIES)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--configs", nargs="+", default=["flat"], help=", ".join(CONFIGS))
    ap.add_argument(
        "--sdpa",
        default="default",
        choices=["default", "flash", "cudnn", "efficient"],
        help="SDPA backend for every attention (eager runs and graph captures)",
    )
    ap.add_argument("--topology", default=None, help="tier spec for the parallel runs, e.g. 2x2")
    ap.add_argument("--emulate", action="store_true", help="emulate a slow outermost tier (CTA-capped NCCL)")
    ap.add_argument("--max-ctas", type=int, default=1, help="CTA cap of the emulated slow link")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--graph", action="store_true", help="also time the step replayed as a CUDA graph")
    ap.add_argument(
        "--single-fused",
        action="store_true",
        help="1 GPU: also time the model through cocodiff (1 rank) with fuse_qk, as the fair baseline",
    )
    ap.add_argument(
        "--single-compiled",
        action="store_true",
        help="1 GPU: also time cocodiff on one rank with fuse_qk and compile_blocks (after --single-fused)",
    )
    ap.add_argument(
        "--peers",
        action="store_true",
        help="also time diffusers (its Ulysses at P > 1) eager, regional-compiled and reduce-overhead, same shapes",
    )
    ap.add_argument("--peer-modes", nargs="+", default=list(PEER_MODES), choices=PEER_MODES)
    ap.add_argument("--profile", action="store_true", help="with --graph: kernel time per category of one replay")
    ap.add_argument("--ref-dir", default="/tmp/cocodiff_ref", help="where the 1-GPU run keeps its outputs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    set_multi_gpu_env()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 or args.single_fused or args.single_compiled:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", local_rank)

    t0 = time.perf_counter()
    model = zoo.build_model(args.family, "full", dtype=torch.bfloat16, device=device, seed=0)
    init_s = time.perf_counter() - t0
    ref_dir = Path(args.ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    import diffusers

    result = {
        "family": args.family,
        "P": world,
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if world > 1 else None,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "params_billion": sum(p.numel() for p in model.parameters()) / 1e9,
        "init_s": init_s,
        "warmup": args.warmup,
        "iters": args.iters,
        "env": {
            k: os.environ.get(k)
            for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
        },
        "sizes": {},
    }
    configs = args.configs
    if world == 1:
        configs = ["single"] + ["single+fused"] * args.single_fused + ["single+fused+compiled"] * args.single_compiled
    unknown = [c for c in configs if world > 1 and (c.split("+")[0] not in CONFIGS or not set(_flags(c)) <= FLAGS)]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}, each with +fused / +compiled")
    compiled_at = [i for i, c in enumerate(configs) if "compiled" in _flags(c)]
    if compiled_at and compiled_at[-1] - compiled_at[0] + 1 != len(configs) - compiled_at[0]:
        raise SystemExit("--configs: put the +compiled configs last (compiling the blocks is not undone)")
    emu = SlowTierEmulation(max_ctas=args.max_ctas) if args.emulate else None
    result["topology"] = args.topology
    result["emulation"] = None if emu is None else {"max_ctas": emu.max_ctas, "stands_for": emu.stands_for}
    if world > 1:
        # one engine with every route (flat, TAPA 1 and 4 chunks, automatic plan); configs switch between them
        parallelize(model, ParallelConfig(all_to_all="tapa", topology=args.topology, emulate_slow_tier=emu))
        eng = model.cocodiff
        common = dict(topology=eng.topology, rank=eng.rank, stats=eng.stats)
        extra_routes = {"none": NoExchange(**common)}
        if any(CONFIGS[c.split("+")[0]][0] == "copy_engine" for c in configs):
            from cocodiff.exchange.copy_engine import CopyEngineExchange

            extra_routes["copy_engine"] = CopyEngineExchange(group=eng.group, **common)
    models = {name: model for name in configs}
    if args.single_fused or args.single_compiled:  # a second copy of the same weights, through the engine on 1 rank
        fused_model = zoo.build_model(args.family, "full", dtype=torch.bfloat16, device=device, seed=0)
        parallelize(fused_model, ParallelConfig(v_first=True, fuse_qk=True))
        models["single+fused"] = models["single+fused+compiled"] = fused_model
    peer = DiffusersPeer(args.family, world, device) if args.peers else None
    result["sdpa_backend"] = args.sdpa
    if args.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_ctx = sdpa_kernel(
            [
                {
                    "flash": SDPBackend.FLASH_ATTENTION,
                    "cudnn": SDPBackend.CUDNN_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION,
                }[args.sdpa]
            ]
        )
        sdpa_ctx.__enter__()  # for the whole run: eager calls and graph captures alike
    for size in args.sizes:
        rows, cols = zoo.image_tokens(args.family, model, size, size)
        inputs = zoo.make_inputs(
            args.family,
            model,
            rows=rows,
            cols=cols,
            n_txt=TEXT_TOKENS[args.family],
            device=device,
            dtype=torch.bfloat16,
            seed=1,
        )
        entry = {"image_tokens": rows * cols, "text_tokens": TEXT_TOKENS[args.family]}
        ref_path = ref_dir / f"{args.family}_{size}.pt"
        for name in configs:
            model = models[name]
            base, fused, compiled = name.split("+")[0], "fused" in _flags(name), "compiled" in _flags(name)
            first_call_s = None
            if compiled and not getattr(model, "_bench_compiled", False):
                from cocodiff.compiled import compile_blocks

                compile_blocks(model, model.cocodiff.plan, None)
                model._bench_compiled = True
            if world > 1:
                route, v_first, overlap = CONFIGS[base]
                eng.set_schedule(v_first=v_first, overlap_output=overlap, fuse_qk=fused)
                if route in extra_routes:
                    eng.use_exchange(extra_routes[route])
                else:
                    eng.use_exchange(route)
            torch.cuda.reset_peak_memory_stats(device)

            def eager():
                with torch.no_grad():
                    return model(**inputs, return_dict=False)[0]

            if compiled:  # the first call compiles this shape: its time is the start-up a user waits for
                t_first = time.perf_counter()
                eager()
                torch.cuda.synchronize()
                first_call_s = time.perf_counter() - t_first
            times = time_fn(eager, args.warmup, args.iters)
            out = eager()
            row = {
                "first_call_s": first_call_s,
                "eager_ms_median": statistics.median(times),
                "eager_ms_min": min(times),
                "eager_ms_all": times,
                "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
            }
            if world > 1 or fused:
                row["bytes_per_step"] = model.cocodiff.step_stats.as_dict()
                auto = getattr(model.cocodiff, "_auto", None)
                if auto is not None and name.startswith("tapa"):
                    row["auto_decisions"] = {str(k[0]): v for k, v in auto.decisions.items()}
                    row["auto_timings_ms"] = {str(k[0]): v for k, v in auto.timings.items()}
            if name == "single" and rank == 0:
                torch.save(out.cpu(), ref_path)
            elif ref_path.exists() and "nocomm" not in name:
                row["rel_err_vs_1gpu"] = rel_err(out, torch.load(ref_path))
            if args.graph:
                try:
                    step = GraphedStep(model)
                    t_capture = time.perf_counter()
                    gout = step(**inputs)
                    torch.cuda.synchronize()
                    row["graph_first_call_s"] = time.perf_counter() - t_capture
                    gtimes = time_fn(step.replay_only, args.warmup, args.iters)
                    row["graph_ms_median"] = statistics.median(gtimes)
                    row["graph_ms_min"] = min(gtimes)
                    if ref_path.exists() and name != "single" and "nocomm" not in name:
                        row["graph_rel_err_vs_1gpu"] = rel_err(gout, torch.load(ref_path))
                    row["graph_vs_eager_max_abs"] = (gout.float() - out.float()).abs().max().item()
                    if args.profile:
                        row["graph_profile"] = kernel_breakdown(step.replay_only)
                    del step, gout
                except Exception as exc:  # report, don't hide: the eager numbers still stand
                    row["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
                release_memory()
            entry[name] = row
            if rank == 0:
                print(
                    f"[P={world}] {args.family} {size}px {name}: eager {row['eager_ms_median']:.1f} ms"
                    + (f", graph {row.get('graph_ms_median', float('nan')):.1f} ms" if args.graph else "")
                    + (f", rel_err {row['rel_err_vs_1gpu']:.2e}" if "rel_err_vs_1gpu" in row else ""),
                    flush=True,
                )
        for model in {id(m): m for m in models.values()}.values():  # the next size starts uncompiled, as this one
            if getattr(model, "_bench_compiled", False):
                for block in model.modules():
                    if getattr(block, "_compiled_call_impl", None) is not None:
                        block._compiled_call_impl = None
                model._bench_compiled = False
        if peer is not None:
            entry["diffusers"] = peer.rows(inputs, ref_path, args, rank, world, size)
        result["sizes"][str(size)] = entry
    if rank == 0:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{args.family}_P{world}{args.tag}.json").write_text(json.dumps(result, indent=1))
    models = model = eng = extra_routes = peer = fused_model = None  # freed together, below
    if dist.is_initialized():
        from cocodiff.apps.launch import release_together

        release_together()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
