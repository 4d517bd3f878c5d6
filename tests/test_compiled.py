"""compile_blocks: the blocks' compute compiled by TorchDynamo around the sharded attention (CPU gloo ranks).

The "aot_eager" backend traces, cuts at our attention processors and guards exactly as inductor does, without
code generation (inductor's kernels run in the GPU tests): outputs equal the single process to fp32 rounding.
"""

import pytest

import _dist_cases as cases
from cocodiff import ParallelConfig
from cocodiff.apps import families as zoo

IMAGE_CASES = [(4, 6, 5, 1), (3, 5, 4, 2)]  # (rows, cols, text tokens, batch): uneven over 2 and 3 ranks
VIDEO_CASES = {
    "wan": [dict(frames=2, rows=3, cols=5, n_txt=7, batch=2)],
    "hunyuanvideo": [dict(frames=2, rows=3, cols=4, n_txt=6, batch=1, text_mask=True)],
}


# the single-stream MLP activations run inside our (opaque) attention processors under the exchanges, with
# V-First's output overlap: compiled there as pieces of their own (eager, each was an unfused kernel); FLUX.2's
# fused projection computes its SwiGLU inside the processor in the flat order too
PIECES = {"flux": ["gelu_into"], "flux2": ["swiglu_into"], "hunyuanvideo": ["gelu_into"]}
ALWAYS = {"flux2"}


@pytest.mark.parametrize("v_first", [False, True], ids=["flat", "vfirst"])
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_compiled_blocks_equal_single_process(pools, family, v_first):
    blocks, diffs, first, repeats, pieces = pools(4).run(
        cases.compiled_blocks_match, family, 2, {"v_first": v_first}, IMAGE_CASES
    )[0]
    assert blocks >= 2 and max(diffs) < 2e-5
    assert first > 0  # the blocks were traced (graphs exist) ...
    assert repeats == 0  # ... and a new step with the same shapes traces nothing
    assert pieces == (PIECES.get(family, []) if v_first or family in ALWAYS else [])


@pytest.mark.slow
@pytest.mark.parametrize("family", zoo.VIDEO_FAMILIES)
def test_compiled_video_blocks_equal_single_process(pools, family):
    blocks, diffs, first, repeats, pieces = pools(4).run(
        cases.compiled_blocks_match, family, 3, {"v_first": True}, VIDEO_CASES[family], True
    )[0]
    assert blocks >= 2 and max(diffs) < 2e-5 and first > 0 and repeats == 0
    assert pieces == PIECES.get(family, [])


def test_compiled_blocks_on_tapa_2x2(pools):
    cfg = {"all_to_all": "tapa", "tapa_plan": "phases", "topology": "2x2", "v_first": True}
    _, diffs, _, repeats, _ = pools(4).run(cases.compiled_blocks_match, "flux", 4, cfg, IMAGE_CASES[:1])[0]
    assert max(diffs) < 2e-5 and repeats == 0


def test_diffusers_regional_compile_after_parallelize(pools):
    # our processors are opaque to TorchDynamo, so the user's own compile_repeated_blocks() works too
    _, diffs, first, repeats, _ = pools(4).run(
        cases.compiled_blocks_match, "flux", 2, {"v_first": True}, IMAGE_CASES[:1], False, True
    )[0]
    assert max(diffs) < 2e-5 and first > 0 and repeats == 0


def test_compile_options_are_checked():
    assert ParallelConfig(compile_blocks=True).label == "flat+compiled"
    with pytest.raises(ValueError, match="compile_blocks=False"):
        ParallelConfig(compile_options={"backend": "eager"})
    with pytest.raises(ValueError, match=r"\['fullgraph'\] not accepted \(the blocks are cut"):
        ParallelConfig(compile_blocks=True, compile_options={"fullgraph": True})
    with pytest.raises(ValueError, match="mode='reduce-overhead' adds CUDA graphs"):
        ParallelConfig(compile_blocks=True, cuda_graph=True, compile_options={"mode": "reduce-overhead"})
    with pytest.raises(TypeError, match="compile_blocks must be a bool"):
        ParallelConfig(compile_blocks="yes")


@pytest.mark.slow
def test_inductor_blocks_equal_single_process(pools):
    # inductor's own code generation (C++ on CPU ranks; the GPU tests run its Triton kernels)
    assert pools(4).run(cases.inductor_blocks_match, 2)[0] < 2e-5


def test_compiled_pieces_outlive_the_recompile_limit():
    # a process that serves many shapes (resolutions, batch sizes) passes TorchDynamo's recompile limit: a piece
    # then runs eagerly, with the same values, instead of failing inside the attention under the exchanges
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    from cocodiff.compiled import compiled_piece
    from cocodiff.models.joint import gelu_into

    torch._dynamo.reset()
    cfg = ParallelConfig(compile_blocks=True, compile_options={"backend": "aot_eager"})
    engine = SimpleNamespace(config=cfg)
    piece = compiled_piece(engine, gelu_into)
    assert piece is not gelu_into and compiled_piece(engine, gelu_into) is piece  # compiled once per engine
    assert compiled_piece(SimpleNamespace(config=ParallelConfig()), gelu_into) is gelu_into  # no compile_blocks
    limit = torch._dynamo.config.recompile_limit
    for n in range(1, limit + 4):
        y = torch.randn(2, n, 6)
        out = torch.empty(2, n, 12)[..., 3:9]  # a strided slice, as the block's buffer columns
        piece(y, out, "tanh")
        torch.testing.assert_close(out, F.gelu(y, approximate="tanh"))
    torch._dynamo.reset()
