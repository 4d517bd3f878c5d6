"""Helpers shared by the model plans' attention processors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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


def attention_modules_by_class(model: nn.Module, classes: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


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


def norm_rope(engine, x, norm, rope_fn, freqs, *, added=None, added_norm=None, **rope_kwargs):
    """Q or K of a FLUX-style attention: `norm(x)` (and `added_norm(added)` for the text stream, put first),
    concatenated along the tokens, then RoPE (`rope_fn(..., freqs)`) when `freqs` is given. With
    `fuse_qk` on CUDA and plain `torch.nn.RMSNorm`s, one fused kernel (`cocodiff.kernels`) does it all."""
    from .. import kernels

    parts = [x] if added is None else [added, x]
    norms = [norm] if added is None else [added_norm, norm]
    if (engine.config.fuse_qk and kernels.fused_device(x) and all(p.numel() for p in parts)
            and all(kernels.fusable_norm(n) and n.eps == norm.eps for n in norms)
            and (freqs is None or (isinstance(freqs, tuple) and len(freqs) == 2))):
        return kernels.norm_cat_rope(parts, norms, freqs)
    x = torch.cat([n(p) for p, n in zip(parts, norms)], dim=1) if len(parts) > 1 else norm(x)
    if freqs is not None:
        x = rotate(rope_fn, x, freqs, **rope_kwargs)
    return x
