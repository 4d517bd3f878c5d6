"""FLUX.2 (`Flux2Transformer2DModel`): double blocks with joint [text, image] attention (as FLUX.1's), then
single blocks whose fused `to_qkv_mlp_proj` projects Q, K, V and the MLP input in one matrix. Split like
FLUX.1 (tokens and their 4-axis RoPE ids). With V-First, the fused projection is computed as row slices of
the same weight (V, Q, K, then the MLP part, which with `overlap_output` runs in two halves while K's and
the attention output's exchanges are in flight); this gives the same numbers up to GEMM rounding order. On one
rank (no exchange to hide) the projection stays one GEMM, as the model's own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import Flux2Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2ParallelSelfAttention,
    Flux2SwiGLU,
)
from torch import nn

from ..compiled import compiled_piece, opaque_to_compile
from ..layout import IMG, TXT
from ..schedule import attend
from ..sharding import Gather, ModelPlan, Split, token_counts
from .flux import processor as double_stream_processor
from .joint import norm_rope, plain_linear, refuse_attention_kwargs, require


def swiglu_into(gate: torch.Tensor, up: torch.Tensor, dst: torch.Tensor) -> None:
    """`dst = silu(gate) * up` (Flux2SwiGLU's halves): compiled (`compiled_piece`), one kernel writing `dst`."""
    dst.copy_(F.silu(gate) * up)


class Flux2SingleUlyssesProcessor:
    """Sharded replacement of diffusers' `Flux2ParallelSelfAttnProcessor` (single-stream blocks)."""

    def __init__(self, engine, layer: str):
        self.engine = engine
        self.layer = layer

    @opaque_to_compile
    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("cocodiff: FLUX.2 attention_mask is not supported under sequence parallelism")
        cfg = self.engine.config
        d, inner = attn.head_dim, attn.inner_dim
        w, b = attn.to_qkv_mlp_proj.weight, attn.to_qkv_mlp_proj.bias
        # row slices of the fused projection: V first, and the MLP part in the exchanges' shadow (on one rank
        # there is no exchange to hide anything under: the projection stays one GEMM, as the model's own)
        sliced = cfg.v_first and self.engine.world > 1 and plain_linear(attn.to_qkv_mlp_proj)
        state = {}

        def rows(lo, hi):
            # a row slice of the fused (out, in) weight is a contiguous view: no copy
            return F.linear(hidden_states, w[lo:hi], None if b is None else b[lo:hi])

        def fused():
            if "fused" not in state:
                state["fused"] = attn.to_qkv_mlp_proj(hidden_states)
            return state["fused"]

        def project(send, i, norm=None):
            lo, hi = i * inner, (i + 1) * inner
            x = (rows(lo, hi) if sliced else fused()[..., lo:hi]).unflatten(-1, (-1, d))
            if norm is None:  # V
                return x
            return norm_rope(self.engine, x, norm, apply_rotary_emb, image_rotary_emb, send=send, sequence_dim=1)

        # SwiGLU's gate half runs while K's exchange is in flight, its other half while the output's is
        mlp_lo, mlp_hi = 3 * inner, w.shape[0]
        mid = mlp_lo + (mlp_hi - mlp_lo) // 2
        # with compiled blocks, silu(gate) * up is one compiled kernel writing the buffer (eager: two kernels)
        swiglu = (
            type(attn.mlp_act_fn) is Flux2SwiGLU
            and not attn.mlp_act_fn._forward_hooks
            and not attn.mlp_act_fn._forward_pre_hooks
        )
        gate_fn = getattr(attn.mlp_act_fn, "gate_fn", None) if swiglu else None
        fuse = (
            cfg.compile_blocks
            and type(gate_fn) is nn.SiLU
            and not gate_fn._forward_hooks
            and not gate_fn._forward_pre_hooks
        )
        split_mlp = cfg.overlaps_output and sliced and swiglu

        def gate():
            g = rows(mlp_lo, mid)
            state["gate"] = g if fuse else attn.mlp_act_fn.gate_fn(g)

        # to_out's input [attention output, MLP branch] is written in place by both (no concatenation copy)
        buf = hidden_states.new_empty(*hidden_states.shape[:2], inner + attn.mlp_hidden_dim)

        def up():  # Flux2SwiGLU: silu(x[..., :half]) * x[..., half:]
            if fuse:
                compiled_piece(self.engine, swiglu_into)(state["gate"], rows(mid, mlp_hi), buf[..., inner:])
            else:
                torch.mul(state["gate"], rows(mid, mlp_hi), out=buf[..., inner:])

        attend(  # writes the attention output into buf[..., :inner]
            self.engine,
            layer=self.layer,
            project_v=lambda send: project(send, 2),
            project_q=lambda send: project(send, 0, attn.norm_q),
            project_k=lambda send: project(send, 1, attn.norm_k),
            kinds=(TXT, IMG),
            out_dtype=hidden_states.dtype,
            independent=(gate, up) if split_mlp else (),
            into=buf[..., :inner],
        )
        if not split_mlp:
            if fuse and not sliced:  # one kernel from the fused projection's columns into the buffer
                f = fused()
                compiled_piece(self.engine, swiglu_into)(f[..., mlp_lo:mid], f[..., mid:mlp_hi], buf[..., inner:])
            else:
                buf[..., inner:].copy_(attn.mlp_act_fn(rows(mlp_lo, mlp_hi) if sliced else fused()[..., mlp_lo:]))
        return attn.to_out(buf)


def _check_call(bound):
    if bound.get("kv_cache_mode") is not None or bound.get("kv_cache") is not None:
        raise ValueError(
            "cocodiff: FLUX.2 reference-image KV caching (kv_cache_mode) is not supported under sequence parallelism"
        )
    refuse_attention_kwargs(bound)
    require(bound, ("hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"), "FLUX.2")


PLAN = ModelPlan(
    family="flux2",
    model_class=Flux2Transformer2DModel,
    token_counts=token_counts(),
    split_inputs={
        "": {
            "hidden_states": Split(IMG, 1),
            "encoder_hidden_states": Split(TXT, 1),
            "img_ids": Split(IMG, -2),  # (S, 4) or (B, S, 4)
            "txt_ids": Split(TXT, -2),
        }
    },
    gather_outputs={"proj_out": Gather(IMG, 1)},
    processors={Flux2ParallelSelfAttention: Flux2SingleUlyssesProcessor, Flux2Attention: double_stream_processor},
    check_call=_check_call,
)
