"""SD3 / SD3.5 (`SD3Transformer2DModel`): joint attention over [image, text] tokens; SD3.5 adds an image-only
second attention (`attn2`) in its first blocks. No RoPE: the sin-cos position embedding is added by
`pos_embed` on the whole latent, so the image sequence is split *after* it, and the text after
`context_embedder`; the unpatchify reshape needs every token, so `proj_out`'s output is gathered."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from ..sharding import Gather, ModelPlan, Split
from ..ulysses import IMG, TXT, UlyssesEngine
from ._common import attention_modules_by_class, refuse, refuse_attention_kwargs


class SD3UlyssesProcessor:
    """Sharded replacement of diffusers' `JointAttnProcessor2_0` (joint `attn` and image-only `attn2`)."""

    def __init__(self, engine: UlyssesEngine):
        self.engine = engine

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("cocodiff: SD3 attention_mask is not supported under sequence parallelism")
        B = hidden_states.shape[0]
        H = attn.heads
        joint = encoder_hidden_states is not None

        def heads(x):
            # (B, L, H * D) -> (B, L, H, D)
            return x.view(B, -1, H, x.shape[-1] // H)

        def project(proj, added_proj, norm=None, added_norm=None):
            # local order [image, text]
            x = heads(proj(hidden_states))
            if norm is not None:
                x = norm(x)
            if joint:
                e = heads(added_proj(encoder_hidden_states))
                if added_norm is not None:
                    e = added_norm(e)
                x = torch.cat([x, e], dim=1)
            return x

        kinds = (IMG, TXT) if joint else (IMG,)
        added = (lambda name: getattr(attn, name)) if joint else (lambda name: None)
        out = self.engine.attend(
            project_v=lambda: project(attn.to_v, added("add_v_proj")),
            project_q=lambda: project(attn.to_q, added("add_q_proj"), attn.norm_q, added("norm_added_q")),
            project_k=lambda: project(attn.to_k, added("add_k_proj"), attn.norm_k, added("norm_added_k")),
            kinds=kinds,
            out_dtype=hidden_states.dtype,
        )
        if joint:
            n_img = hidden_states.shape[1]
            out, enc_out = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                enc_out = attn.to_add_out(enc_out)
        out = attn.to_out[1](attn.to_out[0](out))
        if joint:
            return out, enc_out
        return out


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


def _attention_modules(model):
    return attention_modules_by_class(model, (Attention,))


def _install(model, engine):
    mods = _attention_modules(model)
    for _, m in mods:
        m.set_processor(SD3UlyssesProcessor(engine))
    return len(mods)


PLAN = ModelPlan(
    family="sd3",
    class_name="SD3Transformer2DModel",
    token_counts=_token_counts,
    split_outputs={"pos_embed": {None: Split(IMG, 1)}, "context_embedder": {None: Split(TXT, 1)}},
    gather_outputs={"proj_out": Gather(IMG, 1)},
    install_processors=_install,
    attention_modules=_attention_modules,
    check_call=_check_call,
)
