"""`cocodiff bench e2e`: cocodiff beside diffusers on the same GPUs, the same shapes, in one command.

For every image family, size and rank count (1 first: it writes the reference output), each engine row runs
on a fresh full-size model with random weights (bf16; tiny fp32 configs on CPU ranks):

- cocodiff, per preset (`ParallelConfig.preset`, e.g. "flat", "fast"; on one rank the engine's exchanges are
  no-ops, so "fast" on 1 rank is cocodiff's own one-GPU mode); with `--topology/--emulate` over emulated tiers;
- diffusers, per mode: its own Ulysses (`enable_parallelism(ContextParallelConfig(ulysses_degree=P))`; plain
  diffusers on one rank) eager, with regional compilation (`compile_repeated_blocks(fullgraph=True)`) and, on
  request, `torch.compile(mode="reduce-overhead")`. A mode diffusers cannot run is a row that says why. diffusers
  always runs on the real links;
- xDiT (xfuser), on request (`--peers ... xdit xdit-compile`): its FLUX.1 Ulysses route
  (`cocodiff.apps.xdit_peer`) at each P > 1, launched after the other rows of that P on the same GPUs, with the
  same weights, inputs and reference; transformer step only. Any other case is a row saying why.

Per row: ms per transformer step (CUDA events, warm-up excluded, median; the first call, which compiles and
captures, timed apart; a lossy V-Major row: the mean over one generation's steps, see `_generation_steps`), seconds per
image of the family's diffusers pipeline (`--steps`, e.g. 28 and 50; prompt embeddings given, no text encoders,
output latents: the VAE decode, identical for every engine, is left out), peak memory per GPU, relative error of
the step's output and of each pipeline run's latents against plain diffusers on one GPU.
Each cocodiff row at P > 1 also times its no-exchange bound (every exchange a no-op). Rank 0 writes OUT/e2e.json
(hardware, driver, versions), OUT/e2e.md (tables, ratios to the best one-GPU row and to the best peer row),
OUT/e2e.png and OUT/e2e_breakdown.png (compute and exposed exchange per row); xDiT's logs and JSON go to
OUT/xdit/. Each cocodiff and diffusers row is also appended to OUT/rows.jsonl as soon as it is measured, so a
run killed mid-way (a time limit) keeps what it measured, and `--resume` in the same folder with the same options
runs only the rest. `--no-pipeline` times the transformer steps alone. A progress bar shows the rows as they run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import PRESETS, ParallelConfig, SlowTierEmulation, VMajorConfig
from ..timing import rel_err, release_memory, time_ms
from . import families as zoo
from .launch import set_multi_gpu_env, spawn

DIFFUSERS_MODES = ("eager", "regional-compile", "reduce-overhead")
# xDiT (xfuser): its FLUX.1 Ulysses route (cocodiff.apps.xdit_peer), eager or with its torch.compile setting
XDIT_MODES = {"xdit": "eager", "xdit-compile": "compile"}
PEER_MODES = (*DIFFUSERS_MODES, *XDIT_MODES)
DEFAULT_PEER_MODES = ("eager", "regional-compile")  # reduce-overhead's first call compiles for 1.5-2.5 min a shape
ROUTES = ("flat", "tapa", "copy_engine")  # ParallelConfig.all_to_all
# --v-major VARIANT: VMajorConfig fields of the rows "...+vmajor" (default) and "...+vmajor-VARIANT"
VMAJOR_VARIANTS = {
    "default": {},
    "fp8": {"fp8": True},
    "fixed0.9": {"schedule": "fixed", "cache_ratio_start": 0.9},
    "fixed0.9-fp8": {"schedule": "fixed", "cache_ratio_start": 0.9, "fp8": True},
}
ENGINE_COLORS = {"cocodiff": "#1f77b4", "diffusers": "#ff7f0e", "xDiT": "#2ca02c"}
MAX_PEER_ERR = 5e-2  # a peer row further than this from one GPU is listed but not used as the peer to beat


def add_parser(bsub, formatter_class=None) -> None:
    p = bsub.add_parser(
        "e2e",
        help="cocodiff beside diffusers: ms per step, s per image, memory, error (JSON + markdown + PNG)",
        description=__doc__.split("\n\n")[0],
        formatter_class=formatter_class,
    )
    p.add_argument("--families", nargs="+", default=["flux"], choices=zoo.FAMILIES)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default: 1024; CPU: 64)")
    p.add_argument(
        "--gpus", type=int, nargs="+", default=None, help="rank counts, 1 first (default: 1 and all local GPUs)"
    )
    p.add_argument("--presets", nargs="+", default=None, choices=PRESETS, help="default: flat fast (CPU: flat)")
    p.add_argument(
        "--peers",
        nargs="*",
        default=list(DEFAULT_PEER_MODES),
        choices=PEER_MODES,
        help="diffusers modes (reduce-overhead: torch.compile(mode='reduce-overhead'), its CUDA graphs; slow to "
        "start) and xDiT's (xdit, xdit-compile: xfuser's FLUX.1 Ulysses at each P > 1, in a launch of its own after "
        "the others; needs xfuser installed)",
    )
    p.add_argument(
        "--routes",
        nargs="+",
        default=None,
        choices=ROUTES,
        help="at P > 1, each preset once per exchange route (e.g. flat copy_engine; default: the preset's own)",
    )
    p.add_argument(
        "--head-chunks",
        type=int,
        nargs="+",
        default=None,
        help="at P > 1, each cocodiff row once per value of ParallelConfig.head_chunks (default: the preset's own)",
    )
    p.add_argument(
        "--v-major",
        nargs="*",
        default=None,
        choices=list(VMAJOR_VARIANTS),
        metavar="VARIANT",
        help="at P > 1, each cocodiff row also with V-Major (lossy), once per variant: default (VMajorConfig()'s "
        "defaults, row 'fast+vmajor': the compiled, graph-replayed step selecting what crosses the slow tier), fp8 "
        "(the selected rows as e4m3, 'fast+vmajor-fp8'), fixed0.9, fixed0.9-fp8 (a fixed cache ratio of 0.9); "
        "no variant named: default",
    )
    p.add_argument("--steps", type=int, nargs="+", default=None, help="pipeline lengths (default: 28 50; CPU: 2)")
    p.add_argument(
        "--no-pipeline",
        action="store_true",
        help="transformer steps only, no pipeline runs (size sweeps: a one-GPU 50-step run at 2304^2 takes minutes); "
        "not with --v-major, whose error is its pipeline run's",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run cut short (a time limit) in the same --out with the same options: the rows in "
        "OUT/rows.jsonl are kept (a row that failed runs again), the others run",
    )
    p.add_argument("--topology", default=None, help="tier spec of the largest rank count, e.g. 2x1 (with --emulate)")
    p.add_argument("--emulate", action="store_true", help="cocodiff rows over an emulated slow outer tier")
    p.add_argument("--max-ctas", type=int, default=1, help="CTA cap of the emulated slow link")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--cpu", action="store_true", help="CPU ranks (gloo), tiny configs: checks the command, not speed")
    p.add_argument("--out", default="cocodiff-out/bench-e2e", help="output folder")


def run_e2e(args) -> int:
    """The `bench e2e` subcommand: options checked before any rank starts."""
    from .cli import UsageError

    cuda = torch.cuda.is_available() and not args.cpu
    gpus = torch.cuda.device_count() if cuda else 0
    counts = args.gpus or ([1, gpus] if gpus > 1 else [1, 2] if not cuda else [1])
    if counts[0] != 1 or sorted(set(counts)) != counts:
        raise UsageError(f"--gpus {counts}: give increasing rank counts starting with 1 (it writes the reference)")
    if cuda and counts[-1] > gpus:
        raise UsageError(f"--gpus {counts[-1]}: only {gpus} GPUs here")
    if args.head_chunks is not None and min(args.head_chunks) < 1:
        raise UsageError(f"--head-chunks {args.head_chunks}: give integers >= 1")
    if args.no_pipeline and args.steps:
        raise UsageError(f"--no-pipeline runs no pipeline: drop --steps {args.steps}")
    if args.no_pipeline and args.v_major is not None:
        raise UsageError(
            "--no-pipeline with --v-major: a V-Major row's error is its whole pipeline run's against one GPU; "
            "drop --no-pipeline (or --v-major)"
        )
    if args.emulate and args.topology is None:
        raise UsageError("--emulate needs --topology, e.g. 2x1 (2 emulated nodes of 1 GPU)")
    opts = dict(
        families=args.families,
        sizes=args.sizes or ([1024] if cuda else [64]),
        presets=args.presets or (["flat", "fast"] if cuda else ["flat"]),
        routes=args.routes,
        head_chunks=args.head_chunks,
        v_major=None if args.v_major is None else list(dict.fromkeys(args.v_major or ["default"])),
        peers=args.peers,
        steps=[] if args.no_pipeline else args.steps or ([28, 50] if cuda else [2]),
        topology=args.topology,
        emulate=args.emulate,
        max_ctas=args.max_ctas,
        warmup=args.warmup,
        iters=args.iters,
        cuda=cuda,
        out=args.out,
    )
    if "eager" not in opts["peers"]:  # (xDiT modes are run apart, see _xdit_rows)
        raise UsageError("--peers must include eager: plain diffusers on one GPU is the reference of every row")
    if not cuda and "copy_engine" in (opts["routes"] or []):
        raise UsageError("--routes copy_engine needs GPU ranks on one host; on CPU ranks use flat or tapa")
    if not cuda and "fast" in opts["presets"]:
        raise UsageError("--presets fast needs GPU ranks (CUDA graphs); on CPU ranks use flat or vfirst")
    if cuda:
        set_multi_gpu_env()
    Path(args.out, "ref").mkdir(parents=True, exist_ok=True)
    # read before any row runs (a failure here must not cost the run); the JSON is rewritten after every P, so
    # the rows measured so far survive a later failure (and rank 0 appends each row to rows.jsonl as it is measured)
    result = {"command": "cocodiff bench e2e", "env": _environment(cuda), "options": dict(opts), "rows": []}
    out = Path(args.out)
    if args.resume:  # (the ranks get the kept rows with the options; the JSON says how many were kept)
        opts["resumed"] = _resumable_rows(out, opts)
        result["resumed_rows"] = len(opts["resumed"])
    else:  # rank 0 appends every row to rows.jsonl as it is measured (see _e2e_rank)
        (out / "rows.jsonl").write_text("")
        (out / "options.json").write_text(json.dumps(opts, indent=1))
    for world in counts:
        # a peer's first call may compile for minutes while the other ranks wait at the row's barrier
        backend = "nccl" if cuda else "gloo"
        result["rows"] += spawn(_e2e_rank, world, opts, backend=backend, timeout_s=7200, collective_timeout_s=1800)[0]
        result["rows"] += _xdit_rows(opts, world)
        (out / "e2e.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (out / "e2e.md").write_text(text)
    plot(result, out / "e2e.png")
    print(text)
    print(f"wrote {out / 'e2e.json'}, {out / 'e2e.md'}, {out / 'e2e.png'} (and e2e_breakdown.png at P > 1)")
    return 0


def _environment(cuda: bool) -> dict:
    import subprocess

    import diffusers

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    if cuda:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            )
            env["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            env["driver"] = None
    from importlib.metadata import PackageNotFoundError, version

    try:
        env["xfuser"] = version("xfuser")  # xfuser 0.7.0 has no __version__
    except PackageNotFoundError:
        env["xfuser"] = None
    return env


def _row_key(r: dict) -> str:
    return f"{r['family']}/{r['size']}/{r['P']}/{r['engine']}/{r['mode']}"


def _resumable_rows(out: Path, opts: dict) -> dict:
    """`--resume`: the rows of OUT/rows.jsonl that need not run again, by `_row_key` (a row that failed runs again,
    and so does plain diffusers on one GPU when the reference files it writes are missing).

    Raises:
        UsageError: no earlier run in OUT, or one with other options.
    """
    from .cli import UsageError

    try:
        before = json.loads((out / "options.json").read_text())
        lines = (out / "rows.jsonl").read_text().splitlines()
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume: no earlier run in {out} ({exc}); run without --resume") from exc
    now = json.loads(json.dumps(opts))
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if differ:
        raise UsageError(f"--resume: the run in {out} had other options ({', '.join(differ)}); give the same ones")
    rows = {}
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:  # a line cut by the kill
            continue
        if "error" in r:
            continue
        if (r["P"], r["engine"], r["mode"]) == (1, "diffusers", "eager"):  # writes the references
            refs = [f"{r['family']}_{r['size']}.pt"] + [f"{r['family']}_{r['size']}_run{n}.pt" for n in opts["steps"]]
            if not all((out / "ref" / f).exists() for f in refs):
                continue
        rows[_row_key(r)] = r
    return rows


# ---- on every rank ---------------------------------------------------------------------------------------
def _e2e_rank(opts: dict) -> list[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    cuda = opts["cuda"]
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if cuda else torch.float32
    size_name = "full" if cuda else "tiny"
    items = [
        (family, size, engine, mode)
        for family in opts["families"]
        for size in opts["sizes"]
        for engine, modes in (("diffusers", _diffusers_modes(opts)), ("cocodiff", _cocodiff_modes(opts, world)))
        for mode in modes
    ]
    bar = None
    if rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=f"bench e2e, {world} rank(s)", unit="row")
    rows = []
    for family, size, engine, mode in items:
        if bar is not None:
            bar.set_postfix_str(f"{family} {size}px {engine} {mode}")
        row = {"family": family, "size": size, "P": world, "engine": engine, "mode": mode}
        if _row_key(row) in opts.get("resumed", {}):  # measured before the run was cut (--resume)
            rows.append(opts["resumed"][_row_key(row)])
            if bar is not None:
                bar.update(1)
            continue
        try:
            row.update(_measure(opts, family, size, engine, mode, device, dtype, size_name, world))
        except Exception as exc:  # a row that cannot run says why (the others still run)
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rows.append(row)
        if rank == 0:  # a run killed mid-way (a timeout) still leaves the rows it measured
            with open(Path(opts["out"], "rows.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        if cuda:
            torch._dynamo.reset()
            release_memory()
        dist.barrier()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def _diffusers_modes(opts: dict) -> list[str]:
    return [m for m in opts["peers"] if m in DIFFUSERS_MODES]  # eager first: on one rank it is the reference


def _cocodiff_modes(opts: dict, world: int) -> list[str]:
    """cocodiff's rows: each preset, at P > 1 once per `--routes` entry ("preset@route"; on one rank every
    exchange is a no-op, so the route changes nothing there), per `--head-chunks` value ("preset/hcN") and, with
    `--v-major`, also with V-Major, once per variant ("...+vmajor", "...+vmajor-fp8")."""
    if world == 1:
        return list(opts["presets"])
    modes = [f"{p}@{r}" for p in opts["presets"] for r in opts["routes"]] if opts.get("routes") else opts["presets"]
    chunks = opts.get("head_chunks")
    modes = [f"{m}/hc{n}" for m in modes for n in chunks] if chunks else list(modes)
    if opts.get("v_major"):  # each row also with V-Major, unless its preset has it already
        tags = ["+vmajor" + ("" if v == "default" else f"-{v}") for v in opts["v_major"]]
        modes = [v for m in modes for v in ([m] if m.startswith("cocodiff") else [m] + [m + t for t in tags])]
    return modes


# ---- xDiT: its own launch per rank count ------------------------------------------------------------------
def _xdit_rows(opts: dict, world: int) -> list[dict]:
    """xDiT's rows at `world` ranks: `cocodiff.apps.xdit_peer` under torchrun, on the same GPUs after the other
    rows (xfuser sets up its own process groups and runtime state, so it gets processes of its own), the same
    weights, inputs and 1-GPU reference; a row that cannot run says why."""
    import importlib.util
    import subprocess
    import sys

    modes = [XDIT_MODES[m] for m in opts["peers"] if m in XDIT_MODES]
    reason = None
    if not modes:
        reason = "not requested (--peers ... xdit xdit-compile; needs xfuser)"
    elif not opts["cuda"]:
        reason = "xDiT needs CUDA GPUs"
    elif world == 1:
        reason = "xDiT rows are its Ulysses at P > 1"
    elif importlib.util.find_spec("xfuser") is None:
        reason = "xfuser is not installed here (it also needs yunchang and distvae; e.g. pip install xfuser==0.7.0)"

    def row(family, size, mode, **info):
        return {"family": family, "size": size, "P": world, "engine": "xDiT", "mode": mode, **info}

    if reason is not None:
        return [row(f, z, "-", error=reason) for f in opts["families"] for z in opts["sizes"]]
    out = Path(opts["out"], "xdit")
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        row(f, z, m, error="xDiT rows cover FLUX.1 only (xfuser's xFuserFlux1Transformer2DWrapper route)")
        for f in opts["families"]
        if f != "flux"
        for z in opts["sizes"]
        for m in modes
    ]
    if "flux" not in opts["families"]:
        return rows
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
    cmd += ["-m", "cocodiff.apps.xdit_peer", "--sizes", *map(str, opts["sizes"]), "--out", str(out)]
    cmd += ["--ref", str(Path(opts["out"], "ref", "flux_{size}.pt"))] + ["--compile"] * ("compile" in modes)
    log = out / f"xdit_P{world}.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
        result = json.loads((out / f"xdit_flux_P{world}.json").read_text())
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        why = f"{type(exc).__name__}: {exc}"[:300] + f" (log: {log})"
        return rows + [row("flux", z, m, error=why) for z in opts["sizes"] for m in modes]
    return rows + xdit_rows_from_report(result, opts["sizes"], modes, world, proc.returncode, log)


def xdit_rows_from_report(result: dict, sizes, modes, world: int, returncode: int, log) -> list[dict]:
    """`xdit_peer`'s JSON -> e2e rows (ms per step, first call, peak memory, error against one GPU)."""
    failed = result.get("failed_stage")
    out = []
    for size in sizes:
        for mode in modes:
            base = {"family": "flux", "size": size, "P": world, "engine": "xDiT", "mode": mode}
            got = [r for r in result.get("rows", []) if r.get("size") == size and r.get("mode") == mode]
            if failed is not None:
                out.append({**base, "error": f"{failed['stage']}: {failed['error']}"[:500]})
            elif not got:
                out.append({**base, "error": f"no row (xdit_peer exited with {returncode}; log: {log})"})
            elif "error" in got[0]:
                out.append({**base, "error": f"{got[0].get('stage')}: {got[0]['error']}"[:500]})
            else:
                r = got[0]
                info = {
                    "config": f"USP {mode}" + (f" ({r['compile']['mode']})" if "compile" in r else ""),
                    "ms_per_step": r["ms_median"],
                    "ms_per_step_all": r.get("ms_all"),
                    "first_call_s": r["first_call_s"],
                }
                for key in ("peak_mem_GiB", "rel_err_vs_1gpu"):
                    if r.get(key) is not None:
                        info[key] = r[key]
                out.append({**base, **info})
    return out


def _config(opts: dict, mode: str, world: int) -> ParallelConfig:
    mode, vmajor, variant = mode.partition("+vmajor")
    mode, _, chunks = mode.partition("/hc")
    preset, _, route = mode.partition("@")
    extra = {"all_to_all": route} if route else {}
    if vmajor:
        extra["v_major"] = VMajorConfig(**VMAJOR_VARIANTS[variant.removeprefix("-") or "default"])
    if chunks:
        extra["head_chunks"] = int(chunks)
    if opts["topology"] is not None and world > 1:
        import math

        from ..topology import parse_topology_spec

        if math.prod(parse_topology_spec(opts["topology"])) == world:
            extra["topology"] = opts["topology"]
            if opts["emulate"]:
                extra["emulate_slow_tier"] = SlowTierEmulation(max_ctas=opts["max_ctas"])
    return ParallelConfig.preset(preset, **extra)


def _measure(opts, family, size, engine, mode, device, dtype, size_name, world) -> dict:
    from .. import parallelize

    cuda = opts["cuda"]
    model = zoo.build_model(family, size_name, dtype=dtype, device=device, seed=0)
    info: dict = {}
    if engine == "cocodiff":
        cfg = _config(opts, mode, world)
        parallelize(model, cfg)
        info["config"] = cfg.label
    else:
        if world > 1:
            from diffusers import ContextParallelConfig

            if getattr(type(model), "_cp_plan", None) is None:
                raise ValueError(f"diffusers has no context-parallel plan for {type(model).__name__}")
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        if mode == "regional-compile":
            model.compile_repeated_blocks(fullgraph=True)
        elif mode == "reduce-overhead":
            model = torch.compile(model, mode="reduce-overhead")
        info["config"] = f"{'Ulysses ' if world > 1 else ''}{mode}"
    rows, cols = zoo.image_tokens(family, model, size, size)
    n_txt = zoo.TEXT_TOKENS_IMAGE[family] if cuda else 5
    inputs = zoo.make_inputs(family, model, rows=rows, cols=cols, n_txt=n_txt, device=device, dtype=dtype, seed=1)

    def step():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    lossy = engine == "cocodiff" and cfg.v_major is not None
    out = None  # a lossy row's error is its whole run's (see _generation_steps)
    if lossy:
        _generation_steps(model, inputs, opts, info)
    else:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        info["first_call_s"] = time.perf_counter() - t0
        times = time_ms(step, warmup=opts["warmup"], iters=opts["iters"], cuda=cuda)
        out = step().float().cpu()
        info.update(ms_per_step=statistics.median(times), ms_per_step_all=times)
        if engine == "cocodiff" and world > 1:  # what one step sends per tier (the last tier is the slowest)
            stats = model.cocodiff.step_stats
            info.update(tiers=list(stats.tier_names), bytes_per_step_by_tier=list(stats.bytes_by_tier))
    if engine == "cocodiff" and world > 1 and cfg.v_major is None and (cfg.ring_degree or 1) == 1:
        info["no_exchange_ms"] = _no_exchange_ms(model, step, opts)
    ref = Path(opts["out"], "ref", f"{family}_{size}.pt")
    if world == 1 and engine == "diffusers" and mode == "eager":
        if dist.get_rank() == 0:
            torch.save(out, ref)
    elif out is not None and ref.exists():
        info["rel_err_vs_1gpu"] = rel_err(out, torch.load(ref))
    if not opts["steps"]:  # --no-pipeline
        if cuda:
            info["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        return info
    # the pipeline's own warm-up run: its shapes (CFG batch, text length) may differ from the step's; a V-Major row's
    # is a run of the shortest length (its exact warm-up steps must fit in the run)
    warm = min(opts["steps"]) if lossy else 2
    pipe, kwargs = zoo.pipeline_around(family, model, height=size, width=size, steps=warm, n_txt=n_txt)
    pipe.set_progress_bar_config(disable=True)
    if engine == "cocodiff":
        model.cocodiff.steps.follow(pipe.scheduler)  # V-Major's step and run length come from the scheduler
    with torch.no_grad():
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        for steps in opts["steps"]:
            kwargs["num_inference_steps"] = steps
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
            if cuda:
                torch.cuda.synchronize(device)
            info[f"s_per_image_{steps}"] = time.perf_counter() - t0
            # the whole run's output against one GPU's: what a lossy mode's error adds up to over the steps
            ref_run = Path(opts["out"], "ref", f"{family}_{size}_run{steps}.pt")
            latents = latents.float().cpu()
            if world == 1 and engine == "diffusers" and mode == "eager":
                if dist.get_rank() == 0:
                    torch.save(latents, ref_run)
            elif ref_run.exists():
                info[f"rel_err_run_{steps}_vs_1gpu"] = rel_err(latents, torch.load(ref_run))
    if cuda:
        info["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return info


def _generation_steps(model, inputs: dict, opts: dict, info: dict) -> None:
    """A lossy (V-Major) row's step time: its steps reuse what earlier steps of the same generation sent, so one
    call repeated is not a step. Runs a generation of `--steps`' first length with falling timesteps that end at
    the inputs' own (the step context marks steps by them) and times every call; ms per step is the mean over the
    steps after V-Major's exact warm-up (their steps sit on the schedule's levels, so a median would fall between
    two of them; `ms_per_step_median` is kept, `ms_per_step_all` has every step, the warm-up first). The row gets no
    step error: a generation's last step sends every token (`final_full_steps`), and the selective steps before it
    ran on latents that never changed; its error is the whole run's (`rel_err_run_N_vs_1gpu`)."""
    eng = model.cocodiff
    n = opts["steps"][0]
    cuda = opts["cuda"]
    t = inputs["timestep"]
    spacing = max(abs(float(t.flatten()[0])), 1.0) * 0.02  # distinct in bf16 at either timestep scale (1 or 1000)
    times, sent = [], []
    for generation in range(2):  # the first compiles and warms up; the second is timed
        eng.steps.begin_generation(total_steps=n)
        t0 = time.perf_counter()
        for i in range(n):
            call = {**inputs, "timestep": t + (n - 1 - i) * spacing}
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            c0 = time.perf_counter()
            with torch.no_grad():
                model(**call, return_dict=False)
            if cuda:
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                ms = (time.perf_counter() - c0) * 1e3
            if generation == 1:
                times.append(ms)
                sent.append(list(eng.step_stats.bytes_by_tier))
        if generation == 0:
            info["first_call_s"] = time.perf_counter() - t0  # the whole first generation, compiles included
    skip = min(eng.config.v_major.warmup_steps, n - 1)
    info.update(
        ms_per_step=statistics.mean(times[skip:]),
        ms_per_step_median=statistics.median(times[skip:]),
        ms_per_step_all=times,
        timed_steps=f"{skip + 1}-{n}",
    )
    # bytes per tier over the generation, and the slowest tier's against n steps that send every token (the
    # largest call: a warm-up or final full step)
    full = max(b[-1] for b in sent)
    info.update(
        tiers=list(eng.step_stats.tier_names),
        bytes_generation_by_tier=[sum(col) for col in zip(*sent)],
        slow_tier_bytes_left=sum(b[-1] for b in sent) / (n * full) if full else None,
    )


def _no_exchange_ms(model, step, opts) -> float:
    """The same step with every exchange a no-op (`NoExchange`: no byte moves, wrong output), timed like the
    row: its compute-only bound; the row's time minus it is the exchange the schedule leaves exposed."""
    from ..exchange import NoExchange

    eng = model.cocodiff
    eng.use_exchange(NoExchange(topology=eng.topology, rank=eng.rank, stats=eng.stats))
    try:
        step()  # a graphed step captures again under the new route
        return statistics.median(time_ms(step, warmup=opts["warmup"], iters=opts["iters"], cuda=opts["cuda"]))
    finally:
        eng.use_exchange("auto")


# ---- report ------------------------------------------------------------------------------------------------
def report(result: dict) -> str:
    env, opts, rows = result["env"], result["options"], result["rows"]
    head = ", ".join(f"{k} {v}" for k, v in env.items() if v and k != "date")
    lines = [
        f"# cocodiff bench e2e, {env['date']}",
        "",
        f"{head}. Random weights ({'full-size bf16' if opts['cuda'] else 'tiny fp32 configs, CPU: not a speed'}"
        f" figure); ms per transformer step (median of {opts['iters']} after {opts['warmup']} warm-up calls) and"
        " seconds per image of the diffusers pipeline (prompt embeddings given, latents out, VAE decode left out).",
        "",
    ]
    steps = opts["steps"]
    for family in opts["families"]:
        for size in opts["sizes"]:
            group = [r for r in rows if r["family"] == family and r["size"] == size]
            ok = [r for r in group if "ms_per_step" in r]
            one = [r["ms_per_step"] for r in ok if r["P"] == 1]
            best_one = min(one) if one else None
            lines += [
                f"## {family} {size}x{size}",
                "",
                "| P | engine | mode | ms/step | no-exchange bound ms (exposed) | vs best 1 GPU | vs best peer at P | "
                + "".join(f"s/image, {s} steps | " for s in steps)
                + "peak GiB | rel. error vs 1 GPU: step"
                + (f" / {steps[0]}-step run" if steps else "")
                + " | first call (s) |",
                "|---" * (10 + len(steps)) + "|",
            ]
            for r in group:
                if "error" in r:
                    lines.append(f"| {r['P']} | {r['engine']} | {r['mode']} | not run: {r['error']} |" + " |" * 9)
                    continue
                peers = [
                    x["ms_per_step"]
                    for x in ok
                    if x["P"] == r["P"] and x["engine"] != "cocodiff" and x.get("rel_err_vs_1gpu", 0.0) <= MAX_PEER_ERR
                ]
                # (over an emulated slow tier the peers still run on the real links: no ratio between them)
                comparable = r["engine"] == "cocodiff" and not (opts.get("emulate") and r["P"] > 1)
                vs_peer = f"{min(peers) / r['ms_per_step']:.2f}x" if peers and comparable else ""
                err = r.get("rel_err_vs_1gpu")
                cells = [
                    str(r["P"]),
                    r["engine"],
                    r.get("config", r["mode"])
                    + (f" ({left:.2f} of the slow-tier bytes)" if (left := r.get("slow_tier_bytes_left")) else ""),
                    f"{r['ms_per_step']:.1f}",
                    f"{r['no_exchange_ms']:.1f} ({r['ms_per_step'] - r['no_exchange_ms']:+.1f})"
                    if "no_exchange_ms" in r
                    else "",
                    f"{best_one / r['ms_per_step']:.2f}x" if best_one else "",
                    vs_peer,
                    *(f"{r[f's_per_image_{s}']:.2f}" if f"s_per_image_{s}" in r else "" for s in steps),
                    f"{r['peak_mem_GiB']:.1f}" if "peak_mem_GiB" in r else "",
                    ("" if err is None else f"{err:.1e}")
                    + (f" / {r[run_err]:.1e}" if steps and (run_err := f"rel_err_run_{steps[0]}_vs_1gpu") in r else ""),
                    f"{r['first_call_s']:.1f}" if "first_call_s" in r else "",
                ]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "No-exchange bound: the same cocodiff step with every exchange a no-op (no byte moves, wrong output), timed",
        "the same way; in brackets the row's time minus it, the exchange its schedule leaves exposed. Best peer: the",
        f"fastest diffusers or xDiT row at the same P whose output is within {MAX_PEER_ERR:.0e} of one GPU (others are",
        "listed, not used). xDiT rows time the transformer step only (no pipeline run). Errors: the step's output, and",
        "the whole pipeline run's latents, against plain diffusers on one GPU. Lossy (V-Major) rows: ms/step is the",
        "mean over one generation's steps after V-Major's exact warm-up steps (every step in the JSON); in brackets",
        f"after the mode, the slowest tier's bytes over that {steps[0] if steps else 'N'}-step generation against as "
        "many full steps.",
        *(["Transformer steps only (--no-pipeline): no pipeline runs."] if not steps else []),
        *(
            [
                "Emulated slow tier: cocodiff's rows at P > 1 cross it; diffusers' and xDiT's rows run on the real",
                "links, so those rows get no ratio to a peer.",
            ]
            if opts.get("emulate")
            else []
        ),
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "ms_per_step" in r]
    if not rows:
        return
    keys = list(dict.fromkeys((r["family"], r["size"]) for r in rows))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 0.5 * max(6, len(rows) / len(keys)) + 1.2))
    axes = [axes] if len(keys) == 1 else axes
    for ax, (family, size) in zip(axes, keys):
        group = [r for r in rows if (r["family"], r["size"]) == (family, size)]
        color = [ENGINE_COLORS.get(r["engine"], "#7f7f7f") for r in group]
        ax.barh(range(len(group)), [r["ms_per_step"] for r in group], color=color)
        ax.set_yticks(range(len(group)), [f"P={r['P']} {r.get('config', r['mode'])}" for r in group], fontsize=8)
        for i, r in enumerate(group):
            ax.text(r["ms_per_step"], i, f" {r['ms_per_step']:.0f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per transformer step (lower is better)")
        ax.set_title(f"{family} {size}x{size}")
    env = result["env"]
    fig.suptitle(
        f"cocodiff (blue), diffusers (orange), xDiT (green), same run: {env['gpu']}, torch {env['torch']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    plot_breakdown(result, path.with_name(path.stem + "_breakdown.png"))


def plot_breakdown(result: dict, path: Path) -> None:
    """Per cocodiff row at P > 1: the step split into compute (its no-exchange bound) and exposed exchange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "no_exchange_ms" in r]
    if not rows:
        return
    labels = [f"{r['family']} {r['size']} P={r['P']} {r.get('config', r['mode'])}" for r in rows]
    compute = [r["no_exchange_ms"] for r in rows]
    exposed = [max(r["ms_per_step"] - r["no_exchange_ms"], 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ax.barh(range(len(rows)), compute, color="#1f77b4", label="compute (no-exchange bound)")
    ax.barh(range(len(rows)), exposed, left=compute, color="#d62728", label="exposed exchange")
    for i, r in enumerate(rows):
        ax.text(r["ms_per_step"], i, f" {r['ms_per_step']:.0f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per transformer step")
    ax.legend(fontsize=8, loc="lower right")
    env = result["env"]
    ax.set_title(f"time breakdown per preset: {env['gpu']}, torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
