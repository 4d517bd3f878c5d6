"""The fused Q/K kernel's definition computes what diffusers' eager chain computes."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from cocodiff.fused_qk import fusable_norm, norm_cat_rope_reference


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("joint", [False, True])
def test_reference_equals_diffusers_chain(dtype, tol, joint):
    g = torch.Generator().manual_seed(0)
    B, H, D = 2, 3, 16
    lens = [5, 7] if joint else [9]
    parts = [torch.randn(B, n, H, D, generator=g).to(dtype) for n in lens]
    norms = []
    for _ in lens:
        n = torch.nn.RMSNorm(D, eps=1e-6).to(dtype)
        with torch.no_grad():
            n.weight.copy_(torch.rand(D, generator=g) + 0.5)
        norms.append(n)
    S = sum(lens)
    angles = torch.rand(S, D // 2, generator=g) * 6
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = angles.sin().repeat_interleave(2, dim=-1)
    with torch.no_grad():
        eager = torch.cat([n(p) for p, n in zip(parts, norms)], dim=1)
        eager = apply_rotary_emb(eager, (cos, sin), sequence_dim=1)
        fused = norm_cat_rope_reference([(p, n.weight) for p, n in zip(parts, norms)], 1e-6, cos, sin)
    assert fused.dtype == eager.dtype and fused.shape == eager.shape
    torch.testing.assert_close(fused.float(), eager.float(), rtol=tol, atol=tol)


def test_only_plain_rmsnorm_is_fused():
    plain = torch.nn.RMSNorm(8, eps=1e-6)
    hooked = torch.nn.RMSNorm(8, eps=1e-6)
    hooked.register_forward_hook(lambda m, a, o: o * 2)
    assert fusable_norm(plain)
    assert not fusable_norm(hooked)
    assert not fusable_norm(torch.nn.RMSNorm(8))  # eps=None: dtype-dependent, left to torch
    assert not fusable_norm(torch.nn.LayerNorm(8))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_sd3_and_qwen_references_equal_diffusers(dtype, tol):
    # SD3.5: diffusers' RMSNorm per stream, [image, text]; Qwen-Image: the same norms, complex RoPE per stream
    # (diffusers' apply_rotary_emb_qwen with use_real=False), [text, image]
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    from cocodiff.fused_qk import norms_cat_reference, qwen_qk_reference

    g = torch.Generator().manual_seed(1)
    B, H, D = 2, 3, 16
    img, txt = torch.randn(B, 7, H, D, generator=g).to(dtype), torch.randn(B, 5, H, D, generator=g).to(dtype)
    norms = []
    for _ in range(2):
        n = RMSNorm(D, eps=1e-6).to(dtype)
        with torch.no_grad():
            n.weight.copy_(torch.rand(D, generator=g) + 0.5)
        norms.append(n)
    tables = [torch.polar(torch.ones(n, D // 2), torch.rand(n, D // 2, generator=g) * 6) for n in (7, 5)]
    with torch.no_grad():
        want = torch.cat([norms[0](img), norms[1](txt)], dim=1)
        got = norms_cat_reference(img, txt, norms[0].weight, norms[1].weight, 1e-6)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        rot_img = apply_rotary_emb_qwen(norms[0](img), tables[0], use_real=False)
        rot_txt = apply_rotary_emb_qwen(norms[1](txt), tables[1], use_real=False)
        want = torch.cat([rot_txt, rot_img], dim=1)
        real = [torch.view_as_real(t) for t in tables]
        got = qwen_qk_reference(img, txt, norms[0].weight, norms[1].weight, 1e-6, *real)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_a_kernel_that_cannot_compile_falls_back_with_a_warning(monkeypatch):
    from cocodiff import fused_qk

    def broken(*args, **kwargs):
        raise RuntimeError("no Triton here")

    wrapper = fused_qk._CompiledOrReference(fused_qk.norms_cat_reference)
    monkeypatch.setattr(wrapper, "kernel", broken)
    x, w = torch.randn(1, 3, 2, 4), torch.ones(4)
    with pytest.warns(UserWarning, match="compiling norms_cat_reference failed"):
        out = wrapper(x, x, w, w, 1e-6)
    torch.testing.assert_close(out, fused_qk.norms_cat_reference(x, x, w, w, 1e-6))
    assert wrapper(x, x, w, w, 1e-6).shape == out.shape  # later calls: the eager definition, no warning
