"""Ulysses exchanges: sequence-sharded <-> head-sharded, with async handles and byte accounting per tier.

Every exchange is the same primitive: a *block all-to-all*. Each rank holds a send buffer whose dim 0 has
one block per destination rank, `(P, ...)`, and receives a buffer whose dim 0 has one block per source
rank. How the blocks travel is the strategy's business: `FlatAllToAll` issues one all-to-all over the whole
group (the paper's "Flat" baseline); a topology-aware strategy (TAPA) routes the same blocks in one phase
per tier and must deliver the same bytes to the same place. Strategies return a `Handle`; the consumer
calls `wait()` right before it needs the data, which is what lets V's transfer run under Q/K work.

Ranks may hold different numbers of tokens (a sequence that does not divide by P). Blocks are padded to
the longest local length `L_MAX` so that every block has the same size (one even all-to-all, and TAPA's
phases stay uniform); the padding rows are dropped right after the exchange, before attention sees them,
so they cannot change the result.

Names: B batch, S all tokens, L local tokens of one rank, L_MAX the longest L, H heads, H_LOCAL = H / P,
D head dim, P ranks. This module imports no diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from .topology import Topology


def all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """`all_gather_single` where torch has it (2.13+), else `all_gather_into_tensor` (same semantics)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


# ---------------------------------------------------------------------------------------------------
# Byte accounting
# ---------------------------------------------------------------------------------------------------
@dataclass
class CommStats:
    """Bytes and messages this rank sent, per tier, and how many exchanges it started.

    `bytes_by_tier[t]` counts payload bytes leaving this rank over tier t (bytes to itself are not counted);
    `messages_by_tier[t]` counts point-to-point messages (one per peer per collective: a chunked TAPA phase
    counts once per chunk); `exchanges` counts block all-to-alls started (one may issue several collectives).
    Padding rows are payload too: they are counted, since they travel. Counters cover the last forward call
    (`engine.step_stats`). Under `cuda_graph=True` each replay adds the counts recorded at its capture;
    `GraphedStep.replay_only` (benchmarks) updates nothing, so the capture call's values stand.
    """

    tier_names: tuple[str, ...]
    bytes_by_tier: list[int] = field(default_factory=list)
    messages_by_tier: list[int] = field(default_factory=list)
    exchanges: int = 0
    gather_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.bytes_by_tier:
            self.bytes_by_tier = [0] * len(self.tier_names)
        if not self.messages_by_tier:
            self.messages_by_tier = [0] * len(self.tier_names)

    def reset(self) -> None:
        self.bytes_by_tier = [0] * len(self.tier_names)
        self.messages_by_tier = [0] * len(self.tier_names)
        self.exchanges = 0
        self.gather_bytes = 0

    def add(self, other: "CommStats") -> None:
        for i in range(len(self.tier_names)):
            self.bytes_by_tier[i] += other.bytes_by_tier[i]
            self.messages_by_tier[i] += other.messages_by_tier[i]
        self.exchanges += other.exchanges
        self.gather_bytes += other.gather_bytes

    def count_block_exchange(self, peers_per_tier: list[int], send: torch.Tensor) -> None:
        """Account one block all-to-all of `send` `(P, ...)`: one block to each peer, per tier."""
        block_bytes = send[0].numel() * send.element_size()
        for t, n in enumerate(peers_per_tier):
            self.bytes_by_tier[t] += n * block_bytes
            self.messages_by_tier[t] += n
        self.exchanges += 1

    def as_dict(self) -> dict:
        return {
            "bytes_by_tier": dict(zip(self.tier_names, self.bytes_by_tier)),
            "messages_by_tier": dict(zip(self.tier_names, self.messages_by_tier)),
            "exchange_calls": self.exchanges,
            "output_gather_bytes": self.gather_bytes,
            "total_bytes": sum(self.bytes_by_tier) + self.gather_bytes,
        }


# ---------------------------------------------------------------------------------------------------
# Handles and strategies
# ---------------------------------------------------------------------------------------------------
class Handle:
    """An exchange in flight. `wait()` returns the received tensor (post-processed), once.

    On NCCL, `wait()` only makes the current stream wait for the communication stream: no host sync, so a
    step that uses handles can be captured in a CUDA graph.
    """

    __slots__ = ("_works", "_result", "_post", "_join", "_done")

    def __init__(self, works: list, result: torch.Tensor | None, post: Callable[[torch.Tensor], torch.Tensor] | None,
                 join: Callable[[], None] | None = None):
        self._works = works
        self._result = result
        self._post = post
        self._join = join
        self._done = False

    def wait(self) -> torch.Tensor:
        if not self._done:
            for w in self._works:
                if w is not None:
                    w.wait()
            if self._join is not None:
                self._join()  # side streams of a multi-phase exchange rejoin the caller's stream
            if self._post is not None:
                self._result = self._post(self._result)
            self._works = []
            self._done = True
        return self._result

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Handle":
        """Chain `fn` after the post-processing (runs at `wait()`); returns this handle."""
        if self._done:
            self._result = fn(self._result)
            return self
        post = self._post
        self._post = fn if post is None else (lambda x: fn(post(x)))
        return self


class FlatAllToAll:
    """The paper's Flat baseline: one all-to-all over the whole group per tensor.

    Args:
        group: the process group of the P Ulysses ranks.
        topology: tiers of that group, used only to account bytes per tier (the route is NCCL's/gloo's).
        sync: debug switch: wait right after starting.
    """

    name = "flat"

    def __init__(self, *, group, topology: Topology, sync: bool = False, stats: CommStats | None = None):
        self.group = group
        self.topology = topology
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sync = sync
        self.stats = stats if stats is not None else CommStats(tuple(t.name for t in topology.tiers))
        self._peers = topology.peers_per_tier(self.rank)

    def start(self, send: torch.Tensor, post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Handle:
        """Start a block all-to-all. `send` is `(P, ...)` contiguous, block i goes to rank i; the handle
        yields `(P, ...)` with block j from rank j (then `post` applied)."""
        if send.shape[0] != self.world:
            raise ValueError(f"block all-to-all needs dim 0 == P={self.world}, got shape {tuple(send.shape)}")
        send = send.contiguous()
        recv = torch.empty_like(send)
        self.stats.count_block_exchange(self._peers, send)
        if self.world == 1:
            recv.copy_(send)
            return Handle([], recv, post)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        handle = Handle([work], recv, post)
        if self.sync:
            handle.wait()
        return handle


# ---------------------------------------------------------------------------------------------------
# Token layout of one exchange
# ---------------------------------------------------------------------------------------------------
class SeqLayout:
    """Local token counts of all ranks for one attention call, and the index maps padding needs.

    Args:
        lengths: tokens held by each rank (same on every rank: derived from config and input shapes).
        rank: this rank's index in the group.
    """

    def __init__(self, lengths: tuple[int, ...], rank: int):
        self.lengths = tuple(int(n) for n in lengths)
        self.rank = rank
        self.world = len(self.lengths)
        self.l_max = max(max(self.lengths), 1)
        self.total = sum(self.lengths)
        self.uniform = all(n == self.l_max for n in self.lengths)
        self._index_cache: dict[torch.device, torch.Tensor] = {}

    @property
    def local(self) -> int:
        return self.lengths[self.rank]

    def real_rows(self, device: torch.device) -> torch.Tensor:
        """Indices of the real (non-padding) rows in a `(P * L_MAX)` stack of padded blocks."""
        idx = self._index_cache.get(device)
        if idx is None:
            rows = [r * self.l_max + i for r, n in enumerate(self.lengths) for i in range(n)]
            idx = torch.tensor(rows, dtype=torch.long, device=device)
            self._index_cache[device] = idx
        return idx


def send_buffer(a2a, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An empty contiguous send buffer for `a2a.start`: the strategy's own (e.g. the copy-engine exchange's
    symmetric-memory slot, which saves it a copy) or a fresh tensor."""
    make = getattr(a2a, "send_buffer", None)
    if make is None:
        return like.new_empty(shape)
    return make(shape, like.dtype, like.device)


def start_seq_to_head(x: torch.Tensor, layout: SeqLayout, a2a: FlatAllToAll) -> Handle:
    """Start the seq->head exchange of one tensor.

    Args:
        x: `(B, L, H, D)`, this rank's L tokens, all heads.
    Returns:
        a handle yielding `(B, H_LOCAL, S, D)`: all S tokens (source-rank order), this rank's heads.
    """
    P = layout.world
    B, L, H, D = x.shape
    if L != layout.local:
        raise ValueError(f"seq->head: rank {layout.rank} holds {L} tokens, layout says {layout.local}")
    if H % P:
        raise ValueError(f"seq->head: {H} heads do not divide over {P} ranks")
    h_local = H // P
    # (B, L, H, D) -> (B, L, P, H_LOCAL, D) -> (P, L, B, H_LOCAL, D)
    blocks = x.view(B, L, P, h_local, D).permute(2, 1, 0, 3, 4)
    send = send_buffer(a2a, (P, layout.l_max, B, h_local, D), x)
    send[:, :L].copy_(blocks)
    if L != layout.l_max:
        send[:, L:].zero_()  # padding rows: dropped after the exchange, zero for reproducible bytes

    def post(recv: torch.Tensor) -> torch.Tensor:
        # (P, L_MAX, B, H_LOCAL, D) -> (P * L_MAX, B, H_LOCAL, D) -> drop padding -> (S, B, H_LOCAL, D)
        flat = recv.view(P * layout.l_max, B, h_local, D)
        if not layout.uniform:
            flat = flat.index_select(0, layout.real_rows(flat.device))
        # (S, B, H_LOCAL, D) -> (B, H_LOCAL, S, D): a view; SDPA takes the strides as they are
        return flat.permute(1, 2, 0, 3)

    return a2a.start(send, post)


def start_head_to_seq(o: torch.Tensor, layout: SeqLayout, a2a: FlatAllToAll) -> Handle:
    """Start the head->seq exchange of an attention output.

    Args:
        o: `(B, H_LOCAL, S, D)`, all tokens (source-rank order, as seq->head delivered them), this rank's heads.
    Returns:
        a handle yielding `(B, L, H, D)`: this rank's tokens, all heads (head order restored).
    """
    P = layout.world
    B, h_local, S, D = o.shape
    if S != layout.total:
        raise ValueError(f"head->seq: got {S} tokens, layout says {layout.total}")
    # (B, H_LOCAL, S, D) -> (S, B, H_LOCAL, D)
    tokens = o.permute(2, 0, 1, 3)
    send = send_buffer(a2a, (P, layout.l_max, B, h_local, D), o)
    rows = send.view(P * layout.l_max, B, h_local, D)
    if layout.uniform:
        # (S, B, H_LOCAL, D) -> (P * L, B, H_LOCAL, D) = (P, L, B, H_LOCAL, D)
        rows.copy_(tokens)
    else:
        rows.zero_()
        rows.index_copy_(0, layout.real_rows(o.device), tokens)
    L = layout.local

    def post(recv: torch.Tensor) -> torch.Tensor:
        # (P, L_MAX, B, H_LOCAL, D): block j = my tokens, head group j -> (B, L, P, H_LOCAL, D) -> (B, L, H, D)
        mine = recv[:, :L] if L != layout.l_max else recv
        return mine.permute(2, 1, 0, 3, 4).reshape(B, L, P * h_local, D)

    return a2a.start(send, post)


def gather_seq(x: torch.Tensor, layout: SeqLayout, *, dim: int, group, stats: CommStats | None = None):
    """All-gather a sequence-sharded tensor along `dim` (uneven lengths allowed): every rank gets the whole.

    Used once per forward for the model output, never inside attention.
    """
    world = layout.world
    if world == 1:
        return x
    l_max = layout.l_max
    dim = dim % x.dim()
    # (..., L, ...) -> (L, ...): the sequence dim first, padded to L_MAX
    moved = x.movedim(dim, 0)
    if moved.shape[0] != layout.local:
        raise ValueError(
            f"gather: rank {layout.rank} holds {moved.shape[0]} rows along dim {dim}, expected {layout.local}"
        )
    if layout.local == l_max:
        send = moved.contiguous()
    else:
        send = moved.new_zeros((l_max,) + tuple(moved.shape[1:]))
        send[: moved.shape[0]].copy_(moved)
    # (P * L_MAX, ...) in source-rank order
    out = moved.new_empty((world * l_max,) + tuple(moved.shape[1:]))
    all_gather_into(out, send, group=group)
    if stats is not None:
        stats.gather_bytes += send.numel() * send.element_size() * (world - 1)
    if not layout.uniform:
        out = out.index_select(0, layout.real_rows(out.device))
    return out.movedim(0, dim).contiguous()
