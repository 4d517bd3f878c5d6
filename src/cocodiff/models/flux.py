"""FLUX.1 (`FluxTransformer2DModel`): joint text+image attention in double blocks, [text, image] tokens in
single blocks. Text and image tokens are split separately and their RoPE ids alike, so each rank's local
sequence is [its text slice, its image slice] with matching rotary embeddings; attention is invariant to
the order of keys, so the exchange's rank-major token order changes nothing."""

from __future__ import annotations

import hashlib
import inspect
import warnings

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxSingleTransformerBlock

from ..layout import IMG, TXT
from ..modulation import ModulationPlan
from ..sharding import Gather, ModelPlan, Split, token_counts
from .joint import (
    JointAttnProcessor,
    has_output_projection,
    mlp_into,
    norm_rope,
    refuse,
    refuse_attention_kwargs,
    require,
    use_forward,
)


def flux_qk(engine, img, txt, norm, added_norm, freqs, send=None):
    """FLUX Q/K: per-stream RMSNorm, [text, image], RoPE over the joined local tokens (their global
    positions: the rotary tables were split with them); one fused kernel with `fuse_qk`."""
    return norm_rope(
        engine, img, norm, apply_rotary_emb, freqs, added=txt, added_norm=added_norm, send=send, sequence_dim=1
    )


def processor(engine, layer: str) -> JointAttnProcessor:
    return JointAttnProcessor(engine, layer, text_first=True, qk=flux_qk, single_stream=(TXT, IMG))


# The reordered copy below follows diffusers' `FluxSingleTransformerBlock.forward` whose source has this sha256
# (diffusers 0.41.0 and 0.42.1). If the installed diffusers changed it, the copy is not installed (the blocks
# keep diffusers' forward, exact, without the MLP overlap) and a warning says so; a test fails.
SINGLE_BLOCK_FORWARD_SHA256 = "57350a6dab842b40e0d677b9c42794c17e45907ad45991d36dba69d89096a37b"


def single_block_forward_is_current() -> bool:
    """Whether the installed diffusers' single-block forward is the one `single_block_forward` copies."""
    source = inspect.getsource(FluxSingleTransformerBlock.forward)
    return hashlib.sha256(source.encode()).hexdigest() == SINGLE_BLOCK_FORWARD_SHA256


def single_block_forward(
    self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None
):
    """diffusers' `FluxSingleTransformerBlock.forward` (0.42) with the MLP branch moved into the attention's
    shadow: its first half (output columns) runs while K's exchange is in flight, its second half while
    the attention output's is. Same values: GELU is elementwise, so the halves concatenated equal the whole
    (a GEMM of half the width may round differently). The attention output and the MLP branch are written
    into `proj_out`'s input buffer where diffusers concatenates them (one pass over the block's widest
    activation fewer). Installed per block; active with `overlap_output`."""
    processor = self.attn.processor
    if not isinstance(processor, JointAttnProcessor) or not processor.engine.config.overlaps_output:
        return FluxSingleTransformerBlock.forward(  # diffusers' own (this block's class is a subclass: use_forward)
            self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
        )
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    # proj_out's input [attention output, MLP branch] is written in place by both (no concatenation copy); the
    # attention is pre-only (no output projection), so its output is what goes there
    attn_dim = self.attn.inner_dim
    buf = norm_hidden_states.new_empty(*norm_hidden_states.shape[:2], attn_dim + self.mlp_hidden_dim)
    independent = mlp_into(self.proj_mlp, self.act_mlp, norm_hidden_states, buf[..., attn_dim:], processor.engine)
    # as diffusers' FluxAttention.forward: keyword arguments the processor does not take are dropped
    extra = {k: v for k, v in (joint_attention_kwargs or {}).items() if k == "attention_mask"}
    into = None if has_output_projection(self.attn) else buf[..., :attn_dim]
    attn_output = processor(
        self.attn, norm_hidden_states, image_rotary_emb=image_rotary_emb, independent=independent, into=into, **extra
    )
    if into is None:
        buf[..., :attn_dim].copy_(attn_output)
    hidden_states = buf
    gate = gate.unsqueeze(1)
    hidden_states = gate * self.proj_out(hidden_states)
    hidden_states = residual + hidden_states
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return encoder_hidden_states, hidden_states


def _install(model, engine) -> None:
    if not single_block_forward_is_current():
        warnings.warn(
            "cocodiff: the installed diffusers changed FluxSingleTransformerBlock.forward; the FLUX single-stream "
            "blocks keep diffusers' forward (exact), without running their MLP under the exchanges (overlap_output)",
            stacklevel=4,
        )
        return
    wrapped = 0
    for m in model.modules():
        # exact type: a subclass may have its own forward, which the reordered copy would silently replace
        if type(m) is FluxSingleTransformerBlock:
            if "forward" in m.__dict__:  # already wrapped (diffusers hooks: caching, offloading): keep theirs
                wrapped += 1
                continue
            use_forward(m, single_block_forward)
    if wrapped:
        warnings.warn(
            f"cocodiff: {wrapped} FLUX single-stream blocks already have a wrapped forward (diffusers "
            "hooks); they keep it, and their MLP does not run under the exchanges (overlap_output)",
            stacklevel=4,
        )


def _check_call(bound):
    refuse(bound, ("controlnet_block_samples", "controlnet_single_block_samples"), "ControlNet residuals")
    refuse_attention_kwargs(bound)
    require(bound, ("hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"), "FLUX")


PLAN = ModelPlan(
    family="flux",
    model_class=FluxTransformer2DModel,
    token_counts=token_counts(),
    split_inputs={
        "": {
            "hidden_states": Split(IMG, 1),
            "encoder_hidden_states": Split(TXT, 1),
            "img_ids": Split(IMG, -2),  # (S, 3), or the deprecated (B, S, 3)
            "txt_ids": Split(TXT, -2),
        }
    },
    gather_outputs={"proj_out": Gather(IMG, 1)},
    processors={FluxAttention: processor},
    install=_install,
    check_call=_check_call,
    modulation=ModulationPlan(
        source="time_text_embed",
        linears=(
            "transformer_blocks.*.norm1.linear",
            "transformer_blocks.*.norm1_context.linear",
            "single_transformer_blocks.*.norm.linear",
        ),
    ),
)
