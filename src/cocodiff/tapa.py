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

Also here: `FairFlatAllToAll`, the flat exchange under slow-tier emulation (each rank pair's bytes over the
same emulated link as TAPA uses), and `AutoAllToAll`, which picks the faster route per message shape by
timing the candidates (flat, TAPA, TAPA in 4 chunks) at first use (timings max-reduced over ranks, so
every rank picks the same).
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Callable

import torch
import torch.distributed as dist

from .comm import CommStats, Handle
from .topology import Topology


class TapaAllToAll:
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

    def __init__(self, *, topology: Topology, tier_groups: dict[int, object], rank: int, stats: CommStats,
                 chunks: int = 1, sync: bool = False):
        self.topology = topology
        self.sizes = topology.sizes
        self.world = topology.world_size
        self.rank = rank
        self.groups = tier_groups
        self.phases = [t for t, s in enumerate(self.sizes) if s > 1]
        self.stats = stats
        self.chunks = max(1, int(chunks))
        self.sync = sync
        self._streams: dict[tuple[torch.device, int], torch.cuda.Stream] = {}
        if self.chunks > 1:
            self.name = f"tapa/{self.chunks}"

    def _account(self, send: torch.Tensor, chunks: int) -> None:
        total = send.numel() * send.element_size()
        for t in self.phases:
            n = self.sizes[t]
            self.stats.bytes_by_tier[t] += total // n * (n - 1)
            self.stats.messages_by_tier[t] += chunks * (n - 1)  # every chunk runs its own phase
        self.stats.exchanges += 1

    def _stream(self, device: torch.device, k: int) -> "torch.cuda.Stream":
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
                x = self._after_phase(x.permute([n_tiers - k - 1] + list(range(n_tiers - k - 1)) +
                                                list(range(n_tiers - k, x.dim()))), k, n_tiers)
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
        if send.shape[0] != self.world:
            raise ValueError(f"block all-to-all needs dim 0 == P={self.world}, got shape {tuple(send.shape)}")
        P = self.world
        flat = send.reshape(P, -1)
        X = flat.shape[1]
        self._account(send, min(self.chunks, X) if X > 0 else 1)
        # (P, X) -> (D_{T-1}, ..., D_0, X)
        grid = tuple(reversed(self.sizes))
        out = torch.empty_like(flat)
        if not self.phases:
            out.copy_(flat)
            return Handle([], out.view_as(send), post)
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
        if self.sync:
            handle.wait()
        return handle


class FairFlatAllToAll:
    """The flat exchange under slow-tier emulation: intra-node blocks over the node's fast group, inter-node
    blocks over the emulated slow link (a CTA-limited group of all ranks), both at once, as NCCL would run a
    flat all-to-all on a real cluster. Same bytes in the same place as `FlatAllToAll`.

    Args:
        topology: tiers; the outermost tier is the (emulated) slow one.
        node_group: this rank's group of ranks sharing its outermost coordinate.
        slow_world: all ranks, over the emulated slow link.
    """

    name = "flat"

    def __init__(self, *, topology: Topology, node_group, slow_world, rank: int, stats: CommStats, sync: bool = False):
        self.topology = topology
        self.world = topology.world_size
        self.rank = rank
        self.local = self.world // topology.sizes[-1]
        self.node = rank // self.local
        self.node_group = node_group
        self.slow_world = slow_world
        self.stats = stats
        self.sync = sync
        self._peers = topology.peers_per_tier(rank)
        lo, hi = self.node * self.local, (self.node + 1) * self.local
        self._local_rows = (lo, hi)
        self._remote_splits = [0 if lo <= r < hi else 1 for r in range(self.world)]

    def start(self, send: torch.Tensor, post=None) -> Handle:
        if send.shape[0] != self.world:
            raise ValueError(f"block all-to-all needs dim 0 == P={self.world}, got shape {tuple(send.shape)}")
        self.stats.count_block_exchange(self._peers, send)
        P = self.world
        flat = send.reshape(P, -1)
        lo, hi = self._local_rows
        local_send = flat[lo:hi].contiguous()
        local_recv = torch.empty_like(local_send)
        remote_send = torch.cat([flat[:lo], flat[hi:]]).contiguous()
        remote_recv = torch.empty_like(remote_send)
        w1 = dist.all_to_all_single(local_recv, local_send, group=self.node_group, async_op=True)
        w2 = dist.all_to_all_single(remote_recv, remote_send, output_split_sizes=self._remote_splits,
                                    input_split_sizes=self._remote_splits, group=self.slow_world, async_op=True)

        def assemble(_):
            out = torch.cat([remote_recv[:lo], local_recv, remote_recv[lo:]])
            out = out.view_as(send)
            return post(out) if post is not None else out

        handle = Handle([w1, w2], None, assemble)
        if self.sync:
            handle.wait()
        return handle


class AutoAllToAll:
    """Per message shape, the fastest of several equivalent strategies, chosen by timing them at first use.

    Decisions depend only on the shape and on timings that are max-reduced over all ranks, so every rank
    makes the same choice (a rank that chose differently would issue different collectives and hang).
    Tuning runs collectives, so it must happen in an eager call before any CUDA-graph capture.
    """

    name = "auto"

    def __init__(self, candidates: list, *, group, stats: CommStats, reps: int = 10, margin: float = 0.97):
        self.candidates = candidates  # candidates[0] is the flat route, the default
        self.group = group
        self.stats = stats
        self.reps = reps
        self.margin = margin
        self.decisions: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}
        self._chosen: dict[tuple, object] = {}

    def _time(self, strat, sample: torch.Tensor) -> float:
        """Median ms of `reps` exchanges (2 warm-up), leaving the byte counters as they were."""
        from .timing import time_ms

        saved = (list(self.stats.bytes_by_tier), list(self.stats.messages_by_tier), self.stats.exchanges)
        times = time_ms(lambda: strat.start(sample).wait(), warmup=2, iters=self.reps, cuda=sample.is_cuda)
        self.stats.bytes_by_tier[:], self.stats.messages_by_tier[:] = saved[0], saved[1]
        self.stats.exchanges = saved[2]
        return statistics.median(times)

    def choose(self, send: torch.Tensor):
        key = (tuple(send.shape), send.dtype, send.device.type)
        strat = self._chosen.get(key)
        if strat is not None:
            return strat
        if send.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"cocodiff: exchange shape {tuple(send.shape)} was not tuned before CUDA-graph capture; run the "
                "step once eagerly first (GraphedStep does)"
            )
        sample = torch.randn(send.shape, device=send.device).to(send.dtype)
        times = torch.tensor([self._time(c, sample) for c in self.candidates], dtype=torch.float64)
        times = times.to(send.device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=self.group)
        times = times.cpu().tolist()
        # another route replaces flat only if it is clearly faster (timings of ~10 runs are noisy)
        best = min(range(len(self.candidates)), key=lambda i: times[i])
        if times[best] > self.margin * times[0]:
            best = 0
        strat = self.candidates[best]
        self._chosen[key] = strat
        self.decisions[key] = strat.name
        self.timings[key] = {c.name: t for c, t in zip(self.candidates, times)}
        return strat

    def start(self, send: torch.Tensor, post=None) -> Handle:
        return self.choose(send).start(send, post)


# ---------------------------------------------------------------------------------------------------
# Building the exchange of an engine
# ---------------------------------------------------------------------------------------------------
def _slow_options(group, max_ctas: int):
    """NCCL options that cap a communicator's CTAs (the slow-link lever); None for other backends."""
    if dist.get_backend(group) != "nccl":
        return None
    opts = dist.ProcessGroupNCCL.Options()
    opts.config.max_ctas = max_ctas
    return opts


class _GroupFactory:
    """Creates the sub-groups of one engine. Every rank of the default group calls `new_group` for every
    sub-group (torch's collective contract), so engines with sub-groups need the default group as their
    group (checked in `build_exchange`)."""

    def __init__(self, group):
        self.parent = dist.get_process_group_ranks(group)
        self.me = dist.get_rank()

    def make(self, members: list[int], opts=None):
        """`members` are group ranks; returns the new group if this rank is a member, else None."""
        ranks = [self.parent[m] for m in members]
        g = dist.new_group(ranks, pg_options=opts)
        return g if self.me in ranks else None


def build_exchange(config, group, topology: Topology):
    """The block all-to-all strategy an engine uses, with its process groups (collective: all ranks call it).

    Returns:
        (strategy, stats): the strategy's `start(send, post)` is what the seq<->head exchanges call.
    """
    from .comm import FlatAllToAll  # local: comm stays free of TAPA

    rank = dist.get_rank(group)
    stats = CommStats(tuple(t.name for t in topology.tiers))
    emul = config.emulate_slow_tier
    if config.all_to_all == "copy_engine":
        from .ce import CopyEngineAllToAll

        return CopyEngineAllToAll(group=group, topology=topology, sync=config.sync, stats=stats), stats
    if config.all_to_all == "flat" and emul is None:
        return FlatAllToAll(group=group, topology=topology, sync=config.sync, stats=stats), stats
    if dist.get_world_size(group) != dist.get_world_size():
        # Sub-groups of a sub-group would need every rank of the world to take part in creating them
        # (torch's new_group contract), and local-synchronisation groups hang after ordinary new_group
        # calls (torch 2.13, gloo): refuse clearly instead.
        raise ValueError(
            f"cocodiff: all_to_all='tapa' and emulate_slow_tier need the engine's group to span the whole "
            f"default process group (this group has {dist.get_world_size(group)} of {dist.get_world_size()} ranks); "
            "use all_to_all='flat' on sub-groups, or start a process group of exactly these ranks"
        )
    if emul is not None and (len(topology.tiers) < 2 or topology.sizes[-1] == 1):
        raise ValueError(
            f"ParallelConfig.emulate_slow_tier needs a topology whose outermost tier has at least 2 members, got "
            f"{topology.spec!r}; "
            "set topology='2x2' (2 emulated nodes of 2 ranks), for example"
        )
    factory = _GroupFactory(group)
    outer = len(topology.tiers) - 1
    slow_opts = _slow_options(group, emul.max_ctas) if emul is not None else None
    tier_groups: dict[int, object] = {}
    for t in range(len(topology.tiers)):
        if topology.sizes[t] == 1 or config.all_to_all != "tapa":
            continue
        opts = slow_opts if t == outer else None
        for members in topology.tier_groups(t):
            g = factory.make(members, opts)
            if g is not None:
                tier_groups[t] = g
    if emul is not None:
        local = topology.world_size // topology.sizes[outer]
        node_group = None
        for node in range(topology.sizes[outer]):
            g = factory.make(list(range(node * local, (node + 1) * local)))
            if g is not None:
                node_group = g
        slow_world = factory.make(list(range(topology.world_size)), slow_opts)
        flat = FairFlatAllToAll(topology=topology, node_group=node_group, slow_world=slow_world, rank=rank,
                                stats=stats, sync=config.sync)
    else:
        flat = FlatAllToAll(group=group, topology=topology, sync=config.sync, stats=stats)
    if config.all_to_all == "flat":
        return flat, stats

    def tapa(chunks):
        return TapaAllToAll(topology=topology, tier_groups=tier_groups, rank=rank, stats=stats, chunks=chunks,
                            sync=config.sync)

    if config.tapa_plan == "phases":
        return tapa(config.tapa_chunks), stats
    return AutoAllToAll([flat, tapa(1), tapa(4)], group=group, stats=stats), stats
