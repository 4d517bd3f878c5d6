"""V-Major: only the tokens whose V changed most cross the slow tier; receivers reuse their cache for the rest.

Per attention layer, CFG branch and denoising step (the step context, `step.py`):

1. V is projected first and packed into its send buffer `(P, L_MAX, B, H_LOCAL, D)`. Each local token's
   change is its relative L1 distance to the V this rank last sent for it (`ref`, per far block).
2. The number of tokens to send, K, follows from the schedule alone (`step_ratio`: warm-up, a cache ratio
   rising linearly, quantised to a few levels, periodic refreshes, full last steps) and L_MAX, which every
   rank knows: message sizes and collective participation are identical on every rank, whatever the values.
3. Each rank sends its K most-changed tokens' V rows to every far rank (ranks across the slow tier), with the
   rows' indices riding along in the same message (4 bytes a row, no extra collective); the near ranks get
   every row. Q and K follow with the same rows. Receivers scatter the rows into persistent receive buffers
   (one per layer, branch and tensor) whose other rows keep what arrived at earlier steps, and attention
   runs on those. With `output=True` the attention output goes back the same way: a far rank sends an
   owner only the rows of the owner's selected tokens, and the owner reuses its cached output for the rest.
4. `ref` is updated for the rows sent, so a token's drift accumulates until it is sent again.
5. With `fp8`, the selected rows cross as 8-bit floats with one fp32 scale per head (`exchange/tiered.py`);
   `ref` keeps what was sent before rounding, so the rounding does not accumulate in the selection.

With a ring dimension (Ulysses x ring, `ring.py`) the selection moves to the ring's hops, which cross the
slow tier: each block's owner selects its most-changed tokens, their K/V rows and indices travel the ring,
and every rank attends to its cached copy of the other blocks (`ring.ring_attention_vmajor`); the Ulysses
exchanges stay exact.

A call sends every row (and refills every cache) when the schedule says so, and at the first call of a CFG
branch in a generation or after the input shapes changed: caches never leak between generations, branches
or shapes. The fast tier is never approximated. With `select_by="heads"` the selection is made per far
block (per destination's head group) instead of once per token.

Memory: per layer and branch, one `ref` and one cache per exchanged tensor, each L_MAX x B x H x D elements
(`cache_bytes`), checked against free memory or `VMajorConfig.memory_budget_gb` with one small all-gather
before a branch's caches are allocated; too little is a clear error on every rank, not an OOM mid-run.

CUDA graphs: a call's shapes depend only on (branch, level), which the engine adds to the graph key; a
50-step run with 4 levels captures at most 5 graphs per input signature and branch. A graph's eager warm-up
would update the caches twice more, so `preserved()` snapshots and restores them around it.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from .compiled import compiled_piece
from .config import ParallelConfig, VMajorConfig
from .exchange import RowPlan, TieredExchange, all_gather_into
from .layout import SeqLayout, heads_of, pack_head_to_seq, pack_seq_to_head, unpack_heads, unpack_tokens
from .memory import format_gb, free_bytes
from .step import CallInfo
from .topology import Topology, node_range


def check_vmajor(config: ParallelConfig, topology: Topology, world: int) -> None:
    """Raise a ValueError naming the fix when V-Major cannot run on this group and topology."""
    vm = config.v_major
    if world < 2:
        raise ValueError("cocodiff.parallelize: V-Major needs at least 2 ranks (nothing crosses a link on one)")
    if vm.tiers == "slow" and (len(topology.tiers) < 2 or topology.sizes[-1] < 2):
        raise ValueError(
            f"cocodiff.parallelize: V-Major selects what crosses the slow (outermost) tier, but topology "
            f"{topology.spec!r} has no outer tier of 2 or more; give a topology such as '2x{world // 2 or 1}' "
            "(nodes x GPUs), or VMajorConfig(tiers='all') to select on every link"
        )


def step_ratio(cfg: VMajorConfig, step: int, total: int) -> tuple[float, int] | None:
    """(cache ratio, level) of a selective step, or None when the step sends every token.

    Selective steps are `warmup_steps .. total - final_full_steps - 1`, minus one step in every `refresh_every`.
    "linear": the ratio rises from `cache_ratio_start` to `cache_ratio_end`, quantised to `levels` values
    (equal shares of the selective steps); "fixed": `cache_ratio_start`. Capped at `max_cache_ratio`.
    """
    first, last = cfg.warmup_steps, total - cfg.final_full_steps - 1
    if step < first or step > last:
        return None
    if cfg.refresh_every and (step - first + 1) % cfg.refresh_every == 0:
        return None
    if cfg.schedule == "fixed" or cfg.levels == 1:
        level, ratio = 0, cfg.cache_ratio_start
    else:
        progress = (step - first) / max(1, last - first)
        level = min(cfg.levels - 1, int(progress * cfg.levels))
        ratio = cfg.cache_ratio_start + (cfg.cache_ratio_end - cfg.cache_ratio_start) * level / (cfg.levels - 1)
    return min(ratio, cfg.max_cache_ratio), level


def active_rows(ratio: float, l_max: int) -> int:
    """K: the rows (tokens) of each block that cross the slow tier at cache ratio `ratio`."""
    return max(1, min(l_max, round((1.0 - ratio) * l_max)))


def cache_bytes(cfg: VMajorConfig, *, layers: int, l_max: int, batch: int, inner_dim: int, elem: int) -> int:
    """Bytes of one CFG branch's caches: per layer `ref` and the Q, K, V (and output) receive buffers."""
    tensors = 4 + (1 if cfg.output else 0)
    return layers * tensors * l_max * batch * inner_dim * elem


@dataclass(frozen=True)
class CallPlan:
    """What V-Major does in one transformer call: its CFG branch and, for a selective call, the cache ratio."""

    branch: int
    ratio: float | None  # None: every row is sent (and every cache refilled)
    level: int | None
    step: int
    total_steps: int


class _LayerState:
    """Persistent tensors of one layer, branch and shape: `ref` (the V last sent, send layout) and the receive
    buffers of Q, K, V and the output, whose far blocks are the cache."""

    def __init__(self, like: torch.Tensor, names: tuple[str, ...]):
        self.ref = torch.zeros_like(like)
        self.recv = {n: torch.zeros_like(like) for n in names}

    def tensors(self) -> list[torch.Tensor]:
        return [self.ref, *self.recv.values()]


class VMajor:
    """V-Major's state for one engine (see the module docstring).

    Args:
        cfg: the `VMajorConfig`.
        engine: the owning `UlyssesEngine` (its topology, groups, counters and configured exact route).
        layers: sharded attention layers of the model (memory accounting).
    """

    def __init__(self, cfg: VMajorConfig, *, engine, layers: int):
        self.cfg = cfg
        self._engine = weakref.ref(engine)  # the engine owns this (engine.vmajor): no reference cycle
        self.layers = layers
        # with a ring dimension V-Major selects what travels the ring's hops (they cross the slow tier; see
        # `ring.ring_attention_vmajor`) and the Ulysses exchanges stay exact
        self.ring = engine.ring
        self.exchange = None
        if self.ring is None:
            topo, rank = engine.topology, engine.rank
            near = node_range(topo, rank) if cfg.tiers == "slow" else (rank, rank + 1)
            self.exchange = TieredExchange(
                topology=topo,
                rank=rank,
                stats=engine.stats,
                near=near,
                near_group=engine.groups.node,
                far_group=engine.groups.far,
                sync=engine.config.sync,
                name="vmajor",
                piece=_row_pieces(self._engine),
            )
        self.plan: CallPlan | None = None
        self.layer_rows: list[tuple[str, int, int | None]] = []  # this call: (layer, L_MAX, K or None = all)
        self._states: dict[tuple, _LayerState] = {}
        self._branch_inputs: dict[int, tuple] = {}  # branch -> (generation, input signature) its caches hold
        self._checked: set[tuple] = set()  # (branch, input signature) whose memory was checked
        self._far_index: dict[torch.device, torch.Tensor] = {}

    # ---- per call ------------------------------------------------------------------------------------

    @property
    def engine(self):
        return self._engine()

    def begin_call(self, call: CallInfo, signature: tuple, *, l_max: int, batch: int, elem: int) -> CallPlan:
        """Decide this call's plan (before any collective of the call; identical on every rank)."""
        if call.step is None or call.total_steps is None:
            raise ValueError(
                "cocodiff: V-Major needs the denoising step and the run's length: parallelize the pipeline (its "
                "scheduler is followed), or call model.cocodiff.steps.follow(scheduler) once, or "
                "model.cocodiff.steps.begin_generation(total_steps=N) before each generation"
            )
        total = call.total_steps
        if self.cfg.warmup_steps > total:
            raise ValueError(
                f"VMajorConfig.warmup_steps={self.cfg.warmup_steps} is longer than the run ({total} steps); use at "
                f"most {total} (= every step exact)"
            )
        branch = call.call
        held = (call.generation, signature)
        if (branch, signature) not in self._checked:
            self._check_memory(branch, l_max=l_max, batch=batch, elem=elem)
            self._checked.add((branch, signature))
        sched = step_ratio(self.cfg, call.step, total)
        if self._branch_inputs.get(branch) != held:
            sched = None  # this branch's caches hold another generation or shape: refill them
        self._branch_inputs[branch] = held
        ratio, level = sched if sched is not None else (None, None)
        self.plan = CallPlan(branch=branch, ratio=ratio, level=level, step=call.step, total_steps=total)
        self.layer_rows = []
        return self.plan

    def graph_key(self):
        p = self.plan
        return None if p is None else (p.branch, "full" if p.ratio is None else p.level)

    def _check_memory(self, branch: int, *, l_max: int, batch: int, elem: int) -> None:
        """One all-gather: every rank learns whether any rank lacks memory for this branch's caches."""
        need = cache_bytes(
            self.cfg, layers=self.layers, l_max=l_max, batch=batch, inner_dim=self.engine.inner_dim, elem=elem
        )
        if self.ring is not None:  # per layer: `ref` of the own block, K and V of every block (ring.RingCaches)
            U, P = self.engine.heads_world, self.engine.world
            need = self.layers * (U + 2 * P) * l_max * batch * (self.engine.inner_dim // U) * elem
        budget = self.cfg.memory_budget_gb
        have = int(budget * 2**30) if budget is not None else free_bytes(self.engine.device)
        mine = torch.tensor([need, have], dtype=torch.int64, device=self.engine.device)
        rows = torch.empty(self.engine.world * 2, dtype=torch.int64, device=self.engine.device)
        all_gather_into(rows, mine, group=self.engine.group)
        short = [(r, n, h) for r, (n, h) in enumerate(rows.view(-1, 2).cpu().tolist()) if n > h]
        if short:
            r, n, h = short[0]
            where = "within VMajorConfig.memory_budget_gb" if budget is not None else "free"
            raise ValueError(
                f"cocodiff: V-Major's caches for CFG branch {branch} need {format_gb(n)} on rank {r} ({self.layers} "
                f"layers x {4 + self.cfg.output} tensors of {l_max} tokens x batch {batch}), but it has "
                f"{format_gb(h)} {where}; use fewer tokens or a smaller batch, more ranks, VMajorConfig(output=False), "
                "a larger budget, or v_major=None"
            )

    def preserved(self):
        """Snapshot (on the host) and restore the current branch's caches around a graph's eager warm-up, when
        the call is selective (a full call refills them identically every time)."""
        p = self.plan
        if p is None or p.ratio is None:
            return contextlib.nullcontext()
        return _Restore([t for key, s in self._states.items() if key[1] == p.branch for t in s.tensors()])

    def clear(self) -> None:
        """Drop every cache (the next call of each branch sends every token)."""
        self._states.clear()
        self._branch_inputs.clear()

    # ---- per layer -------------------------------------------------------------------------------------
    def layer_exchange(self, layer: str, layout: SeqLayout):
        p = self.plan
        if p is None or self.ring is not None:
            return None  # (with a ring: exact Ulysses exchanges, the selection is on the ring's hops)
        k = None if p.ratio is None else active_rows(p.ratio, layout.l_max)
        self.layer_rows.append((layer, layout.l_max, k))
        return _LayerExchange(self, layer, layout, k)

    def ring_counts(self, block_lengths: tuple[int, ...]) -> tuple[int, ...] | None:
        """Tokens of each ring block that travel in this call (None: every token)."""
        ratio = self.plan.ratio
        if ratio is None:
            return None
        return tuple(min(n, active_rows(ratio, n)) for n in block_lengths)

    def ring_caches(self, layer: str, like: torch.Tensor, block_lengths: tuple[int, ...]):
        """This layer's and branch's `ring.RingCaches` (`like`: this rank's block, `(B, H_LOCAL, S, D)`)."""
        from .ring import RingCaches

        key = (layer, self.plan.branch, "ring", block_lengths, tuple(like.shape), like.dtype, like.device)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = RingCaches(like, block_lengths, self.ring.rank)
        return st

    def state(self, layer: str, like: torch.Tensor) -> _LayerState:
        key = (layer, self.plan.branch, tuple(like.shape), like.dtype, like.device)
        st = self._states.get(key)
        if st is None:
            names = ("q", "k", "v", "o") if self.cfg.output else ("q", "k", "v")
            st = self._states[key] = _LayerState(like, names)
        return st

    def far_index(self, device: torch.device) -> torch.Tensor:
        idx = self._far_index.get(device)
        if idx is None:
            idx = self._far_index[device] = torch.tensor(self.exchange.far, dtype=torch.long, device=device)
        return idx

    def select(self, send: torch.Tensor, ref: torch.Tensor, layout: SeqLayout, k: int) -> torch.Tensor:
        """The K most-changed rows: `(K,)` (per token) or `(N_FAR, K)` (per far block with select_by="heads")."""
        l_max = send.shape[1]
        scores = compiled_piece(self.engine, change_scores)
        score = scores(send, ref, self.far_index(send.device), self.cfg.select_by == "tokens")
        if layout.local < l_max:
            score[..., layout.local :] = -1.0  # padding rows go only when a rank has fewer than K tokens
        return score.topk(k, dim=-1, sorted=False).indices


def _row_pieces(engine_ref):
    """`TieredExchange.piece` for V-Major's engine: its rows' shapes change with the cache level. Holds the engine
    weakly (the engine owns V-Major, which owns the exchange)."""

    def piece(fn):
        return compiled_piece(engine_ref(), fn, varying=True)

    return piece


def change_scores(send: torch.Tensor, ref: torch.Tensor, far: torch.Tensor, per_token: bool) -> torch.Tensor:
    """How much each row of the far blocks changed since it was last sent: summed |V - ref| over the row's values
    (and, per token, over the far blocks) relative to summed |ref|, in fp32; `(L_MAX,)` per token, else
    `(N_FAR, L_MAX)`.

    It reads the two largest tensors of V-Major's step (`send` and `ref`, `(P, L_MAX, B, H_LOCAL, D)`) once per
    layer. Eager it is seven kernels that copy out the far blocks, write |V - ref| and |ref| and reduce them
    (about six passes over the far blocks); with `compile_blocks` it is compiled as the blocks' other pieces
    (`compiled.compiled_piece`): the copies and the reductions fuse into one pass that reads each once. Compiled,
    V - ref is not rounded to bf16 before the reduction, so a score can differ from the eager one in its last
    bits; either way the rows are a heuristic choice, sent with their indices, and the receivers follow it."""
    P, l_max = send.shape[:2]
    # (P, L_MAX, B, H_LOCAL, D) -> far blocks (N_FAR, L_MAX, F)
    cur = send.view(P, l_max, -1).index_select(0, far)
    old = ref.view(P, l_max, -1).index_select(0, far)
    diff = (cur - old).abs().sum(-1, dtype=torch.float32)
    norm = old.abs().sum(-1, dtype=torch.float32)
    if per_token:
        return diff.sum(0) / (norm.sum(0) + 1e-6)
    return diff / (norm + 1e-6)


class _Restore:
    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        self.saved = [t.to("cpu", copy=True) for t in self.tensors]
        return self

    def __exit__(self, *exc):
        for t, s in zip(self.tensors, self.saved):
            t.copy_(s)
        self.saved = []
        return False


class _LayerExchange:
    """How one layer's tensors travel under V-Major (the `schedule.LayerExchange` protocol)."""

    def __init__(self, vm: VMajor, layer: str, layout: SeqLayout, k: int | None):
        self.vm = vm
        self.layer = layer
        self.layout = layout
        self.k = k
        self.state: _LayerState | None = None
        self.rows: torch.Tensor | None = None
        self.index: torch.Tensor | None = None  # `rows` as rows of the `(P * L_MAX, F)` view (one per layer)
        self.v_handle = None
        self.v_plan: RowPlan | None = None
        self.heads = 0

    def _far_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """`(K,)` or `(N_FAR, K)` -> `(N_FAR, K)`."""
        return rows.expand(len(self.vm.exchange.far), -1) if rows.dim() == 1 else rows

    def _fp8(self, x: torch.Tensor) -> int | None:
        """The fp8 scale group (a head's D values: the last dim of Q, K, V and the output) when enabled."""
        return x.shape[-1] if self.vm.cfg.fp8 else None

    def _arrived(self) -> torch.Tensor:
        self.v_handle.wait()  # the rows' indices came with V
        return self.v_plan.arrived_rows

    def _arrived_index(self) -> torch.Tensor:
        self.v_handle.wait()
        return self.v_plan.arrived_index

    @property
    def exchange(self):
        return self.vm.exchange

    def start_v(self, v):
        ex, lay = self.vm.exchange, self.layout
        self.heads = heads_of(v)
        send = pack_seq_to_head(v, lay, ex)
        st = self.state = self.vm.state(self.layer, send)
        if self.k is None:
            st.ref.copy_(send)
            plan = RowPlan(send_rows=None, recv=st.recv["v"])
        else:
            rows = self.rows = self.vm.select(send, st.ref, lay, self.k)
            # the rows' index, computed once: V's, Q's and K's messages and the output's arrivals share it
            P, l_max = send.shape[:2]
            glob = self.index = ex.global_rows(self._far_rows(rows), l_max)
            # what the far ranks now hold for these rows (gathered once: V's message is made of them)
            picked = send.view(P * l_max, -1).index_select(0, glob)
            st.ref.view(P * l_max, -1).index_copy_(0, glob, picked)
            plan = self.v_plan = RowPlan(
                send_rows=rows,
                send_index=glob,
                send_values=picked,
                recv=st.recv["v"],
                carry_rows=True,
                fp8_group=self._fp8(send),
            )
        self.v_handle = ex.start(send, lambda recv: unpack_heads(recv, lay), rows=plan)
        return self.v_handle

    def _start_qk(self, x: torch.Tensor, name: str):
        ex, lay = self.vm.exchange, self.layout
        send = pack_seq_to_head(x, lay, ex)
        recv = self.state.recv[name]
        if self.k is None:
            plan = RowPlan(send_rows=None, recv=recv)
        else:
            plan = RowPlan(
                send_rows=self.rows,
                send_index=self.index,
                recv=recv,
                recv_rows=self._arrived,
                recv_index=self._arrived_index,  # computed once, when V's carried rows arrived
                fp8_group=self._fp8(send),
            )
        return ex.start(send, lambda r: unpack_heads(r, lay), rows=plan)

    def start_q(self, q: torch.Tensor):
        return self._start_qk(q, "q")

    def start_k(self, k: torch.Tensor):
        return self._start_qk(k, "k")

    def start_o(self, o: torch.Tensor, into: torch.Tensor | None = None):
        lay, heads = self.layout, self.heads
        if not self.vm.cfg.output:
            from .layout import start_head_to_seq

            return start_head_to_seq(o, lay, self.vm.engine.exchange, heads=heads, into=into)
        ex = self.vm.exchange
        send = pack_head_to_seq(o, lay, ex)
        recv = self.state.recv["o"]
        if self.k is None:
            plan = RowPlan(send_rows=None, recv=recv)
        else:
            # to each far owner: the rows it selected (they came with its V); from each: the rows I selected
            plan = RowPlan(
                send_rows=self._arrived(),
                send_index=self._arrived_index(),
                recv=recv,
                recv_rows=self._far_rows(self.rows),
                recv_index=self.index,
                fp8_group=self._fp8(o),
            )
        return ex.start(send, lambda r: unpack_tokens(r, lay, heads, into), rows=plan)
