"""`cocodiff demo`: `cocodiff generate` on the shipped small model, compared with one process.

With no launcher it starts the ranks itself: as many local GPUs as the model's heads allow (NCCL), or CPU
ranks on gloo when there is no GPU. Under torchrun it runs in the launched processes. Rank 0 writes the
images, `report.json` (the generate record plus the demo's summary) and a short `report.md` (time per step,
bytes exchanged per tier, the error against a single-process run).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: Path, scale: int = 4) -> None:
    """Save `(B, 3, H, W)` images in [-1, 1] as one PNG row, upscaled `scale`x (nearest) to be visible."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    B, C, H, W = x.shape
    row = x.permute(2, 0, 3, 1).reshape(H, B * W, C).numpy()
    Image.fromarray(row).save(path)


def demo_report(record: dict, info) -> dict:
    """The generate record plus the demo's summary fields."""
    from .pipelines import small_labels

    labels = small_labels(info, record["prompt"], record["num_images"])
    size = record["height"]
    return {
        **record,
        "model": (
            f"trained cocodiff model {info.path.name if info.path else 'small_flux'} ({size}x{size} px, "
            f"{(size // 2) ** 2} tokens)"
            if info.trained
            else "RANDOM-WEIGHT small FLUX (untrained: noise-like)"
        ),
        "trained": info.trained,
        "classes": [info.classes[i] for i in labels],
        "image_size": size,
        "tokens": (size // 2) ** 2,  # the small model packs 2x2 pixels per token
        "ms_per_step_median": record["timings"]["ms_per_step_median"],
        "bytes_per_step": record["bytes_per_rank"]["per_step_by_tier"],  # one transformer call per step (no CFG)
    }


def markdown(r: dict) -> str:
    tiers = ", ".join(f"{k}: {v / 1e6:.3f} MB" for k, v in r["bytes_per_step"].items())
    diff = r["max_abs_diff_vs_single_process"]
    gather = r["bytes_per_rank"]["output_gather_total"] / max(1, r["steps"])
    return (
        f"# cocodiff demo\n\n"
        f"- model: {r['model']}\n- classes: {', '.join(r['classes'])}\n"
        f"- {r['ranks']} {r['device']} ranks ({r['backend']}), config `{r['config']['label']}`, "
        f"topology {r['topology']}\n"
        f"- {r['image_size']}x{r['image_size']} px, {r['tokens']} image tokens, {r['steps']} steps\n"
        f"- time per step (median): {r['ms_per_step_median']:.1f} ms\n"
        f"- bytes sent per step by each rank: {tiers}; output gather {gather / 1e6:.3f} MB\n"
        f"- max |parallel - single process| over the images: "
        f"{'not measured' if diff is None else f'{diff:.2e}'}\n"
    )


def run_demo(args) -> int:
    """The `demo` subcommand."""
    from .cli import checked
    from .generate import launch, prepare
    from .smallmodel import SHIPPED_MODELS, resolve_model

    if args.model is not None and not resolve_model(args.model).exists():
        raise FileNotFoundError(
            f"--model {args.model}: no such directory; pass a small model folder or a shipped name "
            f"({', '.join(SHIPPED_MODELS)})"
        )
    job = checked(prepare, args, model=args.model)
    if job.info.kind != "small":
        from .cli import UsageError

        raise UsageError(f"--model {args.model}: the demo runs cocodiff small models; use `cocodiff generate`")
    job = dataclasses.replace(job, compare_single=not args.no_reference, steps=args.steps)
    record = launch(job)
    if record is None:  # another torchrun rank
        return 0
    report = demo_report(record, job.info)
    out = Path(job.out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out}/: {', '.join(record['files'] + ['report.json', 'report.md'])}")
    return 0
