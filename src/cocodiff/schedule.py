"""The per-layer attention schedule: in which order projections run and exchanges start and are waited for.

One sharded attention layer, on every rank:
    project V, Q, K for the local tokens (all heads)      (Q and K: norm and RoPE with global positions)
    seq->head exchanges: all tokens, this rank's heads
    attention (SDPA)
    head->seq exchange of the output: local tokens, all heads

Orders:
- flat (the paper's baseline): project Q, K, V, then start their exchanges (V's first, which V-Major needs;
  the order of the starts changes nothing else).
- V-First (`v_first`): project V and start its exchange, then Q (norm, RoPE) and start its exchange, then K;
  each transfer runs under the projections that follow it. Exact: the same operations, reordered.
- head groups (`head_chunks`, with V-First, in layers without such work: double-stream blocks, SD3, Qwen-Image,
  the video families): K's exchange, the attention and the output's exchange in groups of the rank's heads, so
  group i's attention runs while group i + 1's K and group i - 1's output travel. Exact (attention is per head).
- output overlap (`overlap_output`, default with V-First): work of the block that needs no attention output
  (FLUX's single-block MLP) runs while exchanges are in flight: its first part after the input exchanges
  started (under K's), the rest after the output exchange started.

Waits only order streams (no host synchronisation), so the schedule captures in a CUDA graph. How each
tensor travels (exactly, or V-Major's selected rows) is the `LayerExchange` the engine hands out per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .exchange import Handle
from .layout import (
    ChunkedOutput,
    Projected,
    SendSpec,
    SeqLayout,
    heads_of,
    local_heads,
    start_head_to_seq,
    start_head_to_seq_chunk,
    start_seq_to_head,
    start_seq_to_head_chunks,
)


class LayerExchange(Protocol):
    """How the four tensors of one attention layer travel. `start_v` is always called first. `exchange` is the
    route V, Q and K are sent on (where a producer writing `SendBlocks` puts them)."""

    exchange: Any

    def start_v(self, v: Projected) -> Handle: ...
    def start_q(self, q: Projected) -> Handle: ...
    def start_k(self, k: Projected) -> Handle: ...
    def start_o(self, o: torch.Tensor, into: torch.Tensor | None = None) -> Handle: ...


class ExactLayerExchange:
    """Every tensor through the engine's route, whole."""

    def __init__(self, exchange, layout: SeqLayout):
        self.exchange = exchange
        self.layout = layout
        self.heads = 0

    def start_v(self, v):
        self.heads = heads_of(v)
        return start_seq_to_head(v, self.layout, self.exchange)

    def start_q(self, q):
        return start_seq_to_head(q, self.layout, self.exchange)

    start_k = start_q

    def start_o(self, o, into=None):
        return start_head_to_seq(o, self.layout, self.exchange, heads=self.heads, into=into)


def attend(
    engine,
    *,
    layer: str,
    project_v: Callable[[SendSpec | None], Projected],
    project_q: Callable[[SendSpec | None], Projected],
    project_k: Callable[[SendSpec | None], Projected],
    kinds: tuple[str, ...],
    key_mask: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    independent: Sequence[Callable[[], None]] = (),
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sharded attention of this rank's tokens in the configured order.

    Args:
        engine: the model's `UlyssesEngine`.
        layer: the attention module's name (its key for per-layer state such as V-Major's caches).
        project_v, project_q, project_k: return V / Q / K `(B, L, H, D)` for the local tokens (Q, K with norm
            and RoPE applied). Each is passed the exchange's `SendSpec` (None on one rank): a producer that can
            write its result in the send layout (a fused kernel, streams written side by side) returns
            `SendBlocks` and saves the exchange its pack copy.
        kinds: token kinds of the local sequence, in local order (for the per-rank lengths).
        key_mask: optional `(B, S)` bool key mask in exchange order (`engine.joint_key_mask`).
        out_dtype: dtype of the returned output (default: the attention's).
        independent: work of the block that needs no attention input or output, in order; with
            `overlap_output` the first item runs under the input exchanges and the rest under the output
            exchange, otherwise all of it after the attention.
        into: `(B, L, H * D)` where the output is written (a slice of the buffer the block concatenates the
            attention output into: the unpack's copy then puts it in place), returned.
    Returns:
        `(B, L, H * D)`: the attention output for the local tokens, all heads.
    """
    cfg = engine.config
    lay = engine.seq_layout(kinds)
    ex = engine.layer_exchange(layer, lay)
    spec = SendSpec(lay, ex.exchange) if lay.world > 1 else None
    if cfg.v_first:
        v = project_v(spec)
        heads = heads_of(v)
        hv = ex.start_v(v)
        del v
        hq = ex.start_q(project_q(spec))
        chunks = head_chunks(engine, ex, lay, heads, independent)
        if chunks > 1:
            return _attend_in_head_groups(
                engine, ex, lay, hq, hv, project_k, chunks, heads, kinds, key_mask, into, out_dtype, layer
            )
        hk = ex.start_k(project_k(spec))
    else:
        q, k, v = project_q(spec), project_k(spec), project_v(spec)
        hv = ex.start_v(v)
        hq = ex.start_q(q)
        hk = ex.start_k(k)
        del q, k, v  # the exchanges hold their own send buffers: free the projections early
    overlap = cfg.overlaps_output and len(independent) > 0
    if overlap:
        independent[0]()
    # (B, H_LOCAL, S, D) each; a wait only orders streams (no host synchronisation)
    out = engine.attention(hq.wait(), hk.wait(), hv.wait(), key_mask, kinds, layer)
    del hq, hk, hv
    h = ex.start_o(out, into=into)
    del out
    for work in independent[1:] if overlap else ():
        work()
    x = h.wait()
    if not overlap:
        for work in independent:
            work()
    if into is not None:
        if x is not into:  # a layer exchange that does not unpack in place
            into.copy_(x.flatten(2, 3))
        return into
    x = x.flatten(2, 3)  # (B, L, H, D) -> (B, L, H * D)
    return x if out_dtype is None else x.to(out_dtype)


def head_chunks(engine, ex, layout: SeqLayout, heads: int, independent: Sequence[Callable[[], None]]) -> int:
    """How many head groups this layer's K exchange, attention and output exchange run in
    (`ParallelConfig.head_chunks`): 1 where the layer has independent work to hide its exchanges under, on one
    rank, with a ring, V-Major or a route that copies into buffers of its own; else the largest divisor of the
    rank's heads that is not larger than the configured count."""
    want = engine.config.head_chunks
    if want <= 1 or layout.world == 1 or len(independent) > 0 or engine.ring is not None:
        return 1
    if not isinstance(ex, ExactLayerExchange) or any(r.owns_send_buffers for r in ex.exchange.routes()):
        return 1
    h_local = local_heads(heads, layout.world)
    return max(d for d in range(1, min(want, h_local) + 1) if h_local % d == 0)


def _attend_in_head_groups(
    engine, ex, lay, hq, hv, project_k, chunks, heads, kinds, key_mask, into, out_dtype, layer
) -> torch.Tensor:
    """The rest of `attend` with K's exchange, the attention and the output's exchange in `chunks` groups of
    this rank's heads: group i's attention runs while group i + 1's K and group i - 1's output travel. Exact:
    attention is computed per head, so the groups give one call's values."""
    # K written (by a fused kernel) or packed as one send buffer per head group, each its own exchange
    hks = start_seq_to_head_chunks(project_k(SendSpec(lay, ex.exchange, chunks)), lay, ex.exchange, chunks)
    q, v = hq.wait(), hv.wait()  # (B, H_LOCAL, S, D)
    B, h_local, _, D = q.shape
    group = h_local // chunks
    out = ChunkedOutput(lay, q, batch=B, h_local=h_local, head_dim=D, heads=heads, chunks=chunks, into=into)
    hos = []
    for i, hk in enumerate(hks):
        sl = slice(i * group, (i + 1) * group)
        o = engine.attention(q[:, sl], hk.wait(), v[:, sl], key_mask, kinds, layer)
        hos.append(start_head_to_seq_chunk(o, lay, ex.exchange, out, i))
        del o
    del q, v, hks
    for h in hos:
        h.wait()
    x = out.result()
    return x if into is not None or out_dtype is None else x.to(out_dtype)
