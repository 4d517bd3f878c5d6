"""Does a copy-engine all-to-all hide better under compute than NCCL's? And which SDPA kernel is fastest?

Run with torchrun on the GPUs of one host (P ranks):

    torchrun --standalone --nproc-per-node 4 benchmarks/overlap_probe.py --out OUT

Part 1, per message size of a FLUX.1-sized layer at 1024^2 and 2048^2 (V's seq->head exchange):
  - exchange alone: NCCL (`FlatAllToAll`) vs copy engines (`CopyEngineAllToAll`), bytes checked equal;
  - the Q/K projection GEMMs alone;
  - V-First's pattern: start V's exchange, run the Q/K GEMMs, wait -- with each exchange.
  Each pattern is captured as a CUDA graph of `--reps` repetitions (as the graphed step runs it) and timed
  with CUDA events over `--iters` replays, warm-up excluded; medians per repetition. "hidden" is the share
  of the exchange's own time that the overlap removed: (gemm + a2a - overlapped) / a2a.
Part 2, on rank 0 only: SDPA (B=1, bf16, head dim 128) per backend for the per-rank shapes of P=1 and P.
Rank 0 writes OUT/overlap_probe_P<P>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cocodiff.ce import CopyEngineAllToAll  # noqa: E402
from cocodiff.comm import CommStats, FlatAllToAll, SeqLayout, start_seq_to_head  # noqa: E402
from cocodiff.launch import set_multi_gpu_env  # noqa: E402
from cocodiff.topology import Topology  # noqa: E402

DIM, HEADS, HEAD_DIM, TEXT = 3072, 24, 128, 512


def graph_ms(fn, reps: int, iters: int, warmup: int = 3) -> float:
    """Median ms of one repetition of `fn`, captured `reps` times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        for _ in range(reps):
            fn()
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    t = torch.tensor(times, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return statistics.median(t.tolist())


def exchange_part(size: int, P: int, rank: int, reps: int, iters: int) -> dict:
    dev = torch.device("cuda", torch.cuda.current_device())
    tokens = (size // 16) ** 2 + TEXT
    L = tokens // P
    lay = SeqLayout(tuple([L] * P), rank)
    topo = Topology((P,))
    routes = {
        "nccl": FlatAllToAll(group=dist.group.WORLD, topology=topo, stats=CommStats(("local",))),
        "copy_engine": CopyEngineAllToAll(group=dist.group.WORLD, topology=topo, stats=CommStats(("local",))),
    }
    g = torch.Generator(device=dev).manual_seed(rank)
    v = torch.randn(1, L, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
    x = torch.randn(L, DIM, device=dev, dtype=torch.bfloat16, generator=g)
    wq = torch.randn(DIM, DIM, device=dev, dtype=torch.bfloat16, generator=g) / DIM**0.5
    wk = torch.randn(DIM, DIM, device=dev, dtype=torch.bfloat16, generator=g) / DIM**0.5
    sink = {}

    def gemms():
        sink["q"] = x @ wq
        sink["k"] = x @ wk

    got = {n: start_seq_to_head(v, lay, r).wait().clone() for n, r in routes.items()}
    row = {
        "tokens": tokens, "local_tokens": L,
        "message_MB": L * HEADS * HEAD_DIM * 2 / 1e6,
        "copy_engine_equals_nccl": bool(torch.equal(got["nccl"], got["copy_engine"])),
        "gemm_ms": graph_ms(gemms, reps, iters),
    }
    for name, route in routes.items():
        def alone(route=route):
            sink["v"] = start_seq_to_head(v, lay, route).wait()

        def overlapped(route=route):
            h = start_seq_to_head(v, lay, route)
            gemms()
            sink["v"] = h.wait()

        a2a = graph_ms(alone, reps, iters)
        both = graph_ms(overlapped, reps, iters)
        row[name] = {
            "a2a_ms": a2a,
            "overlapped_ms": both,
            "hidden_fraction": (row["gemm_ms"] + a2a - both) / a2a,
            "exposed_ms": both - row["gemm_ms"],
        }
    return row


def sdpa_part(sizes, P: int, iters: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda", torch.cuda.current_device())
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    out = {}
    for size in sizes:
        S = (size // 16) ** 2 + TEXT
        for heads in sorted({HEADS, HEADS // P}):
            q, k, v = (torch.randn(1, heads, S, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(3))
            ref = None
            row = {}
            for name, be in backends.items():
                try:
                    with sdpa_kernel([be]):
                        o = F.scaled_dot_product_attention(q, k, v)
                        for _ in range(3):
                            F.scaled_dot_product_attention(q, k, v)
                        torch.cuda.synchronize()
                        ts = []
                        for _ in range(iters):
                            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            a.record()
                            F.scaled_dot_product_attention(q, k, v)
                            b.record()
                            b.synchronize()
                            ts.append(a.elapsed_time(b))
                    ref = o if ref is None else ref
                    ms = statistics.median(ts)
                    row[name] = {"ms": ms, "TFLOPs": 4 * S * S * HEAD_DIM * heads / ms / 1e9,
                                 "max_abs_vs_flash": (o.float() - ref.float()).abs().max().item()}
                except RuntimeError as exc:
                    row[name] = {"error": str(exc)[:200]}
            out[f"{size}px_S{S}_H{heads}"] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    set_multi_gpu_env()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, P = dist.get_rank(), dist.get_world_size()
    result = {"P": P, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())), "reps": args.reps, "iters": args.iters,
              "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                      "NVSHMEM_DISABLE_NVLS")},
              "exchange": {}}
    for size in args.sizes:
        try:
            result["exchange"][str(size)] = exchange_part(size, P, rank, args.reps, args.iters)
        except Exception as exc:  # report, keep going: part 2 does not depend on it
            result["exchange"][str(size)] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if rank == 0:
            print(size, json.dumps(result["exchange"][str(size)]), flush=True)
    dist.barrier()
    if rank == 0:
        result["sdpa"] = sdpa_part(args.sizes, P, args.iters)
        print(json.dumps(result["sdpa"], indent=1), flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"overlap_probe_P{P}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
