"""Validation without a process group: configs, presets, topology specs, token layouts, model plans."""

import dataclasses

import pytest
import torch

import cocodiff
from cocodiff import ParallelConfig, Topology, VMajorConfig
from cocodiff.config import SlowTierEmulation
from cocodiff.layout import SeqLayout, TokenLayout, split_sizes
from cocodiff.models import plan_for
from cocodiff.topology import parse_topology_spec


def test_flat_preset_and_defaults():
    cfg = ParallelConfig.preset("flat")
    assert cfg.all_to_all == "flat" and cfg.v_first is False and cfg.v_major is None and cfg.topology is None
    assert ParallelConfig(v_first=True).label == "flat+vfirst"


def test_config_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        ParallelConfig("flat")  # positional
    cfg = ParallelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.v_first = True


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(all_to_all="ring"), "all_to_all='ring'"),
        (dict(topology="2by2"), "'2by2'"),
        (dict(topology="2x0"), "size 0"),
        (dict(v_first="yes"), "v_first"),
        (dict(v_major="on"), "VMajorConfig"),
        (dict(tapa_plan="fast"), "tapa_plan='fast'"),
        (dict(tapa_chunks=0), "tapa_chunks=0"),
        (dict(emulate_slow_tier="yes"), "SlowTierEmulation"),
        (dict(overlap_output="yes"), "overlap_output"),
        (dict(fuse_qk=1), "fuse_qk"),
        (dict(cuda_graph="on"), "cuda_graph"),
        (dict(all_to_all="copy_engine", emulate_slow_tier=SlowTierEmulation()), "copy_engine"),
    ],
)
def test_bad_config_names_the_value(kwargs, words):
    with pytest.raises((ValueError, TypeError)) as err:
        ParallelConfig(**kwargs)
    assert words in str(err.value)


def test_presets_and_refused_combinations():
    assert ParallelConfig.preset("tapa").all_to_all == "tapa"
    assert ParallelConfig.preset("vfirst").v_first is True
    cocodiff = ParallelConfig.preset("cocodiff", topology="2x2")
    assert cocodiff.v_major == VMajorConfig() and cocodiff.v_first and cocodiff.label == "cocodiff"
    assert ParallelConfig.preset("cocodiff", v_major=VMajorConfig(tiers="all")).v_major.tiers == "all"
    with pytest.raises(ValueError, match="copy_engine"):
        ParallelConfig(all_to_all="copy_engine", v_major=VMajorConfig())
    fast = ParallelConfig.preset("fast")
    assert fast.v_first and fast.fuse_qk and fast.compile_blocks and fast.cuda_graph and fast.all_to_all == "flat"
    assert fast.label == "fast+fuse_qk+compiled+cuda_graph"
    # a preset given V-Major or head groups as overrides says so in its label
    assert ParallelConfig.preset("fast", v_major=VMajorConfig(), head_chunks=2).label == (
        "fast+vmajor+chunks2+fuse_qk+compiled+cuda_graph"
    )
    # and V-Major's settings that differ from the defaults (rows of one report must not read alike)
    assert ParallelConfig.preset("fast", v_major=VMajorConfig(fp8=True)).label.startswith("fast+vmajor(fp8)+")
    fixed = VMajorConfig(schedule="fixed", cache_ratio_start=0.9, memory_budget_gb=4.0)
    assert ParallelConfig.preset("cocodiff", v_major=fixed).label == (
        "cocodiff+vmajor(schedule=fixed,cache_ratio_start=0.9)"
    )
    assert ParallelConfig.preset("cocodiff", v_major=VMajorConfig(memory_budget_gb=4.0)).label == "cocodiff"
    # a preset with V-First switched over says so (A/B rows of one report must not read alike)
    assert ParallelConfig.preset("fast", v_first=False).label == "fast+no_vfirst+fuse_qk+compiled+cuda_graph"
    assert ParallelConfig.preset("tapa", v_first=True).label == "tapa+vfirst"
    with pytest.raises(ValueError, match="head_chunks=0"):
        ParallelConfig(head_chunks=0)
    with pytest.raises(ValueError, match="unknown preset"):
        ParallelConfig.preset("turbo")


def test_vmajor_config_validation():
    with pytest.raises(ValueError, match="cache_ratio_end"):
        VMajorConfig(cache_ratio_end=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        VMajorConfig(warmup_steps=-1)


def test_topology_spec_parsing_and_coords():
    assert parse_topology_spec("8x6x2") == (2, 6, 8)
    topo = Topology.from_spec("2x3", 6)
    assert topo.sizes == (3, 2) and topo.spec == "2x3"
    assert [topo.coords(r) for r in (0, 2, 3, 5)] == [(0, 0), (2, 0), (0, 1), (2, 1)]
    assert topo.tier_between(0, 1) == 0 and topo.tier_between(0, 4) == 1 and topo.tier_between(4, 4) == -1
    assert topo.peers_per_tier(0) == [2, 3]
    assert topo.tier_groups(0) == [[0, 1, 2], [3, 4, 5]]
    assert topo.tier_groups(1) == [[0, 3], [1, 4], [2, 5]]
    three = Topology.from_spec("2x2x2", 8)
    assert three.tier_groups(1) == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_topology_product_mismatch_names_both():
    with pytest.raises(ValueError, match="describes 4 ranks but the process group has 6"):
        Topology.from_spec("2x2", 6)


def test_topology_must_not_split_a_host(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    Topology.from_spec("2x4", 8)  # matches the launcher
    Topology.from_spec("2x2x2", 8)  # inner tiers 2x2 = 4 ranks per host: fine
    with pytest.raises(ValueError, match="no tier boundary falls at 4"):
        Topology.from_spec("4x2", 8)  # inner tier of 2 ranks, then 4 "nodes" of 2: no boundary at 4


def test_topology_from_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert Topology.from_launcher(8).sizes == (4, 2)
    assert Topology.from_launcher(4).sizes == (4,)
    assert Topology.from_launcher(2, [4, 5]).sizes == (2,)  # a sub-group on one host
    assert Topology.from_launcher(2, [3, 4]).sizes == (1, 2)  # one rank on each of two hosts
    with pytest.raises(ValueError, match="not spread evenly"):
        Topology.from_launcher(3, [0, 1, 4])


def test_split_sizes_and_layout():
    assert split_sizes(10, 4) == (3, 3, 2, 2)
    assert split_sizes(3, 4) == (1, 1, 1, 0)
    lay = TokenLayout(n_img=10, n_txt=3, world=4)
    assert lay.lengths(("txt", "img")) == (4, 4, 3, 2)
    assert lay.offset("img", 2) == 6


def test_seq_layout_real_rows():
    lay = SeqLayout((3, 1, 0, 2), rank=1)
    assert lay.l_max == 3 and lay.total == 6 and not lay.uniform and lay.local == 1
    assert lay.real_rows(torch.device("cpu")).tolist() == [0, 1, 2, 3, 9, 10]


def test_plan_for_unsupported_class():
    with pytest.raises(TypeError, match="no sharding plan for Linear"):
        plan_for(torch.nn.Linear(2, 2))


def test_parallelize_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        cocodiff.parallelize(torch.nn.Linear(2, 2), ParallelConfig())


def test_overlap_output_follows_v_first_unless_set():
    assert ParallelConfig(v_first=True).overlaps_output
    assert not ParallelConfig().overlaps_output
    assert not ParallelConfig(v_first=True, overlap_output=False).overlaps_output
    assert ParallelConfig(overlap_output=True).overlaps_output


def test_diffusers_outside_the_tested_range_warns_once(monkeypatch):
    import diffusers

    from cocodiff import compat

    assert compat.diffusers_tested(diffusers.__version__)  # the lock's version is inside the range
    assert not compat.diffusers_tested("0.99.0") and not compat.diffusers_tested("0.30.0")
    monkeypatch.setattr(diffusers, "__version__", "0.99.0")
    compat.warn_if_untested.cache_clear()
    with pytest.warns(UserWarning, match="diffusers 0.99.0 is outside"):
        compat.warn_if_untested()
    compat.warn_if_untested.cache_clear()
