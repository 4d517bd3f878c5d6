"""The Ulysses engine: the one object a parallelised model holds.

It owns the process groups, the topology, the exchange route and the byte counters; for the call in
progress it knows how the tokens are spread over the ranks (`TokenLayout`) and which denoising step the call
belongs to (`StepContext`); per attention layer it hands the schedule (`schedule.attend`) the way the
layer's tensors travel (`layer_exchange`: exactly, or V-Major's selected rows).

A forward, in order: the root hook (`sharding.PlanHooks`) checks the inputs, calls `begin_call` (layout,
step, V-Major's plan for this call) and splits the inputs; every attention processor calls
`schedule.attend(engine, layer=...)`; the output hook gathers the output; `end_call` keeps the byte counts.
"""

from __future__ import annotations

import atexit
import weakref
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ParallelConfig
from .exchange import BlockExchange, CommStats, build_exchange
from .layout import IMG, TXT, SeqLayout, TokenLayout, gather_seq
from .schedule import ExactLayerExchange
from .step import CallInfo, StepContext
from .topology import TierGroups, Topology

UnsetMarker = object()  # "argument not given" where None is a meaningful value

_LIVE: weakref.WeakSet = weakref.WeakSet()  # every engine of this process (`release_all`)


def release_all(*, at_exit: bool = False) -> int:
    """`UlyssesEngine.release` on every live engine of this process, and every other graph cocodiff captured
    (a `GraphedStep` built before `parallelize`, say) dropped; returns how many engines. Every engine is tried;
    the first error is raised after. `at_exit`: only drop the graphs, never raising (the interpreter is
    finishing; the process group may be gone)."""
    from .graph import live_graphs

    engines = list(_LIVE)
    first_error: Exception | None = None
    for engine in engines:
        try:
            if at_exit:
                engine.drop_graphs()
            else:
                engine.release()
        except Exception as exc:  # at exit nothing may fail; otherwise the others are still released
            first_error = first_error or exc
    for graphs in live_graphs():
        try:
            graphs.clear()
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None and not at_exit:
        raise first_error
    return len(engines)


# A script that exits without `cocodiff.release()` and without destroying its process group still drops the
# graphs before the interpreter tears the group down (after the atexit handlers). A script that destroys the
# group itself, or registers `destroy_process_group` with atexit after importing cocodiff, must call
# `cocodiff.release()` first.
atexit.register(release_all, at_exit=True)


class UlyssesEngine:
    """State shared by all attention processors of one parallelised model.

    Args:
        config: the validated `ParallelConfig`.
        groups: the process groups (`topology.build_groups`); `groups.group` holds the Ulysses ranks.
        topology: tiers of that group.
        seq_group: all sequence-parallel ranks (the tokens are split over them); default `groups.group`. With a
            ring dimension it holds the Ulysses group's ranks times the ring's.
        ring: this rank's `ring.Ring`, or None without a ring dimension.
        exchange_config: the config the head exchanges are built from when it differs from `config` (a ring's
            Ulysses groups inside one emulated node: no slow tier among them).
        plan: the model family's `ModelPlan`.
        inner_dim: heads x head dim of the widest sharded attention, heads padded to a multiple of the degree
            (memory accounting).
        layers: sharded attention layers of the model (memory accounting of V-Major's caches).
        device: where this rank computes and communicates.
    """

    def __init__(
        self,
        config: ParallelConfig,
        *,
        groups: TierGroups,
        topology: Topology,
        plan,
        inner_dim: int,
        layers: int,
        device: torch.device,
        seq_group=None,
        ring=None,
        exchange_config: ParallelConfig | None = None,
    ):
        self.config = config
        self.groups = groups
        self.group = groups.group if seq_group is None else seq_group  # the ranks the tokens are split over
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.ring = ring
        self.heads_rank = dist.get_rank(groups.group)  # position in the Ulysses (head-exchange) group
        self.heads_world = dist.get_world_size(groups.group)
        self.topology = topology
        self.plan = plan
        self.inner_dim = inner_dim
        self.device = device
        self.exchange: BlockExchange = build_exchange(exchange_config or config, topology, groups, self.heads_rank)
        self.stats: CommStats = self.exchange.stats  # counts of the call in progress
        self.step_stats = CommStats(self.stats.tier_names)  # counts of the last finished call
        self.steps = StepContext()
        self.call: CallInfo | None = None
        self.layout: TokenLayout | None = None
        self.vmajor = None
        if config.v_major is not None:
            from .vmajor import VMajor

            self.vmajor = VMajor(config.v_major, engine=self, layers=layers)
        self.hooks = None  # the sharding hooks (`attach`)
        self.graphs = None  # the StepGraphs of cuda_graph=True (`attach`)
        self.compiled_blocks = 0  # blocks compiled by compile_blocks=True (`attach`)
        self.modulation = None  # the ShardedModulation of shard_modulation=True (`attach`)
        self._configured_exchange = self.exchange  # what `use_exchange("auto")` returns to
        self.text_mask: torch.Tensor | None = None  # the call's text padding mask (None: absent or all ones)
        # masked text tokens when every batch row of the mask is the same (then attention drops those keys and
        # runs unmasked, on the fast kernels); None: no mask, all ones, or rows that differ (masked attention)
        self.text_masked: int | None = None
        self._seq_layouts: dict[tuple[int, ...], SeqLayout] = {}
        self._mask_cache: dict = {}
        self._mask_buffers: dict[tuple, torch.Tensor] = {}
        self._all_ones: list[tuple[torch.Tensor, int, tuple]] = []  # (mask, version, (all ones?, masked)), recent
        self.external_graphs: weakref.WeakSet = weakref.WeakSet()  # `GraphedStep`s over this engine's model
        _LIVE.add(self)

    # ---- set-up ---------------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> None:
        """Install the plan's processors and hooks on `model` (and the CUDA-graph switch when configured)."""
        from .sharding import PlanHooks

        self.plan.install_processors(model, self)
        self.hooks = PlanHooks(model, self.plan, self, self.device)
        mod = self.plan.modulation
        if (
            self.config.shard_modulation
            and self.world > 1
            and mod is not None
            and (mod.applies is None or mod.applies(model))
        ):
            from .modulation import ShardedModulation

            self.modulation = ShardedModulation(model, mod, self)
        if self.config.compile_blocks:
            from .compiled import compile_blocks

            self.compiled_blocks = compile_blocks(model, self.plan, self.config.compile_options)
        if self.config.cuda_graph:
            self.install_graphs(model)

    def install_graphs(self, model: torch.nn.Module, graphs_class=None):
        """The `cuda_graph=True` switch: route `model.forward` through per-signature graph replays
        (`graphs_class`: tests substitute a recorder that replays eagerly, to run the logic on CPU ranks)."""
        from .graph import StepGraphs

        graphs_class = graphs_class or StepGraphs
        self.graphs = graphs_class(model.forward, stats=self.stats, key=self.graph_key, preserve=self.preserve_state)
        model.forward = self.graphs  # an instance attribute: nn.Module.__call__ runs the hooks, then this
        return self.graphs

    def set_schedule(
        self,
        *,
        v_first: bool | None = None,
        overlap_output=UnsetMarker,
        fuse_qk: bool | None = None,
        sync: bool | None = None,
    ) -> None:
        """Switch options that do not change how tokens are sharded (for A/B runs on one model).
        `overlap_output` takes None (follow v_first) or a bool; leave it out to keep the current value."""
        changes: dict[str, Any] = {}
        if fuse_qk is not None:
            changes["fuse_qk"] = fuse_qk
        if v_first is not None:
            changes["v_first"] = v_first
        if overlap_output is not UnsetMarker:
            changes["overlap_output"] = overlap_output
        if sync is not None:
            changes["sync"] = sync
            self._configured_exchange.set_sync(sync)
        if changes:
            self.config = self.config.with_(preset_name=None, **changes)
            self._drop_graphs()

    def use_exchange(self, name: str | BlockExchange) -> None:
        """For A/B benchmarks on one model: route every exchange through one candidate of the automatic
        plan ("flat", "tapa", "tapa/4"), back through the configured route ("auto"), or through a given
        `BlockExchange` (it must count into `engine.stats`)."""
        self._drop_graphs()
        if isinstance(name, BlockExchange):
            self.exchange = name
            return
        if name == "auto":
            self.exchange = self._configured_exchange
            return
        for route in self._configured_exchange.routes():
            if route.name == name:
                self.exchange = route
                return
        names = [r.name for r in self._configured_exchange.routes()]
        raise ValueError(f"no exchange route {name!r}; choose auto or one of {names}")

    def _drop_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()  # captured under the old schedule

    def drop_graphs(self) -> None:
        """Drop every CUDA graph captured over this engine's model: its own (`cuda_graph=True`) and those of
        `GraphedStep`s over the model. The next call per signature captures again."""
        self._drop_graphs()
        for graphs in list(self.external_graphs):
            graphs.clear()

    def release(self) -> None:
        """Let go of what ties this engine to its process group; call it before `destroy_process_group`.

        Drops the CUDA graphs captured over its model (`drop_graphs`) and frees the copy-engine exchange's
        symmetric-memory buffers. Graphs that captured NCCL work and outlive the process group can hang its
        destruction (pytorch/pytorch#115388: `ncclCommDestroy` waits). Every rank must release the same engines
        at the same point: freeing symmetric memory can be collective, and so is the next call's allocation.
        The engine stays usable: the next call allocates and captures again, as the first call did."""
        if self.device.type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.synchronize(self.device)  # nothing in flight uses what is freed below
        self.drop_graphs()
        routes = [self.exchange, self._configured_exchange, *self._configured_exchange.routes()]
        for route in {id(r): r for r in routes}.values():
            route.release()

    # ---- per call -------------------------------------------------------------------------------------
    def begin_call(self, n_img: int, n_txt: int, *, timestep=None, batch: int = 1, elem: int = 4) -> None:
        """Start a transformer call: token layout, step context, V-Major's plan for the call.

        Args:
            n_img, n_txt: the call's image and text tokens.
            timestep: the call's timestep argument (the step context reads it when it has no scheduler).
            batch, elem: batch size and bytes per element (V-Major's caches depend on them).
        """
        self.layout = TokenLayout(n_img=n_img, n_txt=n_txt, world=self.world)
        self.stats.reset()
        self._mask_cache.clear()
        read = self.device.type == "cpu" or self.vmajor is not None
        self.call = self.steps.on_call(timestep, read_device_values=read)
        if self.vmajor is not None:
            l_max = max(self.layout.lengths((TXT, IMG)))
            self.vmajor.begin_call(self.call, (n_img, n_txt, batch, elem), l_max=l_max, batch=batch, elem=elem)

    def end_call(self) -> None:
        self.step_stats = self.stats.copy()

    def graph_key(self):
        """What besides the inputs selects a CUDA graph: whether a text mask is held (and how many keys it drops),
        V-Major's plan."""
        mask = None if self.text_mask is None else (tuple(self.text_mask.shape), self.text_masked)
        return mask, None if self.vmajor is None else self.vmajor.graph_key()

    def hold_text_mask(self, mask: torch.Tensor | None) -> None:
        """Keep the call's text padding mask for the processors: None when absent or all ones (then attention
        runs unmasked, on the fast kernels), else a copy in a buffer reused per shape (a CUDA graph reads it
        at its address). When every batch row masks the same number of tokens at the same places
        (`text_masked`), attention drops those keys and runs unmasked too. What a mask is (all ones, uniform
        rows, how many masked) is read once per mask tensor and version (one host sync)."""
        self.text_masked = None
        if mask is None:
            self.text_mask = None
            return
        known = [facts for seen, version, facts in self._all_ones if seen is mask and version == mask._version]
        if known:
            ones, masked = known[0]
        else:
            m = mask.to(torch.bool)
            uniform, n_masked = torch.stack([(m == m[:1]).all().long(), (~m[0]).sum()]).tolist()  # one sync
            ones = bool(uniform) and n_masked == 0
            masked = n_masked if uniform else None
            self._all_ones = [(mask, mask._version, (ones, masked))] + self._all_ones[:7]
        if ones:
            self.text_mask = None
            return
        self.text_masked = masked
        key = (tuple(mask.shape), mask.device)
        buf = self._mask_buffers.get(key)
        if buf is None:
            buf = self._mask_buffers[key] = torch.empty(mask.shape, dtype=torch.bool, device=mask.device)
        buf.copy_(mask)
        self.text_mask = buf

    def preserve_state(self):
        """A context that restores state a graph's eager warm-up changes (V-Major's caches), else a no-op."""
        return nullcontext() if self.vmajor is None else self.vmajor.preserved()

    def _require_layout(self) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError("cocodiff: an attention processor ran outside a parallelised forward call")
        return self.layout

    def seq_layout(self, kinds: tuple[str, ...], *, whole: bool = False) -> SeqLayout:
        """The lengths of a sequence of `kinds` over the Ulysses group this rank exchanges heads with (its
        `SeqLayout` for the head exchanges), or with `whole` over every sequence-parallel rank."""
        lengths = self._require_layout().lengths(kinds)
        rank = self.rank
        if not whole and self.ring is not None:  # this rank's Ulysses group, in its head-exchange order
            lengths = tuple(lengths[m] for m in self.ring.blocks[self.ring.rank])
            rank = self.heads_rank
        key = (lengths, rank)
        lay = self._seq_layouts.get(key)
        if lay is None:
            lay = SeqLayout(lengths, rank)
            self._seq_layouts[key] = lay
        return lay

    def attention(
        self, q, k, v, key_mask: torch.Tensor | None, kinds: tuple[str, ...], layer: str | None = None
    ) -> torch.Tensor:
        """Attention of the exchanged Q, K, V `(B, H_LOCAL, S, D)`: SDPA over the Ulysses group's tokens, or with a
        ring dimension over every ring position's block (`ring.ring_attention`). `key_mask` `(B, S_ALL)` in
        exchange order over all ranks, or None."""
        if self.ring is None:
            if key_mask is not None and self.text_masked is not None:
                # every batch row masks the same keys: attend to the others, unmasked (the fast kernels)
                keep = self._kept_keys(key_mask)
                return F.scaled_dot_product_attention(q, k.index_select(2, keep), v.index_select(2, keep))
            mask = None if key_mask is None else key_mask[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        from .ring import ring_attention

        lengths = self._require_layout().lengths(kinds)
        blocks = self.ring.block_lengths(lengths)
        if key_mask is not None:
            key_mask = self.ring.mask_in_ring_order(key_mask, lengths)
        if self.vmajor is not None and self.vmajor.plan is not None and layer is not None:
            from .ring import ring_attention_vmajor

            caches = self.vmajor.ring_caches(layer, q, blocks)
            counts = self.vmajor.ring_counts(blocks)
            return ring_attention_vmajor(q, k, v, self.ring, blocks, caches, counts, key_mask, stats=self.stats)
        return ring_attention(q, k, v, self.ring, blocks, key_mask, stats=self.stats)

    def layer_exchange(self, layer: str, layout: SeqLayout):
        """How the tensors of attention `layer` travel in this call (see `schedule.LayerExchange`)."""
        if self.vmajor is not None:
            ex = self.vmajor.layer_exchange(layer, layout)
            if ex is not None:
                return ex
        return ExactLayerExchange(self.exchange, layout)

    def split(self, x: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
        """This rank's slice of a full tensor along `dim` (tokens of `kind`)."""
        layout = self._require_layout()
        full = layout.total(kind)
        if x.shape[dim] != full:
            raise ValueError(f"cocodiff: expected {full} {kind} tokens along dim {dim}, got shape {tuple(x.shape)}")
        n = layout.sizes(kind)[self.rank]
        return x.narrow(dim, layout.offset(kind, self.rank), n)

    def gather(self, x: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
        """Whole tensor from the per-rank slices along `dim`."""
        lay = self.seq_layout((kind,), whole=True)
        return gather_seq(x, lay, dim=dim, group=self.group, stats=self.stats)

    def _kept_keys(self, key_mask: torch.Tensor) -> torch.Tensor:
        """Positions of the attended keys of `key_mask` `(B, S)` (rows alike, `text_masked` of them False), in
        order; computed on the device without a host sync (capturable), once per call and mask."""
        key = (id(key_mask), "kept")
        hit = self._mask_cache.get(key)
        if hit is None:
            n = key_mask.shape[1] - self.text_masked
            # a stable sort of "masked?" puts the attended positions first, in their order
            hit = torch.argsort((~key_mask[0]).to(torch.uint8), stable=True)[:n]
            self._mask_cache[key] = hit
        return hit

    def joint_key_mask(self, txt_mask: torch.Tensor, order: tuple[str, ...]) -> torch.Tensor:
        """Key-padding mask `(B, S)` of the joint sequence in the order the exchange delivers tokens.

        Args:
            txt_mask: `(B, N_TXT)` bool, the full text mask (every rank has it, ranks agree on inputs).
            order: local concatenation order, e.g. ("txt", "img").
        """
        key = (id(txt_mask), order)
        hit = self._mask_cache.get(key)
        if hit is not None:
            return hit
        layout = self._require_layout()
        B = txt_mask.shape[0]
        ones = torch.ones(B, layout.n_img, dtype=torch.bool, device=txt_mask.device)
        full = {TXT: txt_mask.to(torch.bool), IMG: ones}
        parts = []
        for r in range(self.world):
            for kind in order:
                n = layout.sizes(kind)[r]
                parts.append(full[kind].narrow(1, layout.offset(kind, r), n))
        mask = torch.cat(parts, dim=1)
        self._mask_cache[key] = mask
        return mask
