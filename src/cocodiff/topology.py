"""Topology: the tiers of links between ranks, innermost (fastest) first.

A world of P ranks is P = N_0 x N_1 x ... with tier 0 the fastest (e.g. tiles of one GPU, or GPUs of one
node) and the last tier the slowest (nodes). Ranks are numbered with the innermost coordinate varying
fastest, as torchrun numbers them (all local ranks of node 0, then node 1, ...).

The topology is built once and passed explicitly; `build_groups` turns it into the process groups an
engine's exchange routes need (one per tier for TAPA, the node group and the slow-link group for the tiered
route and slow-tier emulation), once per engine. Nothing here touches diffusers.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch.distributed as dist

_DEFAULT_NAMES = {1: ("local",), 2: ("local", "node"), 3: ("tile", "gpu", "node")}


def parse_topology_spec(spec: str) -> tuple[int, ...]:
    """Parse "AxBxC" (outermost first) into tier sizes innermost first: (C, B, A).

    Raises:
        ValueError: naming the spec when it is not of the form "8x6x2" with positive integers.
    """
    if not isinstance(spec, str) or not re.fullmatch(r"\s*\d+(\s*x\s*\d+)*\s*", spec):
        raise ValueError(
            f"topology spec {spec!r} is not of the form 'AxB' or 'AxBxC' (outermost tier first, "
            "e.g. '2x4' = 2 nodes of 4 GPUs)"
        )
    sizes = tuple(int(s) for s in spec.replace(" ", "").split("x"))
    if any(s < 1 for s in sizes):
        raise ValueError(f"topology spec {spec!r} has a tier of size 0; every tier needs at least 1 rank")
    return tuple(reversed(sizes))


@dataclass(frozen=True)
class Tier:
    name: str
    size: int


class Topology:
    """Tiers of a world, innermost (fastest) first.

    Args:
        sizes: tier sizes, innermost first; their product is the world size.
        names: tier names, innermost first (default "local", "node", or "tile", "gpu", "node").
    """

    def __init__(self, sizes: tuple[int, ...], names: tuple[str, ...] | None = None):
        sizes = tuple(int(s) for s in sizes)
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"topology tier sizes {sizes} must be positive")
        if names is None:
            names = _DEFAULT_NAMES.get(len(sizes), tuple(f"tier{i}" for i in range(len(sizes))))
        if len(names) != len(sizes):
            raise ValueError(f"topology has {len(sizes)} tiers but {len(names)} names: {names}")
        self.tiers = tuple(Tier(n, s) for n, s in zip(names, sizes))
        self.world_size = math.prod(sizes)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: str, world_size: int) -> Topology:
        sizes = parse_topology_spec(spec)
        if math.prod(sizes) != world_size:
            raise ValueError(
                f"topology spec {spec!r} describes {math.prod(sizes)} ranks but the process group has "
                f"{world_size}; write a spec whose sizes multiply to {world_size}"
            )
        topo = cls(sizes)
        topo._check_launcher_order()
        return topo

    @classmethod
    def from_launcher(cls, world_size: int, global_ranks: list[int] | None = None) -> Topology:
        """Two tiers (local, node) from torchrun's LOCAL_WORLD_SIZE when the group spans several hosts, else
        one tier. `global_ranks[i]` is the global rank of group rank i (default: the identity)."""
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if local is None or world_size == 1:
            return cls((world_size,))
        local = int(local)
        ranks = list(global_ranks) if global_ranks is not None else list(range(world_size))
        nodes = [r // local for r in ranks]
        distinct = sorted(set(nodes))
        if len(distinct) == 1:
            return cls((world_size,))
        per_node = world_size // len(distinct)
        expected = [distinct[i // per_node] for i in range(world_size)] if world_size % len(distinct) == 0 else None
        if nodes != expected:
            raise ValueError(
                f"the process group's ranks {ranks} are not spread evenly and contiguously over hosts of "
                f"LOCAL_WORLD_SIZE={local}; pass an explicit topology spec, e.g. "
                f"ParallelConfig(topology='1x{world_size}')"
            )
        return cls((per_node, len(distinct)))

    @classmethod
    def resolve(cls, spec: str | None, world_size: int, global_ranks: list[int] | None = None) -> Topology:
        if spec is None:
            return cls.from_launcher(world_size, global_ranks)
        return cls.from_spec(spec, world_size)

    def _check_launcher_order(self) -> None:
        """When the launcher tells how many ranks share a host, no tier declared faster than the host
        boundary may span two hosts (otherwise the 'fast' tier would ride the network)."""
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if local is None:
            return
        local = int(local)
        if local >= self.world_size:
            return  # one host: any spec is an emulation on that host
        prefix = 1
        for tier in self.tiers:
            if prefix == local:
                return
            prefix *= tier.size
            if prefix > local:
                break
        if prefix == local:
            return
        raise ValueError(
            f"topology {self.spec!r} does not match the launcher: each host has LOCAL_WORLD_SIZE={local} ranks, "
            f"but no tier boundary falls at {local} ranks, so a fast tier would span hosts; "
            f"use a spec whose inner tiers multiply to {local}, e.g. '{self.world_size // local}x{local}'"
        )

    # ---- coordinates --------------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(t.size for t in self.tiers)

    @property
    def spec(self) -> str:
        return "x".join(str(s) for s in reversed(self.sizes))

    def coords(self, rank: int) -> tuple[int, ...]:
        """Coordinates of `rank`, innermost first."""
        out = []
        for s in self.sizes:
            out.append(rank % s)
            rank //= s
        return tuple(out)

    def tier_between(self, a: int, b: int) -> int:
        """Index of the slowest tier a message from rank a to rank b crosses (-1 for a == b)."""
        ca, cb = self.coords(a), self.coords(b)
        crossed = -1
        for i, (x, y) in enumerate(zip(ca, cb)):
            if x != y:
                crossed = i
        return crossed

    def peers_per_tier(self, rank: int) -> list[int]:
        """How many other ranks rank `rank` reaches over each tier (flat all-to-all fan-out)."""
        counts = [0] * len(self.tiers)
        for other in range(self.world_size):
            t = self.tier_between(rank, other)
            if t >= 0:
                counts[t] += 1
        return counts

    def tier_groups(self, tier: int) -> list[list[int]]:
        """All rank lists that vary only in coordinate `tier` (the sub-groups of one TAPA phase)."""
        stride = math.prod(self.sizes[:tier])
        size = self.sizes[tier]
        groups, seen = [], set()
        for r in range(self.world_size):
            base = r - ((r // stride) % size) * stride
            if base in seen:
                continue
            seen.add(base)
            groups.append([base + i * stride for i in range(size)])
        return groups

    def inner(self, ranks: int) -> Topology:
        """The tiers of `ranks` contiguous ranks (innermost first: whole tiers, then a part of the next one):
        what a group of contiguous ranks spans, e.g. a Ulysses group of a Ulysses x ring layout.

        Raises:
            ValueError: when `ranks` contiguous ranks are not a whole number of tiers times a divisor of the next.
        """
        sizes, names, left = [], [], ranks
        for tier in self.tiers:
            if left == 1:
                break
            take = math.gcd(left, tier.size)
            if take != min(left, tier.size):
                break
            sizes.append(take)
            names.append(tier.name)
            left //= take
            if take < tier.size:
                break
        if left != 1:
            raise ValueError(
                f"topology {self.spec!r}: {ranks} contiguous ranks do not cover whole inner tiers (and a divisor of "
                "the next); choose a ring_degree that leaves such a Ulysses degree"
            )
        return Topology(tuple(sizes) or (1,), tuple(names) or None)

    def __repr__(self) -> str:
        inner = ", ".join(f"{t.name}={t.size}" for t in self.tiers)
        return f"Topology({self.spec}: {inner})"


# ---------------------------------------------------------------------------------------------------
# Process groups of one engine
# ---------------------------------------------------------------------------------------------------
@dataclass
class TierGroups:
    """The process groups of one engine's exchange routes, built once by `build_groups`.

    Args:
        group: the engine's group (all P ranks).
        tiers: tier index -> this rank's group of the ranks that differ from it only in that tier (TAPA).
        node: this rank's group of the ranks sharing its outermost coordinate (None if not built).
        far: all P ranks, for blocks that cross the outermost tier: CTA-capped under slow-tier emulation,
            else the engine's group itself.
    """

    group: object
    tiers: dict[int, object] = field(default_factory=dict)
    node: object | None = None
    far: object | None = None


def slow_link_options(group, max_ctas: int):
    """NCCL options that cap a communicator's CTAs (the slow-link lever); None for other backends."""
    if dist.get_backend(group) != "nccl":
        return None
    opts = dist.ProcessGroupNCCL.Options()
    opts.config.max_ctas = max_ctas
    return opts


def check_groups(
    topology: Topology, group, *, tapa: bool, node: bool, slow_max_ctas: int | None = None, parent=None
) -> bool:
    """Whether `build_groups` must create sub-groups; raises the errors it would raise, before any collective."""
    if not (tapa or node or slow_max_ctas is not None):
        return False
    world = dist.get_world_size(group if parent is None else parent)
    if world != dist.get_world_size():
        raise ValueError(
            f"cocodiff: all_to_all='tapa', emulate_slow_tier and V-Major need the engine's group to span the whole "
            f"default process group (this group has {world} of {dist.get_world_size()} ranks); use "
            "all_to_all='flat' without them on sub-groups, or start a process group of exactly these ranks"
        )
    if slow_max_ctas is not None and (len(topology.tiers) < 2 or topology.sizes[-1] == 1):
        raise ValueError(
            f"ParallelConfig.emulate_slow_tier needs a topology whose outermost tier has at least 2 members, got "
            f"{topology.spec!r}; set topology='2x2' (2 emulated nodes of 2 ranks), for example"
        )
    return True


def build_groups(
    topology: Topology, group, *, tapa: bool, node: bool, slow_max_ctas: int | None = None, parent=None
) -> TierGroups:
    """Create the sub-groups an engine needs (collective: every rank of the default group calls it alike).

    Args:
        topology: tiers of `group`.
        group: the engine's process group.
        parent: None, or the group `group` is one of several equal blocks of contiguous ranks of (the Ulysses
            groups of a Ulysses x ring layout): the sub-groups of every block are created, each rank keeps its own.
        tapa: build one group per tier (TAPA's phases).
        node: build this rank's node group (the tiered route's near blocks).
        slow_max_ctas: emulate a slow outermost tier: its groups (TAPA's outer phase and the far-block group)
            get this NCCL CTA cap.

    Raises:
        ValueError: when sub-groups are needed but `group` is a proper sub-group of the world (creating
            them would need ranks outside it, and torch's local-synchronisation groups hang after ordinary
            `new_group` calls), or when emulation is asked for without an outer tier of at least 2.
    """
    out = TierGroups(group=group, far=group)
    if not check_groups(topology, group, tapa=tapa, node=node, slow_max_ctas=slow_max_ctas, parent=parent):
        return out
    world = dist.get_world_size(group)
    if parent is None:
        _build_tier_groups(out, topology, dist.get_process_group_ranks(group), tapa, node, slow_max_ctas)
        return out
    everyone = dist.get_process_group_ranks(parent)
    for b in range(len(everyone) // world):  # every block in order, on every rank
        block = everyone[b * world : (b + 1) * world]
        _build_tier_groups(
            out if dist.get_rank() in block else TierGroups(group=None), topology, block, tapa, node, slow_max_ctas
        )
    return out


def _build_tier_groups(out: TierGroups, topology: Topology, parent: list[int], tapa, node, slow_max_ctas) -> None:
    """The sub-groups of one engine group whose global ranks are `parent`, into `out` (the ones this rank is in)."""
    world = len(parent)
    outer = len(topology.tiers) - 1
    me = dist.get_rank()
    slow_opts = slow_link_options(dist.group.WORLD, slow_max_ctas) if slow_max_ctas is not None else None

    def make(members: list[int], opts=None):
        # every rank creates every sub-group (torch's new_group contract); it keeps the ones it belongs to
        ranks = [parent[m] for m in members]
        g = dist.new_group(ranks, pg_options=opts)
        return g if me in ranks else None

    if tapa:
        for t in range(len(topology.tiers)):
            if topology.sizes[t] == 1:
                continue
            for members in topology.tier_groups(t):
                g = make(members, slow_opts if t == outer else None)
                if g is not None:
                    out.tiers[t] = g
    if node or slow_max_ctas is not None:
        local = world // topology.sizes[outer]
        for n in range(topology.sizes[outer]):
            g = make(list(range(n * local, (n + 1) * local)))
            if g is not None:
                out.node = g
    if slow_max_ctas is not None:
        far = make(list(range(world)), slow_opts)
        if far is not None:
            out.far = far


def node_range(topology: Topology, rank: int) -> tuple[int, int]:
    """Group ranks `(lo, hi)` that share `rank`'s outermost coordinate (its node)."""
    local = topology.world_size // topology.sizes[-1]
    lo = rank // local * local
    return lo, lo + local
