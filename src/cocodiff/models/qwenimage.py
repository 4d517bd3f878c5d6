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

        def project_v():
            # (B, L, H * D) -> (B, L, H, D), order [text, image]
            tv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, d))
            iv = attn.to_v(hidden_states).unflatten(-1, (-1, d))
            return torch.cat([tv, iv], dim=1)

        def project_qk():
            iq = attn.to_q(hidden_states).unflatten(-1, (-1, d))
            ik = attn.to_k(hidden_states).unflatten(-1, (-1, d))
            tq = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, d))
            tk = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, d))
            if attn.norm_q is not None:
                iq = attn.norm_q(iq)
            if attn.norm_k is not None:
                ik = attn.norm_k(ik)
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
            if image_rotary_emb is not None:
                img_freqs, txt_freqs = image_rotary_emb
                iq = rotate(apply_rotary_emb_qwen, iq, img_freqs, use_real=False)
                ik = rotate(apply_rotary_emb_qwen, ik, img_freqs, use_real=False)
                tq = rotate(apply_rotary_emb_qwen, tq, txt_freqs, use_real=False)
                tk = rotate(apply_rotary_emb_qwen, tk, txt_freqs, use_real=False)
            return torch.cat([tq, iq], dim=1), torch.cat([tk, ik], dim=1)

        key_mask = None
        if encoder_hidden_states_mask is not None:
            key_mask = self.engine.joint_key_mask(encoder_hidden_states_mask, (TXT, IMG))
        out = self.engine.attend(project_v=project_v, project_qk=project_qk, kinds=(TXT, IMG), key_mask=key_mask)
        out = out.to(hidden_states.dtype)
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
