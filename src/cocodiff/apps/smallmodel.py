"""A small pixel-space FLUX.1-architecture DiT and its flow-matching sampler.

The transformer is diffusers' own `FluxTransformer2DModel` with a small config, so the demo and the
quality harness exercise exactly the sharding path of the big model (joint text+image attention, single
blocks, RoPE). Images are RGB in [-1, 1], packed into tokens of `patch x patch` pixels (3 * patch^2
channels). Conditioning is a class label turned into a few "text" tokens by a learned embedding
(`ClassConditioner`), fed as `encoder_hidden_states` and `pooled_projections`.

`generate` is a real denoising loop driven by diffusers' `FlowMatchEulerDiscreteScheduler`, the scheduler
FLUX and SD3 use. It works the same on a parallelised transformer: every rank runs the loop with the same
seed, so all ranks hold the same latents at every step.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ASSET_ROOT = Path(__file__).parent / "assets"
ASSET_DIR = ASSET_ROOT / "small_flux"
# the trained models cocodiff ships, by the name `--model` accepts: "small" (32x32 px, 256 tokens; the CPU
# default) and "flux128" (128x128 px, 4096 tokens: FLUX.1's sequence at 1024^2; meant for GPUs)
SHIPPED_MODELS: dict[str, Path] = {"small": ASSET_DIR, "flux128": ASSET_ROOT / "flux128"}

# A config small enough to train and run on CPU ranks; 4 heads divide over 1, 2 and 4 ranks.
SMALL_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=12,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)

# The 4096-token model (128x128 px, patch 2): the small architecture with 8 heads (they divide over 1, 2, 4 and 8
# ranks) and wider text/pooled inputs.
FLUX128_CONFIG = dict(SMALL_FLUX_CONFIG, num_attention_heads=8, joint_attention_dim=128, pooled_projection_dim=128)


def resolve_model(model: str | Path | None) -> Path | None:
    """A `--model` value as a folder: a name of `SHIPPED_MODELS` ("small", "flux128") is the shipped model's
    folder unless a folder of that name exists where it is run; anything else is taken as a path; None stays
    None (the default model).

    Raises:
        FileNotFoundError: a shipped name whose weights this installation lacks.
    """
    if model is None:
        return None
    path = Path(model).expanduser()
    if isinstance(model, str) and model in SHIPPED_MODELS and not path.exists():
        path = SHIPPED_MODELS[model]
        if not (path / "cocodiff_small.json").is_file():
            raise FileNotFoundError(
                f"--model {model}: the shipped model's weights are missing from {path}; reinstall cocodiff "
                "(pip install -e .) or pass a model folder"
            )
    return path


class ClassConditioner(nn.Module):
    """Class label -> (`encoder_hidden_states` (B, N_TOKENS, joint_dim), `pooled_projections` (B, pooled_dim))."""

    def __init__(self, num_classes: int, n_tokens: int, joint_dim: int, pooled_dim: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.tokens = nn.Embedding(num_classes, n_tokens * joint_dim)
        self.pooled = nn.Embedding(num_classes, pooled_dim)
        self.joint_dim = joint_dim

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ehs = self.tokens(labels).view(labels.shape[0], self.n_tokens, self.joint_dim)
        return ehs, self.pooled(labels)


@dataclass
class SmallDiT:
    """A small model ready to sample: transformer, class conditioner, class names and image geometry.
    `trained` is False for random weights (reports say so); `meta` holds the training record."""

    transformer: nn.Module
    conditioner: ClassConditioner
    classes: list[str]
    image_size: int
    patch: int
    trained: bool
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.conditioner.parameters()).device


def pack(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p), tokens row-major."""
    B, C, H, W = images.shape
    x = images.view(B, C, H // patch, patch, W // patch, patch)
    # (B, C, ROWS, p, COLS, p) -> (B, ROWS, COLS, C, p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpack(tokens: torch.Tensor, patch: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `pack`."""
    B = tokens.shape[0]
    rows, cols = height // patch, width // patch
    x = tokens.view(B, rows, cols, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, channels, height, width)


def image_ids(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX position ids (rows*cols, 3): (0, row, col)."""
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def random_small_model(
    *,
    seed: int = 0,
    classes: list[str] | None = None,
    image_size: int = 32,
    device="cpu",
    config: dict | None = None,
    n_text_tokens: int = 4,
) -> SmallDiT:
    """The small architecture (or `config`, e.g. `FLUX128_CONFIG`) with random weights (clearly not a trained
    model: `trained=False`)."""
    from diffusers import FluxTransformer2DModel

    classes = classes or ["random"]
    torch.manual_seed(seed)
    cfg = config or SMALL_FLUX_CONFIG
    transformer = FluxTransformer2DModel(**cfg).to(device).eval()
    cond = ClassConditioner(len(classes), n_text_tokens, cfg["joint_attention_dim"], cfg["pooled_projection_dim"])
    cond = cond.to(device)
    return SmallDiT(transformer, cond.eval(), list(classes), image_size, 2, trained=False)


def load_small_model(path: str | Path | None = None, *, device="cpu", dtype=torch.float32) -> SmallDiT:
    """Load the shipped small model (default) or a directory saved the same way (`save_small_model`).

    Weights stored in fp16 are upcast to `dtype` (fp32 by default).

    Raises:
        FileNotFoundError: naming the path when it holds no model.
        ValueError: naming the path when a file of the model is unreadable or does not match the metadata.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    path = resolve_model(path) if path is not None else ASSET_DIR
    meta_file = path / "cocodiff_small.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"no cocodiff small model at {path} (missing {meta_file.name})")
    for needed in (path / "transformer" / "config.json", path / "conditioner.safetensors"):
        if not needed.is_file():
            raise FileNotFoundError(f"incomplete cocodiff small model at {path} (missing {needed.relative_to(path)})")
    from ..checkpoint import inspect_checkpoint

    cfg = inspect_checkpoint(path / "transformer")  # one clear line for a foreign class or a newer diffusers
    if cfg["_class_name"] != "FluxTransformer2DModel":
        raise ValueError(
            f"{path / 'transformer'} holds a {cfg['_class_name']}; the small model is a FluxTransformer2DModel"
        )
    try:
        meta = json.loads(meta_file.read_text())
        classes, n_tokens = list(meta["classes"]), int(meta["n_text_tokens"])
        image_size, patch = int(meta["image_size"]), int(meta["patch"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupt cocodiff small model metadata {meta_file}: {exc!r}") from None
    try:
        transformer = FluxTransformer2DModel.from_pretrained(
            path / "transformer", torch_dtype=dtype, low_cpu_mem_usage=False
        )
        cfg = transformer.config
        cond = ClassConditioner(len(classes), n_tokens, cfg.joint_attention_dim, cfg.pooled_projection_dim)
        cond.load_state_dict(load_file(str(path / "conditioner.safetensors")))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"corrupt cocodiff small model at {path}: {first}") from None
    transformer = transformer.to(device).eval()
    cond = cond.to(device=device, dtype=dtype).eval()
    return SmallDiT(transformer, cond, classes, image_size, patch, trained=True, meta=meta)


def save_small_model(sm: SmallDiT, path: str | Path, *, meta: dict, dtype=torch.float16) -> Path:
    """Save `sm` in the layout `load_small_model` reads: `transformer/` (diffusers, safetensors),
    `conditioner.safetensors` and `cocodiff_small.json` (`meta` plus classes, image_size, patch, n_text_tokens).
    Weights are stored in `dtype` (fp16 keeps the shipped files small); `load_small_model` upcasts."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    transformer = copy.deepcopy(sm.transformer)
    for p in transformer.parameters():  # (not .to(dtype): diffusers warns about casting a loaded model)
        p.data = p.data.to(dtype)
    transformer.save_pretrained(path / "transformer", safe_serialization=True)
    save_file(
        {k: v.detach().to(dtype).contiguous() for k, v in sm.conditioner.state_dict().items()},
        str(path / "conditioner.safetensors"),
    )
    full = dict(
        meta, classes=list(sm.classes), image_size=sm.image_size, patch=sm.patch, n_text_tokens=sm.conditioner.n_tokens
    )
    (path / "cocodiff_small.json").write_text(json.dumps(full, indent=1))
    return path


def default_model(device="cpu") -> SmallDiT:
    """The shipped trained model if present, else the random-weight architecture."""
    if (ASSET_DIR / "cocodiff_small.json").is_file():
        return load_small_model(device=device)
    return random_small_model(device=device)


def follow(transformer, scheduler) -> None:
    """A parallelised transformer's step context follows this sampling loop's scheduler (V-Major needs it)."""
    engine = getattr(transformer, "cocodiff", None)
    if engine is not None:
        engine.steps.follow(scheduler)


def make_scheduler(steps: int):
    """FLUX's Euler flow-matching scheduler (shift 1): sigmas from 1 to ~0 over `steps`, timesteps = 1000 sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(steps)
    return sched


def velocity(sm: SmallDiT, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One transformer call: predicted flow velocity (noise - data) for tokens `x` at times `t` in [0, 1]."""
    rows = cols = sm.image_size // sm.patch
    ehs, pooled = sm.conditioner(labels)
    ids = image_ids(rows, cols, device=x.device, dtype=x.dtype)
    txt_ids = torch.zeros(ehs.shape[1], 3, device=x.device, dtype=x.dtype)
    return sm.transformer(
        hidden_states=x,
        encoder_hidden_states=ehs,
        pooled_projections=pooled,
        timestep=t,
        img_ids=ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]


@torch.no_grad()
def generate(
    sm: SmallDiT,
    labels: torch.Tensor,
    *,
    steps: int = 20,
    seed: int = 0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample images `(B, 3, H, W)` in [-1, 1] for class `labels` with an Euler flow-matching loop.

    The noise comes from a CPU generator seeded with `seed`, so every rank starts from the same latents.
    `callback(step_index, tokens)` runs after each step (progress bars, trajectory probes).
    """
    device = sm.device
    dtype = next(sm.transformer.parameters()).dtype
    B = labels.shape[0]
    size, p = sm.image_size, sm.patch
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, (size // p) ** 2, 3 * p * p, generator=g).to(device=device, dtype=dtype)
    sched = make_scheduler(steps)
    follow(sm.transformer, sched)
    labels = labels.to(device)
    for i, t in enumerate(sched.timesteps):
        tt = (t / 1000).expand(B).to(device=device, dtype=dtype)
        v = velocity(sm, x, tt, labels)
        x = sched.step(v, t, x, return_dict=False)[0]
        if callback is not None:
            callback(i, x)
    return unpack(x.float(), p, size, size).clamp(-1, 1)


@torch.no_grad()
def inpaint(
    sm: SmallDiT,
    images: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 20,
    seed: int = 0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Fill the unknown pixels of `images` (B, 3, H, W) in [-1, 1], RePaint-style for flow matching.

    Before every step at noise level sigma, the known pixels (`known` (B, 1, H, W), 1 = keep) are replaced by
    the ground truth noised to that level, `(1 - sigma) * x0 + sigma * noise`, with the same noise the loop
    started from; the model denoises the rest. A row with an all-zero mask is plain generation, bit for bit
    the same arithmetic as `generate` with the same seed. Returns `(B, 3, H, W)` in [-1, 1] with the known
    pixels equal to the input.
    """
    device = sm.device
    dtype = next(sm.transformer.parameters()).dtype
    B = labels.shape[0]
    size, p = sm.image_size, sm.patch
    if images.shape != (B, 3, size, size) or known.shape != (B, 1, size, size):
        raise ValueError(
            f"inpaint: expected images (B, 3, {size}, {size}) and known (B, 1, {size}, {size}) for "
            f"B={B}, got {tuple(images.shape)} and {tuple(known.shape)}"
        )
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(B, (size // p) ** 2, 3 * p * p, generator=g).to(device=device, dtype=dtype)
    x0 = pack(images.to(device=device, dtype=dtype), p)  # (B, TOKENS, 3*p*p)
    m = pack(known.to(device=device, dtype=dtype).expand(B, 3, size, size), p)  # (B, TOKENS, 3*p*p)
    x = noise
    sched = make_scheduler(steps)
    follow(sm.transformer, sched)
    labels = labels.to(device)
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i].item()
        x = m * ((1 - sigma) * x0 + sigma * noise) + (1 - m) * x
        tt = (t / 1000).expand(B).to(device=device, dtype=dtype)
        v = velocity(sm, x, tt, labels)
        x = sched.step(v, t, x, return_dict=False)[0]
        if callback is not None:
            callback(i, x)
    x = m * x0 + (1 - m) * x
    return unpack(x.float(), p, size, size).clamp(-1, 1)
