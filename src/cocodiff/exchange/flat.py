"""The paper's Flat baseline: one all-to-all over the whole group per tensor (NCCL or gloo routes it)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..topology import Topology
from .base import BlockExchange, CommStats, Handle


class FlatExchange(BlockExchange):
    """One `all_to_all_single` over the engine's group.

    Args:
        group: the process group of the P Ulysses ranks.
        topology, rank, stats, sync: see `BlockExchange` (the topology only labels bytes per tier here).
    """

    name = "flat"

    def __init__(self, *, group, topology: Topology, rank: int, stats: CommStats | None = None, sync: bool = False):
        super().__init__(topology=topology, rank=rank, stats=stats, sync=sync)
        self.group = group

    def start(self, send: torch.Tensor, post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Handle:
        self._check(send)
        send = send.contiguous()
        self._count(send)
        if self.world == 1:
            return Handle([], send, post)  # one rank: the send buffer is the receive buffer, no copy
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        return self._finish(Handle([work], recv, post))
