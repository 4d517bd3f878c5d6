"""TAPA: bit-identical to the flat exchange on 2- and 3-tier topologies; the whole model with preset "tapa"."""

import pytest

import _dist_cases as cases
from cocodiff.apps import families as zoo

# (world, spec, per-rank token counts): even and uneven, 2 and 3 tiers, degenerate tiers of size 1
TOPOLOGIES = [
    (4, "2x2", (3, 3, 3, 3)),
    (4, "2x2", (4, 3, 3, 2)),
    (4, "4x1", (2, 2, 1, 1)),
    (4, "1x4", (3, 2, 2, 2)),
    pytest.param(6, "2x3", (2, 2, 2, 1, 1, 1), marks=pytest.mark.slow),
    pytest.param(8, "2x2x2", (2, 2, 2, 2, 2, 2, 1, 0), marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    "world, spec, lengths", TOPOLOGIES, ids=["2x2-even", "2x2-uneven", "4x1", "1x4", "2x3", "2x2x2"]
)
def test_tapa_bit_identical_to_flat(pools, world, spec, lengths):
    out = pools(world).run(cases.tapa_equals_flat, world, spec, list(lengths))
    names, tiers, msgs = zip(*[(n, b, m) for n, b, m in out[0]])
    assert names == ("tapa", "tapa/3")
    # one phase per tier of size > 1: a rank sends (N_t - 1) messages over tier t
    sizes = list(reversed([int(s) for s in spec.split("x")]))
    assert list(msgs[0]) == [2 * (s - 1) for s in sizes]  # two exchanges: seq->head, head->seq
    assert list(msgs[1]) == [3 * 2 * (s - 1) for s in sizes]  # 3 chunks: every chunk runs each phase


@pytest.mark.parametrize("world, spec", [(4, "2x2"), pytest.param(8, "2x2x2", marks=pytest.mark.slow)])
def test_emulated_fair_flat_and_tapa_bit_identical(pools, world, spec):
    lengths = [3] * (world - 1) + [1]
    out = pools(world).run(cases.tapa_equals_flat, world, spec, lengths, (1, 2), True)
    names = [n for n, _, _ in out[0]]
    assert names == ["tapa", "tapa/2", "flat"]
    # flat under emulation sends the same bytes per tier as plain flat: more, smaller slow-tier messages than TAPA
    flat_msgs, tapa_msgs = out[0][2][2], out[0][0][2]
    assert flat_msgs[-1] > tapa_msgs[-1]


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_preset_tapa_equals_single_process(pools, family):
    shapes = [(4, 4, 8, 1), (3, 5, 5, 2)]
    diffs, decisions, stats = pools(4).run(
        cases.model_with_config, family, 4, {"preset": "tapa", "topology": "2x2"}, shapes
    )[0]
    assert max(diffs) < 2e-5
    assert decisions and set(decisions) <= {"flat", "tapa", "tapa/4"}
    assert set(stats["bytes_by_tier"]) == {"local", "node"}


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_vfirst_preset_with_emulated_slow_tier_equals_single_process(pools, family):
    cfg = {"preset": "vfirst", "topology": "2x2", "tapa_plan": "phases", "tapa_chunks": 2, "emulate": True}
    diffs, _, _ = pools(4).run(cases.model_with_config, family, 4, cfg, [(3, 5, 5, 2)])[0]
    assert max(diffs) < 2e-5


@pytest.mark.parametrize("world,spec", [(2, "2x1"), (4, "2x2")])
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_vfirst_preset_routed_in_phases_equals_single_process(pools, family, world, spec):
    # preset "vfirst" = TAPA + V-First, forced through the phases (the automatic plan may pick flat routing)
    cfg = {"preset": "vfirst", "topology": spec, "tapa_plan": "phases"}
    diffs, _, stats = pools(world).run(cases.model_with_config, family, world, cfg, [(3, 5, 5, 2), (1, 3, 2, 1)])[0]
    assert max(diffs) < 2e-5
    assert stats["bytes_by_tier"]["node"] > 0
