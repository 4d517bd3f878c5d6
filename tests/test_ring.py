"""Ulysses x ring (unified sequence parallelism) on gloo CPU ranks: equal to the single process (fp32) for every
factorisation, uneven tokens, batch 2, text masks, V-First, the video families, compiled blocks, and the
automatic split when the heads are fewer than the ranks."""

import pytest

import _dist_cases as cases
from cocodiff.apps import families as zoo
from cocodiff.ring import split_degree
from cocodiff.topology import Topology

# (rows, cols, text tokens, batch, text mask): uneven over 4 and 8 ranks; a sequence shorter than the ranks
IMAGE = [(3, 5, 5, 2, False), (4, 6, 3, 1, False), (1, 2, 3, 1, False)]


@pytest.mark.parametrize("ring", [2, 4], ids=["ulysses2xring2", "ring4"])
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_ulysses_times_ring_equals_single_process(pools, family, ring):
    diffs, degrees, label, *_, ring_bytes = pools(4).run(
        cases.ring_matches, family, 4, {"ring_degree": ring, "v_first": True}, IMAGE
    )[0]
    assert max(diffs) < 2e-5
    assert degrees == (4 // ring, ring) and f"ring{ring}" in label
    assert ring_bytes > 0  # the K/V hops are counted (engine.step_stats.ring_bytes)


def test_ring_with_a_text_mask(pools):
    # Qwen-Image's padded text: each ring block carries its slice of the key mask
    masked = [(3, 5, 6, 2, True), (2, 3, 5, 1, True)]
    diffs, degrees, *_ = pools(4).run(cases.ring_matches, "qwenimage", 4, {"ring_degree": 2}, masked)[0]
    assert max(diffs) < 2e-5 and degrees == (2, 2)


def test_fewer_heads_than_ranks_choose_a_ring(pools):
    # 2 heads on 4 ranks: ring_degree=None gives Ulysses 2 x ring 2 (before, a ValueError)
    diffs, degrees, *_ = pools(4).run(cases.ring_matches, "flux", 4, {}, IMAGE[:2], 2)[0]
    assert max(diffs) < 2e-5 and degrees == (2, 2)


def test_ring_with_compiled_blocks(pools):
    cfg = {"ring_degree": 2, "v_first": True, "compile_blocks": True, "compile_options": {"backend": "aot_eager"}}
    diffs, degrees, *_ = pools(4).run(cases.ring_matches, "flux", 4, cfg, IMAGE[:1])[0]
    assert max(diffs) < 2e-5 and degrees == (2, 2)


def test_ring_with_tapa_inside_the_ulysses_groups(pools):
    cfg = {"ring_degree": 2, "all_to_all": "tapa", "tapa_plan": "phases", "topology": "2x2", "v_first": True}
    diffs, degrees, _, spec, *_ = pools(4).run(cases.ring_matches, "flux", 4, cfg, IMAGE)[0]
    assert max(diffs) < 2e-5 and degrees == (2, 2) and spec == "2"  # the Ulysses group: the inner tier


@pytest.mark.slow
def test_ring_with_two_tapa_phases(pools):
    # 8 ranks as 2 x 2 x 2: Ulysses groups of 4 ranks span two tiers (two TAPA phases), a ring of 2 across
    cfg = {"ring_degree": 2, "all_to_all": "tapa", "tapa_plan": "phases", "topology": "2x2x2", "v_first": True}
    diffs, degrees, _, spec, phases, *_ = pools(8).run(cases.ring_matches, "flux", 8, cfg, IMAGE)[0]
    assert max(diffs) < 2e-5 and degrees == (4, 2) and spec == "2x2" and phases == [0, 1]


def test_ring_across_an_emulated_slow_tier(pools):
    # 2 emulated nodes of 2: Ulysses inside each node (no slow tier among them), the ring's hops cross
    cfg = {"ring_degree": 2, "topology": "2x2", "emulate": True, "v_first": True}
    diffs, degrees, label, spec, _, route, _ = pools(4).run(cases.ring_matches, "flux", 4, cfg, IMAGE)[0]
    assert max(diffs) < 2e-5 and degrees == (2, 2) and spec == "2" and route == "FlatExchange" and "emulated" in label


@pytest.mark.slow
def test_ulysses_groups_across_an_emulated_slow_tier(pools):
    # 4 emulated nodes of 2, Ulysses groups of 4 ranks span 2 nodes: their exchanges take the tiered route
    cfg = {"ring_degree": 2, "topology": "4x2", "emulate": True, "v_first": True}
    diffs, degrees, _, spec, _, route, _ = pools(8).run(cases.ring_matches, "flux", 8, cfg, IMAGE)[0]
    assert max(diffs) < 2e-5 and degrees == (4, 2) and spec == "2x2" and route == "TieredExchange"


def test_ring_refusals(pools):
    out = pools(4).run(cases.ring_refusals, 4)[0]
    assert "fp8=True apply to Ulysses exchanges only" in out["vmajor-fp8"]
    assert "ring_degree=3 does not divide the 4 ranks" in out["not-a-divisor"]


@pytest.mark.slow
@pytest.mark.parametrize("family", zoo.VIDEO_FAMILIES)
def test_video_ring_equals_single_process(pools, family):
    video = [dict(frames=3, rows=3, cols=5, n_txt=7, batch=2, text_mask=family == "hunyuanvideo")]
    diffs, degrees, *_ = pools(4).run(
        cases.ring_matches, family, 4, {"ring_degree": 2, "v_first": True}, video, None, True
    )[0]
    assert max(diffs) < 2e-5 and degrees == (2, 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg,heads,expected", [({"ring_degree": 2}, None, (4, 2)), ({}, 4, (4, 2))], ids=["4x2", "auto-4-heads"]
)
def test_eight_ranks(pools, cfg, heads, expected):
    diffs, degrees, *_ = pools(8).run(cases.ring_matches, "flux", 8, {**cfg, "v_first": True}, IMAGE, heads)[0]
    assert max(diffs) < 2e-5 and degrees == expected


def test_degrees_and_the_ulysses_groups_tiers():
    assert split_degree(8, 24, None) == (8, 1)  # heads allow Ulysses over all ranks: no ring
    assert (
        split_degree(8, 4, None) == (4, 2) and split_degree(6, 4, None) == (3, 2) and split_degree(5, 3, None) == (1, 5)
    )
    assert split_degree(8, 24, 2) == (4, 2)
    fits = lambda u: u != 2  # noqa: E731  (e.g. a topology whose inner tiers 2 ranks do not cover)
    assert split_degree(6, 2, None, fits) == (1, 6)
    assert Topology.from_spec("2x4", 8).inner(4).sizes == (4,)  # inside a node
    assert Topology.from_spec("4x2", 8).inner(4).sizes == (2, 2)  # two nodes of 2
    assert Topology.from_spec("2x4", 8).inner(2).sizes == (2,)  # half a node
    with pytest.raises(ValueError, match="2 contiguous ranks do not cover whole inner tiers"):
        Topology.from_spec("2x3", 6).inner(2)


def test_a_block_with_no_key_to_attend_to_adds_nothing():
    # a ring block whose keys are all masked (a block of padded text only) must not shift the merged result
    import torch

    from cocodiff.ring import _merge, attention_with_lse

    g = torch.Generator().manual_seed(0)
    q, k1, v1, k2, v2 = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(5))
    mask1 = torch.ones(2, 4, dtype=torch.bool)
    mask2 = torch.zeros(2, 4, dtype=torch.bool)
    mask2[1] = True  # sample 0: block 2 all masked; sample 1: all valid
    acc, lse = _merge(None, None, *attention_with_lse(q, k1, v1, mask1))
    acc, lse = _merge(acc, lse, *attention_with_lse(q, k2, v2, mask2))
    want0 = torch.nn.functional.scaled_dot_product_attention(q[:1], k1[:1], v1[:1])
    want1 = torch.nn.functional.scaled_dot_product_attention(
        q[1:], torch.cat([k1, k2], 2)[1:], torch.cat([v1, v2], 2)[1:]
    )
    torch.testing.assert_close(acc[:1], want0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc[1:], want1, rtol=1e-5, atol=1e-6)
    # no key at all so far: output 0, lse -inf, and no NaN after merging another empty block
    acc, lse = _merge(None, None, *attention_with_lse(q, k2, v2, torch.zeros(2, 4, dtype=torch.bool)))
    acc, lse = _merge(acc, lse, *attention_with_lse(q, k2, v2, torch.zeros(2, 4, dtype=torch.bool)))
    assert not acc.isnan().any() and (acc == 0).all() and torch.isinf(lse).all()


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_vmajor_on_the_ring_hops(pools, family):
    # 2 emulated nodes of 2 GPUs: Ulysses inside each node (exact), the ring across them carries only the
    # most-changed tokens' K/V after the warm-up; the last step is full again
    import _vmajor_cases as vcases

    vm = dict(warmup_steps=2, final_full_steps=1, cache_ratio_start=0.5, cache_ratio_end=0.75)
    rel, got, exact, ulysses_same = pools(4).run(vcases.ring_vmajor_run, family, 4, 2, "2x2", vm)[0]
    assert rel < 0.05, rel
    assert ulysses_same  # the Ulysses exchanges are exact and unchanged
    assert got[:2] == exact[:2] and got[-1] == exact[-1]  # full steps: every row
    assert all(g < 0.7 * e for g, e in zip(got[2:-1], exact[2:-1])), (got, exact)  # selective steps: fewer


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_ring_inside_nodes_ulysses_across(pools, family):
    # ring_placement="ring_inner": ring positions are contiguous ranks (inside an emulated node), the Ulysses
    # groups strided across the nodes ({0, 2}, {1, 3}); padded text masks reordered into ring-block order
    cases_ = [(3, 5, 6, 2, family == "qwenimage"), (4, 6, 3, 1, False)]
    cfg = {"ring_degree": 2, "ring_placement": "ring_inner", "topology": "2x2", "emulate": True, "v_first": True}
    diffs, degrees, label, *_ = pools(4).run(cases.ring_matches, family, 4, cfg, cases_)[0]
    assert max(diffs) < 2e-5 and degrees == (2, 2) and "ring2-inner" in label


def test_ring_placements_layout_and_refusal():
    from cocodiff import ParallelConfig, VMajorConfig
    from cocodiff.ring import layout

    assert layout(8, 4, "ulysses_inner") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout(8, 4, "ring_inner") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="ring_placement='ring_inner' stay inside nodes"):
        ParallelConfig(ring_degree=2, ring_placement="ring_inner", v_major=VMajorConfig(tiers="all"))
    with pytest.raises(ValueError, match="ring_placement='outer'"):
        ParallelConfig(ring_placement="outer")
