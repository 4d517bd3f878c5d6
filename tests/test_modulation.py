"""`shard_modulation`: the blocks' AdaLN modulation GEMVs computed 1/P per rank and all-gathered (CPU gloo ranks)."""

import pytest

import _dist_cases as cases
from cocodiff.modulation import partition

FAMILIES = ["flux", "sd3", "qwenimage"]


def test_partition_is_contiguous_balanced_and_complete():
    assert partition([2, 2, 1, 1], 2) == [0, 2, 4]  # 4 | 2
    assert partition([3] * 38 + [1] * 38, 2) == [0, 25, 76]  # 75 | 77: the nearest to half
    assert partition([1, 1], 4) == [0, 1, 1, 2, 2]  # ranks with nothing
    assert partition([], 3) == [0, 0, 0, 0]
    for widths, parts in [([5, 1, 1, 1, 1, 1], 3), ([1] * 7, 4), ([9, 9, 18, 18] * 5, 8)]:
        b = partition(widths, parts)
        assert b[0] == 0 and b[-1] == len(widths) and b == sorted(b) and len(b) == parts + 1
        sums = [sum(widths[b[r] : b[r + 1]]) for r in range(parts)]
        assert max(sums) - min(sums) <= 2 * max(widths)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_layer_is_computed_by_its_owner_alone(pools, family, world):
    # every rank poisons the layers it does not own: the output is still the single process's, bit for bit
    # the replicated run's, on the first and the second call
    out = pools(4).run(cases.sharded_modulation, family, world)
    layers = out[0][0]
    assert layers > 0 and sum(r[1] for r in out[:world]) == layers
    for _, _, finite, diff, same in out[:world]:
        assert finite and diff < 2e-5 and same


def test_hunyuanvideo_modulation_is_sharded(pools):
    out = pools(4).run(cases.sharded_modulation, "hunyuanvideo", 2, True, False, True)
    assert out[0][0] > 0 and all(r[2] and r[4] for r in out[:2])


def test_replicated_modulation_shows_the_poison(pools):
    # the contrast: with shard_modulation=False every rank computes every layer, so one poisoned layer shows
    out = pools(4).run(cases.sharded_modulation, "flux", 2, False)
    assert out[0][1] == 0 and not out[0][2]


def test_compiled_blocks_read_the_gathered_results(pools):
    # TorchDynamo traces the Linears' lookup (aot_eager): still the owners' results
    out = pools(4).run(cases.sharded_modulation, "flux", 2, True, True)
    assert all(r[2] and r[3] < 2e-5 for r in out[:2])


def test_compiled_blocks_trace_alike_past_the_recompile_limit(pools):
    # 18 blocks (Dynamo's recompile limit is 8): sharded traces no more graphs than replicated
    for sharded, replicated, blocks in pools(4).run(cases.modulation_compiles_every_block_alike, 2)[:2]:
        assert sharded == replicated < blocks


def test_models_with_other_inputs_are_left_alone_and_ranks_agree(pools):
    for zero_cond_t, token_replace, error in pools(4).run(cases.modulation_applies, 2)[:2]:
        assert not zero_cond_t and not token_replace
        assert error is not None and "counts per rank [5, 6]" in error and "shard_modulation=False" in error
