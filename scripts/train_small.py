"""Train the small FLUX-architecture DiT shipped with cocodiff (CPU, one thread by default).

    python scripts/train_small.py --steps 2000 --batch-size 16 --max-minutes 42

Writes the model to src/cocodiff/assets/small_flux/ (fp16 safetensors; `load_small_model` upcasts) and the
evidence to docs/smallmodel/: loss_curve.json, loss_curve.png, samples.png. `--measure N` runs N steps
only, prints the speed and writes nothing.
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
    ax.set_title("cocodiff small FLUX: training loss (CPU, 1 thread)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from cocodiff.apps.demo import save_grid
    from cocodiff.apps.smallmodel import ASSET_DIR, generate, load_small_model, save_small_model
    from cocodiff.apps.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", type=int, default=0, help="run this many steps, print speed, save nothing")
    ap.add_argument("--out", default=str(ASSET_DIR))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "smallmodel"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.measure:
        cfg = TrainConfig(
            steps=args.measure,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            eval_every=args.measure,
            warmup=min(100, args.measure),
        )
        t0 = time.perf_counter()
        _, hist = train(cfg)
        print(
            f"{hist['steps_done']} steps in {hist['seconds']:.1f}s: {hist['seconds'] / hist['steps_done']:.3f} s/step "
            f"(total incl. data {time.perf_counter() - t0:.1f}s)"
        )
        return 0

    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_minutes=args.max_minutes
    )
    started = datetime.datetime.now(datetime.UTC)
    sm, hist = train(cfg)
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
        "hardware": f"{platform.processor() or platform.machine()}, torch.get_num_threads()={torch.get_num_threads()}",
        "torch": torch.__version__,
        "data": "skimage.data sample images (class = source image), random 32x32 crops with h-flip, "
        "rightmost holdout_frac of each image held out",
        "train_config": {k: v for k, v in hist["config"].items() if k != "model_config"},
        "weights": "EMA, stored fp16",
    }
    save_small_model(sm, args.out, meta=meta)
    docs = Path(args.docs)
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
                )
            },
            indent=0,
        )
    )
    _plot(hist, docs / "loss_curve.png")
    shipped = load_small_model(args.out)  # what users get: fp16 weights upcast to fp32
    n = len(shipped.classes)
    labels = torch.arange(n).repeat(2)
    save_grid(generate(shipped, labels[:n], steps=30, seed=0), docs / "samples_seed0.png")
    save_grid(generate(shipped, labels[:n], steps=30, seed=1), docs / "samples_seed1.png")
    print(
        f"saved model to {args.out}; {hist['steps_done']} steps, {hist['seconds'] / 60:.1f} min, "
        f"final train loss {hist['final_train_loss']:.4f}, held-out {hist['final_heldout_loss']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
