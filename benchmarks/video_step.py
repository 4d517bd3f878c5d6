"""One transformer step of a full-size video DiT (random bf16 weights) on 1..P GPUs, side by side with
diffusers' own Ulysses: ms per step and relative error against one GPU.

Families: "wan" (Wan2.1-T2V-14B-sized: 40 heads x 128, 40 layers) and "hunyuanvideo" (HunyuanVideo-13B-sized:
24 heads x 128, 20 double + 40 single blocks). Resolutions 480p (832 x 480) and 720p (1280 x 720) at 81 frames:
21 x 30 x 52 = 32,760 and 21 x 45 x 80 = 75,600 video tokens, plus the pipelines' 512 (Wan) / 256
(HunyuanVideo) text tokens. Launch once per GPU count with torchrun; the 1-GPU run writes the reference
outputs (and, where 81 frames do not fit one GPU, the longest frame count that did) that the parallel runs
compare against:

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # (also set here)
    torchrun --nproc-per-node 1 benchmarks/video_step.py --ref-dir REF --out OUT --single-fused
    torchrun --nproc-per-node 2 benchmarks/video_step.py --ref-dir REF --out OUT --graph
    python benchmarks/run.py OUT --gpus 1 2 4 8 -- video_step.py --graph   # 1 GPU first, then P (host allowing)

Rows per (family, resolution), in one JSON per (family, P) with hardware and versions:
  single              1 GPU, plain diffusers: the reference
  single+fused        1 GPU through cocodiff on one rank with fuse_qk (--single-fused): the fair 1-GPU baseline
  flat, vfirst, ...   cocodiff at P ranks (--configs); with --graph also the step replayed as a CUDA graph (what
                      `cuda_graph=True` replays inside a pipeline)
  diffusers-ulysses   diffusers' `enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))` on a fresh
                      copy of the model; HunyuanVideo: a row saying that diffusers has no plan for it
  xdit                a row saying why xDiT was not run here
Timings: CUDA events around one forward, warm-up excluded, median (and min) of --iters runs.

`--dry-run` goes through the same code on CPU with the tiny configs (fp32, gloo when launched with torchrun,
host clock): it checks the script, not the speed.
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
from cocodiff.memory import comm_buffer_bytes
from cocodiff.timing import rel_err, release_memory, time_ms

RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}  # (height, width) as Wan's and HunyuanVideo's pipelines
DRY_GRID = (2, 3, 5)  # --dry-run: (frames, rows, cols) tokens of the tiny models, uneven over 2 and 4 ranks

# name -> (exchange route, v_first, fuse_qk)
CONFIGS = {
    "flat": ("flat", False, False),
    "vfirst": ("flat", True, False),
    "vfirst+fused": ("flat", True, True),
    "ce-vfirst+fused": ("copy_engine", True, True),  # one host: blocks moved by the copy engines
}
COMPILED = "vfirst+fused+compiled"  # --compiled at P > 1: a model of its own with compile_blocks=True


class Bench:
    """Times one model call per row and compares it with the 1-GPU reference."""

    def __init__(self, args, device: torch.device, rank: int):
        self.args, self.device, self.rank = args, device, rank
        self.cuda = device.type == "cuda"
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16

    def build(self, family: str):
        size = "tiny" if self.args.dry_run else "full"
        return zoo.build_model(family, size, dtype=self.dtype, device=self.device, seed=0)

    def row(self, model, inputs, ref_path: Path | None, *, graph: bool) -> dict:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

        def eager():
            with torch.no_grad():
                return model(**inputs, return_dict=False)[0]

        times = time_ms(eager, warmup=self.args.warmup, iters=self.args.iters, cuda=self.cuda)
        out = eager()
        row = {"eager_ms_median": statistics.median(times), "eager_ms_min": min(times), "eager_ms_all": times}
        if self.cuda:
            row["peak_mem_GiB"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if ref_path is not None and ref_path.exists():
            row["rel_err_vs_1gpu"] = rel_err(out, torch.load(ref_path))
        if graph and self.cuda:
            from cocodiff.graph import GraphedStep

            try:
                step = GraphedStep(model)
                gout = step(**inputs)
                gtimes = time_ms(step.replay_only, warmup=self.args.warmup, iters=self.args.iters)
                row["graph_ms_median"], row["graph_ms_min"] = statistics.median(gtimes), min(gtimes)
                if ref_path is not None and ref_path.exists():
                    row["graph_rel_err_vs_1gpu"] = rel_err(gout, torch.load(ref_path))
                del step, gout
            except Exception as exc:  # report, don't hide: the eager numbers still stand
                row["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
            release_memory()
        row["_out"] = out
        return row


def video_inputs(bench: Bench, family: str, model, res: str, frames: int) -> tuple[dict, dict]:
    """The call's inputs and a description (token counts) for `res` at `frames` frames."""
    if bench.args.dry_run:
        grid, n_txt = DRY_GRID, 7
    else:
        height, width = RESOLUTIONS[res]
        grid, n_txt = zoo.video_tokens(family, model, height, width, frames), zoo.TEXT_TOKENS[family]
    f, r, c = grid
    inputs = zoo.make_video_inputs(
        family, model, frames=f, rows=r, cols=c, n_txt=n_txt, batch=bench.args.batch, device=bench.device, seed=1
    )
    desc = {"frames": None if bench.args.dry_run else frames, "token_grid": list(grid), "video_tokens": f * r * c}
    return inputs, {**desc, "text_tokens": n_txt}


def exchange_estimate_gib(model, desc: dict, world: int, batch: int, elem: int, extra: int) -> float:
    """The engine's own estimate of the exchange buffers at this call's shapes (its setup-time memory check)."""
    eng = model.cocodiff
    n = desc["video_tokens"] + (desc["text_tokens"] if eng.plan.family == "hunyuanvideo" else 0)
    l_max = -(-n // world)
    return comm_buffer_bytes(l_max=l_max, batch=batch, inner_dim=eng.inner_dim, elem=elem, extra_buffers=extra) / 2**30


def frames_that_fit(bench: Bench, family: str, model, res: str, ref_dir: Path) -> int:
    """1 GPU: the longest of --frames, --fallback-frames whose step runs; parallel runs read it back."""
    meta = ref_dir / f"{family}_{res}.json"
    if dist.is_initialized() and dist.get_world_size() > 1:
        return json.loads(meta.read_text())["frames"] if meta.exists() else bench.args.frames
    for frames in [bench.args.frames, *bench.args.fallback_frames]:
        inputs, _ = video_inputs(bench, family, model, res, frames)
        try:
            with torch.no_grad():
                model(**inputs)
            meta.write_text(json.dumps({"frames": frames}))
            return frames
        except torch.OutOfMemoryError:
            del inputs
            release_memory()
    raise SystemExit(f"{family} {res}: no frame count of {[bench.args.frames, *bench.args.fallback_frames]} fits")


def diffusers_ulysses(bench: Bench, family: str, inputs: dict, ref_path: Path, world: int) -> dict:
    """diffusers' own Ulysses on a fresh copy of the model (its hooks and ours must not mix)."""
    import diffusers
    from diffusers import ContextParallelConfig

    cls = zoo.model_class(family)
    if getattr(cls, "_cp_plan", None) is None:
        return {
            "error": f"diffusers {diffusers.__version__} has no context-parallel plan (_cp_plan) for {cls.__name__}"
        }
    # cocodiff's model of this family stays allocated during this row: its weights are in this row's peak
    resident = torch.cuda.memory_allocated() / 2**30 if bench.cuda else 0.0
    model = bench.build(family)
    try:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        row = bench.row(model, inputs, ref_path, graph=bench.args.graph)
        if bench.cuda:
            row["resident_before_GiB"] = resident  # subtract from peak_mem_GiB to compare with cocodiff's rows
        return row
    except Exception as exc:  # e.g. tokens not divisible by the degree: report it
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        del model
        if bench.cuda:
            release_memory()


def xdit_row() -> dict:
    try:
        import xfuser  # noqa: F401
    except ImportError:
        return {"error": "xfuser is not installed"}
    return {
        "error": "not run: xDiT's Wan and HunyuanVideo sequence parallelism lives in its example scripts, which "
        "patch a whole pipeline; it has no transformer-level entry point to time one step side by side"
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=list(zoo.VIDEO_FAMILIES), choices=zoo.VIDEO_FAMILIES)
    ap.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--fallback-frames", type=int, nargs="*", default=[61, 41, 21], help="tried on 1 GPU after OOM")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=["flat", "vfirst", "vfirst+fused"], help=", ".join(CONFIGS))
    ap.add_argument("--graph", action="store_true", help="also time the step replayed as a CUDA graph")
    ap.add_argument("--single-fused", action="store_true", help="1 GPU: also time cocodiff on 1 rank with fuse_qk")
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="also time cocodiff with compiled blocks (V-First, fuse_qk, compile_blocks): on 1 rank and at P > 1",
    )
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers' own Ulysses")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, fp32: exercise the code path")
    ap.add_argument("--ref-dir", default="/tmp/cocodiff_video_ref", help="where the 1-GPU run keeps its outputs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")

    set_multi_gpu_env()
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.dry_run:
        device = torch.device("cpu")
        if world > 1 or args.single_fused or args.compiled:
            dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        if world > 1 or args.single_fused or args.compiled:
            dist.init_process_group("nccl", device_id=device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    bench = Bench(args, device, rank)
    ref_dir, out_dir = Path(args.ref_dir), Path(args.out)
    ref_dir.mkdir(parents=True, exist_ok=True)
    import diffusers

    for family in args.families:
        t0 = time.perf_counter()
        model = bench.build(family)
        result = {
            "family": family,
            "size": "tiny (dry run)" if args.dry_run else "full",
            "P": world,
            "device": torch.cuda.get_device_name(device) if bench.cuda else platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if bench.cuda and world > 1 else None,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "params_billion": sum(p.numel() for p in model.parameters()) / 1e9,
            "dtype": str(bench.dtype),
            "init_s": time.perf_counter() - t0,
            "batch": args.batch,
            "warmup": args.warmup,
            "iters": args.iters,
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
            "resolutions": {},
        }
        if world == 1:
            configs = ["single"] + ["single+fused"] * args.single_fused + ["single+compiled"] * args.compiled
        else:
            configs = args.configs + [COMPILED] * args.compiled
        eng = None
        if world > 1:
            parallelize(model, ParallelConfig())
            eng = model.cocodiff
        fused_model = None
        if "single+fused" in configs:  # the same weights through the engine on one rank
            fused_model = bench.build(family)
            parallelize(fused_model, ParallelConfig(v_first=True, fuse_qk=True))
        compiled_model = None
        if args.compiled:  # the same weights, the blocks compiled (on one rank: cocodiff's own one-GPU mode)
            compiled_model = bench.build(family)
            parallelize(compiled_model, ParallelConfig(v_first=True, fuse_qk=True, compile_blocks=True))
        copy_engine = None
        for res in args.resolutions:
            frames = frames_that_fit(bench, family, model, res, ref_dir)
            inputs, entry = video_inputs(bench, family, model, res, frames)
            ref_path = ref_dir / f"{family}_{res}_{frames}f.pt"
            for name in configs:
                target = {"single+fused": fused_model, "single+compiled": compiled_model, COMPILED: compiled_model}
                target = target.get(name, model)
                if name in CONFIGS:
                    route, v_first, fused = CONFIGS[name]
                    if route == "copy_engine" and not bench.cuda:
                        entry[name] = {"error": "the copy-engine exchange needs CUDA"}
                        continue
                    eng.set_schedule(v_first=v_first, fuse_qk=fused)
                    if route == "copy_engine" and copy_engine is None:
                        from cocodiff.exchange.copy_engine import CopyEngineExchange

                        copy_engine = CopyEngineExchange(
                            group=eng.group, topology=eng.topology, rank=eng.rank, stats=eng.stats
                        )
                    eng.use_exchange(copy_engine if route == "copy_engine" else "auto")
                row = bench.row(target, inputs, None if name == "single" else ref_path, graph=args.graph)
                out = row.pop("_out")
                if name == "single" and rank == 0:
                    torch.save(out.cpu(), ref_path)
                if getattr(target, "cocodiff", None) is not None:
                    row["bytes_per_step"] = target.cocodiff.step_stats.as_dict()
                    extra = target.cocodiff.exchange.extra_buffers(4)
                    elem = torch.finfo(bench.dtype).bits // 8
                    row["exchange_buffers_GiB_estimate"] = exchange_estimate_gib(
                        target, entry, world, args.batch, elem, extra
                    )
                entry[name] = row
                if rank == 0:
                    err = f", rel_err {row['rel_err_vs_1gpu']:.2e}" if "rel_err_vs_1gpu" in row else ""
                    graph = f", graph {row['graph_ms_median']:.1f} ms" if "graph_ms_median" in row else ""
                    what = f"{family} {res} {entry['video_tokens']} tokens {name}"
                    print(f"[P={world}] {what}: {row['eager_ms_median']:.1f} ms{graph}{err}", flush=True)
            if world > 1:
                entry["xdit"] = xdit_row()
                if not args.no_diffusers:
                    entry["diffusers-ulysses"] = diffusers_ulysses(bench, family, inputs, ref_path, world)
                    row = entry["diffusers-ulysses"]
                    row.pop("_out", None)
                    if rank == 0:
                        print(f"[P={world}] {family} {res} diffusers-ulysses: {row.get('eager_ms_median', row)}")
            result["resolutions"][res] = entry
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{family}_P{world}{args.tag}.json").write_text(json.dumps(result, indent=1))
        del model, fused_model, compiled_model
        if bench.cuda:
            release_memory()
    copy_engine = None  # its symmetric buffers are freed together, below
    if dist.is_initialized():
        from cocodiff.apps.launch import release_together

        release_together()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
