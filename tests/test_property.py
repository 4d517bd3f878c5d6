"""Property: over sequence lengths, batch, heads, head dim, ranks (2-7, and 8), topology tiers and configs, the
parallel output equals the single-process output, or a clear ValueError comes before any collective.

Most drawn cases are valid and compare outputs (flat, TAPA with its phases forced, V-First, the output
overlap; even and uneven sequences; heads that do not divide). A minority are invalid (fewer heads than
ranks) and must fail clearly on every rank. Each case runs on a pool of exactly `world` ranks, so TAPA's
per-tier groups span the whole group. Every case is bounded in time by the worker pool (a hang fails the case
instead of the suite)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _dist_cases as cases

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out


def _specs(world):
    out = [str(world)]
    for a in range(2, world + 1):
        if world % a == 0 and a < world:
            out.append(f"{a}x{world // a}")
            rest = world // a
            for b in range(2, rest):
                if rest % b == 0:
                    out.append(f"{a}x{b}x{rest // b}")
    return out


CONFIGS = [
    {},
    {"v_first": True},
    {"v_first": True, "overlap_output": False},
    {"overlap_output": True},
    {"all_to_all": "tapa", "tapa_plan": "phases"},
    {"all_to_all": "tapa", "tapa_plan": "phases", "v_first": True},
    {"all_to_all": "tapa", "tapa_plan": "phases", "tapa_chunks": 2},
    {"all_to_all": "tapa"},  # the automatic plan (times the routes)
]


@st.composite
def case(draw):
    world = draw(st.sampled_from([2, 3, 4, 5, 6, 7, 8]))
    valid = draw(st.integers(0, 9)) > 0  # 9 in 10 cases compare outputs
    if valid:
        heads = draw(st.integers(world, max(world, 8)))  # >= world: divisible or padded
    else:
        heads = draw(st.integers(1, world - 1))  # fewer heads than ranks and ring_degree=1: refused
    return {
        "world": world,
        "valid": valid,
        "spec": draw(st.sampled_from(_specs(world))),
        "config": draw(st.sampled_from(CONFIGS)),
        "family": draw(st.sampled_from(["flux", "sd3", "qwenimage", "flux2"])),
        "heads": heads,
        "head_dim": draw(st.sampled_from([8, 16])),
        "rows": draw(st.integers(1, 4)),
        "cols": draw(st.integers(1, 5)),
        "n_txt": draw(st.integers(1, 6)),
        "batch": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 3)),
    }


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(c=case())
def test_parallel_equals_single_process_or_clear_error(pools, c):
    results = pools(c["world"]).run(cases.property_case, c, timeout_s=120)
    if not c["valid"]:
        for kind, msg in results:
            assert kind == "error" and f"{c['heads']} heads" in msg and f"degree {c['world']}" in msg, msg
    else:
        for kind, diff in results:
            assert kind == "ok" and diff < 3e-5, (kind, diff)
