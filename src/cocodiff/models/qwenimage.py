"""Qwen-Image (`QwenImageTransformer2DModel`): joint [text, image] attention with complex RoPE tables from
`pos_embed`. The text length sets the text RoPE offset and is checked against the text mask at the model's
top, so tokens are split at the first block's inputs (as diffusers' own plan does) and the rotary tables
at `pos_embed`'s outputs. The optional text padding mask is used whole: every rank rebuilds the joint key
mask in the order the exchange delivers tokens, with no collective."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_qwenimage import (
    QwenImageTransformerBlock,
    apply_rotary_emb_qwen,
)

from ..sharding import Gather, ModelPlan, Split
from ..ulysses import IMG, TXT, UlyssesEngine
from ._common import refuse, refuse_attention_kwargs, rotate


class QwenUlyssesProcessor:
    """Sharded replacement of diffusers' `QwenDoubleStreamAttnProcessor2_0`."""

    def __init__(self, engine: UlyssesEngine):
        self.engine = engine

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        if encoder_hidden_states is None:
            raise ValueError("cocodiff: Qwen-Image attention requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("cocodiff: Qwen-Image takes encoder_hidden_states_mask, not attention_mask")
        d = attn.inner_dim // attn.heads

        img_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)

        def project(proj, added_proj, norm=None, added_norm=None, rope=False):
            # (B, L, H * D) -> (B, L, H, D), local order [text, image]
            i = proj(hidden_states).unflatten(-1, (-1, d))
            t = added_proj(encoder_hidden_states).unflatten(-1, (-1, d))
            if norm is not None:
                i = norm(i)
            if added_norm is not None:
                t = added_norm(t)
            if rope and image_rotary_emb is not None:
                i = rotate(apply_rotary_emb_qwen, i, img_freqs, use_real=False)
                t = rotate(apply_rotary_emb_qwen, t, txt_freqs, use_real=False)
            return torch.cat([t, i], dim=1)

        key_mask = None
        if encoder_hidden_states_mask is not None:
            key_mask = self.engine.joint_key_mask(encoder_hidden_states_mask, (TXT, IMG))
        out = self.engine.attend(
            project_v=lambda: project(attn.to_v, attn.add_v_proj),
            project_q=lambda: project(attn.to_q, attn.add_q_proj, attn.norm_q, attn.norm_added_q, rope=True),
            project_k=lambda: project(attn.to_k, attn.add_k_proj, attn.norm_k, attn.norm_added_k, rope=True),
            kinds=(TXT, IMG),
            key_mask=key_mask,
            out_dtype=hidden_states.dtype,
        )
        n_txt = encoder_hidden_states.shape[1]
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out


def _token_counts(model, bound):
    return bound["hidden_states"].shape[1], bound["encoder_hidden_states"].shape[1]


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


def _attention_modules(model):
    return [(f"{n}.attn", m.attn) for n, m in model.named_modules() if isinstance(m, QwenImageTransformerBlock)]


def _install(model, engine):
    mods = _attention_modules(model)
    for _, m in mods:
        if not isinstance(m, Attention):
            raise TypeError(f"cocodiff: unexpected Qwen-Image attention class {type(m).__name__}")
        m.set_processor(QwenUlyssesProcessor(engine))
    return len(mods)


PLAN = ModelPlan(
    family="qwenimage",
    class_name="QwenImageTransformer2DModel",
    token_counts=_token_counts,
    split_inputs={
        "transformer_blocks.0": {"hidden_states": Split(IMG, 1), "encoder_hidden_states": Split(TXT, 1)},
        "transformer_blocks.*": {"modulate_index": Split(IMG, 1)},
    },
    split_outputs={"pos_embed": {0: Split(IMG, 0), 1: Split(TXT, 0)}},
    gather_outputs={"proj_out": Gather(IMG, 1)},
    install_processors=_install,
    attention_modules=_attention_modules,
    check_call=_check_call,
)
