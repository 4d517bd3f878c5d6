"""Model configurations and input builders for the supported DiT families (images and video).

"full" configs are the published architectures (FLUX.1-dev, SD3.5-large, Qwen-Image, FLUX.2-dev, Wan2.1-T2V-14B,
HunyuanVideo) used with random weights for speed measurements (speed does not depend on values); "tiny" configs
keep every code path (joint attention, single blocks, RoPE, SD3.5's second attention, QK norms; Wan's self- and
cross-attention and I2V image context; HunyuanVideo's text refiner and masks) at a size a CPU test can afford.
Image families take a token grid (`make_inputs`), video families a (frames, rows, cols) grid
(`make_video_inputs`).
"""

from __future__ import annotations

import torch

FAMILIES = ("flux", "sd3", "qwenimage", "flux2")  # image families
VIDEO_FAMILIES = ("wan", "hunyuanvideo")

# Wan2.1-T2V-14B (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json: dim 5120 = 40 x 128, 40 layers, ffn
# HunyuanVideo with every code path at a CPU test's size
_HUNYUAN_TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=12,
    attention_head_dim=6,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 2, 2),
)

# 13824, UMT5 text dim 4096); the I2V and TI2V-5B configs below differ from it where they say
_WAN_14B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

# Wan at a CPU test's size: 12 heads divide 2, 3 and 4 ranks; head dim 6 gives Wan's RoPE 2 + 2 + 2 dims
_WAN_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=6,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)

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
    "wan": {
        "tiny": dict(_WAN_TINY),
        # Wan 2.1 I2V: image context tokens (CLIP features) join the cross-attention's keys (`add_k_proj`); the
        # text must then be 512 tokens (diffusers' processor hard-codes it)
        "tiny-i2v": dict(_WAN_TINY, in_channels=8, image_dim=8, added_kv_proj_dim=72),
        # Wan2.1-T2V-14B (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json: dim 5120 = 40 x 128, 40 layers,
        # ffn 13824, UMT5 text dim 4096); Wan 2.2 T2V/I2V-A14B use two experts of this size (`transformer_2`)
        "full": dict(_WAN_14B),
        # Wan2.1-I2V-14B-480P/720P: 36 input channels (noise, mask, image latent), CLIP image context 1280 -> 5120
        "full-i2v": dict(_WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
        # Wan2.2-TI2V-5B: dim 3072 = 24 x 128, 30 layers, ffn 14336, 48 latent channels (its VAE compresses
        # 16x16 spatially, 4x in time); the pipeline passes per-token timesteps (`expand_timesteps`)
        "full-ti2v-5b": dict(
            _WAN_14B, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30
        ),
    },
    "hunyuanvideo": {
        "tiny": dict(_HUNYUAN_TINY),
        # HunyuanVideo-I2V's "token_replace" conditioning: the first frame's tokens are modulated apart
        "tiny-token-replace": dict(
            _HUNYUAN_TINY, in_channels=8, guidance_embeds=False, image_condition_type="token_replace"
        ),
        # HunyuanVideo 13B (hunyuanvideo-community/HunyuanVideo transformer/config.json, = diffusers' defaults):
        # 24 heads x 128, 20 double + 40 single blocks, 2 refiner blocks, Llama text dim 4096, CLIP pooled 768
        "full": dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=20,
            num_single_layers=40,
            num_refiner_layers=2,
            mlp_ratio=4.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=4096,
            pooled_projection_dim=768,
            rope_theta=256.0,
            rope_axes_dim=(16, 56, 56),
        ),
    },
}

# text tokens of one prompt as the pipelines pass them (benchmarks): FLUX's T5 512, SD3's CLIP 77 + T5 256,
# Qwen-Image ~256, FLUX.2 512; WanPipeline's UMT5 512 (max_sequence_length), HunyuanVideoPipeline's Llama 256
TEXT_TOKENS = {"flux": 512, "sd3": 333, "qwenimage": 256, "flux2": 512, "wan": 512, "hunyuanvideo": 256}


def model_class(family: str):
    if family == "flux":
        from diffusers import FluxTransformer2DModel as cls
    elif family == "sd3":
        from diffusers import SD3Transformer2DModel as cls
    elif family == "qwenimage":
        from diffusers import QwenImageTransformer2DModel as cls
    elif family == "flux2":
        from diffusers import Flux2Transformer2DModel as cls
    elif family == "wan":
        from diffusers import WanTransformer3DModel as cls
    elif family == "hunyuanvideo":
        from diffusers import HunyuanVideoTransformer3DModel as cls
    else:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES + VIDEO_FAMILIES}")
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


# ---- video ------------------------------------------------------------------------------------------------
def video_latent(height: int, width: int, num_frames: int, *, spatial: int = 8, temporal: int = 4):
    """Latent (frames, height, width) of a video as Wan's and HunyuanVideo's VAEs make it: 8x spatially, 4x in
    time after the first frame (81 frames -> 21 latent frames). Wan 2.2 TI2V's VAE: `spatial=16`."""
    return (num_frames - 1) // temporal + 1, height // spatial, width // spatial


def patch_size(family: str, model) -> tuple[int, int, int]:
    """(frames, rows, cols) of one patch: one video token."""
    cfg = model.config
    if family == "wan":
        return tuple(cfg.patch_size)
    if family == "hunyuanvideo":
        return cfg.patch_size_t, cfg.patch_size, cfg.patch_size
    raise ValueError(f"unknown video family {family!r}; choose one of {VIDEO_FAMILIES}")


def video_tokens(family: str, model, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    """Token grid (frames, rows, cols) of a video of `num_frames` frames of `height` x `width` pixels;
    480p x 81 frames on Wan: (21, 30, 52) = 32,760 tokens, 720p: (21, 45, 80) = 75,600."""
    f, h, w = video_latent(height, width, num_frames)
    pt, ph, pw = patch_size(family, model)
    return f // pt, h // ph, w // pw


def make_video_inputs(
    family: str,
    model,
    *,
    frames: int,
    rows: int,
    cols: int,
    n_txt: int,
    batch: int = 1,
    dtype=None,
    device="cpu",
    seed: int = 1,
    text_mask: bool = False,
    per_token_timestep: bool = False,
    image_tokens: int = 257,
    extra: int = 0,
) -> dict:
    """Random inputs of one transformer call on a `frames` x `rows` x `cols` token grid with `n_txt` text tokens.

    Args:
        text_mask: HunyuanVideo: padded text, a different number of valid tokens per sample (else all valid).
        per_token_timestep: Wan: one timestep per video token, `(B, S)`, as Wan 2.2 TI2V's pipeline passes
            them (the first frame's tokens at 0, the conditioning image).
        image_tokens: Wan 2.1 I2V (`image_dim` set): image context tokens (CLIP: 257).
        extra: latent rows and columns beyond the patch grid (dropped by the strided patch embedding).
    """
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    pt, ph, pw = patch_size(family, model)
    latent = (batch, cfg.in_channels, frames * pt, rows * ph + extra, cols * pw + extra)
    t = torch.rand(batch, generator=g) * 1000
    if family == "wan":
        out = dict(hidden_states=rnd(*latent), encoder_hidden_states=rnd(batch, n_txt, cfg.text_dim))
        if per_token_timestep:
            ts = t[:, None].repeat(1, frames * rows * cols)
            ts[:, : rows * cols] = 0  # the first frame: the conditioning image, no noise
            out["timestep"] = ts.to(device)
        else:
            out["timestep"] = t.to(device)
        if cfg.image_dim is not None:
            out["encoder_hidden_states_image"] = rnd(batch, image_tokens, cfg.image_dim)
        return out
    mask = torch.ones(batch, n_txt, dtype=torch.long)
    if text_mask:
        for b in range(batch):
            mask[b, max(1, n_txt - 1 - 2 * b) :] = 0  # padded tail, different per sample
    out = dict(
        hidden_states=rnd(*latent),
        timestep=t.to(device=device, dtype=dtype),
        encoder_hidden_states=rnd(batch, n_txt, cfg.text_embed_dim),
        encoder_attention_mask=mask.to(device),
        pooled_projections=rnd(batch, cfg.pooled_projection_dim),
    )
    if cfg.guidance_embeds:
        out["guidance"] = torch.full((batch,), 6000.0, device=device, dtype=dtype)
    return out


TEXT_TOKENS_IMAGE = {"flux": 512, "sd3": 333, "qwenimage": 256, "flux2": 512}  # the pipelines' usual lengths


def pipeline_around(family: str, transformer, *, height: int, width: int, steps: int, n_txt: int, seed: int = 7):
    """A diffusers pipeline of an image family around `transformer` with no text encoders and no VAE (random
    prompt embeddings are given, the output is latents), and the keyword arguments of one call; CFG as the
    family's pipeline does it (SD3: batched, guidance 3.0; Qwen-Image: true CFG, two calls per step).

    Returns:
        (pipeline, call kwargs).
    """
    import inspect

    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        FluxPipeline,
        QwenImagePipeline,
        StableDiffusion3Pipeline,
    )

    cls = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline, "qwenimage": QwenImagePipeline}.get(
        family, Flux2Pipeline
    )
    if family not in FAMILIES:
        raise ValueError(f"no pipeline for {family!r}; image families: {FAMILIES}")
    none = {
        n: None for n in inspect.signature(cls.__init__).parameters if n not in ("self", "transformer", "scheduler")
    }
    pipe = cls(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    p = next(transformer.parameters())
    g = torch.Generator().manual_seed(seed)
    dim = transformer.config.joint_attention_dim

    def emb(*shape):
        return torch.randn(*shape, generator=g).to(device=p.device, dtype=p.dtype)

    kw = dict(height=height, width=width, num_inference_steps=steps, output_type="latent")
    if family == "flux":
        return pipe, dict(
            prompt_embeds=emb(1, n_txt, dim),
            pooled_prompt_embeds=emb(1, transformer.config.pooled_projection_dim),
            guidance_scale=3.5,
            **kw,
        )
    if family == "sd3":
        pdim = transformer.config.pooled_projection_dim
        return pipe, dict(
            prompt_embeds=emb(1, n_txt, dim),
            pooled_prompt_embeds=emb(1, pdim),
            negative_prompt_embeds=emb(1, n_txt, dim),
            negative_pooled_prompt_embeds=emb(1, pdim),
            guidance_scale=3.0,
            **kw,
        )
    if family == "qwenimage":
        mask = torch.ones(1, n_txt, dtype=torch.long, device=p.device)
        return pipe, dict(
            prompt_embeds=emb(1, n_txt, dim),
            prompt_embeds_mask=mask,
            negative_prompt_embeds=emb(1, n_txt, dim),
            negative_prompt_embeds_mask=mask,
            true_cfg_scale=4.0,
            **kw,
        )
    return pipe, dict(prompt_embeds=emb(1, n_txt, dim), **kw)
