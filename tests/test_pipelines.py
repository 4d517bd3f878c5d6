"""The engine inside diffusers' own pipelines, unchanged (`parallelize(pipe)`), on gloo CPU ranks: exact equals
one process; V-Major through the step context the pipeline's scheduler gives (FLUX.1, SD3 with batched CFG,
Qwen-Image with true CFG: two transformer calls per step, one cache per branch; FLUX.2)."""

import pytest

import _vmajor_cases as cases
from cocodiff.apps import families as zoo

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_pipeline_exact_and_vmajor(pools, family):
    vm = dict(warmup_steps=2, tiers="all", final_full_steps=1)
    out = pools(2).run(cases.pipeline_runs, family, vm)
    diff, rel, vm_bytes, branches, exact_bytes = out[0]
    assert out[0] == out[1]  # every rank holds the same output
    assert rel < 0.05, rel
    assert vm_bytes < exact_bytes  # fewer bytes crossed (both include the output gathers)
    assert branches == (2 if family == "qwenimage" else 1)


@pytest.mark.parametrize("vmajor", [False, True], ids=["exact", "vmajor"])
def test_compiled_blocks_inside_a_pipeline(pools, vmajor):
    # compile_blocks in a whole FluxPipeline run: exact, or V-Major within its error; after the first
    # denoising step nothing is traced again (new timesteps, V-Major's levels and caches do not re-trace), except
    # V-Major's own compiled piece (its change scores), traced once at its first selective step
    vm = dict(warmup_steps=1, tiers="all", final_full_steps=1) if vmajor else None
    out = pools(2).run(cases.compiled_pipeline_runs, "flux", vm)
    rel, graphs = out[0]
    assert rel < (0.05 if vmajor else 1e-5)
    first = 2 if vmajor else 1  # steps after which the graph count stays (V-Major: warm-up, then a selective step)
    assert len(graphs) > first + 2 and len(set(graphs[first - 1 :])) == 1, graphs
    if vmajor:
        assert graphs[1] == graphs[0] + 1, graphs  # the change scores, one graph
