"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): text-to-video and image-to-video, where sequences are longest.

Every block has a self-attention over the video tokens (`attn1`: RMSNorm over all heads before the head
split, 3-D RoPE) and a cross-attention from the video tokens to the text (`attn2`; Wan 2.1 I2V adds image
context tokens to its keys). Only the self-attention needs an exchange: the video tokens are split after the
patch embedding (at the first block's input, as diffusers' own plan does) with the rotary tables split
alongside (`rope`'s outputs), and gathered after `proj_out`, before unpatchify. The cross-attention keeps
diffusers' processor and runs on each rank's video tokens against the whole text, with no exchange.
Wan 2.2 TI2V's per-token timesteps (`timestep` of shape (B, S)) are split with their tokens before the time
embedding, so every per-token modulation (blocks and output norm) is local."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention, WanTimeTextImageEmbedding

from .. import fused_qk
from ..compiled import opaque_to_compile
from ..layout import IMG
from ..schedule import attend
from ..sharding import Gather, ModelPlan, Split
from .joint import matching, refuse_attention_kwargs, require, rotate


def apply_wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers' `WanAttnProcessor` RoPE (a local function there): pairs (x[2i], x[2i+1]) rotated;
    `x` `(B, L, H, D)`, tables `(1, L, 1, D)` with each frequency repeated for the pair."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelfAttnProcessor:
    """Sharded replacement of diffusers' `WanAttnProcessor` on the self-attentions (`attn1`)."""

    def __init__(self, engine, layer: str):
        self.engine = engine
        self.layer = layer

    @opaque_to_compile
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "cocodiff: Wan self-attention takes no encoder_hidden_states or attention_mask under sequence "
                "parallelism"
            )
        H = attn.heads

        def project_qk(send, proj, norm):
            x = proj(hidden_states)  # (B, L, H * D)
            if self.engine.config.fuse_qk and fused_qk.fused_device(x) and x.numel() and fused_qk.fusable_norm(norm):
                cos, sin = (t[0, :, 0] for t in rotary_emb) if rotary_emb is not None else (None, None)
                args = (x, norm.weight, norm.eps, H, cos, sin)
                return fused_qk.run(fused_qk.heads_norm_rope_reference, *args, send=send, heads=H)
            x = norm(x).unflatten(2, (H, -1))  # (B, L, H * D) -> (B, L, H, D)
            return x if rotary_emb is None else rotate(apply_wan_rope, x, *rotary_emb)

        out = attend(
            self.engine,
            layer=self.layer,
            project_v=lambda send: attn.to_v(hidden_states).unflatten(2, (H, -1)),
            project_q=lambda send: project_qk(send, attn.to_q, attn.norm_q),
            project_k=lambda send: project_qk(send, attn.to_k, attn.norm_k),
            kinds=(IMG,),
            out_dtype=hidden_states.dtype,
        )
        return attn.to_out[1](attn.to_out[0](out))


def _is_self_attention(attn) -> bool:
    return not attn.is_cross_attention


WanSelfAttention = matching(WanAttention, _is_self_attention, "WanSelfAttention")


def _world(model) -> int:
    return model.cocodiff.world


def _token_counts(model, bound):
    """(video tokens, 0): the text is not split (the cross-attention reads all of it on every rank)."""
    hs = bound["hidden_states"]
    if hs.dim() != 5:
        raise ValueError(f"cocodiff: Wan hidden_states must be (B, C, F, H, W), got shape {tuple(hs.shape)}")
    p_t, p_h, p_w = model.config.patch_size
    f, h, w = hs.shape[-3:]
    n_img = (f // p_t) * (h // p_h) * (w // p_w)  # as the model's strided patch embedding and its RoPE
    t = bound.get("timestep")
    if isinstance(t, torch.Tensor) and t.dim() == 2:
        if t.shape[1] != n_img:
            raise ValueError(
                f"cocodiff: Wan per-token timestep has shape {tuple(t.shape)}, but the latent has {n_img} video "
                f"tokens; pass one timestep per video token, (B, {n_img}), or one per sample, (B,)"
            )
        if n_img < _world(model):
            raise ValueError(
                f"cocodiff: Wan per-token timestep needs at least one video token per rank ({n_img} tokens, "
                f"{_world(model)} ranks); use fewer ranks or a larger latent"
            )
    return n_img, 0


def _split_timesteps(engine):
    """Pre-hook of the time embedding: per-token timesteps `(B * S,)` (with `timestep_seq_len=S`) become
    this rank's `(B * L,)` with `timestep_seq_len=L`, so `temb` and the modulation are per local token."""

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        seq = kwargs.get("timestep_seq_len")
        if seq is None:
            return None
        args = list(args)
        t = args[0] if args else kwargs["timestep"]
        local = engine.split(t.unflatten(0, (-1, seq)), IMG, 1)  # (B * S,) -> (B, S) -> (B, L)
        if args:
            args[0] = local.reshape(-1)
        else:
            kwargs["timestep"] = local.reshape(-1)
        kwargs["timestep_seq_len"] = local.shape[1]
        return tuple(args), kwargs

    return hook


def _install(model, engine) -> None:
    for m in model.modules():
        if isinstance(m, WanTimeTextImageEmbedding):
            m.register_forward_pre_hook(_split_timesteps(engine), with_kwargs=True)


def _check_call(bound):
    refuse_attention_kwargs(bound, "attention_kwargs")
    require(bound, ("hidden_states", "timestep", "encoder_hidden_states"), "Wan")


PLAN = ModelPlan(
    family="wan",
    model_class=WanTransformer3DModel,
    token_counts=_token_counts,
    split_inputs={"blocks.0": {"hidden_states": Split(IMG, 1)}},  # (B, S, C) after the patch embedding
    split_outputs={"rope": {0: Split(IMG, 1), 1: Split(IMG, 1)}},  # (cos, sin), each (1, S, 1, D)
    gather_outputs={"proj_out": Gather(IMG, 1)},
    processors={WanSelfAttention: WanSelfAttnProcessor},
    install=_install,
    check_call=_check_call,
)
