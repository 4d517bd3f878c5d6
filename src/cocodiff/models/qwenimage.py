"""Qwen-Image (`QwenImageTransformer2DModel`): joint [text, image] attention with complex RoPE tables from
`pos_embed`. The text length sets the text RoPE offset and is checked against the text mask at the model's
top, so tokens are split at the first block's inputs (as diffusers' own plan does) and the rotary tables
at `pos_embed`'s outputs. The optional text padding mask is used whole: every rank rebuilds the joint key
mask in the order the exchange delivers tokens, with no collective."""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from .. import fused_qk
from ..layout import IMG, TXT
from ..modulation import ModulationPlan
from ..sharding import Gather, ModelPlan, Split, token_counts
from .joint import JointAttnProcessor, fuse_streams, refuse, refuse_attention_kwargs, rotate


def qwen_qk(engine, img, txt, norm, added_norm, freqs, send=None):
    """Qwen-Image Q/K: per-stream RMSNorm and complex RoPE (each stream its own table), then [text, image]; with
    `fuse_qk` on CUDA one compiled kernel (`fused_qk.qwen_qk_reference`)."""
    if freqs is not None and fuse_streams(engine, img, txt, norm, added_norm):
        img_freqs, txt_freqs = (torch.view_as_real(f) for f in freqs)
        args = (img, txt, norm.weight, added_norm.weight, norm.eps, img_freqs, txt_freqs)
        return fused_qk.run(fused_qk.qwen_qk_reference, *args, send=send, heads=img.shape[2])
    img, txt = norm(img), added_norm(txt)
    if freqs is not None:
        img_freqs, txt_freqs = freqs
        img = rotate(apply_rotary_emb_qwen, img, img_freqs, use_real=False)
        txt = rotate(apply_rotary_emb_qwen, txt, txt_freqs, use_real=False)
    return torch.cat([txt, img], dim=1)


def processor(engine, layer: str) -> JointAttnProcessor:
    return JointAttnProcessor(engine, layer, text_first=True, qk=qwen_qk, text_mask=True)


def _check_call(bound):
    refuse(bound, ("controlnet_block_samples",), "ControlNet residuals")
    refuse_attention_kwargs(bound, "attention_kwargs")
    mask = bound.get("encoder_hidden_states_mask")
    ehs = bound.get("encoder_hidden_states")
    if mask is not None and ehs is not None and tuple(mask.shape[:2]) != tuple(ehs.shape[:2]):
        raise ValueError(
            f"cocodiff: encoder_hidden_states_mask shape {tuple(mask.shape)} does not match "
            f"encoder_hidden_states {tuple(ehs.shape[:2])}"
        )


PLAN = ModelPlan(
    family="qwenimage",
    model_class=QwenImageTransformer2DModel,
    token_counts=token_counts(),
    split_inputs={
        "transformer_blocks.0": {"hidden_states": Split(IMG, 1), "encoder_hidden_states": Split(TXT, 1)},
        "transformer_blocks.*": {"modulate_index": Split(IMG, 1)},
    },
    split_outputs={"pos_embed": {0: Split(IMG, 0), 1: Split(TXT, 0)}},
    gather_outputs={"proj_out": Gather(IMG, 1)},
    processors={Attention: processor},
    text_mask_arg="encoder_hidden_states_mask",
    check_call=_check_call,
    # with zero_cond_t, img_mod takes the doubled temb and txt_mod its first half: not one input for all
    modulation=ModulationPlan(
        source="time_text_embed",
        linears=("transformer_blocks.*.img_mod.1", "transformer_blocks.*.txt_mod.1"),
        applies=lambda model: not getattr(model.config, "zero_cond_t", False),
    ),
)
