"""Where tokens live: the per-call token layout over the ranks, and the Ulysses seq<->head exchanges.

Image and text tokens are split separately over the P ranks (balanced; the first `n % P` ranks get one
more), so each rank's local sequence is [its text slice, its image slice] (or the family's order).
`start_seq_to_head` packs a rank's `(B, L, H, D)` tokens into one block per destination rank (that rank's
heads) and starts the block exchange; `start_head_to_seq` does the reverse for the attention output.

Ranks may hold different numbers of tokens. Blocks are padded to the longest local length `L_MAX`, so that
every block has the same size (one even all-to-all; TAPA's phases stay uniform); the padding rows are
dropped right after the exchange, before attention sees them, so they cannot change the result.

Heads that do not divide by P (SD3.5-large's 38 over 4 ranks) are padded with zero heads up to the next
multiple of P (38 -> 40: rank blocks of 10 heads, the last holding 8 real ones). A zero head's Q, K and V
give a zero attention output, which the head->seq exchange drops: exact for the real heads, at the cost of
the padded heads' share of the exchange and attention work (2/40 = 5% there).

Names: B batch, S all tokens, L local tokens of one rank, L_MAX the longest L, H heads, H_PAD = H rounded up
to a multiple of P, H_LOCAL = H_PAD / P, D head dim, P ranks. No diffusers here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .exchange import BlockExchange, CommStats, Handle, RowPlan, all_gather_into

IMG, TXT = "img", "txt"


def split_sizes(n: int, world: int) -> tuple[int, ...]:
    """Balanced split of n tokens over `world` ranks; the first n % world ranks get one more."""
    base, extra = divmod(n, world)
    return tuple(base + (1 if r < extra else 0) for r in range(world))


@dataclass(frozen=True)
class TokenLayout:
    """How the image and text tokens of one transformer call are spread over the ranks (same on every rank)."""

    n_img: int
    n_txt: int
    world: int

    def sizes(self, kind: str) -> tuple[int, ...]:
        if kind == IMG:
            return split_sizes(self.n_img, self.world)
        if kind == TXT:
            return split_sizes(self.n_txt, self.world)
        raise ValueError(f"unknown token kind {kind!r}")

    def total(self, kind: str) -> int:
        return self.n_img if kind == IMG else self.n_txt

    def offset(self, kind: str, rank: int) -> int:
        return sum(self.sizes(kind)[:rank])

    def lengths(self, kinds: tuple[str, ...]) -> tuple[int, ...]:
        """Local token counts per rank of a sequence made of the given kinds (e.g. text + image)."""
        per_kind = [self.sizes(k) for k in kinds]
        return tuple(sum(p[r] for p in per_kind) for r in range(self.world))


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


def local_heads(heads: int, world: int) -> int:
    """Heads per rank after padding: `ceil(heads / world)`."""
    return -(-heads // world)


def pack_seq_to_head(x: torch.Tensor, layout: SeqLayout, exchange: BlockExchange) -> torch.Tensor:
    """The send buffer of a seq->head exchange: `(B, L, H, D)` -> `(P, L_MAX, B, H_LOCAL, D)`, block j holding
    this rank's tokens for rank j's heads (padding rows and padding heads zero)."""
    P = layout.world
    B, L, H, D = x.shape
    if L != layout.local:
        raise ValueError(f"seq->head: rank {layout.rank} holds {L} tokens, layout says {layout.local}")
    h_local = local_heads(H, P)
    if h_local * P != H:
        # (B, L, H, D) -> (B, L, H_PAD, D): zero heads at the end
        x = torch.cat([x, x.new_zeros(B, L, h_local * P - H, D)], dim=2)
    # (B, L, H_PAD, D) -> (B, L, P, H_LOCAL, D) -> (P, L, B, H_LOCAL, D)
    blocks = x.view(B, L, P, h_local, D).permute(2, 1, 0, 3, 4)
    send = exchange.send_buffer((P, layout.l_max, B, h_local, D), x.dtype, x.device)
    send[:, :L].copy_(blocks)
    if L != layout.l_max:
        send[:, L:].zero_()  # padding rows: dropped after the exchange, zero for reproducible bytes
    return send


def unpack_heads(recv: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
    """A seq->head receive buffer `(P, L_MAX, B, H_LOCAL, D)` -> `(B, H_LOCAL, S, D)` (source-rank order)."""
    P, l_max, B, h_local, D = recv.shape
    # (P, L_MAX, B, H_LOCAL, D) -> (P * L_MAX, B, H_LOCAL, D) -> drop padding -> (S, B, H_LOCAL, D)
    flat = recv.view(P * l_max, B, h_local, D)
    if not layout.uniform:
        flat = flat.index_select(0, layout.real_rows(flat.device))
    # (S, B, H_LOCAL, D) -> (B, H_LOCAL, S, D): a view; SDPA takes the strides as they are
    return flat.permute(1, 2, 0, 3)


def start_seq_to_head(
    x: torch.Tensor, layout: SeqLayout, exchange: BlockExchange, *, rows: RowPlan | None = None
) -> Handle:
    """Start the seq->head exchange of one tensor.

    Args:
        x: `(B, L, H, D)`, this rank's L tokens, all heads.
        rows: V-Major: only these rows of the far blocks travel (`exchange` must be a `TieredExchange`).
    Returns:
        a handle yielding `(B, H_LOCAL, S, D)`: all S tokens (source-rank order), this rank's heads.
    """
    if layout.world == 1:
        exchange.stats.exchanges += 1
        return Handle([], x.permute(0, 2, 1, 3), None)  # one rank: nothing moves, no copy
    send = pack_seq_to_head(x, layout, exchange)
    if rows is not None:
        return exchange.start(send, lambda recv: unpack_heads(recv, layout), rows=rows)
    return exchange.start(send, lambda recv: unpack_heads(recv, layout))


def pack_head_to_seq(o: torch.Tensor, layout: SeqLayout, exchange: BlockExchange) -> torch.Tensor:
    """The send buffer of a head->seq exchange: `(B, H_LOCAL, S, D)` -> `(P, L_MAX, B, H_LOCAL, D)`, block j
    holding rank j's tokens for this rank's heads."""
    P = layout.world
    B, h_local, S, D = o.shape
    if S != layout.total:
        raise ValueError(f"head->seq: got {S} tokens, layout says {layout.total}")
    # (B, H_LOCAL, S, D) -> (S, B, H_LOCAL, D)
    tokens = o.permute(2, 0, 1, 3)
    send = exchange.send_buffer((P, layout.l_max, B, h_local, D), o.dtype, o.device)
    rows = send.view(P * layout.l_max, B, h_local, D)
    if layout.uniform:
        # (S, B, H_LOCAL, D) -> (P * L, B, H_LOCAL, D) = (P, L, B, H_LOCAL, D)
        rows.copy_(tokens)
    else:
        rows.zero_()
        rows.index_copy_(0, layout.real_rows(o.device), tokens)
    return send


def unpack_tokens(recv: torch.Tensor, layout: SeqLayout, heads: int) -> torch.Tensor:
    """A head->seq receive buffer `(P, L_MAX, B, H_LOCAL, D)` -> `(B, L, H, D)` (head order restored, padding
    heads dropped)."""
    P, l_max, B, h_local, D = recv.shape
    L = layout.local
    # block j = my tokens, head group j: (P, L, B, H_LOCAL, D) -> (B, L, P, H_LOCAL, D) -> (B, L, H_PAD, D)
    mine = recv[:, :L] if L != l_max else recv
    out = mine.permute(2, 1, 0, 3, 4).reshape(B, L, P * h_local, D)
    return out if heads == P * h_local else out[:, :, :heads]


def start_head_to_seq(
    o: torch.Tensor,
    layout: SeqLayout,
    exchange: BlockExchange,
    *,
    heads: int | None = None,
    rows: RowPlan | None = None,
) -> Handle:
    """Start the head->seq exchange of an attention output.

    Args:
        o: `(B, H_LOCAL, S, D)`, all tokens (source-rank order, as seq->head delivered them), this rank's heads.
        heads: H, the model's heads; padding heads beyond it are dropped (default: P * H_LOCAL, no padding).
        rows: V-Major: only these rows of the far blocks travel (`exchange` must be a `TieredExchange`).
    Returns:
        a handle yielding `(B, L, H, D)`: this rank's tokens, all heads (head order restored).
    """
    if layout.world == 1:
        exchange.stats.exchanges += 1
        return Handle([], o.permute(0, 2, 1, 3), None)  # one rank: (B, H, S, D) -> (B, S, H, D), a view
    send = pack_head_to_seq(o, layout, exchange)
    heads = heads or layout.world * o.shape[1]

    def post(recv: torch.Tensor) -> torch.Tensor:
        return unpack_tokens(recv, layout, heads)

    if rows is not None:
        return exchange.start(send, post, rows=rows)
    return exchange.start(send, post)


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
