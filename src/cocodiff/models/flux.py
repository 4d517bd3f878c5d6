"""FLUX.1 (`FluxTransformer2DModel`): joint text+image attention in double blocks, [text, image] tokens in
single blocks. Text and image tokens are split separately and their RoPE ids alike, so each rank's local
sequence is [its text slice, its image slice] with matching rotary embeddings; attention is invariant to
the order of keys, so the exchange's rank-major token order changes nothing."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

from ..sharding import Gather, ModelPlan, Split
from ..ulysses import IMG, TXT, UlyssesEngine
from ._common import attention_modules_by_class, refuse, refuse_attention_kwargs, rotate


class FluxUlyssesProcessor:
    """Sharded replacement of diffusers' `FluxAttnProcessor` and of FLUX.2's `Flux2AttnProcessor` (same math,
    local tokens, Ulysses exchange): both attentions have the same projections, norms and output layers."""

    def __init__(self, engine: UlyssesEngine):
        self.engine = engine

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("cocodiff: FLUX/FLUX.2 attention_mask is not supported under sequence parallelism")
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        d = attn.head_dim

        def project_v():
            # (B, L, H * D) -> (B, L, H, D)
            v = attn.to_v(hidden_states).unflatten(-1, (-1, d))
            if joint:
                ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, d))
                v = torch.cat([ev, v], dim=1)
            return v

        def project_qk():
            q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, d)))
            k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, d)))
            if joint:
                eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
                ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
                q = torch.cat([eq, q], dim=1)
                k = torch.cat([ek, k], dim=1)
            if image_rotary_emb is not None:
                # local tokens carry their global positions: the rotary tables were split with them
                q = rotate(apply_rotary_emb, q, image_rotary_emb, sequence_dim=1)
                k = rotate(apply_rotary_emb, k, image_rotary_emb, sequence_dim=1)
            return q, k

        out = self.engine.attend(project_v=project_v, project_qk=project_qk, kinds=(TXT, IMG))
        out = out.to(hidden_states.dtype)
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            enc_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            enc_out = attn.to_add_out(enc_out.contiguous())
            return out, enc_out
        if hasattr(attn, "to_out"):  # FLUX.1 single blocks are pre-only (no output projection here)
            out = attn.to_out[1](attn.to_out[0](out))
        return out


def _token_counts(model, bound):
    return bound["hidden_states"].shape[1], bound["encoder_hidden_states"].shape[1]


def _check_call(bound):
    refuse(bound, ("controlnet_block_samples", "controlnet_single_block_samples"), "ControlNet residuals")
    refuse_attention_kwargs(bound)
    for name in ("hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"):
        if bound.get(name) is None:
            raise ValueError(f"cocodiff: FLUX needs {name!r}")


def _attention_modules(model):
    return attention_modules_by_class(model, (FluxAttention,))


def _install(model, engine):
    mods = _attention_modules(model)
    for _, m in mods:
        m.set_processor(FluxUlyssesProcessor(engine))
    return len(mods)


PLAN = ModelPlan(
    family="flux",
    class_name="FluxTransformer2DModel",
    token_counts=_token_counts,
    split_inputs={
        "": {
            "hidden_states": Split(IMG, 1),
            "encoder_hidden_states": Split(TXT, 1),
            "img_ids": Split(IMG, -2),  # (S, 3), or the deprecated (B, S, 3)
            "txt_ids": Split(TXT, -2),
        }
    },
    gather_outputs={"proj_out": Gather(IMG, 1)},
    install_processors=_install,
    attention_modules=_attention_modules,
    check_call=_check_call,
)
