"""xDiT (xfuser 0.7.0) as a peer: one transformer forward of a FLUX.1-sized `FluxTransformer2DModel` (random bf16
weights) under xDiT's own Ulysses sequence parallelism (USP) at degree P = WORLD_SIZE, eager and (--compile) with
xDiT's torch.compile setting.

    torchrun --nproc-per-node P -m cocodiff.apps.xdit_peer --sizes 1024 2048 --compile --out OUT [--ref 'REF_{size}.pt']
    python -m cocodiff.apps.xdit_peer --dry-run      # CPU: prints the plan and why xfuser does (not) import

`cocodiff bench e2e --peers ... xdit [xdit-compile]` launches it after its own rows, at each P > 1, with the same
weights, inputs and 1-GPU reference, and puts its rows beside the others. xfuser and its dependencies are not
cocodiff dependencies: install them where it runs (e.g. the wheels of xfuser 0.7.0, yunchang, distvae).

Route: the one xDiT's runner (`xfuser/runner.py`, `runner_models/flux.py`) takes for FLUX.1-dev without PipeFusion,
less the text encoders, VAE and scheduler, which a transformer step does not use: `init_distributed_environment()`
-> `xFuserArgs(ulysses_degree=P).create_config()` -> `initialize_model_parallel(sequence_parallel_degree=P,
ulysses_degree=P)` (yunchang's process groups) -> `xFuserFlux1Transformer2DWrapper`, a `FluxTransformer2DModel`
subclass whose forward chunks image and text tokens over the SP group and all-gathers the output, each attention
running `xFuserFluxAttnProcessor` -> `USP` (one QKV all-to-all, the attention backend xDiT picks for the GPU, an
output all-to-all); built on the meta device and handed the random model's tensors (`load_state_dict(assign=True)`)
-> `initialize_runtime_state(stand_in, engine_config)`, the stand-in holding what xDiT reads off a FluxPipeline
(`.transformer`, `vae_scale_factor`) -> per size `set_input_parameters(height, width, batch_size=1,
max_condition_sequence_length=512)`. The `xFuserFluxPipeline`/`xFuserFluxTransformer2DWrapper` route is the one
xDiT keeps for PipeFusion. --compile does what the runner does for FLUX.1: `torch.compile(transformer,
mode="reduce-overhead", dynamic=None)` with inductor's compute/communication reordering on
(`_enable_compute_comm_overlap`), compiled afresh per size. (`use_onediff` needs onediff/nexfort and exists only on
the legacy pipeline path.)

Every stage that can fail (import, dist_init, config, model_parallel_init, build, wrap, runtime_state; per row
set_input, inputs, ref_load, compile, first_call / compile_first_call, timing) is caught on its own and reported as
a row naming the stage and the exception: the JSON says why xDiT did not run where it did not. Rank 0 writes
OUT/xdit_flux_P{P}.json after every row; `sizes` repeats the eager rows as {size: {"xdit": row}} for
report_peers.py. Timings: CUDA events, 2 warm-up calls excluded, median of 5; first call by perf_counter between
syncs; peak memory per row. `--config tiny` exists only to check the script itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

from cocodiff.apps.launch import set_multi_gpu_env

set_multi_gpu_env()  # NVLink multicast off, before anything can initialise torch.distributed

import torch  # noqa: E402

from cocodiff.apps import families  # noqa: E402
from cocodiff.timing import rel_err, release_memory, time_ms  # noqa: E402

N_TXT = 512
SHIMS: list[str] = []  # none: every diffusers symbol xfuser 0.7.0 imports exists in diffusers 0.42.1
STAGES = "import dist_init config model_parallel_init build wrap runtime_state | set_input inputs ref_load compile "
STAGES += "first_call timing"
SET_INPUT = dict(batch_size=1, num_inference_steps=1, max_condition_sequence_length=N_TXT, split_text_embed_in_sp=True)


class StageError(RuntimeError):
    def __init__(self, stage: str, exc: BaseException):
        tb = traceback.extract_tb(exc.__traceback__)[-3:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb))
        super().__init__(f"{type(exc).__name__}: {exc}"[:1200] + (f" [at {where}]" if where else ""))
        self.stage = stage


def stage(name: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise StageError(name, exc) from exc


def version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def xdit_import() -> SimpleNamespace:
    """The xfuser entry points of this route (importing any of them runs xfuser/__init__, every pipeline wrapper)."""
    import xfuser.core.distributed as dist
    from xfuser.config import xFuserArgs
    from xfuser.model_executor.models.transformers import transformer_flux as flux

    return SimpleNamespace(Args=xFuserArgs, dist=dist, flux=flux)


class FluxPipelineStandIn:
    """What DiTRuntimeState reads off a FluxPipeline: its transformer and vae_scale_factor (a class name starting
    with "Flux" makes xDiT double it for FLUX's 2x2 packing: 16 pixels a token)."""

    vae_scale_factor = 8

    def __init__(self, transformer):
        self.transformer = transformer


def xdit_setup(X: SimpleNamespace, world: int, attention_backend: str | None):
    stage("dist_init", X.dist.init_distributed_environment)
    args = X.Args(ulysses_degree=world, ring_degree=1, attention_backend=attention_backend)
    engine_config, _ = stage("config", args.create_config)
    engine_config.runtime_config.dtype = torch.bfloat16
    sp = engine_config.parallel_config.sp_config
    mp = dict(sequence_parallel_degree=sp.sp_degree, ulysses_degree=sp.ulysses_degree, ring_degree=sp.ring_degree)
    stage("model_parallel_init", X.dist.initialize_model_parallel, **mp)  # dp = cfg = tp = pp = 1
    return engine_config


def xdit_wrap(X: SimpleNamespace, model, config: dict):
    """xDiT's transformer class with `model`'s weights (the same tensors: built on meta, assigned)."""
    with torch.device("meta"):
        xm = X.flux.xFuserFlux1Transformer2DWrapper(**config)
    xm.load_state_dict(model.state_dict(), assign=True, strict=True)
    procs = {type(b.attn.processor) for b in [*xm.transformer_blocks, *xm.single_transformer_blocks]}
    assert procs == {X.flux.xFuserFluxAttnProcessor}, procs
    return xm.eval()


def enable_compute_comm_overlap() -> None:
    """xFuserModel._enable_compute_comm_overlap (runner_models/base_model.py), less its PipeFusion branch."""
    cfg = torch._inductor.config
    cfg.reorder_for_compute_comm_overlap = True
    cfg.reorder_for_compute_comm_overlap_passes = ["reorder_compute_for_overlap", "sink_waits", "raise_comms"]


def run_row(fn, ref, cuda: bool, first_stage: str) -> dict:
    """First call (s), then 2 warm-up calls and 5 timed ones; peak memory; error against the reference."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = stage(first_stage, fn)
    if cuda:
        torch.cuda.synchronize()
    row: dict = {"first_call_s": time.perf_counter() - t0}
    if ref is not None:
        row["rel_err_vs_1gpu"] = rel_err(out, ref) if out.shape == ref.shape else None
        row["ref_shape"], row["out_shape"] = list(ref.shape), list(out.shape)
    del out
    times = stage("timing", time_ms, fn, warmup=2, iters=5, cuda=cuda)
    row.update(ms_median=statistics.median(times), ms_min=min(times), ms_all=times)
    if cuda:
        row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--compile", action="store_true", help="also time xDiT's torch.compile setting (second row)")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="the runner's mode for FLUX.1 on NVIDIA")
    ap.add_argument("--attention-backend", default=None, help="xDiT's name (e.g. CUDNN, SDPA); default: its choice")
    ap.add_argument("--ref", default=None, help="torch.save of the 1-GPU output (B, tokens, C); may hold {size}")
    ap.add_argument("--out", default=None)
    ap.add_argument("--config", default="full", choices=["full", "tiny"], help="tiny: a check of the script only")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and try the import only (CPU is fine)")
    args = ap.parse_args()

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank, cuda = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.is_available()
    report: dict = {
        "engine": "xDiT",
        "family": "flux",
        "config": args.config,
        "P": world,
        "gpu": torch.cuda.get_device_name(local_rank) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        **{k: version(k) for k in ("diffusers", "xfuser", "yunchang", "distvae", "transformers", "flash_attn")},
        "route": "xFuserFlux1Transformer2DWrapper + initialize_runtime_state (xfuser runner's FLUX.1 Ulysses path)",
        "settings": {"ulysses_degree": world, "ring_degree": 1, "n_txt": N_TXT, "batch": 1},
        "shims": SHIMS,
        "failed_stage": None,
        "rows": [],
        "sizes": {},
    }
    out_path = Path(args.out) / f"xdit_flux_P{world}.json" if args.out else None

    def dump() -> None:
        if rank == 0 and out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=1))

    def setup_failed(e: StageError) -> None:
        report["failed_stage"] = {"stage": e.stage, "error": str(e), "rank": rank}
        report["sizes"] = {str(size): {"xdit": {"error": f"{e.stage}: {e}"}} for size in args.sizes}
        print(json.dumps({"xdit_failed": report["failed_stage"]}), flush=True)
        dump()

    if args.dry_run:
        print(f"plan: P={world} sizes={args.sizes} compile={args.compile} ({args.compile_mode}) stages: {STAGES}")
        print(f"route: {report['route']}; versions: " + ", ".join(f"{k}={report[k]}" for k in ("torch", "diffusers")))
    if cuda:  # xfuser's import already touches the current device (envs.PACKAGES_CHECKER): make it this rank's
        torch.cuda.set_device(local_rank)
    try:
        X = stage("import", xdit_import)
        if args.dry_run:
            print(json.dumps({"import": "ok", "xfuser": report["xfuser"]}))
            return
        engine_config = xdit_setup(X, world, args.attention_backend)
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        cfg = families.CONFIGS["flux"][args.config]
        model = stage("build", families.build_model, "flux", args.config, dtype=torch.bfloat16, device=device, seed=0)
        xm = stage("wrap", xdit_wrap, X, model, cfg)
        del model
        stage("runtime_state", X.dist.initialize_runtime_state, FluxPipelineStandIn(xm), engine_config)
        report["settings"]["attention_backend"] = X.dist.get_runtime_state().attention_backend.name
    except StageError as e:
        return setup_failed(e)

    def one(size: int, mode: str) -> None:
        row: dict = {"size": size, "mode": mode}
        try:
            stage("set_input", X.dist.get_runtime_state().set_input_parameters, height=size, width=size, **SET_INPUT)
            grid = dict(rows=size // 16, cols=size // 16, n_txt=N_TXT, device=device, dtype=torch.bfloat16, seed=1)
            inputs = stage("inputs", families.make_inputs, "flux", xm, **grid)
            ref_path = Path(args.ref.format(size=size)) if args.ref else None
            ref = stage("ref_load", torch.load, ref_path) if ref_path is not None and ref_path.exists() else None
            model_call = xm
            if mode == "compile":
                stage("compile", enable_compute_comm_overlap)
                model_call = stage("compile", torch.compile, xm, mode=args.compile_mode, dynamic=None)
                row["compile"] = {"mode": args.compile_mode, "dynamic": None, "compute_comm_overlap": True}
            graphs = mode == "compile" and args.compile_mode in ("reduce-overhead", "max-autotune")

            def fn():
                if graphs:  # each call is a new step for CUDA-graph trees (xDiT's _mark_cudagraph_steps)
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.no_grad():
                    return model_call(**inputs, return_dict=False)[0].clone()

            row.update(run_row(fn, ref, cuda, "first_call" if mode == "eager" else "compile_first_call"))
        except StageError as e:
            row.update(stage=e.stage, error=str(e))
            print(json.dumps({"xdit_row_failed": row, "rank": rank}), flush=True)
        report["rows"].append(row)
        if mode == "eager":
            report["sizes"][str(size)] = {"xdit": {**row, "eager_ms_median": row.get("ms_median")}}
        dump()
        if rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "ms_all"}), flush=True)

    for mode in ("eager", "compile") if args.compile else ("eager",):
        for size in args.sizes:
            one(size, mode)
            torch._dynamo.reset()  # a compiled row's graphs and CUDA-graph pool go with it
            release_memory()
    try:
        X.dist.get_runtime_state().destroy_distributed_env()
    except Exception as exc:  # exiting anyway; say so rather than hide it
        print(f"destroy_distributed_env: {type(exc).__name__}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
