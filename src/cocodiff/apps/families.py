"""Model configurations and input builders for the four supported DiT families.

"full" configs are the published architectures (FLUX.1-dev, SD3.5-large, Qwen-Image, FLUX.2-dev) used with
random weights for speed measurements (speed does not depend on values); "tiny" configs keep every code path
(joint attention, single blocks, RoPE, SD3.5's second attention, QK norms) at a size a CPU test can afford.
"""

from __future__ import annotations

import torch

FAMILIES = ("flux", "sd3", "qwenimage", "flux2")

CONFIGS: dict[str, dict[str, dict]] = {
    "flux": {
        "tiny": dict(
            patch_size=1,
            in_channels=8,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        ),
        # FLUX.1-dev
        "full": dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
    },
    "sd3": {
        "tiny": dict(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=16,
            caption_projection_dim=32,
            pooled_projection_dim=16,
            out_channels=4,
            pos_embed_max_size=32,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        # SD3.5-large (38 heads: the Ulysses degree must divide 38)
        "full": dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=38,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
    },
    "qwenimage": {
        "tiny": dict(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=16,
            axes_dims_rope=(2, 2, 4),
        ),
        # Qwen-Image (20B)
        "full": dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            axes_dims_rope=(16, 56, 56),
        ),
    },
    "flux2": {
        "tiny": dict(
            patch_size=1,
            in_channels=8,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=16,
            timestep_guidance_channels=16,
            axes_dims_rope=(2, 2, 2, 2),
            guidance_embeds=True,
        ),
        # FLUX.2-dev (32B)
        "full": dict(),
    },
}


def model_class(family: str):
    if family == "flux":
        from diffusers import FluxTransformer2DModel as cls
    elif family == "sd3":
        from diffusers import SD3Transformer2DModel as cls
    elif family == "qwenimage":
        from diffusers import QwenImageTransformer2DModel as cls
    elif family == "flux2":
        from diffusers import Flux2Transformer2DModel as cls
    else:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    return cls


def build_model(family: str, size: str = "tiny", *, dtype=torch.float32, device="cpu", seed: int = 0, **overrides):
    """A randomly initialised model of the family; the same seed gives the same weights on every rank."""
    cfg = dict(CONFIGS[family][size])
    cfg.update(overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(family)(**cfg)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def image_tokens(family: str, model, height: int, width: int) -> tuple[int, int]:
    """Token grid (rows, cols) of an image of `height` x `width` pixels (VAE factor 8, plus packing)."""
    if family in ("flux", "qwenimage"):
        return height // 16, width // 16  # 8x VAE, 2x2 packing
    if family == "flux2":
        return height // 16, width // 16
    if family == "sd3":
        p = model.config.patch_size
        return height // 8 // p, width // 8 // p
    raise ValueError(family)


def make_inputs(
    family: str,
    model,
    *,
    rows: int,
    cols: int,
    n_txt: int,
    batch: int = 1,
    dtype=None,
    device="cpu",
    seed: int = 1,
    text_mask: bool = False,
) -> dict:
    """Random inputs of one transformer call with a `rows` x `cols` token grid and `n_txt` text tokens."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    t = torch.rand(batch, generator=g).to(device=device, dtype=dtype)
    n_img = rows * cols
    if family == "flux":
        ids = torch.zeros(rows, cols, 3)
        ids[..., 1] = torch.arange(rows)[:, None]
        ids[..., 2] = torch.arange(cols)[None, :]
        out = dict(
            hidden_states=rnd(batch, n_img, cfg.in_channels),
            encoder_hidden_states=rnd(batch, n_txt, cfg.joint_attention_dim),
            pooled_projections=rnd(batch, cfg.pooled_projection_dim),
            timestep=t,
            img_ids=ids.reshape(n_img, 3).to(device=device, dtype=dtype),
            txt_ids=torch.zeros(n_txt, 3, device=device, dtype=dtype),
        )
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return out
    if family == "sd3":
        p = cfg.patch_size
        return dict(
            hidden_states=rnd(batch, cfg.in_channels, rows * p, cols * p),
            encoder_hidden_states=rnd(batch, n_txt, cfg.joint_attention_dim),
            pooled_projections=rnd(batch, cfg.pooled_projection_dim),
            timestep=t * 1000,
        )
    if family == "qwenimage":
        out = dict(
            hidden_states=rnd(batch, n_img, cfg.in_channels),
            encoder_hidden_states=rnd(batch, n_txt, cfg.joint_attention_dim),
            timestep=t,
            img_shapes=[[(1, rows, cols)]] * batch,
        )
        if text_mask:
            mask = torch.ones(batch, n_txt, dtype=torch.bool)
            for b in range(batch):
                mask[b, max(1, n_txt - 1 - b) :] = False  # padded tail, different per sample
            out["encoder_hidden_states_mask"] = mask.to(device)
        return out
    if family == "flux2":
        ids = torch.zeros(rows, cols, 4)
        ids[..., 1] = torch.arange(rows)[:, None]
        ids[..., 2] = torch.arange(cols)[None, :]
        txt_ids = torch.zeros(n_txt, 4)
        txt_ids[:, 3] = torch.arange(n_txt)
        out = dict(
            hidden_states=rnd(batch, n_img, cfg.in_channels),
            encoder_hidden_states=rnd(batch, n_txt, cfg.joint_attention_dim),
            timestep=t,
            img_ids=ids.reshape(n_img, 4).to(device=device, dtype=dtype),
            txt_ids=txt_ids.to(device=device, dtype=dtype),
        )
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 4.0, device=device, dtype=dtype)
        return out
    raise ValueError(f"unknown model family {family!r}")
