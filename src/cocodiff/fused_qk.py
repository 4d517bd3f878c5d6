"""Fused Q/K preparation: RMSNorm (per stream), the [text, image] concatenation and RoPE in one kernel.

In diffusers' eager FLUX attention, preparing Q or K is a chain of memory-bound kernels: RMSNorm, the
concatenation of the text and image parts, and RoPE computed in fp32 (upcast, pair split, stack, two
multiplies, add, downcast). On 4 H200s at 1024^2 these kernels outweigh the exchanges they sit between
(docs/benchmarks/2026-11-28-overlap). `norm_cat_rope` computes the same function with one read of each
input and one write of the result: the pure-torch definition below, compiled by `torch.compile` (inductor)
once per shape. Same math as diffusers (RMSNorm in fp32 as torch's, rotation in fp32, one rounding to the
input dtype at each point diffusers rounds); inductor may keep an intermediate in fp32 where eager rounds
it, so results agree to bf16 rounding, not bit for bit.

Used when `ParallelConfig(fuse_qk=True)`, on CUDA tensors; elsewhere (CPU ranks) the eager path runs.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # torch.nn.RMSNorm: normalise in fp32, scale by the weight, result in the input dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1, sequence_dim=1); x (B, L, H, D)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def norm_cat_rope_reference(parts, eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None):
    """`parts`: [(x, weight)] in local order, each x `(B, L_i, H, D)`; returns the normed parts concatenated
    along the tokens, rotated when `cos`/`sin` `(sum L_i, D)` are given."""
    x = torch.cat([_rms(p, w, eps) for p, w in parts], dim=1) if len(parts) > 1 else _rms(*parts[0], eps)
    return x if cos is None else _rope(x, cos, sin)


def fused_device(x: torch.Tensor) -> bool:
    """Where the compiled kernel runs (CUDA); CPU ranks keep the eager path."""
    return x.is_cuda


def fusable_norm(norm: nn.Module | None) -> bool:
    """A bare `torch.nn.RMSNorm` (no subclass, no hooks): the fused kernel reproduces exactly that."""
    return type(norm) is nn.RMSNorm and not norm._forward_hooks and not norm._forward_pre_hooks and norm.eps is not None


def norm_cat_rope(parts, norms, freqs, send=None):
    """Fused RMSNorm (one per part) + concatenation + RoPE of CUDA tensors.

    Args:
        parts: tensors `(B, L_i, H, D)` in local token order.
        norms: the `torch.nn.RMSNorm` of each part (`fusable_norm` must hold; one eps for all).
        freqs: None, or diffusers' real rotary tables `(cos, sin)`, each `(sum L_i, D)`.
        send: the exchange's `SendSpec`: the result is written in its send layout (`run`).
    """
    eps = norms[0].eps
    cos, sin = (None, None) if freqs is None else freqs
    args = [(p, n.weight) for p, n in zip(parts, norms)]
    return run(norm_cat_rope_reference, args, eps, cos, sin, send=send, heads=parts[0].shape[2])


# ---- the video families' Q/K preparation (models/wan.py, models/hunyuan_video.py) ----------------------------
def heads_norm_rope_reference(x: torch.Tensor, weight, eps: float, heads: int, cos, sin) -> torch.Tensor:
    """Wan's Q or K from its projection `x` `(B, L, H * D)`: RMSNorm over all heads (as `torch.nn.RMSNorm`),
    the head split, RoPE with `(L, D)` tables (Wan's rotation of pairs is diffusers' `apply_rotary_emb` with
    each frequency repeated for the pair); returns `(B, L, H, D)`."""
    x = _rms(x, weight, eps).unflatten(2, (heads, -1))  # (B, L, H * D) -> (B, L, H, D)
    return x if cos is None else _rope(x, cos, sin)


def _rms_diffusers(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # diffusers' own RMSNorm (not torch's): fp32 variance, the normalised value rounded to the weight's dtype
    return (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype) * weight


def norm_rope_cat_reference(img, txt, w_img, w_txt, eps: float, cos, sin) -> torch.Tensor:
    """HunyuanVideo's Q or K `(B, L, H, D)`: diffusers' RMSNorm of each stream, RoPE on the video part only,
    then [video, text]."""
    img = _rope(_rms_diffusers(img, w_img, eps), cos, sin)
    return img if txt is None else torch.cat([img, _rms_diffusers(txt, w_txt, eps)], dim=1)


# ---- SD3/SD3.5 and Qwen-Image (diffusers' RMSNorm, models/joint.py, models/qwenimage.py) -----------------
def norms_cat_reference(first, second, w_first, w_second, eps: float) -> torch.Tensor:
    """SD3.5's Q or K: diffusers' RMSNorm of each stream, then [first, second] (image, text)."""
    return torch.cat([_rms_diffusers(first, w_first, eps), _rms_diffusers(second, w_second, eps)], dim=1)


def _rope_pairs(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # diffusers' apply_rotary_emb_qwen(use_real=False): pairs of x as complex numbers times the complex table,
    # written out in real arithmetic (inductor has no complex kernels); `freqs` is view_as_real of the table
    # `(L, D / 2, 2)`, x `(B, L, H, D)`; fp32, one rounding to x's dtype
    fr, fi = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]
    xr, xi = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([xr * fr - xi * fi, xr * fi + xi * fr], dim=-1).flatten(3).to(x.dtype)


def qwen_qk_reference(img, txt, w_img, w_txt, eps: float, img_freqs, txt_freqs) -> torch.Tensor:
    """Qwen-Image's Q or K: diffusers' RMSNorm of each stream, complex RoPE with each stream's table (given as
    `torch.view_as_real`), then [text, image]."""
    img = _rope_pairs(_rms_diffusers(img, w_img, eps), img_freqs)
    txt = _rope_pairs(_rms_diffusers(txt, w_txt, eps), txt_freqs)
    return torch.cat([txt, img], dim=1)


class _CompiledOrReference:
    """`fn` compiled by inductor; if compiling it fails on this machine, one warning and `fn` itself from then on
    (the same math, eagerly): a kernel that cannot be built costs speed, never the run."""

    def __init__(self, fn):
        self.fn = fn
        self.kernel = torch.compile(fn, dynamic=False, fullgraph=True)
        self.failed = False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        try:
            return self.kernel(*args)
        except Exception as exc:  # inductor/Triton unavailable or a lowering error: report once, run eagerly
            import warnings

            warnings.warn(
                f"cocodiff fuse_qk: compiling {self.fn.__name__} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                "running its eager definition instead (same result, slower)",
                stacklevel=2,
            )
            self.failed = True
            return self.fn(*args)


@functools.cache
def compiled(fn):
    """`fn` compiled by inductor (static shapes, one graph), once per function, with the eager fallback of
    `_CompiledOrReference` (tests substitute `fn` itself)."""
    return _CompiledOrReference(fn)


@functools.cache
def _packing(fn):
    """`fn` followed by `layout.pack_tokens`: `packed(*args, world, l_max, chunks)` returns `fn(*args)` in the seq->head
    send layout; compiled, the kernel writes its result there directly (no pack copy after it)."""
    from .layout import pack_tokens

    def packed(*args):
        *args, world, l_max, chunks = args
        return pack_tokens(fn(*args), world, l_max, chunks)

    packed.__name__ = packed.__qualname__ = f"{fn.__name__}_packed"
    return packed


def run(fn, *args, send=None, heads: int | None = None):
    """`fn(*args)` (a Q/K `..._reference` returning `(B, L, H, D)`) by its compiled kernel. With `send` (the
    exchange's `layout.SendSpec`, None on one rank) the kernel writes the exchange's send layout and the result
    is `layout.SendBlocks` (`heads`: H)."""
    if send is None:
        return compiled(fn)(*args)
    from .layout import SendBlocks

    return SendBlocks(compiled(_packing(fn))(*args, send.world, send.l_max, send.chunks), heads, send.chunks)
