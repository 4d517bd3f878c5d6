"""`cocodiff demo`: the small model through a real denoising loop on several ranks.

With no launcher it starts the ranks itself: one per local GPU on NCCL, or CPU ranks on gloo when there is
no GPU. Under torchrun it runs in the launched processes. Rank 0 writes the images, a JSON report and a
short markdown report (time per step, bytes exchanged per tier, the error against a single-process run).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from .launch import set_multi_gpu_env, spawn


def _config_from_args(args) -> ParallelConfig:
    cfg = ParallelConfig.preset(args.preset, topology=args.topology)
    changes = {}
    if args.v_first:
        changes["v_first"] = True
    for name in ("all_to_all", "fuse_qk", "cuda_graph"):
        value = getattr(args, name, None)
        if value:
            changes[name] = value
    return cfg.with_(preset_name=None, **changes) if changes else cfg


def save_grid(images: torch.Tensor, path: Path, scale: int = 4) -> None:
    """Save `(B, 3, H, W)` images in [-1, 1] as one PNG row, upscaled `scale`x (nearest) to be visible."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    B, C, H, W = x.shape
    row = x.permute(2, 0, 3, 1).reshape(H, B * W, C).numpy()
    Image.fromarray(row).save(path)


def _demo_rank(opts: dict) -> dict | None:
    from tqdm import tqdm

    from ..parallelize import parallelize
    from .smallmodel import default_model, generate, load_small_model

    rank, world = dist.get_rank(), dist.get_world_size()
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        device = torch.device("cpu")
    sm = load_small_model(opts["model"], device=device) if opts["model"] else default_model(device=device)
    n = opts["num_images"]
    labels = torch.arange(n) % len(sm.classes)

    # the single-process reference runs on rank 0 *after* the parallel run, on an untouched copy: doing it
    # first would keep the other ranks waiting in their first collective (and could hit --timeout)
    single = copy.deepcopy(sm.transformer) if opts["reference"] and rank == 0 else None
    parallelize(sm.transformer, opts["config"])
    engine = sm.transformer.cocodiff

    bar = tqdm(total=opts["steps"], desc=f"denoising on {world} {device.type} ranks", disable=rank != 0)
    step_ms: list[float] = []
    last = [time.perf_counter()]

    fail_rank = os.environ.get("COCODIFF_DEBUG_FAIL_RANK")  # fault injection for the failure tests

    def on_step(i, x):
        if fail_rank is not None and int(fail_rank) == rank and i == int(os.environ.get("COCODIFF_DEBUG_FAIL_STEP", 1)):
            raise RuntimeError(f"injected failure on rank {rank} at step {i}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_ms.append((now - last[0]) * 1e3)
        last[0] = now
        bar.update(1)

    images = generate(sm, labels, steps=opts["steps"], seed=opts["seed"], callback=on_step)
    bar.close()
    if rank != 0:
        return None
    reference = None
    if single is not None:
        reference = generate(
            dataclasses.replace(sm, transformer=single), labels, steps=opts["steps"], seed=opts["seed"]
        )
    stats = engine.step_stats.as_dict()
    timed = sorted(step_ms[1:] or step_ms)  # first step includes one-time set-up
    report = {
        "model": "shipped trained small FLUX"
        if sm.trained
        else "RANDOM-WEIGHT small FLUX (untrained: noise-like images)",
        "trained": sm.trained,
        "classes": [sm.classes[i] for i in labels.tolist()],
        "image_size": sm.image_size,
        "tokens": (sm.image_size // sm.patch) ** 2,
        "ranks": world,
        "device": device.type,
        "backend": dist.get_backend(),
        "config": opts["config_label"],
        "topology": engine.topology.spec,
        "steps": opts["steps"],
        "ms_per_step_median": timed[len(timed) // 2],
        "bytes_per_step": stats,  # one transformer call per denoising step here (no CFG)
        "max_abs_diff_vs_single_process": None if reference is None else (images - reference).abs().max().item(),
    }
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images, out / "images.png")
    if reference is not None:
        save_grid(reference, out / "reference_single_process.png")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    tiers = ", ".join(f"{k}: {v / 1e6:.3f} MB" for k, v in r["bytes_per_step"]["bytes_by_tier"].items())
    diff = r["max_abs_diff_vs_single_process"]
    return (
        f"# cocodiff demo\n\n"
        f"- model: {r['model']}\n- classes: {', '.join(r['classes'])}\n"
        f"- {r['ranks']} {r['device']} ranks ({r['backend']}), config `{r['config']}`, topology {r['topology']}\n"
        f"- {r['image_size']}x{r['image_size']} px, {r['tokens']} image tokens, {r['steps']} steps\n"
        f"- time per step (median): {r['ms_per_step_median']:.1f} ms\n"
        f"- bytes sent per step by each rank: {tiers}; output gather "
        f"{r['bytes_per_step']['output_gather_bytes'] / 1e6:.3f} MB\n"
        f"- max |parallel - single process| over the images: "
        f"{'not measured' if diff is None else f'{diff:.2e}'}\n"
    )


def run_demo(args) -> int:
    cfg = _config_from_args(args)
    if args.model is not None and not Path(args.model).exists():
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    on_gpu = torch.cuda.is_available() and not args.cpu
    gpu_only = [
        flag
        for flag, on in (
            ("--cuda-graph", cfg.cuda_graph),
            ("--fuse-qk", cfg.fuse_qk),
            ("--all-to-all copy_engine", cfg.all_to_all == "copy_engine"),
        )
        if on
    ]
    if gpu_only and not on_gpu:
        raise ValueError(f"{', '.join(gpu_only)} need GPU ranks; this run uses CPU ranks (drop the flag)")
    opts = dict(
        model=args.model,
        num_images=args.num_images,
        steps=args.steps,
        seed=args.seed,
        out=args.out,
        config=cfg,
        config_label=cfg.label,
        reference=not args.no_reference,
    )
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        set_multi_gpu_env()
        backend = "nccl" if on_gpu else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
        try:
            report = _demo_rank(opts)
        finally:
            dist.destroy_process_group()
    else:
        gpus = torch.cuda.device_count() if on_gpu else 0
        if gpus:
            world = args.ranks or gpus
            if world > gpus:
                raise ValueError(f"--ranks {world} asks for more GPUs than the {gpus} present")
            backend = "nccl"
        else:
            world = args.ranks or 2
            backend = "gloo"
        if world < 1:
            raise ValueError(f"--ranks must be >= 1, got {world}")
        report = spawn(_demo_rank, world, opts, backend=backend, timeout_s=3600, collective_timeout_s=args.timeout)[0]
    if report is not None:
        print(_markdown(report))
        print(f"wrote {args.out}/images.png, report.json, report.md")
    return 0
