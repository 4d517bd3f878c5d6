"""Training cocodiff's small DiTs: rectified flow on crops of scikit-image's bundled sample images.

The data needs no download: each class is one image that scikit-image ships inside its wheel
(`skimage.data`), optionally downscaled so that a crop shows a meaningful piece of it (cells, stars, bricks).
The rightmost `holdout_frac` of every image is never seen in training; the quality harness draws its
evaluation crops from there (`heldout_crops`).

Two models are trained with this code (`PRESETS`): "small" (32x32 crops of downscaled images, 256 tokens,
CPU) and "flux128" (128x128 crops at full resolution, 4096 tokens as FLUX.1 has at 1024^2, one GPU in bf16).

Objective (matches `smallmodel.generate`, which integrates with `FlowMatchEulerDiscreteScheduler`):
    x_t = (1 - t) * x0 + t * eps,   target v = eps - x0,   timestep input t in [0, 1]
with t drawn from a logit-normal distribution (as in SD3), AdamW, linear warm-up then cosine decay, and
an exponential moving average of the weights, which is what gets shipped. With `checkpoint` set, the whole
training state (weights, EMA, optimiser, random generators, history) is saved every `checkpoint_every` steps
and a later call with the same config resumes from it, bit for bit as if it had not stopped.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .smallmodel import FLUX128_CONFIG, SMALL_FLUX_CONFIG, ClassConditioner, SmallDiT, pack, velocity

# class name -> (skimage.data function, the small model's integer downscale factor). All ship in the
# scikit-image wheel. `TrainConfig.downscale` overrides the factor per class (the flux128 model uses 1).
SOURCES: dict[str, tuple[str, int]] = {
    "ihc": ("immunohistochemistry", 2),
    "retina": ("retina", 6),
    "hubble": ("hubble_deep_field", 3),
    "moon": ("moon", 2),
    "brick": ("brick", 2),
    "coffee": ("coffee", 3),
    "grass": ("grass", 1),
    "gravel": ("gravel", 1),
    "astronaut": ("astronaut", 1),
    "camera": ("camera", 1),
    "rocket": ("rocket", 1),
    "chelsea": ("chelsea", 1),
}
DEFAULT_CLASSES: tuple[str, ...] = ("ihc", "retina", "hubble", "moon", "brick", "coffee")
FLUX128_CLASSES: tuple[str, ...] = tuple(SOURCES)
# full resolution, except the 1411 px fundus photograph (a 128 px crop of it at full size is mostly flat red)
FLUX128_DOWNSCALE: dict[str, int] = {name: 1 for name in SOURCES} | {"retina": 2}


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
        downscale: class -> integer downscale factor of its source image (missing classes: `SOURCES`' factor).
        device: where the model trains ("cpu", "cuda", "cuda:1").
        bf16: autocast the forward pass to bfloat16 (weights, optimiser and EMA stay fp32).
        checkpoint: file of the whole training state, written every `checkpoint_every` steps and at the end
            (atomically); when it exists, training resumes from it (its config must match this one).
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
    downscale: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    bf16: bool = False
    checkpoint: str | None = None
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        unknown = [c for c in self.classes if c not in SOURCES]
        if unknown:
            raise ValueError(f"TrainConfig.classes: unknown {unknown}; choose from {sorted(SOURCES)}")
        bad = {c: f for c, f in self.downscale.items() if c not in SOURCES or int(f) != f or f < 1}
        if bad:
            raise ValueError(f"TrainConfig.downscale {bad}: keys must be classes of SOURCES, factors integers >= 1")
        if self.image_size % 2:
            raise ValueError(f"TrainConfig.image_size={self.image_size} must be even (patch 2)")
        if not 0.0 < self.holdout_frac < 1.0:
            raise ValueError(f"TrainConfig.holdout_frac={self.holdout_frac} must be in (0, 1)")

    def factor(self, name: str) -> int:
        """The downscale factor of class `name`'s source image."""
        return int(self.downscale.get(name, SOURCES[name][1]))

    def factors(self) -> dict[str, int]:
        """Class -> downscale factor, for every class of the config."""
        return {c: self.factor(c) for c in self.classes}


# the fields of a checkpoint's config that may differ on resume (they do not change what is computed)
_RESUMABLE_CHANGES = ("max_minutes", "checkpoint", "checkpoint_every", "log_every", "device")


def load_source(name: str, factor: int | None = None) -> torch.Tensor:
    """Class `name` as a `(3, H, W)` float image in [-1, 1], downscaled by `factor` (default: its factor in
    `SOURCES`; 1 = full resolution)."""
    import numpy as np
    import skimage.data
    from skimage.transform import rescale

    fn, default = SOURCES[name]
    factor = default if factor is None else int(factor)
    img = getattr(skimage.data, fn)()
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    if factor != 1:
        img = rescale(img, 1.0 / factor, anti_aliasing=True, channel_axis=-1)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().clamp(0, 1) * 2 - 1


def split_holdout(img: torch.Tensor, frac: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) -> (train part, held-out part): the held-out part is the rightmost max(size, frac*W) columns."""
    W = img.shape[-1]
    cut = W - max(size, int(round(frac * W)))
    return img[..., :cut], img[..., cut:]


def heldout_crops(
    classes: list[str] | tuple[str, ...],
    *,
    image_size: int = 32,
    per_class: int = 4,
    holdout_frac: float = 0.25,
    downscale: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic evaluation crops `(N, 3, S, S)` in [-1, 1] and labels `(N,)` from the held-out strips,
    `per_class` crops per class spread evenly down the strip (class-major order). `downscale`: class ->
    factor, as the model was trained (`TrainConfig.downscale`; default: `SOURCES`' factors)."""
    downscale = downscale or {}
    images, labels = [], []
    for k, name in enumerate(classes):
        _, held = split_holdout(load_source(name, downscale.get(name)), holdout_frac, image_size)
        H, W = held.shape[-2:]
        x0 = (W - image_size) // 2
        for j in range(per_class):
            y0 = round((H - image_size) * (j + 0.5) / per_class)
            images.append(held[:, y0 : y0 + image_size, x0 : x0 + image_size])
            labels.append(k)
    return torch.stack(images), torch.tensor(labels)


class CropSampler:
    """Random training crops (with horizontal flips) from the non-held-out part of each class image.

    The images live on `device`; the crop positions come from a CPU generator (a few numbers per crop), so a
    run draws the same crops on any device."""

    def __init__(self, classes, image_size: int, holdout_frac: float, *, downscale=None, device="cpu"):
        self.size = image_size
        downscale = downscale or {}
        self.parts = [
            split_holdout(load_source(c, downscale.get(c)), holdout_frac, image_size)[0].to(device) for c in classes
        ]
        self.device = torch.device(device)

    def sample(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images (B, 3, S, S), labels (B,), both on the sampler's device."""
        S = self.size
        labels = torch.randint(len(self.parts), (batch,), generator=g)
        crops = []
        for k in labels.tolist():
            img = self.parts[k]
            y = int(torch.randint(img.shape[1] - S + 1, (1,), generator=g))
            x = int(torch.randint(img.shape[2] - S + 1, (1,), generator=g))
            crop = img[:, y : y + S, x : x + S]
            crops.append(crop.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else crop)
        return torch.stack(crops), labels.to(self.device)


def flow_loss(sm: SmallDiT, x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Rectified-flow MSE (fp32) for images `x0` (B, 3, S, S), times `t` (B,), noise `eps` (B, 3, S, S)."""
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    v = velocity(sm, pack(xt, sm.patch), t, labels)  # (B, TOKENS, 3*p*p)
    return (v.float() - pack(eps - x0, sm.patch)).pow(2).mean()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def build_model(cfg: TrainConfig) -> SmallDiT:
    """A freshly initialised `SmallDiT` for `cfg` (trained=False until `train` has run), on the CPU."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(cfg.seed)
    mc = cfg.model_config
    transformer = FluxTransformer2DModel(**mc)
    cond = ClassConditioner(len(cfg.classes), cfg.n_text_tokens, mc["joint_attention_dim"], mc["pooled_projection_dim"])
    torch.nn.init.normal_(cond.tokens.weight, std=0.5)
    torch.nn.init.normal_(cond.pooled.weight, std=0.5)
    return SmallDiT(transformer, cond, list(cfg.classes), cfg.image_size, 2, trained=False)


@torch.no_grad()
def heldout_loss(
    sm: SmallDiT, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 1234, batch: int = 32
) -> float:
    """Flow loss on fixed held-out crops at fixed times (an evenly spaced t grid) and fixed noise (drawn on the
    CPU, so the figure does not depend on the device), evaluated in chunks of `batch` crops."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(images.shape, generator=g)
    t = (torch.arange(images.shape[0]) + 0.5) / images.shape[0]
    t = t[torch.randperm(images.shape[0], generator=g)]
    dev = sm.device
    total = 0.0
    for i in range(0, images.shape[0], batch):
        sl = slice(i, i + batch)
        n = images[sl].shape[0]
        loss = flow_loss(sm, images[sl].to(dev), labels[sl].to(dev), t[sl].to(dev), eps[sl].to(dev))
        total += loss.item() * n
    return total / images.shape[0]


def _config_mismatch(saved: dict, cfg: TrainConfig) -> list[str]:
    now = asdict(cfg)
    keys = (set(saved) | set(now)) - set(_RESUMABLE_CHANGES)
    diff = sorted(k for k in keys if _jsonish(saved.get(k)) != _jsonish(now.get(k)))
    if torch.device(saved.get("device", "cpu")).type != torch.device(cfg.device).type:
        diff.append("device type")  # the noise generator lives on the device (another GPU index is fine)
    return diff


def _jsonish(x):
    """Tuples and lists compare equal (a config read back from a checkpoint has lists)."""
    if isinstance(x, (list, tuple)):
        return [_jsonish(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonish(v) for k, v in x.items()}
    return x


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a call killed mid-save leaves the previous checkpoint


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print) -> tuple[SmallDiT, dict]:
    """Train a small DiT on `cfg.device` and return (EMA model, history), both on that device.

    History: {"config", "train" [(step, mean loss over the last log_every steps)], "heldout" [(step,
    held-out loss of the EMA weights)], "steps_done", "seconds" (wall time of all calls, resumed ones
    included), "final_train_loss", "final_heldout_loss", "resumed_at" [steps where a call resumed]}.

    Raises:
        ValueError: `cfg.checkpoint` holds a run of another config (naming the fields that differ).
    """
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; inference and the tests stay fp32
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN's attention backward fails for this model on H200 (torch 2.11+cu130: "mha_graph.execute ...
        # is_good()", seen as CUBLAS_STATUS_EXECUTION_FAILED later); flash attention trains it
        torch.backends.cuda.enable_cudnn_sdp(False)
    sm = build_model(cfg)
    sm.transformer.to(device)
    sm.conditioner.to(device)
    sampler = CropSampler(cfg.classes, cfg.image_size, cfg.holdout_frac, downscale=cfg.factors(), device=device)
    ev_images, ev_labels = heldout_crops(
        cfg.classes,
        image_size=cfg.image_size,
        per_class=8,
        holdout_frac=cfg.holdout_frac,
        downscale=cfg.factors(),
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
    g = torch.Generator().manual_seed(cfg.seed)  # crops and times (CPU: the same data on every device)
    # noise: drawn where it is used (the CPU run keeps the one generator it always had)
    g_noise = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(cfg.seed + 1)
    hist: dict = {"config": asdict(cfg), "train": [], "heldout": [], "resumed_at": []}
    window: list[float] = []
    start_step, seconds_before = 0, 0.0
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        diff = _config_mismatch(state["hist"]["config"], cfg)
        if diff:
            raise ValueError(
                f"train: checkpoint {ckpt} holds a run with other {', '.join(diff)}; "
                "use the same config to resume it, or another --checkpoint path"
            )
        sm.transformer.load_state_dict(state["model"])
        sm.conditioner.load_state_dict(state["conditioner"])
        ema.transformer.load_state_dict(state["ema_model"])
        ema.conditioner.load_state_dict(state["ema_conditioner"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["g"])
        if g_noise is not g:
            g_noise.set_state(state["g_noise"])
        hist = state["hist"]
        window = [torch.tensor(w, device=device) for w in state["window"]]
        hist["config"] = asdict(cfg)
        start_step, seconds_before = state["step"], hist["seconds"]
        hist["resumed_at"].append(start_step)
        log(f"resumed from {ckpt} at step {start_step}")

    def save(step_done: int, elapsed: float) -> None:
        hist["seconds"] = seconds_before + elapsed
        state = {
            "step": step_done,
            "model": sm.transformer.state_dict(),
            "conditioner": sm.conditioner.state_dict(),
            "ema_model": ema.transformer.state_dict(),
            "ema_conditioner": ema.conditioner.state_dict(),
            "opt": opt.state_dict(),
            "g": g.get_state(),
            "g_noise": g_noise.get_state(),
            "hist": hist,
            "window": [float(w) for w in window],
        }
        _save_state(ckpt, state)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    start = time.perf_counter()
    step = start_step
    for step in range(start_step, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x0, labels = sampler.sample(cfg.batch_size, g)
        t = torch.sigmoid(torch.randn(cfg.batch_size, generator=g)).to(device)  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=g_noise, device=g_noise.device)
        with autocast:
            loss = flow_loss(sm, x0, labels, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        window.append(loss.detach())
        elapsed = time.perf_counter() - start
        if (step + 1) % cfg.log_every == 0:
            hist["train"].append((step + 1, torch.stack(window).mean().item()))
            window = []
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            hl = heldout_loss(ema, ev_images, ev_labels)
            hist["heldout"].append((step + 1, hl))
            done = step + 1 - start_step
            recent = hist["train"][-1][1] if hist["train"] else torch.stack(window).mean().item()
            log(
                f"step {step + 1}/{cfg.steps}  train {recent:.4f}  heldout(ema) {hl:.4f}  "
                f"{elapsed / done:.3f} s/step  {(seconds_before + elapsed) / 60:.1f} min"
            )
        if ckpt is not None and (step + 1) % cfg.checkpoint_every == 0:
            save(step + 1, elapsed)
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60:
            log(f"stopping at step {step + 1}: {cfg.max_minutes} min wall-time limit")
            break
    else:
        step = cfg.steps - 1 if cfg.steps > start_step else start_step - 1
    elapsed = time.perf_counter() - start
    hist["steps_done"] = step + 1
    if ckpt is not None:
        save(step + 1, elapsed)
    hist["seconds"] = seconds_before + elapsed
    if not hist["heldout"] or hist["heldout"][-1][0] != step + 1:
        hist["heldout"].append((step + 1, heldout_loss(ema, ev_images, ev_labels)))
    if window:  # the steps since the last logged mean
        hist["train"].append((step + 1, torch.stack(window).mean().item()))
    hist["final_train_loss"] = sum(loss for _, loss in hist["train"][-10:]) / max(1, len(hist["train"][-10:]))
    hist["final_heldout_loss"] = hist["heldout"][-1][1]
    ema.trained = True
    return ema, hist


# Training presets of the shipped models (`scripts/train_small.py --preset`): TrainConfig overrides.
PRESETS: dict[str, dict] = {
    "small": {},
    "flux128": dict(
        classes=FLUX128_CLASSES,
        downscale=FLUX128_DOWNSCALE,
        image_size=128,
        n_text_tokens=8,
        steps=6000,
        batch_size=32,
        lr=5e-4,
        min_lr=2e-5,
        warmup=200,
        ema_decay=0.999,
        eval_every=500,
        log_every=25,
        bf16=True,
        model_config=dict(FLUX128_CONFIG),
    ),
}
