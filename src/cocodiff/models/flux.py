"""FLUX.1 (`FluxTransformer2DModel`): joint text+image attention in double blocks, [text, image] tokens in
single blocks. Text and image tokens are split separately and their RoPE ids alike, so each rank's local
sequence is [its text slice, its image slice] with matching rotary embeddings; attention is invariant to
the order of keys, so the exchange's rank-major token order changes nothing."""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxSingleTransformerBlock

from ..sharding import Gather, ModelPlan, Split
from ..ulysses import IMG, TXT, UlyssesEngine
from ._common import attention_modules_by_class, norm_rope, plain_linear, refuse, refuse_attention_kwargs


class FluxUlyssesProcessor:
    """Sharded replacement of diffusers' `FluxAttnProcessor` and of FLUX.2's `Flux2AttnProcessor` (same math,
    local tokens, Ulysses exchange): both attentions have the same projections, norms and output layers."""

    def __init__(self, engine: UlyssesEngine):
        self.engine = engine

    def start(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
              before_attention=None):
        """Start the sharded attention; the handle yields the output `(B, L, H * D)` before the output
        projection (`finish`). `before_attention`: see `UlyssesEngine.start_attend`."""
        if attention_mask is not None:
            raise ValueError("cocodiff: FLUX/FLUX.2 attention_mask is not supported under sequence parallelism")
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        d = attn.head_dim

        def project(proj, added_proj, norm=None, added_norm=None, rope=False):
            # (B, L, H * D) -> (B, L, H, D); local order [text, image]
            x = proj(hidden_states).unflatten(-1, (-1, d))
            e = added_proj(encoder_hidden_states).unflatten(-1, (-1, d)) if joint else None
            if norm is None:  # V
                return x if e is None else torch.cat([e, x], dim=1)
            # local tokens carry their global positions: the rotary tables were split with them
            return norm_rope(self.engine, x, norm, apply_rotary_emb, image_rotary_emb if rope else None,
                             added=e, added_norm=added_norm, sequence_dim=1)

        return self.engine.start_attend(
            project_v=lambda: project(attn.to_v, attn.add_v_proj if joint else None),
            project_q=lambda: project(attn.to_q, attn.add_q_proj if joint else None, attn.norm_q,
                                      attn.norm_added_q if joint else None, rope=True),
            project_k=lambda: project(attn.to_k, attn.add_k_proj if joint else None, attn.norm_k,
                                      attn.norm_added_k if joint else None, rope=True),
            kinds=(TXT, IMG),
            out_dtype=hidden_states.dtype,
            before_attention=before_attention,
        )

    @staticmethod
    def finish(attn, out, encoder_hidden_states=None):
        """The output projections of diffusers' processor, on the local tokens."""
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            enc_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            enc_out = attn.to_add_out(enc_out.contiguous())
            return out, enc_out
        if hasattr(attn, "to_out"):  # FLUX.1 single blocks are pre-only (no output projection here)
            out = attn.to_out[1](attn.to_out[0](out))
        return out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        out = self.start(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb).wait()
        return self.finish(attn, out, encoder_hidden_states)


def single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                         joint_attention_kwargs=None):
    """diffusers' `FluxSingleTransformerBlock.forward` (0.42) with the MLP branch moved into the attention's
    shadow: its first half (output columns) runs while K's exchange is in flight, its second half while
    the attention output's is. Same values: GELU is elementwise, so the halves concatenated equal the whole
    (a GEMM of half the width may round differently). Installed per block; active with `overlap_output`."""
    processor = self.attn.processor
    if not isinstance(processor, FluxUlyssesProcessor) or not processor.engine.config.overlaps_output:
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                  joint_attention_kwargs)
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_parts = []
    if plain_linear(self.proj_mlp):
        w, b = self.proj_mlp.weight, self.proj_mlp.bias
        half = w.shape[0] // 2

        def mlp(lo, hi):
            mlp_parts.append(self.act_mlp(F.linear(norm_hidden_states, w[lo:hi], None if b is None else b[lo:hi])))

        first, second = (lambda: mlp(0, half)), (lambda: mlp(half, w.shape[0]))
    else:  # LoRA-wrapped or hooked: called whole, under the output exchange
        first, second = None, lambda: mlp_parts.append(self.act_mlp(self.proj_mlp(norm_hidden_states)))
    # as diffusers' FluxAttention.forward: keyword arguments the processor does not take are dropped
    extra = {k: v for k, v in (joint_attention_kwargs or {}).items() if k == "attention_mask"}
    pending = processor.start(self.attn, norm_hidden_states, image_rotary_emb=image_rotary_emb,
                              before_attention=first, **extra)
    second()
    attn_output = pending.wait()
    hidden_states = torch.cat([attn_output, *mlp_parts], dim=2)
    gate = gate.unsqueeze(1)
    hidden_states = gate * self.proj_out(hidden_states)
    hidden_states = residual + hidden_states
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return encoder_hidden_states, hidden_states


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
    wrapped = 0
    for m in model.modules():
        # exact type: a subclass may have its own forward, which the reordered copy would silently replace
        if type(m) is FluxSingleTransformerBlock:
            if "forward" in m.__dict__:  # already wrapped (diffusers hooks: caching, offloading): keep theirs
                wrapped += 1
                continue
            m.forward = types.MethodType(single_block_forward, m)
    if wrapped:
        warnings.warn(f"cocodiff: {wrapped} FLUX single-stream blocks already have a wrapped forward (diffusers "
                      "hooks); they keep it, and their MLP does not run under the exchanges (overlap_output)",
                      stacklevel=3)
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
