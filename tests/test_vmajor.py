"""V-Major (lossy selective communication) and the step context it needs, on gloo CPU ranks."""

import pytest

import _vmajor_cases as cases
from cocodiff import VMajorConfig
from cocodiff.apps import families as zoo
from cocodiff.vmajor import active_rows, step_ratio

# ---- the schedule (no process group) ------------------------------------------------------------------


def test_schedule_warmup_ramp_refresh_and_final_steps():
    cfg = VMajorConfig(warmup_steps=4, cache_ratio_start=0.5, cache_ratio_end=0.9, levels=4, final_full_steps=2)
    plan = [step_ratio(cfg, s, 50) for s in range(50)]
    assert all(p is None for p in plan[:4]) and all(p is None for p in plan[48:])
    ratios = [p[0] for p in plan[4:48]]
    assert ratios[0] == 0.5 and ratios[-1] == pytest.approx(0.9)
    assert ratios == sorted(ratios)  # rises
    assert len({p[1] for p in plan[4:48]}) == 4  # quantised: 4 levels -> at most 5 graphs with the full steps
    refresh = VMajorConfig(warmup_steps=2, refresh_every=5, final_full_steps=0)
    full = [s for s in range(20) if step_ratio(refresh, s, 20) is None]
    assert full == [0, 1, 6, 11, 16]
    fixed = VMajorConfig(warmup_steps=1, schedule="fixed", cache_ratio_start=0.7, max_cache_ratio=0.6)
    assert {step_ratio(fixed, s, 10) for s in range(1, 9)} == {(0.6, 0)}  # capped


def test_active_rows():
    assert active_rows(0.0, 100) == 100 and active_rows(0.75, 100) == 25 and active_rows(0.95, 10) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cache_ratio_start=1.5), "cache_ratio_start"),
        (dict(cache_ratio_end=-0.1), "cache_ratio_end"),
        (dict(max_cache_ratio=1.0), "max_cache_ratio"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(levels=0), "levels"),
        (dict(tiers="nodes"), "tiers"),
        (dict(select_by="layer"), "select_by"),
        (dict(schedule="cosine"), "schedule"),
        (dict(memory_budget_gb=0), "memory_budget_gb"),
    ],
)
def test_bad_vmajor_configs_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VMajorConfig(**kwargs)


# ---- on gloo ranks ----------------------------------------------------------------------------------------
EXACT = {
    "warmup": dict(warmup_steps=6, tiers="all"),
    "ratio0": dict(warmup_steps=1, cache_ratio_start=0.0, cache_ratio_end=0.0, final_full_steps=0, tiers="all"),
}


@pytest.mark.parametrize("mode", list(EXACT))
@pytest.mark.parametrize("world,topology", [(2, None), (4, None), (2, "2x1"), (4, "2x2")])
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_nothing_skipped_equals_the_exact_engine(pools, family, world, topology, mode):
    kwargs = dict(EXACT[mode])
    if topology is not None:
        kwargs["tiers"] = "slow"
    pools(world).run(cases.vmajor_exact_when_nothing_is_skipped, family, world, topology, kwargs)


@pytest.mark.parametrize(
    "world,topology,kwargs",
    [
        (4, "2x2", dict(warmup_steps=2)),  # the defaults on two emulated nodes
        (4, None, dict(warmup_steps=1, tiers="all", select_by="heads")),
        (2, "2x1", dict(warmup_steps=1, output=False, schedule="fixed", cache_ratio_start=0.6)),
        (4, "2x2", dict(warmup_steps=2, fp8=True)),  # 8-bit rows with a scale per head
    ],
)
@pytest.mark.parametrize("family", ["flux", "sd3", "qwenimage", "flux2"])
def test_slow_tier_bytes_drop_as_the_schedule_says(pools, family, world, topology, kwargs):
    rel, sent, exact = pools(world).run(cases.vmajor_bytes_follow_the_schedule, family, world, topology, kwargs)[0]
    assert sum(sent) < 0.75 * sum(exact), (sent, exact)


def test_ranks_whose_v_differ_wildly_still_complete(pools):
    counts = pools(4).run(cases.vmajor_ranks_with_wildly_different_v, 4)
    assert all(c == counts[0] for c in counts)  # the same bytes on every rank: sizes follow the schedule


def test_generations_and_cfg_branches_never_share_caches(pools):
    assert pools(2).run(cases.vmajor_generations_and_branches, 2) == [2, 2]


def test_vmajor_refusals_are_clear_and_on_every_rank(pools):
    for out in pools(2).run(cases.vmajor_refusals, 2):
        assert "denoising step" in out["no_steps"], out
        assert "warmup_steps=9 is longer than the run (4 steps)" in out["warmup"], out
        assert "V-Major's caches" in out["budget"] and "memory_budget_gb" in out["budget"], out
        assert "outermost" in out["single_tier"] and "tiers='all'" in out["single_tier"], out


def test_step_context_tracks_generations_steps_and_cfg_calls(pools):
    assert pools(2).run(cases.step_context_over_generations, 2) == [True, True]


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo"])
def test_vmajor_on_video_families(pools, family):
    rel, fraction = pools(2).run(cases.video_vmajor, family)[0]
    assert rel < 0.05 and fraction < 0.8, (rel, fraction)


def test_vmajor_adds_few_ops_per_layer(pools):
    # each op a selective V-Major layer adds over the exact one is a small kernel on the GPU step's critical
    # path (at 5-10% of the bytes its 1024^2 step stays ~9 ms above the no-exchange bound,
    # docs/benchmarks/2026-11-30-sizes-slow-tier): the rows' index is computed once per layer, not per tensor
    per_layer, extra, layers = pools(2).run(cases.vmajor_ops_per_layer, 2)[0]
    assert extra.get("add", 0) <= 3 * layers and "mul" not in extra, extra  # (was 10 adds and a mul per layer)
    assert per_layer <= 33, (per_layer, extra)  # eager: the change scores' 9 ops compile into one kernel
