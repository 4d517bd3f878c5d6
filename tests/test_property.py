"""Property: over sequence lengths, batch, heads, head dim, ranks (1-8), topology tiers and configs, the
parallel output equals the single-process output, or a clear ValueError comes before any collective.
Every case is bounded in time by the worker pool (a hang fails the case instead of the suite)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _dist_cases as cases


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
    {"all_to_all": "tapa"},
    {"all_to_all": "tapa", "tapa_plan": "phases", "v_first": True},
    {"all_to_all": "tapa", "tapa_plan": "phases", "tapa_chunks": 2},
]


@st.composite
def case(draw):
    world = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 8, 8]))  # 8 = the whole pool: TAPA runs there
    return {
        "world": world,
        "spec": draw(st.sampled_from(_specs(world))),
        "config": draw(st.sampled_from(CONFIGS)),
        "family": draw(st.sampled_from(["flux", "sd3"])),
        "heads": draw(st.sampled_from([1, 2, 3, 4, 6, 8])),
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
    out = pools(8).run(cases.property_case, c, timeout_s=120)
    results = out[: c["world"]]
    needs_world_group = c["config"].get("all_to_all") == "tapa" and c["world"] < 8
    if c["heads"] % c["world"]:
        for kind, msg in results:
            assert kind == "error" and f"{c['heads']} heads" in msg and f"degree {c['world']}" in msg, msg
    elif needs_world_group:
        for kind, msg in results:  # TAPA on a sub-group of the world is refused, clearly, before collectives
            assert kind == "error" and "span the whole default process group" in msg, msg
    else:
        for kind, diff in results:
            assert kind == "ok" and diff < 3e-5
