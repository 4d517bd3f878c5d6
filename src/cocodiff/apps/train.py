"""Training the shipped small DiT: rectified flow on crops of scikit-image's bundled sample images.

The data needs no download: each class is one image that scikit-image ships inside its wheel
(`skimage.data`), downscaled so that a 32x32 crop shows a meaningful piece of it (cells, stars, bricks).
The rightmost `holdout_frac` of every downscaled image is never seen in training; the quality harness
draws its evaluation crops from there (`heldout_crops`).

Objective (matches `smallmodel.generate`, which integrates with `FlowMatchEulerDiscreteScheduler`):
    x_t = (1 - t) * x0 + t * eps,   target v = eps - x0,   timestep input t in [0, 1]
with t drawn from a logit-normal distribution (as in SD3), AdamW, linear warm-up then cosine decay, and
an exponential moving average of the weights, which is what gets shipped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .smallmodel import SMALL_FLUX_CONFIG, ClassConditioner, SmallDiT, pack, velocity

# class name -> (skimage.data function, integer downscale factor). All ship in the scikit-image wheel.
SOURCES: dict[str, tuple[str, int]] = {
    "ihc": ("immunohistochemistry", 2),
    "retina": ("retina", 6),
    "hubble": ("hubble_deep_field", 3),
    "moon": ("moon", 2),
    "brick": ("brick", 2),
    "coffee": ("coffee", 3),
}
DEFAULT_CLASSES: tuple[str, ...] = tuple(SOURCES)


@dataclass(kw_only=True)
class TrainConfig:
    """Hyper-parameters of `train`; everything is recorded in the shipped model's metadata.

    Args:
        classes: class names, keys of `SOURCES` (the class index is the position in this tuple).
        image_size: crop side in pixels (patch 2 gives (image_size / 2)^2 tokens).
        steps: optimiser steps.
        batch_size: crops per step.
        lr, min_lr, warmup: AdamW learning rate, its cosine floor, and linear warm-up steps.
        ema_decay: decay of the shipped exponential moving average of the weights.
        holdout_frac: rightmost fraction of each downscaled image kept out of training.
        max_minutes: stop early (keeping the schedule) if wall time runs out; None = no limit.
    """

    classes: tuple[str, ...] = DEFAULT_CLASSES
    image_size: int = 32
    n_text_tokens: int = 4
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    seed: int = 0
    holdout_frac: float = 0.25
    log_every: int = 10
    eval_every: int = 250
    max_minutes: float | None = None
    model_config: dict = field(default_factory=lambda: dict(SMALL_FLUX_CONFIG))

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in SOURCES]
        if unknown:
            raise ValueError(f"TrainConfig.classes: unknown {unknown}; choose from {sorted(SOURCES)}")
        if self.image_size % 2:
            raise ValueError(f"TrainConfig.image_size={self.image_size} must be even (patch 2)")
        if not 0.0 < self.holdout_frac < 1.0:
            raise ValueError(f"TrainConfig.holdout_frac={self.holdout_frac} must be in (0, 1)")


def load_source(name: str) -> torch.Tensor:
    """Class `name` as a `(3, H, W)` float image in [-1, 1], downscaled by its factor in `SOURCES`."""
    import numpy as np
    import skimage.data
    from skimage.transform import rescale

    fn, factor = SOURCES[name]
    img = getattr(skimage.data, fn)()
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    img = rescale(img, 1.0 / factor, anti_aliasing=True, channel_axis=-1)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().clamp(0, 1) * 2 - 1


def split_holdout(img: torch.Tensor, frac: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) -> (train part, held-out part): the held-out part is the rightmost max(size, frac*W) columns."""
    W = img.shape[-1]
    cut = W - max(size, int(round(frac * W)))
    return img[..., :cut], img[..., cut:]


def heldout_crops(
    classes: list[str] | tuple[str, ...], *, image_size: int = 32, per_class: int = 4, holdout_frac: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic evaluation crops `(N, 3, S, S)` in [-1, 1] and labels `(N,)` from the held-out strips,
    `per_class` crops per class spread evenly down the strip (class-major order)."""
    images, labels = [], []
    for k, name in enumerate(classes):
        _, held = split_holdout(load_source(name), holdout_frac, image_size)
        H, W = held.shape[-2:]
        x0 = (W - image_size) // 2
        for j in range(per_class):
            y0 = round((H - image_size) * (j + 0.5) / per_class)
            images.append(held[:, y0 : y0 + image_size, x0 : x0 + image_size])
            labels.append(k)
    return torch.stack(images), torch.tensor(labels)


class CropSampler:
    """Random training crops (with horizontal flips) from the non-held-out part of each class image."""

    def __init__(self, classes, image_size: int, holdout_frac: float):
        self.size = image_size
        self.parts = [split_holdout(load_source(c), holdout_frac, image_size)[0] for c in classes]

    def sample(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images (B, 3, S, S), labels (B,)."""
        S = self.size
        labels = torch.randint(len(self.parts), (batch,), generator=g)
        out = torch.empty(batch, 3, S, S)
        for i, k in enumerate(labels.tolist()):
            img = self.parts[k]
            y = int(torch.randint(img.shape[1] - S + 1, (1,), generator=g))
            x = int(torch.randint(img.shape[2] - S + 1, (1,), generator=g))
            crop = img[:, y : y + S, x : x + S]
            out[i] = crop.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else crop
        return out, labels


def flow_loss(sm: SmallDiT, x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Rectified-flow MSE for images `x0` (B, 3, S, S), times `t` (B,), noise `eps` (B, 3, S, S)."""
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    v = velocity(sm, pack(xt, sm.patch), t, labels)  # (B, TOKENS, 3*p*p)
    return (v - pack(eps - x0, sm.patch)).pow(2).mean()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def build_model(cfg: TrainConfig) -> SmallDiT:
    """A freshly initialised `SmallDiT` for `cfg` (trained=False until `train` has run)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(cfg.seed)
    mc = cfg.model_config
    transformer = FluxTransformer2DModel(**mc)
    cond = ClassConditioner(len(cfg.classes), cfg.n_text_tokens, mc["joint_attention_dim"], mc["pooled_projection_dim"])
    torch.nn.init.normal_(cond.tokens.weight, std=0.5)
    torch.nn.init.normal_(cond.pooled.weight, std=0.5)
    return SmallDiT(transformer, cond, list(cfg.classes), cfg.image_size, 2, trained=False)


@torch.no_grad()
def heldout_loss(sm: SmallDiT, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 1234) -> float:
    """Flow loss on fixed held-out crops at fixed times (an evenly spaced t grid) and fixed noise."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(images.shape, generator=g)
    t = (torch.arange(images.shape[0]) + 0.5) / images.shape[0]
    t = t[torch.randperm(images.shape[0], generator=g)]
    return flow_loss(sm, images, labels, t, eps).item()


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print) -> tuple[SmallDiT, dict]:
    """Train a small DiT on CPU (or wherever the default device is) and return (EMA model, history).

    History: {"config", "train" [(step, mean loss over the last log_every steps)], "heldout" [(step,
    held-out loss of the EMA weights)], "steps_done", "seconds", "final_train_loss", "final_heldout_loss"}.
    """
    sm = build_model(cfg)
    sampler = CropSampler(cfg.classes, cfg.image_size, cfg.holdout_frac)
    ev_images, ev_labels = heldout_crops(
        cfg.classes, image_size=cfg.image_size, per_class=8, holdout_frac=cfg.holdout_frac
    )
    params = list(sm.transformer.parameters()) + list(sm.conditioner.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = SmallDiT(
        copy.deepcopy(sm.transformer).eval(),
        copy.deepcopy(sm.conditioner).eval(),
        sm.classes,
        sm.image_size,
        sm.patch,
        trained=False,
    )
    ema_params = list(ema.transformer.parameters()) + list(ema.conditioner.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    sm.transformer.train()
    g = torch.Generator().manual_seed(cfg.seed)
    hist: dict = {"config": asdict(cfg), "train": [], "heldout": []}
    window: list[float] = []
    start = time.perf_counter()
    step = 0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x0, labels = sampler.sample(cfg.batch_size, g)
        t = torch.sigmoid(torch.randn(cfg.batch_size, generator=g))  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=g)
        loss = flow_loss(sm, x0, labels, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        window.append(loss.item())
        elapsed = time.perf_counter() - start
        if (step + 1) % cfg.log_every == 0:
            hist["train"].append((step + 1, sum(window) / len(window)))
            window = []
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            hl = heldout_loss(ema, ev_images, ev_labels)
            hist["heldout"].append((step + 1, hl))
            log(
                f"step {step + 1}/{cfg.steps}  train {hist['train'][-1][1]:.4f}  heldout(ema) {hl:.4f}  "
                f"{elapsed / (step + 1):.2f} s/step  {elapsed / 60:.1f} min"
            )
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60:
            log(f"stopping at step {step + 1}: {cfg.max_minutes} min wall-time limit")
            break
    hist["steps_done"] = step + 1
    hist["seconds"] = time.perf_counter() - start
    if not hist["heldout"] or hist["heldout"][-1][0] != step + 1:
        hist["heldout"].append((step + 1, heldout_loss(ema, ev_images, ev_labels)))
    hist["final_train_loss"] = sum(loss for _, loss in hist["train"][-10:]) / max(1, len(hist["train"][-10:]))
    hist["final_heldout_loss"] = hist["heldout"][-1][1]
    ema.trained = True
    return ema, hist
