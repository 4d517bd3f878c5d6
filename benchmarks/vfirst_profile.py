"""V-First on the GPU timeline, and "Equation 2" per model family.

1. Profile: one step (P GPUs; FLUX.1-sized unless `--family`; eager flat + V-First, or `--preset`) under
   torch.profiler. From the CUDA kernel timeline it measures, for every NCCL all-to-all kernel, how much of its
   time overlaps compute kernels on other streams, separately for V's exchange (the first all-to-all of each
   attention layer under V-First) and for Q/K/O's; writes the summary JSON, a PNG of one layer's timeline and
   the compressed trace.
2. Equation 2: per family (FLUX.1, SD3.5, Qwen-Image, FLUX.2 dims) and batch size, CUDA-event timings of
   T(V projection), T(V exchange), T(Q/K work: projections, RMSNorm, RoPE) for one attention layer of one
   rank at P GPUs; the overlap holds when T(V proj) + T(V exchange) <= T(Q/K work).

    torchrun --nproc-per-node 4 benchmarks/vfirst_profile.py --out OUT
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from cocodiff import ParallelConfig, parallelize
from cocodiff.apps import families as zoo
from cocodiff.apps.launch import set_multi_gpu_env
from cocodiff.timing import time_ms

FAMILY_DIMS = {  # hidden = heads x head dim, text tokens, image tokens at 1024^2
    "flux": dict(heads=24, head_dim=128, txt=512, img=4096),
    "sd3.5-large": dict(heads=38, head_dim=64, txt=333, img=4096),
    "qwenimage": dict(heads=24, head_dim=128, txt=256, img=4096),
    "flux2": dict(heads=48, head_dim=128, txt=512, img=4096),
}


def _events(fn, iters=20, warmup=5):
    return statistics.median(time_ms(fn, warmup=warmup, iters=iters))


def equation2(world: int, device, group) -> list[dict]:
    from diffusers.models.embeddings import apply_rotary_emb

    rows = []
    for fam, d in FAMILY_DIMS.items():
        H, D = d["heads"], d["head_dim"]
        if H % world:
            rows.append({"family": fam, "skipped": f"{H} heads do not divide over {world} GPUs"})
            continue
        C = H * D
        for size, scale in (("1024", 1), ("2048", 4)):
            for B in (1, 2, 4):
                S = d["txt"] + d["img"] * scale
                L = -(-S // world)
                x = torch.randn(B, L, C, device=device, dtype=torch.bfloat16)
                wq, wk, wv = (torch.nn.Linear(C, C, device=device, dtype=torch.bfloat16) for _ in range(3))
                nq, nk = (torch.nn.RMSNorm(D, device=device, dtype=torch.bfloat16) for _ in range(2))
                cos = torch.randn(L, D, device=device)
                sin = torch.randn(L, D, device=device)
                v = wv(x).unflatten(-1, (H, D))
                send = v.view(B, L, world, H // world, D).permute(2, 1, 0, 3, 4).contiguous()
                recv = torch.empty_like(send)

                def vproj():
                    return wv(x)

                def vex():
                    dist.all_to_all_single(recv, send, group=group)

                def qk():
                    q = nq(wq(x).unflatten(-1, (H, D)))
                    k = nk(wk(x).unflatten(-1, (H, D)))
                    return apply_rotary_emb(q, (cos, sin), sequence_dim=1), apply_rotary_emb(
                        k, (cos, sin), sequence_dim=1
                    )

                tv, tx, tqk = _events(vproj), _events(vex), _events(qk)
                rows.append(
                    {
                        "family": fam,
                        "size": size,
                        "batch": B,
                        "tokens": S,
                        "local_tokens": L,
                        "v_proj_ms": tv,
                        "v_exchange_ms": tx,
                        "qk_work_ms": tqk,
                        "lhs_ms": tv + tx,
                        "holds": tv + tx <= tqk,
                        "exposed_ms": max(0.0, tv + tx - tqk),
                    }
                )
    return rows


def overlap_summary(events: list[dict]) -> dict:
    """From chrome-trace kernel events: per NCCL kernel, the fraction of its time that overlaps compute
    kernels on other streams. NCCL kernels are taken in launch order; under V-First each attention layer
    issues V, Q, K (seq->head) and then O (head->seq): index % 4 == 0 is V's exchange."""
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    nccl = sorted(_all_to_alls(kernels), key=lambda e: e["ts"])

    def covered(e):
        return _covered(e, kernels)

    out = {"nccl_kernels": len(nccl), "groups": {}}
    for name, sel in (("V", lambda i: i % 4 == 0), ("Q,K", lambda i: i % 4 in (1, 2)), ("O", lambda i: i % 4 == 3)):
        ks = [e for i, e in enumerate(nccl) if sel(i)]
        dur = sum(e["dur"] for e in ks)
        cov = sum(covered(e) for e in ks)
        out["groups"][name] = {
            "kernels": len(ks),
            "total_us": dur,
            "overlapped_us": cov,
            "hidden_fraction": cov / dur if dur else None,
        }
    tot = sum(g["total_us"] for g in out["groups"].values())
    out["all_hidden_fraction"] = sum(g["overlapped_us"] for g in out["groups"].values()) / tot if tot else None
    return out


def hidden_by_block(events: list[dict], n_double: int = 19) -> dict:
    """Hidden fraction per block type (FLUX.1: `n_double` double-stream blocks first, then single-stream)
    and exchange (V, Q, K, output: four all-to-alls per attention layer, in that launch order under
    V-First). Leaves out the step's first all-to-all, which waits for the other ranks to enter the step
    (launch skew, not transfer); the all-gathers are not counted (`_all_to_alls`)."""
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    nccl = sorted(_all_to_alls(kernels), key=lambda e: e["ts"])
    layers = len(nccl) // 4
    by = {}
    for i, e in enumerate(nccl[: 4 * layers]):
        if i == 0:
            continue
        key = f"{'double' if i // 4 < n_double else 'single'} {'VQKO'[i % 4]}"
        r = by.setdefault(key, {"kernels": 0, "total_us": 0.0, "hidden_us": 0.0})
        r["kernels"] += 1
        r["total_us"] += e["dur"]
        r["hidden_us"] += _covered(e, kernels)
    for r in by.values():
        r["hidden_fraction"] = r["hidden_us"] / r["total_us"] if r["total_us"] else None
    tot = sum(r["total_us"] for r in by.values())
    hid = sum(r["hidden_us"] for r in by.values())
    return {
        "excluded": {"first_exchange_us": nccl[0]["dur"] if nccl else None, "after_layers": len(nccl) - 4 * layers},
        "by_block_and_exchange": by,
        "all": {
            "total_us": tot,
            "hidden_us": hid,
            "hidden_fraction": hid / tot if tot else None,
            "exposed_us": tot - hid,
        },
    }


def compute_stream_gaps(events: list[dict], n_double: int = 19) -> dict:
    """When no compute kernel runs during the step, and which all-to-all was in flight then. Compute is the union
    of the non-NCCL kernels over every stream (a replayed CUDA graph spreads its kernels over streams of its own,
    so no single stream is "the" compute stream). An idle interval is charged to the all-to-all running during it
    (double/single block, V/Q/K/O as in `hidden_by_block`; the first all-to-all apart), or to none: kernel
    boundaries, launch or host gaps, and an all-gather in flight (sharded modulation's at the step's start, the
    output gather at its end)."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"])
    nccl = _all_to_alls(kernels)
    comp = [e for e in kernels if "nccl" not in e["name"].lower()]
    if not comp:
        return {}
    layers = len(nccl) // 4
    label = {}
    for i, e in enumerate(nccl):
        if i == 0:
            label[id(e)] = "first exchange"
        elif i < 4 * layers:
            label[id(e)] = f"{'double' if i // 4 < n_double else 'single'} {'VQKO'[i % 4]}"
        else:
            label[id(e)] = "unlabelled (not four a layer)"
    busy: list[list[float]] = []
    for e in comp:
        a, b = e["ts"], e["ts"] + e["dur"]
        if busy and a <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], b)
        else:
            busy.append([a, b])
    by: dict = {}
    for (_, end), (start, _) in zip(busy, busy[1:]):
        during = [n for n in nccl if n["ts"] < start and n["ts"] + n["dur"] > end]
        key = label[id(during[-1])] if during else "none (kernel boundaries, launches)"
        r = by.setdefault(key, {"gaps": 0, "idle_us": 0.0})
        r["gaps"] += 1
        r["idle_us"] += start - end
    nccl_us: dict = {}
    for n in nccl:
        nccl_us[label[id(n)]] = nccl_us.get(label[id(n)], 0.0) + n["dur"]
    span = busy[-1][1] - busy[0][0]
    compute = sum(b - a for a, b in busy)
    return {
        "span_us": span,
        "compute_us": compute,
        "idle_us": span - compute,
        "idle_by_exchange_in_flight": dict(sorted(by.items(), key=lambda kv: -kv[1]["idle_us"])),
        "nccl_kernel_us": nccl_us,
    }


def _all_to_alls(kernels: list[dict]) -> list[dict]:
    """The NCCL kernels of the all-to-alls (send/recv): not the all-gathers (sharded modulation at the step's start,
    the output gather at its end), so that four per attention layer line up as V, Q, K, O."""
    return [e for e in kernels if "nccl" in e["name"].lower() and "allgather" not in e["name"].lower()]


def _covered(e: dict, kernels: list[dict]) -> float:
    """Microseconds of NCCL kernel `e` that overlap non-NCCL kernels (on any other stream)."""
    a, b = e["ts"], e["ts"] + e["dur"]
    iv = sorted(
        (max(a, c["ts"]), min(b, c["ts"] + c["dur"]))
        for c in kernels
        if "nccl" not in c["name"].lower() and c["ts"] < b and c["ts"] + c["dur"] > a
    )
    tot, cur = 0.0, None
    for lo, hi in iv:
        if cur is None or lo > cur[1]:
            if cur:
                tot += cur[1] - cur[0]
            cur = [lo, hi]
        else:
            cur[1] = max(cur[1], hi)
    if cur:
        tot += cur[1] - cur[0]
    return tot


def plot_layer(events, path, layer=10, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = sorted((e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"])
    nccl = _all_to_alls(kernels)
    if len(nccl) < 4 * (layer + 1):
        layer = 0
    t0 = nccl[4 * layer]["ts"] - 50
    t1 = nccl[4 * layer + 3]["ts"] + nccl[4 * layer + 3]["dur"] + 20
    win = [e for e in kernels if e["ts"] < t1 and e["ts"] + e["dur"] > t0]
    tids = sorted({e.get("tid") for e in win}, key=str)
    fig, ax = plt.subplots(figsize=(12, 2 + 0.4 * len(tids)))
    labels = ["V a2a", "Q a2a", "K a2a", "O a2a"]
    for e in win:
        y = tids.index(e.get("tid"))
        is_nccl = "nccl" in e["name"].lower()
        ax.broken_barh([(e["ts"] - t0, e["dur"])], (y - 0.4, 0.8), color="tab:red" if is_nccl else "tab:blue")
    for j in range(4):
        e = nccl[4 * layer + j]
        ax.text(e["ts"] - t0, tids.index(e.get("tid")) + 0.45, labels[j], fontsize=7)
    ax.set_yticks(range(len(tids)))
    ax.set_yticklabels([f"stream {t}" for t in tids], fontsize=7)
    ax.set_xlabel("us from the layer's first all-to-all")
    ax.set_title(
        f"step, attention layer {layer}, flat + V-First (red: NCCL all-to-all, blue: compute)"
        + (f" — {title}" if title else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--family", default="flux", choices=zoo.FAMILIES, help="the step profiled (Equation 2: all)")
    ap.add_argument(
        "--graph",
        action="store_true",
        help="profile a call replayed as a CUDA graph (ParallelConfig(cuda_graph=True): the user's path)",
    )
    ap.add_argument("--fuse-qk", action="store_true", help="ParallelConfig(fuse_qk=True)")
    ap.add_argument("--all-to-all", default="flat", choices=["flat", "copy_engine"])
    ap.add_argument("--skip-eq2", action="store_true")
    ap.add_argument(
        "--preset",
        default=None,
        help="profile ParallelConfig.preset(NAME) instead (e.g. fast: compiled blocks, replayed as a CUDA graph)",
    )
    ap.add_argument(
        "--nccl-high-priority",
        action="store_true",
        help="the process group's NCCL stream at high priority (ProcessGroupNCCL.Options(is_high_priority_stream))",
    )
    args = ap.parse_args()
    if args.preset is not None:
        args.graph = ParallelConfig.preset(args.preset).cuda_graph
    set_multi_gpu_env()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    pg_options = None
    if args.nccl_high_priority:  # NCCL's kernels on a high-priority stream: their CTAs go first when SMs free up
        pg_options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local), pg_options=pg_options)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    eq2 = [] if args.skip_eq2 else equation2(world, device, dist.group.WORLD)
    torch.cuda.empty_cache()

    model = zoo.build_model(args.family, "full", dtype=torch.bfloat16, device=device, seed=0)
    # "double": the joint blocks (`transformer_blocks`, every block of SD3 / Qwen-Image), "single": the rest
    n_double = len(model.transformer_blocks)
    if args.preset is not None:
        config = ParallelConfig.preset(args.preset, all_to_all=args.all_to_all)
    else:
        config = ParallelConfig(v_first=True, fuse_qk=args.fuse_qk, all_to_all=args.all_to_all, cuda_graph=args.graph)
    parallelize(model, config)
    rows, cols = zoo.image_tokens(args.family, model, args.size, args.size)
    n_txt = zoo.TEXT_TOKENS_IMAGE[args.family]
    inputs = zoo.make_inputs(args.family, model, rows=rows, cols=cols, n_txt=n_txt, device=device, dtype=torch.bfloat16)
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            model(**inputs)
        torch.cuda.synchronize()
        if args.graph:
            for _ in range(3):  # the first call captures, the others replay
                model(**inputs)
            torch.cuda.synchronize()
            step_ms = statistics.median(time_ms(lambda: model(**inputs), warmup=2, iters=7))
            dist.barrier()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                model(**inputs)
                torch.cuda.synchronize()
        else:
            step_ms = statistics.median(time_ms(lambda: model(**inputs), warmup=2, iters=7))
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                model(**inputs)
                torch.cuda.synchronize()
    if rank == 0:
        trace = out / "trace_rank0.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
        found = len(_all_to_alls([e for e in events if e.get("cat") == "kernel" and "dur" in e]))
        want = 4 * (n_double + len(getattr(model, "single_transformer_blocks", ())))
        if found != want:  # e.g. the copy engine (no NCCL kernels) or another schedule: the V/Q/K/O labels would lie
            print(f"vfirst_profile: {found} NCCL all-to-all kernels for {want // 4} attention layers (4 each): the "
                  "per-exchange figures below are not labelled correctly", flush=True)  # fmt: skip
        summary = overlap_summary(events)
        summary.update(
            {
                "P": world,
                "family": args.family,
                "size": args.size,
                "config": f"preset {args.preset} ({args.all_to_all})"
                if args.preset
                else f"{args.all_to_all}+vfirst{'+fuse_qk' if args.fuse_qk else ''}, "
                f"{'cuda_graph=True (replay)' if args.graph else 'eager'}",
                "gpu": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
                "step_ms_median_of_7": step_ms,
                "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
                "nccl_high_priority_stream": args.nccl_high_priority,
            }
        )
        tag = (args.preset or ("graph" if args.graph else "eager")) + f"_{args.size}"
        tag = tag if args.family == "flux" else f"{args.family}_{tag}"
        plot_layer(events, out / f"vfirst_layer_timeline_{tag}.png", title=tag)
        kern = [e for e in events if e.get("cat") == "kernel"]
        with gzip.open(out / f"trace_rank0_kernels_{tag}.json.gz", "wt") as f:
            json.dump(kern, f)
        trace.unlink()
        (out / f"vfirst_overlap_{tag}.json").write_text(json.dumps(summary, indent=1))
        by_block = hidden_by_block(events, n_double)
        (out / f"hidden_by_block_{tag}.json").write_text(json.dumps(by_block, indent=1))
        gaps = compute_stream_gaps(events, n_double)
        (out / f"compute_gaps_{tag}.json").write_text(json.dumps(gaps, indent=1))
        print(json.dumps({"hidden_by_block": by_block, "compute_gaps": gaps}, indent=1))
        if eq2:
            (out / "equation2.json").write_text(json.dumps({"P": world, "rows": eq2}, indent=1))
        print(json.dumps(summary, indent=1))
        for r in eq2:
            if "skipped" in r:
                print(r)
            else:
                print(
                    f"{r['family']:12s} {r['size']} B={r['batch']}: V proj {r['v_proj_ms']:.3f} + V a2a "
                    f"{r['v_exchange_ms']:.3f} = {r['lhs_ms']:.3f} vs Q/K {r['qk_work_ms']:.3f} ms -> "
                    + ("holds" if r["holds"] else f"EXPOSED {r['exposed_ms']:.3f} ms")
                )
    if not args.graph:  # after a profiled graph replay the final barrier hung once (results were complete)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
