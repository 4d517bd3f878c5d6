"""TAPA: the block all-to-all routed in one phase per topology tier, fastest tier first.

A world of P = N_0 x ... x N_{T-1} ranks (tier 0 fastest). Rank r has coordinates (c_0, ..., c_{T-1}).
Before phase k a rank holds the blocks *from* every rank that differs from it only in coordinates < k,
*to* every rank that agrees with it in coordinates < k. Phase k is an all-to-all inside each group of ranks
that differ only in coordinate k (all groups of a tier run at once); afterwards coordinate k is settled
too. After the last phase a rank holds one block from every rank, in flat rank order: the same bytes in
the same place as the flat all-to-all, only the route differs (tests check bit equality).

Buffer layout through the phases (dims, outermost first):
    before phase k:  (D_{T-1}, ..., D_k, S_{k-1}, ..., S_0, X)   D = destination coordinate, S = source
    phase k sends along D_k: (D_k, D_{T-1}, ..., D_{k+1}, S_{k-1}, ..., S_0, X) -> all-to-all -> (S_k, ...)
Each phase costs one contiguous copy (the permute that brings D_k to the front).

Pipelining: the payload X can be cut into chunks; chunk c's phase k+1 runs while chunk c+1's phase k does
(different communicators run on different NCCL streams). On CUDA the phases are issued from one side
stream per phase, forked from and joined back to the caller's stream: no host synchronisation, graph
capturable. On CPU (gloo) phases run one after the other.

The tier groups come from `topology.build_groups` (built once per engine); the automatic choice between
this route and flat lives in `auto.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..topology import Topology
from .base import BlockExchange, CommStats, Handle


class TapaExchange(BlockExchange):
    """Hierarchical block all-to-all (see module docstring).

    Args:
        topology: tiers of the group.
        tier_groups: tier index -> this rank's process group of that tier (ranks differing only there).
        rank: this rank's index in the parent group.
        stats: byte counters to add to (shared with other strategies of the same engine).
        chunks: pieces the payload is cut into for pipelining (1 = sequential phases).
        sync: debug: wait right after starting.
    """

    name = "tapa"

    def __init__(
        self,
        *,
        topology: Topology,
        tier_groups: dict[int, object],
        rank: int,
        stats: CommStats | None = None,
        chunks: int = 1,
        sync: bool = False,
    ):
        super().__init__(topology=topology, rank=rank, stats=stats, sync=sync)
        self.sizes = topology.sizes
        self.groups = tier_groups
        self.phases = [t for t, s in enumerate(self.sizes) if s > 1]
        self.chunks = max(1, int(chunks))
        self._streams: dict[tuple[torch.device, int], torch.cuda.Stream] = {}
        if self.chunks > 1:
            self.name = f"tapa/{self.chunks}"

    def extra_buffers(self, in_flight: int) -> int:
        return 2 * len(self.phases) * in_flight  # per phase: the permuted send copy and its receive buffer

    def _account(self, send: torch.Tensor, chunks: int) -> None:
        total = send.numel() * send.element_size()
        for t in self.phases:
            n = self.sizes[t]
            self.stats.bytes_by_tier[t] += total // n * (n - 1)
            self.stats.messages_by_tier[t] += chunks * (n - 1)  # every chunk runs its own phase
        self.stats.exchanges += 1

    def _stream(self, device: torch.device, k: int) -> torch.cuda.Stream:
        key = (device, k)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]

    def _phase_send(self, buf: torch.Tensor, k_index: int) -> torch.Tensor:
        """Bring D_k (the last destination dim) to the front, contiguous. buf dims: D..., S..., X."""
        n_dest = len(self.sizes) - k_index
        order = [n_dest - 1] + list(range(n_dest - 1)) + list(range(n_dest, buf.dim()))
        return buf.permute(order).contiguous()

    @staticmethod
    def _after_phase(recv: torch.Tensor, k_index: int, n_tiers: int) -> torch.Tensor:
        """(S_k, D_{T-1..k+1}, S_{k-1..0}, X) -> (D_{T-1..k+1}, S_k, S_{k-1..0}, X) (a view)."""
        n_dest_left = n_tiers - k_index - 1
        order = list(range(1, n_dest_left + 1)) + [0] + list(range(n_dest_left + 1, recv.dim()))
        return recv.permute(order)

    def _run_chunk(self, x: torch.Tensor, async_ops: bool, streams=None, keep: list | None = None):
        """All phases of one chunk. `x`: (D_{T-1}, ..., D_0, X_CHUNK).

        Returns (S_{T-1}, ..., S_0, X_CHUNK), the works, and the stream of the last phase. Every buffer a
        phase allocates is appended to `keep`: the caller records them on the stream that waits for the
        last phase, so the caching allocator cannot hand their memory to another stream while NCCL still
        reads or writes it (the exchange after this one may start before this one is waited for)."""
        n_tiers = len(self.sizes)
        works = []
        prev_stream = None
        for k in range(n_tiers):
            if self.sizes[k] == 1:
                # nothing to exchange: relabel D_k as S_k
                x = self._after_phase(
                    x.permute([n_tiers - k - 1] + list(range(n_tiers - k - 1)) + list(range(n_tiers - k, x.dim()))),
                    k,
                    n_tiers,
                )
                continue
            if streams is not None:
                stream = streams[k]
                ctx = torch.cuda.stream(stream)
            else:
                stream, ctx = None, contextlib.nullcontext()
            with ctx:
                if streams is not None and works:
                    works[-1].wait()  # this phase's stream waits for the previous phase (no host wait)
                    x.record_stream(stream)
                send = self._phase_send(x, k)
                recv = torch.empty_like(send)
                if keep is not None:
                    keep.extend((send, recv))
                work = dist.all_to_all_single(recv, send, group=self.groups[k], async_op=True)
                if not async_ops:
                    work.wait()
                works.append(work)
                x = self._after_phase(recv, k, n_tiers)
            prev_stream = stream
        return x, works, prev_stream

    def start(self, send: torch.Tensor, post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Handle:
        self._check(send)
        P = self.world
        flat = send.reshape(P, -1)
        X = flat.shape[1]
        self._account(send, min(self.chunks, X) if X > 0 else 1)
        # (P, X) -> (D_{T-1}, ..., D_0, X)
        grid = tuple(reversed(self.sizes))
        out = torch.empty_like(flat)
        if not self.phases:
            return Handle([], send, post)  # one rank: nothing moves
        chunks = min(self.chunks, X) if X > 0 else 1
        bounds = [X * c // chunks for c in range(chunks + 1)]
        if flat.is_cuda:
            cur = torch.cuda.current_stream(flat.device)
            streams = {k: self._stream(flat.device, k) for k in self.phases}
            for s in streams.values():
                s.wait_stream(cur)  # fork: the inputs are ready on the caller's stream
            flat.record_stream(streams[self.phases[0]])
            last = None
            for c in range(chunks):
                piece = flat[:, bounds[c] : bounds[c + 1]].reshape(grid + (bounds[c + 1] - bounds[c],))
                keep: list[torch.Tensor] = []
                res, works, last = self._run_chunk(piece, async_ops=True, streams=streams, keep=keep)
                with torch.cuda.stream(last):
                    works[-1].wait()  # the last phase done implies every earlier phase of this chunk done
                    out[:, bounds[c] : bounds[c + 1]].copy_(res.reshape(P, -1))
                    for t in keep:
                        t.record_stream(last)
            out.record_stream(last)
            # Events recorded now mark the end of *this* exchange on every phase stream: waiting on them (not
            # on the streams) does not also wait for exchanges started later, and rejoins every side stream.
            done = []
            for s in streams.values():
                ev = torch.cuda.Event()
                ev.record(s)
                done.append(ev)

            def join():
                cur_now = torch.cuda.current_stream(flat.device)
                for ev in done:
                    cur_now.wait_event(ev)

            handle = Handle([], out.view_as(send), post, join=join)
        else:
            for c in range(chunks):
                piece = flat[:, bounds[c] : bounds[c + 1]].reshape(grid + (bounds[c + 1] - bounds[c],))
                res, _, _ = self._run_chunk(piece, async_ops=False)
                out[:, bounds[c] : bounds[c + 1]].copy_(res.reshape(P, -1))
            handle = Handle([], out.view_as(send), post)
        return self._finish(handle)
