"""SD3 / SD3.5 (`SD3Transformer2DModel`): joint attention over [image, text] tokens; SD3.5 adds an image-only
second attention (`attn2`) in its first blocks. No RoPE: the sin-cos position embedding is added by
`pos_embed` on the whole latent, so the image sequence is split *after* it, and the text after
`context_embedder`; the unpatchify reshape needs every token, so `proj_out`'s output is gathered."""

from __future__ import annotations

from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention

from ..layout import IMG, TXT
from ..modulation import ModulationPlan
from ..sharding import Gather, ModelPlan, Split
from .joint import JointAttnProcessor, refuse, refuse_attention_kwargs


def _token_counts(model, bound):
    hs = bound["hidden_states"]
    if hs.dim() != 4:
        raise ValueError(f"cocodiff: SD3 hidden_states must be (B, C, H, W), got shape {tuple(hs.shape)}")
    p = model.config.patch_size
    h, w = hs.shape[-2:]
    if h % p or w % p:
        raise ValueError(f"cocodiff: SD3 latent {h}x{w} is not divisible by the patch size {p}")
    return (h // p) * (w // p), bound["encoder_hidden_states"].shape[1]


def _check_call(bound):
    refuse(bound, ("block_controlnet_hidden_states",), "ControlNet residuals")
    refuse_attention_kwargs(bound)


PLAN = ModelPlan(
    family="sd3",
    model_class=SD3Transformer2DModel,
    token_counts=_token_counts,
    split_outputs={"pos_embed": {None: Split(IMG, 1)}, "context_embedder": {None: Split(TXT, 1)}},
    gather_outputs={"proj_out": Gather(IMG, 1)},
    processors={Attention: lambda engine, layer: JointAttnProcessor(engine, layer, text_first=False)},
    check_call=_check_call,
    blocks=("JointTransformerBlock",),  # diffusers declares no _repeated_blocks for SD3
    # (the last block's norm1_context is an AdaLayerNormContinuous: linear(silu(temb)) too)
    modulation=ModulationPlan(
        source="time_text_embed",
        linears=("transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear"),
    ),
)
