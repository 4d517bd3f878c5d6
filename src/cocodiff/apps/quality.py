"""`cocodiff quality`: does a communication mode change the images? (the paper's inpainting study)

Held-out crops of the shipped model's training images (never seen in training) are inpainted under a
center mask and under block masks, and generated from scratch, by one denoising loop (`smallmodel.inpaint`;
a row with an empty mask is plain generation). The same batch runs once in a single process (the exact
reference) and then, for every mode and rank count, on ranks through `cocodiff.parallelize`: one GPU per rank
over NCCL when GPUs are present (fp32, TF32 off; the reference on GPU 0), CPU ranks on gloo otherwise or
with `--cpu`. Each row
reports PSNR / SSIM (scikit-image) against the ground truth and against the single-process output, the
largest pixel difference, and the bytes each rank sent per tier over the whole run.

Modes are rows by name (`MODES`); a mode that cannot run at a rank count (a topology of other size, V-Major
with a warm-up longer than the run) is skipped with the reason as its note. The V-Major rows ("cocodiff-*":
the preset's defaults, lossy) run on two emulated tiers, where V-Major selects what crosses the outer one.
LPIPS is not computed: it needs pretrained network weights, which cannot be downloaded here.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from ..topology import parse_topology_spec

# (row label, how to build its ParallelConfig): {"preset": name, **field overrides} or ParallelConfig kwargs.
# "-2x2" rows run on an explicit two-tier topology (2 "nodes" x 2 ranks; only at 4 ranks) with TAPA's phased
# route forced (tapa_plan="phases"), so the hierarchical exchange itself is what is checked.
MODES: list[tuple[str, dict]] = [
    ("flat", {"all_to_all": "flat"}),
    ("flat+vfirst", {"all_to_all": "flat", "v_first": True}),
    ("tapa", {"preset": "tapa"}),
    ("vfirst", {"preset": "vfirst"}),
    ("flat-2x2", {"all_to_all": "flat", "topology": "2x2"}),
    ("tapa-2x2", {"preset": "tapa", "tapa_plan": "phases", "topology": "2x2"}),
    ("vfirst-2x2", {"preset": "vfirst", "tapa_plan": "phases", "topology": "2x2"}),
    ("cocodiff-2x1", {"preset": "cocodiff", "topology": "2x1"}),
    ("cocodiff-2x2", {"preset": "cocodiff", "tapa_plan": "phases", "topology": "2x2"}),
    # Ulysses x ring: Ulysses inside each of the 2 "nodes", a ring of 2 across them (exact; and V-Major on the
    # ring's hops)
    ("ring-2x2", {"all_to_all": "flat", "ring_degree": 2, "topology": "2x2"}),
    ("cocodiff-ring-2x2", {"preset": "cocodiff", "ring_degree": 2, "tapa_plan": "phases", "topology": "2x2"}),
]
TASKS = ("center", "blocks", "generate")


def build_config(spec: dict, topology: str | None = None) -> ParallelConfig:
    """A `ParallelConfig` from a `MODES` entry, `topology` (if given) replacing the entry's own.

    Raises:
        ValueError, TypeError: for a mode this version of cocodiff cannot build (the row is then skipped).
    """
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if topology is not None:
        spec["topology"] = topology
    if not preset:
        return ParallelConfig(**spec)
    cfg = ParallelConfig.preset(preset)
    return cfg.with_(**spec) if spec else cfg


def make_masks(task: str, n: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """Known-pixel masks `(n, 1, size, size)`, 1 = known. "center": the central (size/2)^2 square unknown
    (a quarter of the area); "blocks": four random rectangles per image unknown (seeded); "generate": all
    unknown."""
    known = torch.ones(n, 1, size, size)
    if task == "center":
        a, b = size // 4, size - size // 4
        known[..., a:b, a:b] = 0
    elif task == "blocks":
        g = torch.Generator().manual_seed(seed)
        lo, hi = max(2, size // 8), max(3, size // 3)
        for i in range(n):
            for _ in range(4):
                h, w = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=g))
                y, x = (
                    int(torch.randint(size - h + 1, (1,), generator=g)),
                    int(torch.randint(size - w + 1, (1,), generator=g)),
                )
                known[i, :, y : y + h, x : x + w] = 0
    elif task == "generate":
        known.zero_()
    else:
        raise ValueError(f"unknown quality task {task!r}; choose from {TASKS}")
    return known


def _hwc(img: torch.Tensor):
    """(3, H, W) in [-1, 1] -> float64 numpy (H, W, 3) in [0, 1]."""
    return ((img.detach().double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two `(3, H, W)` images in [-1, 1], data range of [0, 1]; inf for identical images."""
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio

    x, y = _hwc(a), _hwc(b)
    if mean_squared_error(x, y) == 0:
        return math.inf
    return float(peak_signal_noise_ratio(x, y, data_range=1.0))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM (7x7 windows, scikit-image) of two `(3, H, W)` images in [-1, 1]; 1.0 for identical images."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(_hwc(a), _hwc(b), data_range=1.0, channel_axis=-1))


def _mean(xs: list[float]) -> float:
    return math.inf if any(math.isinf(x) for x in xs) else sum(xs) / len(xs)


def _jsonable(x: float) -> float | str:
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def _load(model: str | None, device="cpu"):
    from .smallmodel import default_model, load_small_model

    return load_small_model(model, device=device) if model else default_model(device=device)


def _stamp(device: torch.device) -> float:
    """A time stamp after the device's queued work (per-step times on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _quality_rank(opts: dict) -> dict:
    """One rank: every mode in turn on a freshly loaded model, same batch and seed as the reference."""
    from ..exchange import CommStats
    from ..parallelize import parallelize
    from .smallmodel import inpaint

    world = dist.get_world_size()
    rank = dist.get_rank()
    device = torch.device(f"cuda:{rank}" if opts["cuda"] else "cpu")
    if not opts["cuda"]:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    out = {}
    for label, cfg in opts["configs"]:
        t0 = time.perf_counter()
        sm = _load(opts["model"], device=device)
        parallelize(sm.transformer, cfg)
        engine = sm.transformer.cocodiff
        total = CommStats(engine.step_stats.tier_names)
        stamps = [_stamp(device)]

        def on_step(i, x):
            total.add(engine.step_stats)
            stamps.append(_stamp(device))

        images = inpaint(
            sm, opts["images"], opts["known"], opts["labels"], steps=opts["steps"], seed=opts["seed"], callback=on_step
        )
        out[label] = {
            "images": images.cpu() if rank == 0 else None,
            "stats": total.as_dict(),
            "ms_per_step": median_step_ms(stamps),
        }
        if rank == 0:
            print(
                f"  {label:<12} on {world} ranks: {time.perf_counter() - t0:5.1f} s "
                f"({out[label]['ms_per_step']:.0f} ms/step, median)",
                flush=True,
            )
    return out


def median_step_ms(stamps: list[float]) -> float:
    """Median time of one denoising step (ms) from the loop's start and per-step time stamps, the first step
    left out (one-time set-up) when there are others: every row of the table is timed this way."""
    dts = sorted(b - a for a, b in zip(stamps[:-1], stamps[1:]))
    if len(dts) > 1:
        dts = sorted(b - a for a, b in zip(stamps[1:-1], stamps[2:]))
    return 1e3 * dts[len(dts) // 2]


def _row_metrics(images, ref, truth, known, tasks, n) -> dict:
    per_task = {}
    for k, task in enumerate(tasks):
        sl = range(k * n, (k + 1) * n)
        hole = [(1 - known[i]).bool().expand(3, -1, -1) for i in sl]
        m = {
            "psnr_vs_single": _mean([psnr(images[i], ref[i]) for i in sl]),
            "ssim_vs_single": sum(ssim(images[i], ref[i]) for i in sl) / n,
            "max_abs_diff_vs_single": float((images[list(sl)] - ref[list(sl)]).abs().max()),
        }
        if task != "generate":  # a generated image has no ground truth to match
            m["psnr_vs_truth"] = _mean([psnr(images[i], truth[i]) for i in sl])
            m["ssim_vs_truth"] = sum(ssim(images[i], truth[i]) for i in sl) / n
            mse = [float(((images[i] - truth[i]) / 2)[h].pow(2).mean()) for i, h in zip(sl, hole)]
            m["psnr_hole_vs_truth"] = _mean([math.inf if e == 0 else -10 * math.log10(e) for e in mse])
        per_task[task] = m
    return per_task


def evaluation_batch(sm, *, per_class: int, tasks: tuple[str, ...], seed: int = 0):
    """(truth (N, 3, S, S), known (N, 1, S, S), labels (N,), crops per task n): held-out crops of every class,
    repeated once per task, task-major. A model whose classes are not training sources (random weights)
    gets the default sources' crops, all under label 0."""
    from .train import DEFAULT_CLASSES, SOURCES, heldout_crops

    classes = sm.classes if all(c in SOURCES for c in sm.classes) else list(DEFAULT_CLASSES)
    frac = sm.meta.get("train_config", {}).get("holdout_frac", 0.25)
    downscale = sm.meta.get("train_config", {}).get("downscale") if classes is sm.classes else None
    crops, labels = heldout_crops(
        classes, image_size=sm.image_size, per_class=per_class, holdout_frac=frac, downscale=downscale
    )
    if classes is not sm.classes:
        labels = torch.zeros_like(labels)
    n = crops.shape[0]
    known = torch.cat([make_masks(t, n, sm.image_size, seed=seed + k) for k, t in enumerate(tasks)])
    return crops.repeat(len(tasks), 1, 1, 1), known, labels.repeat(len(tasks)), n


def run_quality(args) -> int:
    """The `quality` subcommand: reference run, every (mode, ranks) row, then JSON, markdown and plots."""
    from .launch import spawn
    from .pipelines import inspect_model
    from .quality_report import write_outputs
    from .smallmodel import inpaint

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"--tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
    cuda = torch.cuda.is_available() and not args.cpu
    gpus = torch.cuda.device_count() if cuda else 0
    if args.ranks is None:  # 2 and 4 ranks: CPU ranks, or as many of them as there are GPUs
        if cuda and gpus < 2:
            print("quality: one GPU is visible; using CPU ranks (gloo). Pass --cpu to say so.", flush=True)
            cuda, gpus = False, 0
        args.ranks = ",".join(str(w) for w in (2, 4) if not cuda or w <= gpus)
    try:
        worlds = [int(w) for w in str(args.ranks).split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--ranks {args.ranks}: give comma-separated rank counts, e.g. 2,4") from None
    info = inspect_model(args.model)
    for w in worlds or [0]:
        if w < 1:
            raise ValueError(f"--ranks {args.ranks}: every rank count must be >= 1")
        info.check_ranks(w)
        if cuda and w > gpus:
            raise ValueError(
                f"--ranks {args.ranks}: {w} GPU ranks, but {gpus} GPUs are visible; give at most {gpus} or add "
                "--cpu for CPU ranks"
            )
    if args.topology is not None:
        need = math.prod(parse_topology_spec(args.topology))
        if need not in worlds:
            raise ValueError(f"--topology {args.topology}: its tiers hold {need} ranks; use --ranks {need}")
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    known_modes = dict(MODES)
    unknown = [m for m in wanted if m not in known_modes]
    if unknown:
        raise ValueError(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(m for m, _ in MODES)}")
    modes = [(m, known_modes[m]) for m in wanted]
    if args.preset != "flat" or args.v_first:  # the generic parallel flags add one more row
        extra = {"preset": args.preset, **({"v_first": True} if args.v_first else {})}
        modes.append((f"cli:{args.preset}{'+vfirst' if args.v_first else ''}", extra))

    device = torch.device("cuda:0" if cuda else "cpu")
    sm = _load(args.model, device=device)
    truth, known, labels, n = evaluation_batch(sm, per_class=args.per_class, tasks=tasks, seed=args.seed)
    kind = "GPU" if cuda else "CPU"
    print(
        f"quality: {len(truth)} images ({', '.join(tasks)}), {args.steps} steps; {len(modes)} modes on "
        f"{', '.join(map(str, worlds))} {kind} ranks; writing {args.out}/",
        flush=True,
    )
    t0 = _stamp(device)
    stamps = [t0]
    reference = inpaint(
        sm,
        truth,
        known,
        labels,
        steps=args.steps,
        seed=args.seed,
        callback=lambda i, x: stamps.append(_stamp(device)),
    ).cpu()
    ref_ms = median_step_ms(stamps)
    print(
        f"  {'single':<12} on 1 process: {time.perf_counter() - t0:5.1f} s ({ref_ms:.0f} ms/step, median)", flush=True
    )
    rows = [
        {
            "mode": "single",
            "ranks": 1,
            "status": "ok",
            "metrics": _row_metrics(reference, reference, truth, known, tasks, n),
            "bytes_per_rank": {},
            "bytes_all_ranks": 0,
            "ms_per_step": ref_ms,
            "lossless": True,
            "note": "exact reference",
        }
    ]
    outputs = {"single": reference}
    for world in worlds:
        configs, skipped = [], []
        for label, spec in modes:
            topology = args.topology or spec.get("topology")
            try:
                if topology is not None and math.prod(parse_topology_spec(topology)) != world:
                    raise ValueError(f"topology {topology} needs {math.prod(parse_topology_spec(topology))} ranks")
                cfg = build_config(spec, topology)
                if cfg.v_major is not None:
                    from ..topology import Topology
                    from ..vmajor import check_vmajor

                    check_vmajor(cfg, Topology.from_spec(topology or str(world), world), world)
                    if cfg.v_major.warmup_steps > args.steps:
                        raise ValueError(f"V-Major's warm-up ({cfg.v_major.warmup_steps} steps) is longer than the run")
                configs.append((label, cfg))
            except (ValueError, TypeError) as exc:
                skipped.append({"mode": label, "ranks": world, "status": "skipped", "note": str(exc).splitlines()[0]})
        for row in skipped:
            print(f"  {row['mode']:<12} on {world} ranks: skipped ({row['note']})", flush=True)
        if configs:
            print(f"  starting {world} {kind} ranks for {len(configs)} modes ...", flush=True)
        results = (
            spawn(
                _quality_rank,
                world,
                dict(
                    configs=configs,
                    model=args.model,
                    images=truth,
                    known=known,
                    labels=labels,
                    steps=args.steps,
                    seed=args.seed,
                    cuda=cuda,
                ),
                backend="nccl" if cuda else "gloo",
                timeout_s=3600,
            )
            if configs
            else []
        )
        for label, cfg in configs:
            per_rank = [r[label] for r in results]
            images = per_rank[0]["images"]
            outputs[f"{label}@{world}"] = images
            rows.append(
                {
                    "mode": label,
                    "ranks": world,
                    "status": "ok",
                    "lossless": cfg.v_major is None,
                    "config": {
                        "all_to_all": cfg.all_to_all,
                        "v_first": cfg.v_first,
                        "topology": cfg.topology,
                        "tapa_plan": cfg.tapa_plan,
                        "v_major": cfg.v_major is not None,
                    },
                    "metrics": _row_metrics(images, reference, truth, known, tasks, n),
                    # per tier, and the ring's hops (Ulysses x ring) as one more column when there are any
                    "bytes_per_rank": {
                        **per_rank[0]["stats"]["bytes_by_tier"],
                        **(
                            {"ring": per_rank[0]["stats"]["ring_bytes"]}
                            if per_rank[0]["stats"].get("ring_bytes")
                            else {}
                        ),
                    },
                    "bytes_all_ranks": sum(r["stats"]["total_bytes"] for r in per_rank),
                    "ms_per_step": max(r["ms_per_step"] for r in per_rank),
                    "note": "",
                }
            )
        rows.extend(skipped)
    report = {
        "model": _model_label(sm, args.model),
        "trained": sm.trained,
        "classes": sm.classes,
        "image_size": sm.image_size,
        "tokens": (sm.image_size // sm.patch) ** 2,
        "steps": args.steps,
        "seed": args.seed,
        "crops_per_task": n,
        "tasks": list(tasks),
        "ranks": worlds,
        "device": f"{torch.cuda.get_device_name(0)} (one GPU per rank, nccl)" if cuda else "cpu (gloo ranks)",
        "torch": torch.__version__,
        "lpips": "not computed: LPIPS needs pretrained network weights, not available offline",
        "rows": [
            {**r, "metrics": {t: {k: _jsonable(v) for k, v in m.items()} for t, m in r.get("metrics", {}).items()}}
            for r in rows
        ],
    }
    files = write_outputs(report, outputs, truth, known, n, Path(args.out))
    print((Path(args.out) / "quality.md").read_text())
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def _model_label(sm, model: str | None) -> str:
    if not sm.trained:
        return "RANDOM-WEIGHT small FLUX (untrained)"
    tokens = (sm.image_size // sm.patch) ** 2
    name = model if model is not None else "small"
    return f"trained cocodiff model {name} ({sm.image_size}x{sm.image_size} px, {tokens} tokens)"


def add_parser(subparsers, add_parallel_args, formatter_class=None) -> None:
    """Register `cocodiff quality` (the generic --preset/--v-first/--topology flags add one extra row)."""
    p = subparsers.add_parser(
        "quality",
        help="PSNR/SSIM of communication modes vs single process (inpainting)",
        description="Inpaint and generate with every communication mode on GPU ranks (CPU ranks without GPUs or "
        "with --cpu); compare with one process.",
        formatter_class=formatter_class,
    )
    p.add_argument(
        "--ranks",
        default=None,
        help="comma-separated rank counts (default: 2,4; on GPUs those the visible GPUs allow, CPU ranks on one GPU)",
    )
    p.add_argument(
        "--modes",
        default=",".join(m for m, _ in MODES),
        help=f"comma-separated rows, from: {', '.join(m for m, _ in MODES)} (-2x2: two tiers of 2, at 4 ranks only); "
        "modes not available in this version are skipped with a note",
    )
    p.add_argument(
        "--tasks", default=",".join(TASKS), help="comma-separated, from: center, blocks (inpainting), generate"
    )
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--per-class", type=int, default=2, help="held-out crops per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model", default=None, help="small model directory, or a shipped one: small (default), flux128 (GPUs)"
    )
    p.add_argument("--out", default="cocodiff-out/quality", help="output directory")
    p.add_argument("--cpu", action="store_true", help="use CPU ranks (gloo) even when GPUs are present")
    add_parallel_args(p)
