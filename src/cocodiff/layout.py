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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


@dataclass(frozen=True)
class SendBlocks:
    """A seq->head send buffer `(P, L_MAX, B, H_LOCAL, D)` that its producer wrote in the exchange's layout (padding
    rows and heads zero), so the exchange needs no pack copy: a fused Q/K kernel's output (`pack_tokens` is the
    kernel's last step) or V's streams written side by side (`SendSpec.parts`). `heads`: the model's H (the
    output exchange drops padding heads beyond it). With `chunks` > 1 (`ParallelConfig.head_chunks`) the buffer
    is `(CHUNKS, P, L_MAX, B, H_LOCAL / CHUNKS, D)`: one contiguous send buffer per group of this rank's heads."""

    blocks: torch.Tensor
    heads: int
    chunks: int = 1


# a projection's result: `(B, L, H, D)`, or the send buffer its producer wrote in the exchange's layout
Projected = torch.Tensor | SendBlocks


def heads_of(x: Projected) -> int:
    """H of a projection's result."""
    return x.heads if isinstance(x, SendBlocks) else x.shape[2]


def pack_tokens(x: torch.Tensor, world: int, l_max: int, chunks: int = 1) -> torch.Tensor:
    """`(B, L, H, D)` -> the seq->head send layout `(P, L_MAX, B, H_LOCAL, D)`, contiguous, padding rows and heads
    zero; with `chunks` > 1, `(CHUNKS, P, L_MAX, B, H_LOCAL / CHUNKS, D)` (one send buffer per head group, see
    `SendBlocks`). Plain torch: inside a compiled kernel inductor writes its result straight in this layout."""
    B, L, H, D = x.shape
    h_local = local_heads(H, world)
    if h_local % chunks:
        raise ValueError(f"seq->head: {h_local} heads per rank do not split into {chunks} equal groups")
    if h_local * world != H:
        x = F.pad(x, (0, 0, 0, h_local * world - H))  # zero heads at the end
    # (B, L, H_PAD, D) -> (B, L, P, C, H_LOCAL / C, D) -> (C, P, L, B, H_LOCAL / C, D)
    blocks = x.reshape(B, L, world, chunks, h_local // chunks, D).permute(3, 2, 1, 0, 4, 5)
    if L != l_max:
        blocks = F.pad(blocks, (0, 0, 0, 0, 0, 0, 0, l_max - L))  # padding rows at the end of each block
    blocks = blocks.contiguous()
    return blocks[0] if chunks == 1 else blocks


class SendSpec:
    """What a seq->head exchange's send buffer looks like, handed to the producer of its tensor (`schedule.attend`),
    which may then write the tensor in that layout directly and return `SendBlocks`, saving the pack copy.

    Args:
        layout: the layer's `SeqLayout`.
        exchange: the route the tensor travels on (its `send_buffer` is where `parts` writes).
        chunks: head groups the send buffer is split into (`ParallelConfig.head_chunks`; K's exchange only).
    """

    def __init__(self, layout: SeqLayout, exchange: BlockExchange, chunks: int = 1):
        self.layout = layout
        self.exchange = exchange
        self.world = layout.world
        self.l_max = layout.l_max
        self.chunks = chunks  # head groups of the send buffer (`SendBlocks`)

    def parts(self, parts: Sequence[torch.Tensor]) -> SendBlocks | torch.Tensor:
        """The local tokens given as consecutive parts `(B, L_i, H, D)` (a joint attention's text and image
        streams), each written into its rows of the route's send buffer: their concatenation is never made.
        With padded heads (H not a multiple of P), the concatenation instead (rare: SD3.5-large at P > 2)."""
        P, lay = self.world, self.layout
        B, _, H, D = parts[0].shape
        h_local = local_heads(H, P)
        if h_local * P != H or self.chunks != 1:
            return torch.cat(list(parts), dim=1)
        send = self.exchange.send_buffer((P, self.l_max, B, h_local, D), parts[0].dtype, parts[0].device)
        off = 0
        for p in parts:
            n = p.shape[1]
            # (B, n, H, D) -> (P, n, B, H_LOCAL, D): this part's rows of every block
            send[:, off : off + n].copy_(p.reshape(B, n, P, h_local, D).permute(2, 1, 0, 3, 4))
            off += n
        if off != lay.local:
            raise ValueError(f"seq->head: rank {lay.rank} holds {off} tokens, layout says {lay.local}")
        if off != self.l_max:
            send[:, off:].zero_()
        return SendBlocks(send, H)


def pack_seq_to_head(
    x: torch.Tensor | SendBlocks, layout: SeqLayout, exchange: BlockExchange, chunks: int = 1
) -> torch.Tensor:
    """The send buffer of a seq->head exchange: `(B, L, H, D)` -> `(P, L_MAX, B, H_LOCAL, D)`, block j holding
    this rank's tokens for rank j's heads (padding rows and padding heads zero); with `chunks` > 1 one such
    buffer per head group, `(CHUNKS, P, L_MAX, B, H_LOCAL / CHUNKS, D)`. `SendBlocks` are that already."""
    P = layout.world
    if isinstance(x, SendBlocks):
        lead = (P, layout.l_max) if x.chunks == 1 else (x.chunks, P, layout.l_max)
        if x.blocks.shape[: len(lead)] != lead:
            raise ValueError(
                f"seq->head: producer wrote blocks of shape {tuple(x.blocks.shape)}, the layout needs "
                f"({', '.join(map(str, lead))}, ...)"
            )
        return x.blocks
    B, L, H, D = x.shape
    if L != layout.local:
        raise ValueError(f"seq->head: rank {layout.rank} holds {L} tokens, layout says {layout.local}")
    if chunks > 1:
        return pack_tokens(x, P, layout.l_max, chunks)  # (CHUNKS, P, L_MAX, B, H_LOCAL / CHUNKS, D)
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
    x: torch.Tensor | SendBlocks, layout: SeqLayout, exchange: BlockExchange, *, rows: RowPlan | None = None
) -> Handle:
    """Start the seq->head exchange of one tensor.

    Args:
        x: `(B, L, H, D)`, this rank's L tokens, all heads; or `SendBlocks` its producer wrote.
        rows: V-Major: only these rows of the far blocks travel (`exchange` must be a `TieredExchange`).
    Returns:
        a handle yielding `(B, H_LOCAL, S, D)`: all S tokens (source-rank order), this rank's heads.
    """
    if layout.world == 1:
        if isinstance(x, SendBlocks):
            raise ValueError("seq->head: SendBlocks on one rank (the schedule hands producers no SendSpec there)")
        exchange.stats.exchanges += 1
        return Handle([], x.permute(0, 2, 1, 3), None)  # one rank: nothing moves, no copy
    send = pack_seq_to_head(x, layout, exchange)
    if rows is not None:
        return exchange.start(send, lambda recv: unpack_heads(recv, layout), rows=rows)
    return exchange.start(send, lambda recv: unpack_heads(recv, layout))


def start_seq_to_head_chunks(
    x: torch.Tensor | SendBlocks, layout: SeqLayout, exchange: BlockExchange, chunks: int
) -> list[Handle]:
    """Start the seq->head exchange of one tensor as `chunks` exchanges, one per group of this rank's heads
    (`ParallelConfig.head_chunks`): handle i yields `(B, H_LOCAL / CHUNKS, S, D)`, heads
    `[i * H_LOCAL / CHUNKS, (i + 1) * H_LOCAL / CHUNKS)` of this rank's. The groups start in order on the route,
    so the first arrives first."""
    if layout.world == 1 or chunks == 1:
        return [start_seq_to_head(x, layout, exchange)]
    if isinstance(x, SendBlocks) and x.chunks != chunks:
        raise ValueError(f"seq->head: producer wrote {x.chunks} head groups, the schedule needs {chunks}")
    send = pack_seq_to_head(x, layout, exchange, chunks)
    return [exchange.start(send[i], lambda recv: unpack_heads(recv, layout)) for i in range(chunks)]


def pack_head_to_seq(o: torch.Tensor, layout: SeqLayout, exchange: BlockExchange) -> torch.Tensor:
    """The send buffer of a head->seq exchange: `(B, H_LOCAL, S, D)` -> `(P, L_MAX, B, H_LOCAL, D)`, block j
    holding rank j's tokens for this rank's heads."""
    P = layout.world
    B, h_local, S, D = o.shape
    if S != layout.total:
        raise ValueError(f"head->seq: got {S} tokens, layout says {layout.total}")
    # (B, H_LOCAL, S, D) -> (S, B, H_LOCAL, D)
    tokens = o.permute(2, 0, 1, 3)
    if layout.uniform and not exchange.owns_send_buffers and tokens.is_contiguous():
        # the attention wrote its output token-major (flash kernels do, for B == 1): that is the send buffer
        return tokens.view(P, layout.l_max, B, h_local, D)
    send = exchange.send_buffer((P, layout.l_max, B, h_local, D), o.dtype, o.device)
    rows = send.view(P * layout.l_max, B, h_local, D)
    if layout.uniform:
        # (S, B, H_LOCAL, D) -> (P * L, B, H_LOCAL, D) = (P, L, B, H_LOCAL, D)
        rows.copy_(tokens)
    else:
        rows.zero_()
        rows.index_copy_(0, layout.real_rows(o.device), tokens)
    return send


def unpack_tokens(recv: torch.Tensor, layout: SeqLayout, heads: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """A head->seq receive buffer `(P, L_MAX, B, H_LOCAL, D)` -> `(B, L, H, D)` (head order restored, padding
    heads dropped); with `into` `(B, L, H * D)` (e.g. a slice of the buffer the block concatenates into) written
    there, and `into` returned."""
    P, l_max, B, h_local, D = recv.shape
    L = layout.local
    # block j = my tokens, head group j: (P, L, B, H_LOCAL, D) -> (B, L, P, H_LOCAL, D) -> (B, L, H_PAD, D)
    mine = (recv[:, :L] if L != l_max else recv).permute(2, 1, 0, 3, 4)
    if into is not None and heads == P * h_local:
        into.unflatten(-1, (P, h_local, D)).copy_(mine)  # the one copy the unpack makes, into its final place
        return into
    out = mine.reshape(B, L, P * h_local, D)
    out = out if heads == P * h_local else out[:, :, :heads]
    if into is not None:
        into.unflatten(-1, (heads, D)).copy_(out)
        return into
    return out


def start_head_to_seq(
    o: torch.Tensor,
    layout: SeqLayout,
    exchange: BlockExchange,
    *,
    heads: int | None = None,
    rows: RowPlan | None = None,
    into: torch.Tensor | None = None,
) -> Handle:
    """Start the head->seq exchange of an attention output.

    Args:
        o: `(B, H_LOCAL, S, D)`, all tokens (source-rank order, as seq->head delivered them), this rank's heads.
        heads: H, the model's heads; padding heads beyond it are dropped (default: P * H_LOCAL, no padding).
        rows: V-Major: only these rows of the far blocks travel (`exchange` must be a `TieredExchange`).
        into: `(B, L, H * D)` to write the result into (see `unpack_tokens`).
    Returns:
        a handle yielding `(B, L, H, D)`: this rank's tokens, all heads (head order restored); with `into`, `into`.
    """
    if layout.world == 1:
        exchange.stats.exchanges += 1
        mine = o.permute(0, 2, 1, 3)  # one rank: (B, H, S, D) -> (B, S, H, D), a view
        if into is not None:
            into.unflatten(-1, mine.shape[2:]).copy_(mine)
            mine = into
        return Handle([], mine, None)
    send = pack_head_to_seq(o, layout, exchange)
    heads = heads or layout.world * o.shape[1]

    def post(recv: torch.Tensor) -> torch.Tensor:
        return unpack_tokens(recv, layout, heads, into)

    if rows is not None:
        return exchange.start(send, post, rows=rows)
    return exchange.start(send, post)


class ChunkedOutput:
    """Where the head->seq exchanges of an attention output split into head groups (`start_head_to_seq_chunk`)
    put their rows: `(B, L, H * D)`, the caller's `into` when given and no padding heads, else a buffer of the
    padded width whose real heads `result()` returns (and copies into `into`).

    Args:
        layout: the layer's `SeqLayout`.
        like: a tensor of the output's dtype and device.
        batch, h_local, head_dim: the output's B, H_LOCAL (padded) and D.
        heads: H, the model's heads.
        chunks: head groups per rank.
        into: `(B, L, H * D)` the caller wants the output in, or None.
    """

    def __init__(self, layout, like, *, batch, h_local, head_dim, heads, chunks, into=None):
        P, L = layout.world, layout.local
        self.heads, self.head_dim, self.into = heads, head_dim, into
        self.padded = P * h_local != heads
        if into is not None and not self.padded:
            self.buffer = into
        else:
            self.buffer = like.new_empty(batch, L, P * h_local * head_dim)
        # (B, L, P, CHUNKS, H_LOCAL / CHUNKS, D): chunk i of rank j's heads at [:, :, j, i]
        self.slots = self.buffer.unflatten(-1, (P, chunks, h_local // chunks, head_dim))

    def write(self, recv: torch.Tensor, layout: SeqLayout, chunk: int) -> None:
        """A head->seq receive buffer `(P, L_MAX, B, H_LOCAL / CHUNKS, D)` of head group `chunk` into place."""
        L = layout.local
        # block j = my tokens, head group `chunk` of rank j: (P, L, B, Hc, D) -> (B, L, P, Hc, D)
        self.slots[:, :, :, chunk].copy_((recv[:, :L] if L != recv.shape[1] else recv).permute(2, 1, 0, 3, 4))

    def result(self) -> torch.Tensor:
        """`(B, L, H * D)`, padding heads dropped (in `into` when given)."""
        if not self.padded:
            return self.buffer
        real = self.buffer[..., : self.heads * self.head_dim]
        if self.into is None:
            return real
        self.into.copy_(real)
        return self.into


def start_head_to_seq_chunk(
    o: torch.Tensor, layout: SeqLayout, exchange: BlockExchange, out: ChunkedOutput, chunk: int
) -> Handle:
    """Start the head->seq exchange of head group `chunk` of an attention output `(B, H_LOCAL / CHUNKS, S, D)`;
    its `wait()` writes the rows into `out` (`ChunkedOutput`)."""
    send = pack_head_to_seq(o, layout, exchange)

    def post(recv: torch.Tensor) -> None:
        out.write(recv, layout, chunk)

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
