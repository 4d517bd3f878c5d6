"""Every model family, sharded over 2 and 4 gloo CPU ranks, equals the single-process model (fp32)."""

import pytest

import _dist_cases as cases
from cocodiff.apps import families as zoo

# (rows, cols, text tokens, batch[, text mask]): even split, uneven split with batch 2, and a tiny image
# where some ranks hold no image (or no text) tokens at all.
CASES = [(4, 4, 8, 1), (3, 5, 5, 2), (1, 3, 2, 1)]
QWEN_CASES = CASES + [(3, 3, 6, 2, True)]


@pytest.mark.parametrize("v_first", [False, True], ids=["flat", "vfirst"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_parallel_equals_single_process(pools, family, world, v_first):
    shapes = QWEN_CASES if family == "qwenimage" else CASES
    out = pools(4).run(cases.model_matches_single_process, family, world, v_first, shapes)
    diffs = out[0]
    assert len(diffs) == len(shapes)
    assert max(diffs) < 2e-5


def test_ranks_that_disagree_on_inputs_raise(pools):
    out = pools(4).run(cases.ranks_disagree, 2)
    for msg in out[:2]:
        assert "ranks disagree" in msg, msg


def test_fewer_heads_than_ranks_raise_before_any_collective(pools):
    out = pools(4).run(cases.bad_heads, 4)
    for msg in out:
        assert "3 heads" in msg and "degree 4" in msg, msg


@pytest.mark.parametrize("world", [pytest.param(3, marks=pytest.mark.slow), 4, pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_heads_that_do_not_divide_are_padded_exactly(pools, family, world):
    # 10 heads over 3, 4 and 8 ranks: padded to 12, 12 and 16 zero-extended heads
    assert pools(max(world, 4)).run(cases.uneven_heads_match, family, world)[0] < 2e-5


@pytest.mark.parametrize("family,expected", [("flux", [3, 1]), ("flux2", [3])])
def test_exchanges_run_under_the_single_block_mlp(pools, family, expected):
    for in_flight in pools(4).run(cases.overlap_output_order, family, 2)[:2]:
        assert in_flight == {False: [0], True: expected}, in_flight


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_hooked_projections_are_not_sliced(pools, family):
    assert pools(4).run(cases.hooked_projection_called_whole, family, 2)[0] < 2e-5


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_fused_qk_path_equals_single_process(pools, family):
    diff, calls = pools(4).run(cases.fused_qk_path_matches, family, 2)[0]
    assert diff < 2e-5
    assert calls > 0  # the fused path was taken (2 per attention layer)


def test_a_forward_wrapper_keeps_sharding_hooks_working(pools):
    # cuda_graph=True's wrapper, minus CUDA: each rank's wrapper gets its shard of the 15 image tokens
    assert [s for s in pools(4).run(cases.forward_wrapper_after_parallelize, 2)[:2]] == [[8], [7]]


def test_cuda_graph_switch_bookkeeping_on_cpu_ranks(pools):
    assert pools(4).run(cases.cuda_graph_switch_logic, 2)[:2] == [True, True]


def test_release_drops_graphs_and_keeps_the_model_usable(pools):
    assert pools(4).run(cases.release_logic, 2)[:2] == [True, True]


def test_copied_diffusers_forward_is_current():
    # models/flux.py carries a reordered copy of diffusers' FluxSingleTransformerBlock.forward: when the installed
    # diffusers changes that forward, the copy must be reviewed (until then it is not installed: exact, no overlap)
    from cocodiff.models.flux import single_block_forward_is_current

    assert single_block_forward_is_current(), "diffusers changed FluxSingleTransformerBlock.forward: review the copy"


@pytest.mark.parametrize("v_first", [False, True], ids=["flat", "vfirst"])
def test_qwen_padded_text_drops_masked_keys_when_rows_agree(pools, v_first):
    # rows that agree: the masked keys are dropped and attention runs unmasked; rows that differ: masked attention
    out = pools(3).run(cases.qwen_text_mask_paths, 3, v_first)[0]
    assert [masked for _, masked in out] == [2, 3, None]
    assert max(d for d, _ in out) < 2e-5


# (family, ranks, heads, groups): each rank's heads split into groups; 10 heads over 4 ranks are padded to 12, 3 per
# rank (the last rank holds 1 real and 2 zero heads), one head per group
HEAD_GROUP_CASES = [
    ("flux", 2, 8, 2),
    ("flux", 4, 10, 3),
    ("sd3", 2, 8, 4),
    ("qwenimage", 2, 8, 2),
    ("flux2", 2, 8, 2),
]


@pytest.mark.parametrize("fuse", [False, True], ids=["eager_qk", "fused_qk"])
@pytest.mark.parametrize("family,world,heads,groups", HEAD_GROUP_CASES)
def test_head_groups_equal_one_group_and_single_process(pools, family, world, heads, groups, fuse):
    diff, one, grouped = pools(4).run(cases.head_groups_match, family, world, heads, groups, fuse)[0]
    assert diff < 2e-5
    # the groups ran: every attention layer without independent work starts 2 * (groups - 1) more exchanges
    assert grouped > one and (grouped - one) % (2 * (groups - 1)) == 0, (one, grouped)
