"""The block-exchange protocol every route implements, its handle, and the byte counters.

Every Ulysses exchange is the same primitive: a *block all-to-all*. Each rank holds a send buffer whose
dim 0 has one block per destination rank, `(P, ...)`, and receives a buffer whose dim 0 has one block per
source rank. How the blocks travel is the route's business (`flat`, `tapa`, `copy_engine`, `tiered`,
`auto`: one module each in this package); every route delivers the same bytes to the same place. A route's
`start` returns a `Handle`; the consumer calls `wait()` right before it needs the data, which is what lets
V's transfer run under Q/K work.

This package imports no diffusers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..topology import Topology


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
    Padding rows are payload too: they are counted, since they travel. `ring_bytes` counts the K/V blocks this
    rank sent to its ring successor (Ulysses x ring; 0 without a ring). Counters cover the last transformer
    call (`engine.step_stats`). Under `cuda_graph=True` each replay adds the counts recorded at its capture;
    `GraphedStep.replay_only` (benchmarks) updates nothing, so the capture call's values stand.
    """

    tier_names: tuple[str, ...]
    bytes_by_tier: list[int] = field(default_factory=list)
    messages_by_tier: list[int] = field(default_factory=list)
    exchanges: int = 0
    gather_bytes: int = 0
    ring_bytes: int = 0

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
        self.ring_bytes = 0

    def add(self, other: CommStats) -> None:
        for i in range(len(self.tier_names)):
            self.bytes_by_tier[i] += other.bytes_by_tier[i]
            self.messages_by_tier[i] += other.messages_by_tier[i]
        self.exchanges += other.exchanges
        self.gather_bytes += other.gather_bytes
        self.ring_bytes += other.ring_bytes

    def copy(self) -> CommStats:
        out = CommStats(self.tier_names)
        out.add(self)
        return out

    def count_blocks(self, peers_per_tier: list[int], block_bytes: int) -> None:
        """Account one block all-to-all: one block of `block_bytes` to each peer, per tier."""
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
            "ring_bytes": self.ring_bytes,
            "total_bytes": sum(self.bytes_by_tier) + self.gather_bytes + self.ring_bytes,
        }


# ---------------------------------------------------------------------------------------------------
# Handle
# ---------------------------------------------------------------------------------------------------
class Handle:
    """An exchange in flight. `wait()` returns the received tensor (post-processed), once.

    On NCCL, `wait()` only makes the current stream wait for the communication stream: no host sync, so a
    step that uses handles can be captured in a CUDA graph.
    """

    __slots__ = ("_works", "_result", "_post", "_join", "_done")

    def __init__(
        self,
        works: list,
        result: torch.Tensor | None,
        post: Callable[[torch.Tensor], torch.Tensor] | None,
        join: Callable[[], None] | None = None,
    ):
        self._works = works
        self._result = result
        self._post = post
        self._join = join
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

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

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Handle:
        """Chain `fn` after the post-processing (runs at `wait()`); returns this handle."""
        if self._done:
            self._result = fn(self._result)
            return self
        post = self._post
        self._post = fn if post is None else (lambda x: fn(post(x)))
        return self


# ---------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------
class BlockExchange(ABC):
    """A route for block all-to-alls over the P ranks of one engine.

    Contract: `start(send, post)` takes `send` `(P, ...)` (block i goes to rank i) and returns a `Handle`
    yielding `(P, ...)` with block j from rank j, then `post` applied. Every route delivers the same bytes to
    the same place; they differ in how the bytes travel. Routes count what they send in `stats`.

    Args:
        topology: tiers of the engine's group (byte accounting per tier; tiered routes also route by it).
        rank: this rank's index in the engine's group.
        stats: byte counters shared by all routes of one engine (default: fresh ones).
        sync: debug switch: wait right after starting (no overlap).
    """

    name: str = "exchange"
    # True when `start` copies every send buffer into memory of its own unless it came from `send_buffer` (the
    # copy engine's symmetric memory); otherwise any contiguous tensor is sent in place
    owns_send_buffers: bool = False

    def __init__(self, *, topology: Topology, rank: int, stats: CommStats | None = None, sync: bool = False):
        self.topology = topology
        self.world = topology.world_size
        self.rank = rank
        self.stats = stats if stats is not None else CommStats(tuple(t.name for t in topology.tiers))
        self.sync = sync
        self.peers = topology.peers_per_tier(rank)

    @abstractmethod
    def start(self, send: torch.Tensor, post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Handle:
        """Start a block all-to-all of `send` `(P, ...)` contiguous."""

    def send_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An empty contiguous tensor to write the next send buffer into. Routes with buffers of their own
        (the copy engine's symmetric memory) hand out those, which saves `start` a copy."""
        return torch.empty(shape, dtype=dtype, device=device)

    def extra_buffers(self, in_flight: int) -> int:
        """Message-sized buffers this route keeps alive beyond every route's send and receive buffers, with
        `in_flight` exchanges started and not yet waited for (memory accounting before the first call)."""
        return 0

    def routes(self) -> list[BlockExchange]:
        """The routes this one dispatches to (itself, or the candidates of an automatic choice)."""
        return [self]

    def release(self) -> None:
        """Free buffers this route holds across calls (the next call allocates again); no-op by default.
        Only when no exchange is in flight and no captured graph uses them (`UlyssesEngine.release`)."""
        return None

    def set_sync(self, sync: bool) -> None:
        for route in self.routes():
            route.sync = sync

    def _check(self, send: torch.Tensor) -> None:
        if send.shape[0] != self.world:
            raise ValueError(f"block all-to-all needs dim 0 == P={self.world}, got shape {tuple(send.shape)}")

    def _count(self, send: torch.Tensor) -> None:
        self.stats.count_blocks(self.peers, send[0].numel() * send.element_size())

    def _finish(self, handle: Handle) -> Handle:
        if self.sync:
            handle.wait()
        return handle
