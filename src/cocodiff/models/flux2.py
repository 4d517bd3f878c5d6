"""FLUX.2 (`Flux2Transformer2DModel`): double blocks with joint [text, image] attention, then single blocks
whose fused `to_qkv_mlp_proj` projects Q, K, V and the MLP input in one matrix. Split like FLUX.1 (tokens
and their 4-axis RoPE ids). With V-First, the fused projection is computed as three row slices of the same
weight (V, then Q/K, then the MLP part), which gives the same numbers up to GEMM rounding order."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2ParallelSelfAttention,
)

from ..sharding import Gather, ModelPlan, Split
from ..ulysses import IMG, TXT, UlyssesEngine
from ._common import refuse_attention_kwargs, rotate
from .flux import FluxUlyssesProcessor


class Flux2SingleUlyssesProcessor:
    """Sharded replacement of diffusers' `Flux2ParallelSelfAttnProcessor` (single-stream blocks)."""

    def __init__(self, engine: UlyssesEngine):
        self.engine = engine

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("cocodiff: FLUX.2 attention_mask is not supported under sequence parallelism")
        d, inner = attn.head_dim, attn.inner_dim
        w, b = attn.to_qkv_mlp_proj.weight, attn.to_qkv_mlp_proj.bias
        state = {}

        def rows(lo, hi):
            # a row slice of the fused (out, in) weight is a contiguous view: no copy
            return F.linear(hidden_states, w[lo:hi], None if b is None else b[lo:hi])

        def fused():
            if "fused" not in state:
                state["fused"] = attn.to_qkv_mlp_proj(hidden_states)
            return state["fused"]

        def project_v():
            if self.engine.config.v_first:
                v = rows(2 * inner, 3 * inner)
            else:
                v = fused()[..., 2 * inner : 3 * inner]
            return v.unflatten(-1, (-1, d))

        def project_qk():
            if self.engine.config.v_first:
                qk = rows(0, 2 * inner)
            else:
                qk = fused()[..., : 2 * inner]
            q, k = qk.chunk(2, dim=-1)
            q = attn.norm_q(q.unflatten(-1, (-1, d)))
            k = attn.norm_k(k.unflatten(-1, (-1, d)))
            if image_rotary_emb is not None:
                q = rotate(apply_rotary_emb, q, image_rotary_emb, sequence_dim=1)
                k = rotate(apply_rotary_emb, k, image_rotary_emb, sequence_dim=1)
            return q, k

        out = self.engine.attend(project_v=project_v, project_qk=project_qk, kinds=(TXT, IMG))
        out = out.to(hidden_states.dtype)
        mlp_in = rows(3 * inner, w.shape[0]) if self.engine.config.v_first else fused()[..., 3 * inner :]
        mlp = attn.mlp_act_fn(mlp_in)
        return attn.to_out(torch.cat([out, mlp], dim=-1))


def _token_counts(model, bound):
    return bound["hidden_states"].shape[1], bound["encoder_hidden_states"].shape[1]


def _check_call(bound):
    if bound.get("kv_cache_mode") is not None or bound.get("kv_cache") is not None:
        raise ValueError("cocodiff: FLUX.2 reference-image KV caching (kv_cache_mode) is not supported under sequence parallelism")
    refuse_attention_kwargs(bound)
    for name in ("hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"):
        if bound.get(name) is None:
            raise ValueError(f"cocodiff: FLUX.2 needs {name!r}")


def _attention_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Flux2Attention, Flux2ParallelSelfAttention))]


def _install(model, engine):
    mods = _attention_modules(model)
    for _, m in mods:
        if isinstance(m, Flux2ParallelSelfAttention):
            m.set_processor(Flux2SingleUlyssesProcessor(engine))
        else:
                m.set_processor(FluxUlyssesProcessor(engine))  # double-stream: same math as FLUX.1's
    return len(mods)


PLAN = ModelPlan(
    family="flux2",
    class_name="Flux2Transformer2DModel",
    token_counts=_token_counts,
    split_inputs={
        "": {
            "hidden_states": Split(IMG, 1),
            "encoder_hidden_states": Split(TXT, 1),
            "img_ids": Split(IMG, -2),  # (S, 4) or (B, S, 4)
            "txt_ids": Split(TXT, -2),
        }
    },
    gather_outputs={"proj_out": Gather(IMG, 1)},
    install_processors=_install,
    attention_modules=_attention_modules,
    check_call=_check_call,
)
