"""Block exchanges: the protocol (`base`), one module per route, and the factory that builds an engine's route.

Routes: `flat` (one all-to-all, the paper's baseline), `tapa` (one phase per topology tier), `copy_engine`
(peer memcpys on one host), `tiered` (near blocks over the node's group, far blocks over the slow link:
the fair flat route under slow-tier emulation, and the route V-Major selects rows on), `auto` (the fastest
of flat and TAPA per message shape); `none` (benchmarks only: no byte moves, the compute-only bound).
`build_exchange` is the one place that maps a config to a route.
"""

from __future__ import annotations

from ..config import ParallelConfig
from ..topology import TierGroups, Topology, node_range
from .auto import AutoExchange
from .base import BlockExchange, CommStats, Handle, all_gather_into
from .flat import FlatExchange
from .none import NoExchange
from .tapa import TapaExchange
from .tiered import RowPlan, TieredExchange

__all__ = [
    "AutoExchange",
    "BlockExchange",
    "CommStats",
    "FlatExchange",
    "Handle",
    "NoExchange",
    "RowPlan",
    "TapaExchange",
    "TieredExchange",
    "all_gather_into",
    "build_exchange",
    "needs_groups",
]


def needs_groups(config: ParallelConfig) -> dict:
    """Which sub-groups `topology.build_groups` must create for `config` (keyword arguments)."""
    emu = config.emulate_slow_tier
    return {
        "tapa": config.all_to_all == "tapa",
        "node": emu is not None or (config.v_major is not None and config.v_major.tiers == "slow"),
        "slow_max_ctas": emu.max_ctas if emu is not None else None,
    }


def build_exchange(config: ParallelConfig, topology: Topology, groups: TierGroups, rank: int) -> BlockExchange:
    """The route an engine's exact exchanges take, from its config (routes share one `CommStats`)."""
    stats = CommStats(tuple(t.name for t in topology.tiers))
    common = dict(topology=topology, rank=rank, stats=stats, sync=config.sync)
    if config.all_to_all == "copy_engine":
        from .copy_engine import CopyEngineExchange  # imports symmetric memory (CUDA builds)

        return CopyEngineExchange(group=groups.group, **common)
    if config.emulate_slow_tier is not None:
        flat = TieredExchange(
            near=node_range(topology, rank), near_group=groups.node, far_group=groups.far, name="flat", **common
        )
    else:
        flat = FlatExchange(group=groups.group, **common)
    if config.all_to_all == "flat":
        return flat

    def tapa(chunks: int) -> TapaExchange:
        return TapaExchange(tier_groups=groups.tiers, chunks=chunks, **common)

    if config.tapa_plan == "phases":
        return tapa(config.tapa_chunks)
    return AutoExchange([flat, tapa(1), tapa(4)], group=groups.group)


def check_route(config: ParallelConfig, *, backend: str, hosts: int) -> None:
    """Raise a ValueError naming the fix when the configured route cannot run on this group.

    Args:
        backend: the group's backend ("nccl", "gloo").
        hosts: how many hosts the group spans (from the launcher's LOCAL_WORLD_SIZE).
    """
    if config.all_to_all == "copy_engine":
        if backend != "nccl":
            raise ValueError(
                f"cocodiff.parallelize: all_to_all='copy_engine' needs CUDA ranks on an NCCL process group, this "
                f"group uses {backend}; use all_to_all='flat'"
            )
        if hosts > 1:
            raise ValueError(
                f"cocodiff.parallelize: all_to_all='copy_engine' needs all ranks on one host, the launcher puts "
                f"them on {hosts} hosts; use all_to_all='flat' or 'tapa' across hosts"
            )


def needs_one_host(config: ParallelConfig) -> str | None:
    """The option that needs every rank on one host (checked by comparing host names), or None."""
    return "all_to_all='copy_engine'" if config.all_to_all == "copy_engine" else None
