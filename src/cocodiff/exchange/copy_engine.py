"""Block all-to-all over the GPUs' copy engines (PyTorch symmetric memory), for ranks of one host.

NCCL's all-to-all runs as a kernel: while V's exchange hides under the Q/K projections it occupies SMs the
projections could use. Here the bytes move as peer-to-peer memcpys, which the copy engines execute, and
only two tiny barrier kernels run on SMs. The pattern is "publish, pull" (as PyTorch's low-contention
all-gather does):

1. the sender's blocks are written into its slot of a symmetric buffer (the copy that makes the send
   buffer contiguous writes there directly, see `send_buffer`);
2. barrier: every rank has published;
3. each rank pulls block `rank` from every peer's slot, one stream per peer so the copies run in parallel;
4. barrier: every peer has pulled, so the slot may be written again.

Slots form a ring, so V's, Q's and K's send buffers can be written while earlier exchanges are still in
flight (the exchanges themselves run one after another on the copy stream); a slot is reused only after
the main stream has waited for its previous exchange's final barrier. A larger message allocates a larger
buffer; the old one is kept, since CUDA graphs captured with it replay its addresses. There is no host
synchronisation: the steps are stream operations and capture in a CUDA graph. Buffers are allocated (a
collective rendezvous) the first time a message size is seen, which must happen outside graph capture: the
eager warm-up does it.

Requires CUDA, an NCCL process group (for the rendezvous) and all ranks on one host (peer mappings).
Failure: NCCL's watchdog does not watch these barriers, so they carry their own timeout (`barrier_timeout_s`,
default 600 s like NCCL's collective timeout: a peer still compiling its first call must not trip it). A peer
that died leaves the survivors' barrier kernels waiting until then; the kernel then traps, which fails the
CUDA context with an error instead of spinning forever (torchrun and `cocodiff.apps.launch` stop the other
ranks sooner when they see a rank fail).
Whether it is faster than NCCL is measured, not assumed: the step benchmark's `ce-*` configurations
(docs/benchmarks/2026-11-28-overlap: 1.4-2.2% faster per step on 4 H200).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..topology import Topology
from .base import BlockExchange, CommStats, Handle

_ALIGN = 256  # bytes: slot starts stay aligned for the copy engines


class CopyEngineExchange(BlockExchange):
    """Block all-to-all whose blocks move as copy-engine memcpys (see the module docstring).

    Args:
        group: process group of the P ranks (NCCL, one host).
        topology: used for byte accounting only.
        slots: exchanges that may be in flight at once (V, Q, K and the output: 4).
        sync: debug switch: wait right after starting.
        barrier_timeout_s: how long a barrier waits for its peers before it traps (see the module docstring).
    """

    name = "copy_engine"
    owns_send_buffers = True

    def __init__(
        self,
        *,
        group,
        topology: Topology,
        rank: int,
        stats: CommStats | None = None,
        slots: int = 4,
        sync: bool = False,
        barrier_timeout_s: float = 600.0,
    ):
        import torch.distributed._symmetric_memory as symm_mem

        super().__init__(topology=topology, rank=rank, stats=stats, sync=sync)
        self.group = group
        self._timeout_ms = int(barrier_timeout_s * 1000)
        self._symm_mem = symm_mem
        self.slots = slots
        self._slot_bytes = 0
        self._buf = None
        self._hdl = None
        self._retired: list = []  # buffers outgrown by a larger message (graphs may still replay them)
        self._next = 0
        self._slot_done: list[tuple[torch.cuda.Event, bool] | None] = [None] * slots
        self._pending: tuple[int, torch.Tensor] | None = None  # (slot, tensor handed out by send_buffer)
        self._stream = None
        self._peer_streams: list[torch.cuda.Stream] = []

    def extra_buffers(self, in_flight: int) -> int:
        return self.slots  # the send buffers live in the symmetric buffer's slots

    def release(self) -> None:
        """Free the symmetric buffers (the current one and those outgrown); the next message allocates anew."""
        if self._buf is not None:
            torch.cuda.synchronize(self._buf.device)
        self._buf = self._hdl = None
        self._retired.clear()
        self._slot_bytes = 0
        self._slot_done = [None] * self.slots
        self._pending = None
        self._next = 0

    # ---- buffers ------------------------------------------------------------------------------------
    def _ensure(self, nbytes: int, device: torch.device) -> None:
        need = -(-nbytes // _ALIGN) * _ALIGN
        if need <= self._slot_bytes:
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"cocodiff copy-engine exchange: a {nbytes}-byte message appeared during CUDA-graph capture; "
                "run the step eagerly once before capturing (GraphedStep does) so buffers are allocated"
            )
        torch.cuda.synchronize(device)  # in-flight exchanges still use the old buffer
        if self._buf is not None:
            # CUDA graphs captured earlier hold the old buffer's addresses and signal pads: keep it alive
            self._retired.append((self._buf, self._hdl))
        self._buf = self._symm_mem.empty(self.slots * need, dtype=torch.uint8, device=device)
        self._hdl = self._symm_mem.rendezvous(self._buf, self.group.group_name)
        self._slot_bytes = need
        self._slot_done = [None] * self.slots
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
            self._peer_streams = [torch.cuda.Stream(device) for _ in range(self.world - 1)]

    def _slot_view(self, rank: int, slot: int, shape, dtype) -> torch.Tensor:
        return self._hdl.get_buffer(rank, tuple(shape), dtype, slot * self._slot_bytes // dtype.itemsize)

    def send_buffer(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor to write the next send buffer into (this rank's slot of the symmetric buffer): `start`
        on it then needs no publishing copy."""
        self._ensure(math.prod(shape) * dtype.itemsize, device)
        slot = self._next
        self._next = (slot + 1) % self.slots
        done = self._slot_done[slot]
        capturing = torch.cuda.is_current_stream_capturing()
        # an event recorded outside the capture in progress cannot be waited for inside it; the eager
        # warm-up before a capture ends with a device synchronisation, so that slot is free anyway
        if done is not None and done[1] == capturing:
            torch.cuda.current_stream().wait_event(done[0])
        view = self._slot_view(self.rank, slot, shape, dtype)
        self._pending = (slot, view)
        return view

    # ---- the exchange -------------------------------------------------------------------------------
    def start(self, send: torch.Tensor, post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Handle:
        """Start a block all-to-all of `send` `(P, ...)` (block i to rank i); see `BlockExchange.start`."""
        self._check(send)
        pending, self._pending = self._pending, None
        if pending is not None and pending[1].data_ptr() == send.data_ptr() and pending[1].shape == send.shape:
            slot = pending[0]
        else:
            mine = self.send_buffer(send.shape, send.dtype, send.device)
            mine.copy_(send)
            slot, self._pending = self._pending[0], None
        self._count(send)

        cur = torch.cuda.current_stream()
        recv = torch.empty_like(send)
        recv[self.rank].copy_(send[self.rank])  # own block: a local copy on the caller's stream
        side = self._stream
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            self._hdl.barrier(channel=slot, timeout_ms=self._timeout_ms)  # every rank has published into this slot
            for i, ps in enumerate(self._peer_streams):
                peer = (self.rank + 1 + i) % self.world
                ps.wait_stream(side)
                with torch.cuda.stream(ps):
                    recv[peer].copy_(self._slot_view(peer, slot, send.shape, send.dtype)[self.rank])
            for ps in self._peer_streams:
                side.wait_stream(ps)
            self._hdl.barrier(
                channel=slot, timeout_ms=self._timeout_ms
            )  # every peer has pulled from this slot: it may be rewritten
            done = torch.cuda.Event()
            done.record(side)
        self._slot_done[slot] = (done, torch.cuda.is_current_stream_capturing())
        return self._finish(Handle([], recv, post, join=lambda: cur.wait_event(done)))
