"""HunyuanVideo (`HunyuanVideoTransformer3DModel`): FLUX-like double-stream blocks (joint [video, text]
attention) and single-stream blocks (one projection of [video, text]), RoPE on the video tokens only, and a
text padding mask. diffusers has no context-parallel plan for it.

Video and text tokens are split separately at the first double block's inputs, so the model's top still
sees the whole sequence and builds the whole key mask `(B, 1, 1, N_VIDEO + N_TEXT)` (valid text = the first
`encoder_attention_mask.sum()` tokens); each attention takes that mask's text part and rebuilds it in the
order the exchange delivers tokens, with no collective. The RoPE tables are split with the video tokens at
`rope`'s outputs; the output is gathered after `proj_out`. The text refiner (`context_embedder`) runs whole
on every rank. HunyuanVideo-I2V's "token_replace" blocks get this rank's share of the first frame's tokens.
With `overlap_output` (on with V-First) the single blocks' MLP runs under the exchanges, as in FLUX.1.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTokenReplaceSingleTransformerBlock,
    HunyuanVideoTokenReplaceTransformerBlock,
)

from .. import fused_qk
from ..compiled import opaque_to_compile
from ..layout import IMG, TXT
from ..modulation import ModulationPlan
from ..sharding import Gather, ModelPlan, Split
from .joint import (
    JointAttnProcessor,
    diffusers_rms,
    has_output_projection,
    matching,
    mlp_into,
    refuse_attention_kwargs,
    require,
    rotate,
    use_forward,
)


def hunyuan_qk(engine, img, txt, norm, added_norm, freqs, send=None):
    """HunyuanVideo Q/K: per-stream RMSNorm, RoPE on the video tokens only, then [video, text]; one
    compiled kernel with `fuse_qk` on CUDA."""
    if (
        engine.config.fuse_qk
        and fused_qk.fused_device(img)
        and isinstance(freqs, tuple)
        and img.numel()
        and (txt is None or txt.numel())
        and diffusers_rms(norm)
        and (txt is None or (diffusers_rms(added_norm) and added_norm.eps == norm.eps))
    ):
        w_txt = None if txt is None else added_norm.weight
        args = (img, txt, norm.weight, w_txt, norm.eps, *freqs)
        return fused_qk.run(fused_qk.norm_rope_cat_reference, *args, send=send, heads=img.shape[2])
    img = img if norm is None else norm(img)
    if freqs is not None:
        img = rotate(apply_rotary_emb, img, freqs, sequence_dim=1)
    if txt is None:
        return img
    txt = txt if added_norm is None else added_norm(txt)
    return torch.cat([img, txt], dim=1)


class HunyuanVideoAttnProcessor(JointAttnProcessor):
    """Sharded replacement of diffusers' `HunyuanVideoAttnProcessor2_0` (double- and single-stream blocks):
    the joint processor, fed the text part of the model's key mask."""

    def __init__(self, engine, layer: str):
        super().__init__(engine, layer, text_first=False, qk=hunyuan_qk, text_mask=True, shared_projections=True)

    @opaque_to_compile
    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        independent=(),
        into=None,
    ):
        txt_mask = None
        if attention_mask is not None:
            lay = self.engine.layout
            n = lay.n_img + lay.n_txt
            if attention_mask.dim() != 4 or tuple(attention_mask.shape[1:]) != (1, 1, n):
                raise ValueError(
                    f"cocodiff: HunyuanVideo attention_mask of shape {tuple(attention_mask.shape)}; expected the "
                    f"model's key mask (B, 1, 1, {n})"
                )
            txt_mask = attention_mask[:, 0, 0, lay.n_img :]  # (B, 1, 1, N_IMG + N_TXT) -> (B, N_TXT)
        return super().__call__(
            attn,
            hidden_states,
            encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            encoder_hidden_states_mask=txt_mask,
            independent=independent,
            into=into,
        )


# sha256 of the diffusers `HunyuanVideoSingleTransformerBlock.forward` source that `single_block_forward` copies
# (tests/test_video.py fails when the installed diffusers changes it)
SINGLE_BLOCK_FORWARD_SHA256 = "3e921434984e3891860e632e553633cc51b55bdfd5974340aa082d5914cecb00"


def single_block_forward(
    self, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None, *args, **kwargs
):
    """diffusers' `HunyuanVideoSingleTransformerBlock.forward` (0.42) with the MLP branch moved into the
    attention's shadow, as FLUX.1's: its first half (output columns) runs while K's exchange is in flight, its
    second half while the attention output's is. GELU is elementwise, so the halves equal the whole (a GEMM
    of half the width may round differently). Installed per block; active with `overlap_output`."""
    processor = self.attn.processor
    if not isinstance(processor, HunyuanVideoAttnProcessor) or not processor.engine.config.overlaps_output:
        return HunyuanVideoSingleTransformerBlock.forward(  # diffusers' own (the block's class is use_forward's)
            self, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb, *args, **kwargs
        )
    n_txt = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    # proj_out's input [attention output, MLP branch] is written in place by both (no concatenations); the
    # attention's local token order [video, text] is the block's
    attn_dim = self.attn.inner_dim
    buf = norm_hidden_states.new_empty(*norm_hidden_states.shape[:2], self.proj_out.in_features)
    independent = mlp_into(self.proj_mlp, self.act_mlp, norm_hidden_states, buf[..., attn_dim:], processor.engine)
    into = None if has_output_projection(self.attn) else buf[..., :attn_dim]
    attn_output, context_attn_output = processor(
        self.attn,
        norm_hidden_states[:, :-n_txt],
        norm_hidden_states[:, -n_txt:],
        attention_mask=attention_mask,
        image_rotary_emb=image_rotary_emb,
        independent=independent,
        into=into,
    )
    if into is None:  # each stream's projected output into its rows (no concatenation first)
        buf[:, :-n_txt, :attn_dim].copy_(attn_output)
        buf[:, -n_txt:, :attn_dim].copy_(context_attn_output)
    hidden_states = gate.unsqueeze(1) * self.proj_out(buf) + residual
    return hidden_states[:, :-n_txt], hidden_states[:, -n_txt:]


def _is_block_attention(attn) -> bool:
    # the blocks' attentions have text projections (double) or no output projection (single); the text
    # refiner's self-attention has neither and stays local
    return attn.added_kv_proj_dim is not None or attn.pre_only


BlockAttention = matching(Attention, _is_block_attention, "HunyuanVideoBlockAttention")
TOKEN_REPLACE_BLOCKS = (HunyuanVideoTokenReplaceTransformerBlock, HunyuanVideoTokenReplaceSingleTransformerBlock)


def _token_counts(model, bound):
    hs, ehs = bound["hidden_states"], bound["encoder_hidden_states"]
    if hs.dim() != 5:
        raise ValueError(f"cocodiff: HunyuanVideo hidden_states must be (B, C, F, H, W), got {tuple(hs.shape)}")
    p, p_t = model.config.patch_size, model.config.patch_size_t
    f, h, w = hs.shape[-3:]
    n_img, n_txt = (f // p_t) * (h // p) * (w // p), ehs.shape[1]
    world = model.cocodiff.world
    if n_txt < world and model.config.num_single_layers > 0:
        # the single-stream blocks slice [video, text] with `[:, :-n_text]`, wrong for a rank with no text
        raise ValueError(
            f"cocodiff: HunyuanVideo encoder_hidden_states has {n_txt} text tokens, fewer than the {world} ranks; "
            f"its single-stream blocks need one per rank: pad encoder_hidden_states and encoder_attention_mask "
            f"(with zeros) to at least {world} tokens, which leaves the output unchanged"
        )
    return n_img, n_txt


def _local_first_frame(engine, block):
    """Pre-hook of a "token_replace" block: its `num_tokens` (the first frame's tokens, which get their own
    modulation) becomes the number of those tokens this rank holds."""
    names = list(inspect.signature(block.forward).parameters)
    i = names.index("num_tokens")

    def local(n: int) -> int:
        lay, r = engine.layout, engine.rank
        return min(max(n - lay.offset(IMG, r), 0), lay.sizes(IMG)[r])

    def hook(module, args, kwargs):
        if "num_tokens" in kwargs:
            return args, {**kwargs, "num_tokens": local(kwargs["num_tokens"])}
        if len(args) > i:
            return (*args[:i], local(args[i]), *args[i + 1 :]), kwargs
        return None

    return hook


def _install(model, engine) -> None:
    wrapped = 0
    for m in model.modules():
        if isinstance(m, TOKEN_REPLACE_BLOCKS):
            m.register_forward_pre_hook(_local_first_frame(engine, m), with_kwargs=True)
        # exact type: a subclass may have its own forward, which the reordered copy would silently replace
        if type(m) is HunyuanVideoSingleTransformerBlock:
            if "forward" in m.__dict__:  # already wrapped (diffusers hooks: caching, offloading): keep theirs
                wrapped += 1
            else:
                use_forward(m, single_block_forward)
    if wrapped:
        warnings.warn(
            f"cocodiff: {wrapped} HunyuanVideo single-stream blocks already have a wrapped forward (diffusers "
            "hooks); they keep it, and their MLP does not run under the exchanges (overlap_output)",
            stacklevel=4,
        )


def _check_call(bound):
    refuse_attention_kwargs(bound, "attention_kwargs")
    require(bound, ("hidden_states", "encoder_hidden_states", "encoder_attention_mask"), "HunyuanVideo")
    mask, ehs = bound["encoder_attention_mask"], bound["encoder_hidden_states"]
    if tuple(mask.shape) != tuple(ehs.shape[:2]):
        raise ValueError(
            f"cocodiff: HunyuanVideo encoder_attention_mask shape {tuple(mask.shape)} does not match "
            f"encoder_hidden_states {tuple(ehs.shape[:2])}"
        )


PLAN = ModelPlan(
    family="hunyuanvideo",
    model_class=HunyuanVideoTransformer3DModel,
    token_counts=_token_counts,
    split_inputs={"transformer_blocks.0": {"hidden_states": Split(IMG, 1), "encoder_hidden_states": Split(TXT, 1)}},
    split_outputs={"rope": {0: Split(IMG, 0), 1: Split(IMG, 0)}},  # (cos, sin), each (S, D)
    gather_outputs={"proj_out": Gather(IMG, 1)},
    processors={BlockAttention: HunyuanVideoAttnProcessor},
    install=_install,
    check_call=_check_call,
    # diffusers' _repeated_blocks plus HunyuanVideo-I2V's token-replace blocks (compile_blocks)
    blocks=(
        "HunyuanVideoTransformerBlock",
        "HunyuanVideoSingleTransformerBlock",
        "HunyuanVideoTokenReplaceTransformerBlock",
        "HunyuanVideoTokenReplaceSingleTransformerBlock",
        "HunyuanVideoPatchEmbed",
        "HunyuanVideoTokenRefiner",
    ),
    # token-replace blocks (HunyuanVideo-I2V) call their norm's Linear twice, on temb and on the token-replace
    # embedding: not one input for all
    modulation=ModulationPlan(
        source="time_text_embed",
        index=0,
        linears=(
            "transformer_blocks.*.norm1.linear",
            "transformer_blocks.*.norm1_context.linear",
            "single_transformer_blocks.*.norm.linear",
        ),
        applies=lambda model: getattr(model.config, "image_condition_type", None) != "token_replace",
    ),
)
