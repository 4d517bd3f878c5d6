"""One GPU: diffusers' regional compile beside cocodiff's `fast` preset on one rank, kernel by kernel.

Per family and size: both models on the same random weights and inputs, timed in alternation (CUDA events; each
of 7 rounds gives every model one untimed and one timed call; median; so clock drift under the GPU's power cap
hits both alike),
then one profiled call each: device time per kernel category (GEMM, attention, Triton, copies, other) and the
largest kernels that are neither GEMM, attention nor Triton (eager elementwise work that a compiled block would
have fused). A family whose two models do not fit at once (FLUX.2) runs them one after the other
(`--sequential`). Writes OUT/one_gpu_kernels.json.

    torchrun --nproc-per-node 1 benchmarks/one_gpu_kernels.py --out OUT --families flux --sizes 1024 2048
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from cocodiff import ParallelConfig, parallelize
from cocodiff.apps import families as zoo
from cocodiff.timing import rel_err, release_memory, time_ms

CATEGORIES = (  # first match wins
    ("attention", r"fmha|flash_fprop|cudnn_generated|sdpa|attention_kernel"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas"),
    ("triton", r"triton"),
    ("copy", r"Memcpy|CatArray|direct_copy"),
)
ENGINES = ("diffusers-regional-compile", "cocodiff-fast")


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return "other"


def build(engine: str, family: str, device):
    model = zoo.build_model(family, "full", dtype=torch.bfloat16, device=device, seed=0)
    if engine == "diffusers-regional-compile":
        model.compile_repeated_blocks(fullgraph=True)
    else:
        parallelize(model, ParallelConfig.preset("fast"))
    return model


def profile_call(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_cat = collections.defaultdict(lambda: [0.0, 0])
    eager = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        cat = category(e.name)
        by_cat[cat][0] += e.device_time_total / 1e3
        by_cat[cat][1] += 1
        if cat in ("copy", "other"):
            eager[e.name[:140]][0] += e.device_time_total / 1e3
            eager[e.name[:140]][1] += 1
    return {
        "by_category_ms_and_kernels": dict(by_cat),
        "kernel_sum_ms": sum(v[0] for v in by_cat.values()),
        "largest_eager_kernels": sorted(eager.items(), key=lambda kv: -kv[1][0])[:12],
    }


def measure(family: str, size: int, device, sequential: bool) -> dict:
    models, calls, outs, row = {}, {}, {}, {"family": family, "size": size}
    for engine in ENGINES:
        try:
            model = models[engine] = build(engine, family, device)
        except Exception as exc:  # e.g. diffusers cannot compile SD3's blocks: that engine's entry says why
            row[engine] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            continue
        rows, cols = zoo.image_tokens(family, model, size, size)
        n_txt = zoo.TEXT_TOKENS_IMAGE[family]
        inputs = zoo.make_inputs(family, model, rows=rows, cols=cols, n_txt=n_txt, device=device, dtype=torch.bfloat16)
        calls[engine] = lambda m=model, x=inputs: m(**x, return_dict=False)[0]
        with torch.no_grad():
            for _ in range(4):  # compile, capture, warm up
                calls[engine]()
            outs[engine] = calls[engine]().float().cpu()
            if sequential:  # one model at a time: time and profile it, then free it
                row[engine] = {"ms": statistics.median(time_ms(calls[engine], warmup=2, iters=7))}
                row[engine].update(profile_call(calls[engine]))
                del models[engine], calls[engine], model
                torch._dynamo.reset()
                release_memory()
    if not sequential:
        times = {e: [] for e in calls}
        with torch.no_grad():
            for _ in range(7):  # alternating: per round, each model one untimed and one timed call
                for e in calls:
                    times[e] += time_ms(calls[e], warmup=1, iters=1)
            for e in calls:
                row[e] = {"ms": statistics.median(times[e]), "ms_all": times[e], **profile_call(calls[e])}
    row["timing"] = "sequential" if sequential else "alternating"
    if len(outs) == 2:
        row["rel_diff_cocodiff_vs_diffusers"] = rel_err(outs["cocodiff-fast"], outs["diffusers-regional-compile"])
        row["diffusers_over_cocodiff"] = row["diffusers-regional-compile"]["ms"] / row["cocodiff-fast"]["ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", nargs="+", default=["flux"], choices=zoo.FAMILIES)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024])
    ap.add_argument("--sequential", nargs="*", default=["flux2"], help="families run one model at a time")
    args = ap.parse_args()
    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    dist.init_process_group("nccl", device_id=device)  # cocodiff's one-rank engine needs a process group
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}
    for family in args.families:
        for size in args.sizes:
            try:
                row = measure(family, size, device, family in args.sequential)
            except Exception as exc:  # e.g. diffusers has no repeated blocks for SD3: the row says why
                row = {"family": family, "size": size, "error": f"{type(exc).__name__}: {exc}"[:400]}
            torch._dynamo.reset()
            release_memory()
            result["rows"].append(row)
            (out / "one_gpu_kernels.json").write_text(json.dumps(result, indent=1))
            print(json.dumps({k: v for k, v in row.items() if k not in ENGINES}), flush=True)
    from cocodiff.apps.launch import release_together

    release_together()  # graphs freed before the group goes (pytorch#115388)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
