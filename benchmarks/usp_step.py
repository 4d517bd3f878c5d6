"""Ulysses x ring on GPUs: one transformer step of a full-size DiT (random bf16 weights) for every factorisation
of P ranks into Ulysses degree U x ring degree R, beside diffusers' unified attention
(`ContextParallelConfig(ulysses_degree=U, ring_degree=R)`) at the same degrees, in the same launch.

    torchrun --nproc-per-node 1 benchmarks/usp_step.py --ref-dir REF --out OUT            # the 1-GPU reference
    torchrun --nproc-per-node 2 benchmarks/usp_step.py --ref-dir REF --out OUT --graph --peers
    python benchmarks/run.py OUT --gpus 1 2 4 -- usp_step.py --graph --peers --sizes 2048

cocodiff rows (`U{u}xR{r}`, and `-ring_inner` for the other placement: ring over contiguous ranks, Ulysses
groups strided) run V-First, `fuse_qk` (CUDA) and, with --graph, the step replayed as a CUDA graph;
each factorisation is a fresh model (the ring is part of how the model is sharded). diffusers rows run its own
hooks on a fresh copy, eager and (--graph) under cocodiff's `GraphedStep`; a factorisation diffusers refuses
is a row saying why. Timings: CUDA events, warm-up excluded, median of --iters. Rank 0 writes
OUT/usp_<family>_P<P>.json (readable by report_peers.py).

`--dry-run` runs the same code on CPU ranks (gloo) with the tiny config: it checks the script, not the speed.
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
from cocodiff.timing import rel_err, release_memory, time_ms

TEXT_TOKENS = {"flux": 512, "sd3": 333, "qwenimage": 256, "flux2": 512}


def factorisations(world: int) -> list[tuple[int, int]]:
    """(Ulysses, ring) pairs with U x R = world: pure Ulysses first, pure ring last."""
    return [(world // r, r) for r in range(1, world + 1) if world % r == 0]


def memory_trace(model, call) -> dict:
    """Allocated GiB after every transformer block of one eager call, and the peak inside it: whether a row's
    memory grows block by block (something held until the step ends) or peaks inside one block."""
    after: list[float] = []
    hooks = [
        blk.register_forward_hook(lambda *_: after.append(torch.cuda.memory_allocated() / 2**30))
        for blk in [*getattr(model, "transformer_blocks", []), *getattr(model, "single_transformer_blocks", [])]
    ]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**30
    try:
        call()
    finally:
        for h in hooks:
            h.remove()
    return {"before": before, "after_each_block": after, "peak": torch.cuda.max_memory_allocated() / 2**30}


def time_row(model, inputs, ref_path: Path, args, cuda: bool) -> dict:
    def call():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = time_ms(call, warmup=args.warmup, iters=args.iters, cuda=cuda)
    out = call()
    row = {"eager_ms_median": statistics.median(times), "eager_ms_min": min(times), "eager_ms_all": times}
    if cuda:
        row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if cuda and args.memory_trace:
        row["memory_trace_GiB"] = memory_trace(model, call)
    if ref_path.exists():
        row["rel_err_vs_1gpu"] = rel_err(out, torch.load(ref_path))
    if args.graph and cuda:
        from cocodiff.graph import GraphedStep

        try:
            step = GraphedStep(model)
            gout = step(**inputs)
            gtimes = time_ms(step.replay_only, warmup=args.warmup, iters=args.iters)
            row.update(graph_ms_median=statistics.median(gtimes), graph_ms_min=min(gtimes))
            if ref_path.exists():
                row["graph_rel_err_vs_1gpu"] = rel_err(gout, torch.load(ref_path))
            del step, gout
        except Exception as exc:  # report, don't hide: the eager numbers stand
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="flux", choices=zoo.FAMILIES)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048])
    ap.add_argument("--graph", action="store_true", help="also time the step replayed as a CUDA graph")
    ap.add_argument("--peers", action="store_true", help="also time diffusers' unified attention at each (U, R)")
    ap.add_argument(
        "--ring-peer-backend",
        default="_native_flash",
        help="diffusers attention backend for its ring rows (its default, native SDPA, cannot return the log-sum-exp "
        "a ring merges with; _native_flash and _native_cudnn can)",
    )
    ap.add_argument(
        "--memory-trace", action="store_true", help="record allocated GiB after every block of one eager call per row"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true", help="CPU ranks, tiny config, fp32: exercise the code path")
    ap.add_argument("--ref-dir", default="/tmp/cocodiff_usp_ref")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    set_multi_gpu_env()
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = not args.dry_run
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    rank = dist.get_rank() if world > 1 else 0
    dtype = torch.bfloat16 if cuda else torch.float32
    size_name = "full" if cuda else "tiny"

    def build():
        return zoo.build_model(args.family, size_name, dtype=dtype, device=device, seed=0)

    import diffusers

    result = {
        "family": args.family,
        "P": world,
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda and world > 1 else None,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "warmup": args.warmup,
        "iters": args.iters,
        "sizes": {},
    }
    ref_dir = Path(args.ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        probe = build()
        rows, cols = zoo.image_tokens(args.family, probe, size, size) if cuda else (5, 7)
        inputs = zoo.make_inputs(
            args.family,
            probe,
            rows=rows,
            cols=cols,
            n_txt=TEXT_TOKENS[args.family] if cuda else 5,
            device=device,
            dtype=dtype,
            seed=1,
        )
        ref_path = ref_dir / f"usp_{args.family}_{size}.pt"
        entry: dict = {"image_tokens": rows * cols}
        if world == 1:
            entry["single"] = time_row(probe, inputs, Path("/nonexistent"), args, cuda)
            with torch.no_grad():
                torch.save(probe(**inputs, return_dict=False)[0].cpu(), ref_path)
        del probe
        release_memory()
        runs = [
            (u, r, placement)
            for u, r in (factorisations(world) if world > 1 else [])
            for placement in (("ulysses_inner", "ring_inner") if 1 < r < world else ("ulysses_inner",))
        ]
        for u, r, placement in runs:
            name = f"U{u}xR{r}" + ("-ring_inner" if placement == "ring_inner" else "")
            model = build()
            t0 = time.perf_counter()
            try:
                cfg = ParallelConfig(ring_degree=r, ring_placement=placement, v_first=True, fuse_qk=cuda)
                parallelize(model, cfg)
                row = time_row(model, inputs, ref_path, args, cuda)
                row["setup_s"] = time.perf_counter() - t0
            except ValueError as exc:  # e.g. a Ulysses degree the heads do not allow
                row = {"error": str(exc)[:500]}
            entry[name] = row
            del model
            release_memory()  # each row's peak is its own (a previous row's model must not linger)
            if rank == 0:
                print(f"[P={world}] {size}px cocodiff {name}: {row.get('eager_ms_median', row)}", flush=True)
            if args.peers and placement == "ulysses_inner":
                from diffusers import ContextParallelConfig

                peer = build()
                try:
                    if r > 1 and args.ring_peer_backend != "native":  # its default backend returns no lse
                        peer.set_attention_backend(args.ring_peer_backend)
                    peer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=u, ring_degree=r))
                    prow = time_row(peer, inputs, ref_path, args, cuda)
                    prow["attention_backend"] = args.ring_peer_backend if r > 1 else "native"
                except Exception as exc:  # a peer that cannot run a factorisation is a row that says why
                    prow = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                entry.setdefault("diffusers", {})[name] = prow
                del peer
                if rank == 0:
                    print(f"[P={world}] {size}px diffusers {name}: {prow.get('eager_ms_median', prow)}", flush=True)
            if cuda:
                release_memory()
        result["sizes"][str(size)] = entry
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"usp_{args.family}_P{world}.json").write_text(json.dumps(result, indent=1))
    if dist.is_initialized():
        from cocodiff.apps.launch import release_together

        release_together()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
