"""The Ulysses engine: per-forward token layout and the per-layer attention schedule (flat order or V-First).

`UlyssesEngine` is the one object a parallelised model holds. It owns the process group, the topology, the
exchange strategy and the byte counters, and it knows, for the forward pass in progress, how many image
and text tokens each rank holds (`TokenLayout`). Attention processors of every model family call
`engine.attend(...)` (or `start_attend`) with closures that project V, Q and K; the schedule (which
projection runs first and when each exchange starts and is waited for) lives here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import CommStats, Handle, SeqLayout, gather_seq, start_head_to_seq, start_seq_to_head
from .config import ParallelConfig
from .tapa import build_exchange
from .topology import Topology

IMG, TXT = "img", "txt"
UnsetMarker = object()  # "argument not given" where None is a meaningful value


def split_sizes(n: int, world: int) -> tuple[int, ...]:
    """Balanced split of n tokens over `world` ranks; the first n % world ranks get one more."""
    base, extra = divmod(n, world)
    return tuple(base + (1 if r < extra else 0) for r in range(world))


@dataclass(frozen=True)
class TokenLayout:
    """How the image and text tokens of one forward pass are spread over the ranks (same on every rank)."""

    n_img: int
    n_txt: int
    world: int

    @property
    def img_sizes(self) -> tuple[int, ...]:
        return split_sizes(self.n_img, self.world)

    @property
    def txt_sizes(self) -> tuple[int, ...]:
        return split_sizes(self.n_txt, self.world)

    def sizes(self, kind: str) -> tuple[int, ...]:
        if kind == IMG:
            return self.img_sizes
        if kind == TXT:
            return self.txt_sizes
        raise ValueError(f"unknown token kind {kind!r}")

    def offset(self, kind: str, rank: int) -> int:
        return sum(self.sizes(kind)[:rank])

    def lengths(self, kinds: tuple[str, ...]) -> tuple[int, ...]:
        """Local token counts per rank of a sequence made of the given kinds (e.g. text + image)."""
        per_kind = [self.sizes(k) for k in kinds]
        return tuple(sum(p[r] for p in per_kind) for r in range(self.world))


class UlyssesEngine:
    """State shared by all attention processors of one parallelised model.

    Args:
        config: the validated `ParallelConfig`.
        group: process group of the Ulysses ranks.
        topology: tiers of that group.
    """

    def __init__(self, config: ParallelConfig, group, topology: Topology):
        self.config = config
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.topology = topology
        self.a2a, self.stats = build_exchange(config, group, topology)
        self.layout: TokenLayout | None = None
        self.calls = 0
        self.step_stats = CommStats(tuple(t.name for t in topology.tiers))
        self._seq_layouts: dict[tuple[int, ...], SeqLayout] = {}
        self.graphs = None  # the StepGraphs of cuda_graph=True
        self._mask_cache: dict = {}

    def set_schedule(self, *, v_first: bool | None = None, overlap_output=UnsetMarker, fuse_qk: bool | None = None,
                     sync: bool | None = None) -> None:
        """Switch options that do not change how tokens are sharded (for A/B runs on one model).
        `overlap_output` takes None (follow v_first) or a bool; leave it out to keep the current value."""
        changes = {}
        if fuse_qk is not None:
            changes["fuse_qk"] = fuse_qk
        if v_first is not None:
            changes["v_first"] = v_first
        if overlap_output is not UnsetMarker:
            changes["overlap_output"] = overlap_output
        if sync is not None:
            changes["sync"] = sync
            routes = getattr(self, "_auto", None) or self.a2a
            for strat in getattr(routes, "candidates", [routes]):
                strat.sync = sync
        if changes:
            self.config = self.config.with_(preset_name=None, **changes)
            self._drop_graphs()

    def _drop_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()  # captured under the old schedule

    def use_exchange(self, name: str) -> None:
        """For A/B benchmarks on one model: route every exchange through one route of the automatic plan
        ("flat", "tapa", "tapa/4") or back to "auto". Needs all_to_all="tapa" (tapa_plan="auto")."""
        auto = getattr(self, "_auto", None) or self.a2a
        if not hasattr(auto, "candidates"):
            raise ValueError("use_exchange needs a model parallelised with all_to_all='tapa', tapa_plan='auto'")
        self._auto = auto
        self._drop_graphs()
        if name == "auto":
            self.a2a = auto
            return
        for strat in auto.candidates:
            if strat.name == name:
                self.a2a = strat
                return
        raise ValueError(f"no exchange route {name!r}; choose auto or one of {[c.name for c in auto.candidates]}")

    # ---- layout -------------------------------------------------------------------------------
    def begin_forward(self, n_img: int, n_txt: int) -> None:
        self.layout = TokenLayout(n_img=n_img, n_txt=n_txt, world=self.world)
        self.stats.reset()
        self._mask_cache.clear()
        self.calls += 1

    def end_forward(self) -> None:
        self.step_stats = CommStats(self.stats.tier_names)
        self.step_stats.add(self.stats)

    def _require_layout(self) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError("cocodiff: an attention processor ran outside a parallelised forward call")
        return self.layout

    def seq_layout(self, kinds: tuple[str, ...]) -> SeqLayout:
        lengths = self._require_layout().lengths(kinds)
        lay = self._seq_layouts.get(lengths)
        if lay is None:
            lay = SeqLayout(lengths, self.rank)
            self._seq_layouts[lengths] = lay
        return lay

    def split(self, x: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
        """This rank's slice of a full tensor along `dim` (tokens of `kind`)."""
        layout = self._require_layout()
        full = layout.n_img if kind == IMG else layout.n_txt
        if x.shape[dim] != full:
            raise ValueError(
                f"cocodiff: expected {full} {kind} tokens along dim {dim}, got shape {tuple(x.shape)}"
            )
        n = layout.sizes(kind)[self.rank]
        return x.narrow(dim, layout.offset(kind, self.rank), n)

    def gather(self, x: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
        """Whole tensor from the per-rank slices along `dim`."""
        lay = self.seq_layout((kind,))
        return gather_seq(x, lay, dim=dim, group=self.group, stats=self.stats)

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

    # ---- the per-layer schedule -----------------------------------------------------------------
    def start_attend(
        self,
        *,
        project_v: Callable[[], torch.Tensor],
        project_q: Callable[[], torch.Tensor],
        project_k: Callable[[], torch.Tensor],
        kinds: tuple[str, ...],
        key_mask: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        before_attention: Callable[[], None] | None = None,
    ) -> Handle:
        """Sharded attention of this rank's tokens, returned while its output exchange is still in flight.

        The caller may run work that does not need the attention output (FLUX's single-block MLP branch)
        before `wait()`; the output exchange then runs under it.

        Schedule. Without V-First (the paper's baseline order): project Q, K, V, then start their exchanges.
        With V-First: project V and start its exchange, then project Q (norm, RoPE) and start its exchange,
        then K; each transfer runs under the projections that follow it, and only K's is left exposed.

        Args:
            project_v: returns V `(B, L, H, D)` for the local tokens.
            project_q: returns Q `(B, L, H, D)` for the local tokens, norm and RoPE applied.
            project_k: returns K `(B, L, H, D)` for the local tokens, norm and RoPE applied.
            kinds: token kinds of the local sequence, in local order (for the per-rank lengths).
            key_mask: optional `(B, S)` bool key mask in exchange order (see `joint_key_mask`).
            out_dtype: dtype of the returned output (default: the attention's).
            before_attention: work that needs no attention input (part of a block's MLP), run after the
                input exchanges started and before the attention waits for them: it hides K's exchange.
        Returns:
            a handle yielding `(B, L, H * D)`: attention output for the local tokens, all heads.
        """
        lay = self.seq_layout(kinds)
        if self.config.v_first:
            hv = start_seq_to_head(project_v(), lay, self.a2a)
            hq = start_seq_to_head(project_q(), lay, self.a2a)
            hk = start_seq_to_head(project_k(), lay, self.a2a)
        else:
            q, k, v = project_q(), project_k(), project_v()
            hq = start_seq_to_head(q, lay, self.a2a)
            hk = start_seq_to_head(k, lay, self.a2a)
            hv = start_seq_to_head(v, lay, self.a2a)
            del q, k, v  # the exchanges hold their own send buffers: free the projections early
        if before_attention is not None:
            before_attention()
        mask = None if key_mask is None else key_mask[:, None, None, :]
        # (B, H_LOCAL, S, D) each; a wait only orders streams (no host synchronisation)
        out = F.scaled_dot_product_attention(hq.wait(), hk.wait(), hv.wait(), attn_mask=mask)
        del hq, hk, hv
        h = start_head_to_seq(out, lay, self.a2a)
        del out

        def finish(x: torch.Tensor) -> torch.Tensor:
            x = x.flatten(2, 3)
            return x if out_dtype is None else x.to(out_dtype)

        return h.then(finish)

    def attend(self, **kwargs) -> torch.Tensor:
        """`start_attend(...)` waited for at once: `(B, L, H * D)`."""
        return self.start_attend(**kwargs).wait()
