"""The sharded joint-attention processor the model plans share, and the helpers they use.

diffusers' FLUX.1/FLUX.2 double-stream, FLUX.1 single-stream, SD3/SD3.5 (joint and image-only) and
Qwen-Image attentions have the same shape: Q/K/V projections of the image stream (`to_q`...), optionally of
the text stream (`add_q_proj`...), per-head norms, RoPE in some, one attention over the joined sequence,
and output projections (`to_out`, `to_add_out`). `JointAttnProcessor` does that on the local tokens through
the engine's schedule (`schedule.attend`); a family says only its local token order and how Q and K get
their norms and RoPE (`qk`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import fused_qk
from ..compiled import compiled_piece, opaque_to_compile
from ..layout import IMG, TXT
from ..schedule import attend

# qk(engine, img, txt, norm, added_norm, image_rotary_emb, send=None) -> Q or K `(B, L, H, D)` in local token
# order; given the exchange's `SendSpec` as `send`, a fused kernel returns it as `SendBlocks` (schedule.attend)
QK = Callable[..., Any]


def diffusers_rms(norm) -> bool:
    """A bare diffusers `RMSNorm` with a weight and no bias or hooks: what `fused_qk`'s kernels reproduce."""
    from diffusers.models.normalization import RMSNorm

    return (
        type(norm) is RMSNorm
        and norm.weight is not None
        and norm.bias is None
        and not norm._forward_hooks
        and not norm._forward_pre_hooks
    )


def fuse_streams(engine, img, txt, norm, added_norm) -> bool:
    """Whether Q/K of two streams with diffusers RMSNorms can take a `fused_qk` kernel (CUDA, `fuse_qk`)."""
    return (
        engine.config.fuse_qk
        and fused_qk.fused_device(img)
        and txt is not None
        and img.numel() > 0
        and txt.numel() > 0
        and diffusers_rms(norm)
        and diffusers_rms(added_norm)
        and added_norm.eps == norm.eps
    )


def norms_then_concat(text_first: bool) -> QK:
    """Q/K of a family without RoPE (SD3): each stream's norm, then the streams joined in local order; with
    `fuse_qk` on CUDA and diffusers RMSNorms (SD3.5) one compiled kernel."""

    def qk(engine, img, txt, norm, added_norm, freqs, send=None):
        if fuse_streams(engine, img, txt, norm, added_norm):
            first, second = (txt, img) if text_first else (img, txt)
            w_first, w_second = (added_norm, norm) if text_first else (norm, added_norm)
            args = (first, second, w_first.weight, w_second.weight, norm.eps)
            return fused_qk.run(fused_qk.norms_cat_reference, *args, send=send, heads=img.shape[2])
        img = img if norm is None else norm(img)
        if txt is None:
            return img
        txt = txt if added_norm is None else added_norm(txt)
        return torch.cat([txt, img] if text_first else [img, txt], dim=1)

    return qk


class JointAttnProcessor:
    """Sharded replacement of diffusers' joint attention processors (see the module docstring).

    Args:
        engine: the model's `UlyssesEngine`.
        layer: the attention module's name (its per-layer key).
        text_first: local order [text, image] (FLUX, Qwen-Image) or [image, text] (SD3).
        qk: how Q and K get their norms and RoPE (default: norms, no RoPE).
        text_mask: the family takes a text padding mask (Qwen-Image): the engine holds it (`engine.text_mask`,
            None when all ones).
        single_stream: token kinds of `hidden_states` when no text stream is passed: FLUX's single-stream
            blocks carry [text, image] in one stream, SD3.5's `attn2` only the image.
        shared_projections: an attention without text projections (`add_q_proj`) that is passed a text
            stream projects it with the image stream's projections and norms (HunyuanVideo's single-stream
            blocks: one projection of [image, text]); the streams are still joined in local order.
    """

    def __init__(
        self,
        engine,
        layer: str,
        *,
        text_first: bool = True,
        qk: QK | None = None,
        text_mask: bool = False,
        single_stream: tuple[str, ...] = (IMG,),
        shared_projections: bool = False,
    ):
        self.engine = engine
        self.layer = layer
        self.text_first = text_first
        self.qk = qk or norms_then_concat(text_first)
        self.text_mask = text_mask
        self.single_stream = single_stream
        self.shared_projections = shared_projections

    @opaque_to_compile
    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        encoder_hidden_states_mask=None,
        independent: Sequence[Callable[[], None]] = (),
        into: torch.Tensor | None = None,
    ):
        """diffusers' processor call; `independent` and `into` (where the attention output is written, before any
        output projection) as `schedule.attend`'s, passed by the reordered single-block forwards."""
        if attention_mask is not None:
            raise ValueError(
                f"cocodiff: {type(attn).__name__} attention_mask is not supported under sequence parallelism"
            )
        if encoder_hidden_states_mask is not None and not self.text_mask:
            raise ValueError(f"cocodiff: {type(attn).__name__} takes no encoder_hidden_states_mask")
        if self.text_mask and encoder_hidden_states_mask is None:
            encoder_hidden_states_mask = self.engine.text_mask  # held by the engine (sharding.PlanHooks)
        has_added = getattr(attn, "add_q_proj", None) is not None
        shared = self.shared_projections and encoder_hidden_states is not None and not has_added
        joint = encoder_hidden_states is not None and (has_added or shared)
        H = attn.heads

        def heads(x):
            return x.unflatten(-1, (H, -1))  # (B, L, H * D) -> (B, L, H, D)

        def project(send, proj, added_proj, norms=None):
            img = heads(proj(hidden_states))
            txt = heads(added_proj(encoder_hidden_states)) if joint else None
            if norms is not None:  # Q or K: norms and RoPE as the family does them
                return self.qk(self.engine, img, txt, norms[0], norms[1], image_rotary_emb, send=send)
            if txt is None:
                return img
            parts = [txt, img] if self.text_first else [img, txt]
            # V: the streams written side by side into the send buffer (no concatenation), on one rank joined
            return torch.cat(parts, dim=1) if send is None else send.parts(parts)

        def added(name):
            if not joint:
                return None
            return getattr(attn, _SHARED[name]) if shared else getattr(attn, name, None)

        kinds = ((TXT, IMG) if self.text_first else (IMG, TXT)) if joint else self.single_stream
        key_mask = None
        if encoder_hidden_states_mask is not None:
            key_mask = self.engine.joint_key_mask(encoder_hidden_states_mask, kinds)
        out = attend(
            self.engine,
            layer=self.layer,
            project_v=lambda send: project(send, attn.to_v, added("add_v_proj")),
            project_q=lambda send: project(send, attn.to_q, added("add_q_proj"), (attn.norm_q, added("norm_added_q"))),
            project_k=lambda send: project(send, attn.to_k, added("add_k_proj"), (attn.norm_k, added("norm_added_k"))),
            kinds=kinds,
            key_mask=key_mask,
            out_dtype=hidden_states.dtype,
            independent=independent,
            into=into,
        )
        if not joint:
            return _out(attn, out)
        n_txt = encoder_hidden_states.shape[1]
        n_img = out.shape[1] - n_txt
        if self.text_first:
            txt_out, img_out = out.split_with_sizes([n_txt, n_img], dim=1)
        else:
            img_out, txt_out = out.split_with_sizes([n_img, n_txt], dim=1)
        if not getattr(attn, "context_pre_only", False) and getattr(attn, "to_add_out", None) is not None:
            txt_out = attn.to_add_out(txt_out.contiguous())
        # (with `into` and no output projection the caller reads `into` itself: no contiguous copy of a part)
        return _out(
            attn, img_out if into is not None and not has_output_projection(attn) else img_out.contiguous()
        ), txt_out


# the image stream's module standing in for each text-stream module under `shared_projections`
_SHARED = {
    "add_q_proj": "to_q",
    "add_k_proj": "to_k",
    "add_v_proj": "to_v",
    "norm_added_q": "norm_q",
    "norm_added_k": "norm_k",
}


def has_output_projection(attn) -> bool:
    """Whether the attention projects its output (`to_out`): pre-only attentions have none, or an empty list."""
    return bool(getattr(attn, "to_out", None))


def _out(attn, x: torch.Tensor) -> torch.Tensor:
    """The image stream's output projection (`to_out`: linear, dropout); pre-only attentions have none."""
    to_out = getattr(attn, "to_out", None)
    if to_out is None:
        return x
    for layer in to_out:
        x = layer(x)
    return x


# ---- helpers of the plans ------------------------------------------------------------------------------
def refuse(bound: dict[str, Any], names: tuple[str, ...], why: str) -> None:
    """Raise a ValueError if any of the named call arguments is set."""
    for n in names:
        v = bound.get(n)
        if v is not None and not (isinstance(v, (bool, int)) and not v):  # tensors/lists: set means refused
            raise ValueError(f"cocodiff: argument {n!r} is not supported under sequence parallelism ({why})")


def refuse_attention_kwargs(bound: dict[str, Any], key: str = "joint_attention_kwargs") -> None:
    kw = bound.get(key) or {}
    if "ip_adapter_image_embeds" in kw or "ip_hidden_states" in kw:
        raise ValueError("cocodiff: IP-Adapter inputs are not supported under sequence parallelism")


def require(bound: dict[str, Any], names: tuple[str, ...], family: str) -> None:
    for name in names:
        if bound.get(name) is None:
            raise ValueError(f"cocodiff: {family} needs {name!r}")


def check_unfused(attn: nn.Module) -> None:
    if getattr(attn, "fused_projections", False):
        raise ValueError(
            f"cocodiff: {type(attn).__name__} has fused QKV projections; call transformer.unfuse_qkv_projections() "
            "before parallelize()"
        )


def rotate(fn, x, *args, **kwargs):
    """Apply a RoPE function, skipping empty tensors: a rank may hold no tokens of a kind (fewer tokens than
    ranks), and diffusers' RoPE reshapes with -1, which is ambiguous for zero elements."""
    if x.numel() == 0:
        return x
    return fn(x, *args, **kwargs)


def plain_linear(m: nn.Module) -> bool:
    """True if `m` is a bare `nn.Linear` (no subclass, no hooks): only then may its weight be used in row
    slices (`F.linear(x, w[lo:hi])`) in place of calling it. A LoRA wrapper or a hooked layer computes more
    than its base weight, so slicing would silently drop that: such layers are called whole."""
    return type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def norm_rope(engine, x, norm, rope_fn, freqs, *, added=None, added_norm=None, send=None, **rope_kwargs):
    """Q or K of a FLUX-style attention: `norm(x)` (and `added_norm(added)` for the text stream, put first),
    concatenated along the tokens, then RoPE (`rope_fn(..., freqs)`) when `freqs` is given. With
    `fuse_qk` on CUDA and plain `torch.nn.RMSNorm`s, one fused kernel (`cocodiff.fused_qk`) does it all,
    writing the exchange's send layout when given its `SendSpec` (`send`)."""
    parts = [x] if added is None else [added, x]
    norms = [norm] if added is None else [added_norm, norm]
    if (
        engine.config.fuse_qk
        and fused_qk.fused_device(x)
        and all(p.numel() for p in parts)
        and all(fused_qk.fusable_norm(n) and n.eps == norm.eps for n in norms)
        and (freqs is None or (isinstance(freqs, tuple) and len(freqs) == 2))
    ):
        return fused_qk.norm_cat_rope(parts, norms, freqs, send=send)
    x = torch.cat([n(p) for p, n in zip(parts, norms)], dim=1) if len(parts) > 1 else norm(x)
    if freqs is not None:
        x = rotate(rope_fn, x, freqs, **rope_kwargs)
    return x


_FORWARD_CLASSES: dict[tuple[type, Callable], type] = {}


def use_forward(m: nn.Module, forward: Callable) -> None:
    """Run `m` with `forward` (a function of `self`, e.g. a reordered copy of its class's forward) in place of its
    class's. Done by giving `m` a subclass with that method, named as its class (diffusers' regional compile
    finds blocks by class name): an instance attribute bound to `m` itself would make a reference cycle that
    keeps a deleted model's weights allocated until Python's cycle collector runs."""
    base = type(m)
    cls = _FORWARD_CLASSES.get((base, forward))
    if cls is None:
        attrs = {"forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__}
        cls = _FORWARD_CLASSES[(base, forward)] = type(base.__name__, (base,), attrs)
    m.__class__ = cls


def matching(base: type, predicate: Callable[[nn.Module], bool], name: str) -> type:
    """A key for `ModelPlan.processors` that matches only the `base` modules for which `predicate` holds.

    The plan selects attention modules with `isinstance`; some families use one class for attentions that
    must be sharded and for attentions that must stay local (Wan's self- and cross-attention, HunyuanVideo's
    block attentions and its text refiner's). The returned class answers `isinstance` by `predicate`, so the
    local ones keep their own processors and are left out of the head-count check."""

    class _Matching(type):
        def __instancecheck__(cls, obj) -> bool:
            return isinstance(obj, base) and predicate(obj)

    return _Matching(name, (), {"__doc__": f"{base.__name__} modules selected by {predicate.__name__}"})


def gelu_into(y: torch.Tensor, dst: torch.Tensor, approximate: str) -> None:
    """`dst = gelu(y)`: compiled (`compiled_piece`), one kernel reading `y` and writing `dst` in place."""
    dst.copy_(F.gelu(y, approximate=approximate))


def mlp_into(
    proj: nn.Module, act, x: torch.Tensor, out: torch.Tensor, engine=None
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A single-stream block's MLP input branch `act(proj(x))` as the schedule's `independent` work, written into
    `out` (its columns of the buffer the block would concatenate it into): with a plain `nn.Linear` two halves of
    its output columns (the first under the input exchanges, the second under the output's; `act` must be
    elementwise), otherwise (LoRA-wrapped or hooked, or on one rank) the layer called whole, under the output
    exchange. A bare `nn.GELU` writes its result in place, compiled when `engine` compiles blocks
    (`compiled_piece`: this runs inside the attention processor, outside the block's compiled pieces); another
    activation's result is copied there."""
    if type(act) is nn.GELU and not act._forward_hooks and not act._forward_pre_hooks:
        # (the closures run inside the opaque processor: the compiled piece is looked up there, not while a
        # compiled block's forward is traced)

        def activate(y, dst):
            gelu = compiled_piece(engine, gelu_into)
            if gelu is gelu_into:  # not compiling: the eager kernel writes in place
                torch._C._nn.gelu(y, approximate=act.approximate, out=dst)
            else:
                gelu(y, dst, act.approximate)

    else:

        def activate(y, dst):
            dst.copy_(act(y))

    if not plain_linear(proj) or (engine is not None and engine.world == 1):
        # (one rank: no exchange to hide work under, so the GEMM stays whole, as the model's own)
        return (lambda: None, lambda: activate(proj(x), out))
    w, b = proj.weight, proj.bias
    half = w.shape[0] // 2

    def piece(lo: int, hi: int) -> None:
        activate(F.linear(x, w[lo:hi], None if b is None else b[lo:hi]), out[..., lo:hi])

    return (lambda: piece(0, half), lambda: piece(half, w.shape[0]))
