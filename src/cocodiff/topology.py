"""Topology: the tiers of links between ranks, innermost (fastest) first.

A world of P ranks is P = N_0 x N_1 x ... with tier 0 the fastest (e.g. tiles of one GPU, or GPUs of one
node) and the last tier the slowest (nodes). Ranks are numbered with the innermost coordinate varying
fastest, as torchrun numbers them (all local ranks of node 0, then node 1, ...).

The topology is built once and passed explicitly; `tier_groups` lists the rank sets of each tier's
sub-groups, which the exchange builder (`tapa.build_exchange`) turns into process groups once per engine.
Nothing here touches diffusers.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass


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
    def from_spec(cls, spec: str, world_size: int) -> "Topology":
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
    def from_launcher(cls, world_size: int, global_ranks: list[int] | None = None) -> "Topology":
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
                f"LOCAL_WORLD_SIZE={local}; pass an explicit topology spec, e.g. ParallelConfig(topology='1x{world_size}')"
            )
        return cls((per_node, len(distinct)))

    @classmethod
    def resolve(cls, spec: str | None, world_size: int, global_ranks: list[int] | None = None) -> "Topology":
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

    def __repr__(self) -> str:
        inner = ", ".join(f"{t.name}={t.size}" for t in self.tiers)
        return f"Topology({self.spec}: {inner})"
