"""Train a FLUX-architecture DiT shipped with cocodiff: "small" (CPU, one thread by default) or "flux128" (GPU).

    python scripts/train_small.py --steps 2000 --batch-size 16 --max-minutes 42
    python scripts/train_small.py --preset flux128 --device cuda --max-minutes 12 --checkpoint /tmp/flux128.pt

Writes the model to src/cocodiff/apps/assets/<preset folder>/ (fp16 safetensors; `load_small_model` upcasts)
and the evidence to docs/<preset docs>/: loss_curve.json, loss_curve.png, samples_seed*.png. With
--checkpoint the whole training state is saved as it goes and a second call resumes it. `--measure N` runs N
steps only, prints the speed and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _plot(hist: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    s, loss = zip(*hist["train"])
    ax.plot(s, loss, lw=0.8, alpha=0.7, label=f"train (mean of {hist['config']['log_every']} steps)")
    s, loss = zip(*hist["heldout"])
    ax.plot(s, loss, "o-", label="held-out crops, EMA weights")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title(f"cocodiff {hist['preset']}: training loss ({hist['hardware']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from cocodiff.apps.demo import save_grid
    from cocodiff.apps.smallmodel import SHIPPED_MODELS, generate, load_small_model, save_small_model
    from cocodiff.apps.train import PRESETS, TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS), help="which shipped model to train")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the preset's)")
    ap.add_argument("--batch-size", type=int, default=None, help="crops per step (default: the preset's)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument(
        "--precision",
        default=None,
        choices=["bf16", "fp32"],
        help="bf16 autocast or fp32 (TF32 matmuls on GPUs); default: the preset's",
    )
    ap.add_argument("--anomaly", action="store_true", help="autograd anomaly detection (debugging a failure)")
    ap.add_argument("--checkpoint", default=None, help="training-state file: saved as it goes, resumed if present")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--measure", type=int, default=0, help="run this many steps, print speed, save nothing")
    ap.add_argument("--out", default=None, help="model folder (default: the shipped one of the preset)")
    ap.add_argument("--docs", default=None, help="evidence folder (default: docs/smallmodel or docs/flux128)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or str(SHIPPED_MODELS[args.preset])
    docs = Path(args.docs or ROOT / "docs" / ("smallmodel" if args.preset == "small" else args.preset))
    given = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr).items() if v is not None}
    if args.precision is not None:
        given.update(bf16=args.precision == "bf16")
    base = dict(PRESETS[args.preset], **given, seed=args.seed, device=args.device)
    torch.autograd.set_detect_anomaly(args.anomaly)

    if args.measure:
        cfg = TrainConfig(**dict(base, steps=args.measure, eval_every=args.measure, warmup=min(100, args.measure)))
        t0 = time.perf_counter()
        _, hist = train(cfg)
        print(
            f"{hist['steps_done']} steps in {hist['seconds']:.1f}s: {hist['seconds'] / hist['steps_done']:.3f} s/step "
            f"(total incl. data {time.perf_counter() - t0:.1f}s)"
        )
        return 0

    cfg = TrainConfig(
        **base, max_minutes=args.max_minutes, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every
    )
    device = torch.device(args.device)
    hardware = (
        f"{torch.cuda.get_device_name(device)}, bf16 autocast={cfg.bf16}"
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, torch.get_num_threads()={torch.get_num_threads()}"
    )
    started = datetime.datetime.now(datetime.UTC)
    sm, hist = train(cfg)
    hist["preset"], hist["hardware"] = args.preset, hardware
    command = "python scripts/train_small.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    meta = {
        "trained_steps": hist["steps_done"],
        "planned_steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "final_train_loss": hist["final_train_loss"],
        "final_heldout_loss": hist["final_heldout_loss"],
        "train_seconds": hist["seconds"],
        "date": started.date().isoformat(),
        "command": command,
        "hardware": hardware,
        "torch": torch.__version__,
        "preset": args.preset,
        "data": f"skimage.data sample images (class = source image, downscale factors {cfg.factors()}), random "
        f"{cfg.image_size}x{cfg.image_size} crops with h-flip, rightmost holdout_frac of each image held out",
        "train_config": {k: v for k, v in hist["config"].items() if k != "model_config"},
        "weights": "EMA, stored fp16",
    }
    save_small_model(sm, out, meta=meta)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "loss_curve.json").write_text(
        json.dumps(
            {
                k: hist[k]
                for k in (
                    "config",
                    "train",
                    "heldout",
                    "steps_done",
                    "seconds",
                    "final_train_loss",
                    "final_heldout_loss",
                    "resumed_at",
                    "preset",
                    "hardware",
                )
            },
            indent=0,
        )
    )
    _plot(hist, docs / "loss_curve.png")
    shipped = load_small_model(out, device=device)  # what users get: fp16 weights upcast to fp32
    n = len(shipped.classes)
    labels = torch.arange(n)
    scale = max(1, 128 // shipped.image_size)
    for seed in (0, 1):
        save_grid(generate(shipped, labels, steps=30, seed=seed).cpu(), docs / f"samples_seed{seed}.png", scale=scale)
    print(
        f"saved model to {out}; {hist['steps_done']} steps, {hist['seconds'] / 60:.1f} min, "
        f"final train loss {hist['final_train_loss']:.4f}, held-out {hist['final_heldout_loss']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
