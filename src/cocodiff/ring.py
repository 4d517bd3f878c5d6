"""Ring attention: the second sequence-parallel dimension, for degrees past the head count (Ulysses x ring).

With `ring_degree=R` the P ranks form R ring positions x U = P / R Ulysses ranks. By default
(`ring_placement="ulysses_inner"`) ranks `j*U .. j*U+U-1` are Ulysses group j (contiguous: inside a node when U
divides the GPUs per node) and ranks `u, U+u, 2U+u, ...` form ring u; "ring_inner" is the reverse (`layout`).
The tokens are split over all P ranks as without a ring; the Ulysses exchange inside group j gives every
member all of group j's tokens for H/U heads (`schedule.attend`); the attention over the whole sequence is then
a ring: each rank holds Q, K and V of its group's tokens ("block j"), computes attention of its Q against the
K/V block in hand while the next block arrives from its ring predecessor (point-to-point send/receive, started
before the compute), and merges the partial results exactly through their log-sum-exp in fp32:

    lse = log(exp(lse_a) + exp(lse_b)),  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

Blocks have the lengths the token layout gives (uneven groups are fine: every rank knows every block's
length, so receive buffers have the exact size); a key-padding mask travels as its slice per block. No host
synchronisation: the step still captures in a CUDA graph (NCCL point-to-point inside a capture).

With V-Major (`ring_attention_vmajor`) each block travels as its owner's selection of most-changed tokens, and
every rank attends to its cached copy of the other blocks with those rows updated.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist


def layout(world: int, ulysses: int, placement: str) -> list[list[int]]:
    """The ranks (of the sequence-parallel group) of each Ulysses group, ring position by ring position:
    "ulysses_inner": contiguous ranks (a node's GPUs exchange heads, the ring crosses nodes); "ring_inner":
    strided ranks (the ring runs inside a node, the head exchanges cross nodes)."""
    degree = world // ulysses
    if placement == "ulysses_inner":
        return [[j * ulysses + u for u in range(ulysses)] for j in range(degree)]
    return [[u * degree + j for u in range(ulysses)] for j in range(degree)]


class Ring:
    """One rank's ring: its position, the ring's process group, the global ranks of its neighbours, and which
    sequence-parallel ranks hold each ring block (`blocks[j]`: Ulysses group j, in head-exchange order)."""

    def __init__(self, group, degree: int, rank: int, blocks: list[list[int]] | None = None):
        self.group = group
        self.degree = degree
        self.rank = rank
        ranks = dist.get_process_group_ranks(group)
        self.next = ranks[(rank + 1) % degree]
        self.prev = ranks[(rank - 1) % degree]
        self.blocks = blocks
        self.contiguous = blocks is None or all(b == list(range(b[0], b[0] + len(b))) for b in blocks)
        self._order: dict[tuple, torch.Tensor] = {}
        self._received: dict[tuple, torch.Tensor] = {}

    def receive_buffer(self, like: torch.Tensor, n: int, slot: int, part: int) -> torch.Tensor:
        """The persistent buffer `(n, *like.shape[1:])` a hop receives part `part` of its message into; `slot`
        alternates between the hops of one attention (0, 1, 0, ...), so the block in hand is never the one being
        overwritten. Persistent: a fresh buffer per hop would be held by NCCL until the work is reaped, and a
        forward the CPU runs ahead of piles them up (tens of GB at 2048^2); CUDA graphs capture their addresses.
        Reuse is ordered by the streams: a hop's receive is enqueued after the attention that read the slot."""
        key = (part, slot, n, tuple(like.shape[1:]), like.dtype, like.device)
        buf = self._received.get(key)
        if buf is None:
            buf = self._received[key] = like.new_empty((n, *like.shape[1:]))
        return buf

    def block_lengths(self, lengths: tuple[int, ...]) -> tuple[int, ...]:
        """Tokens of each ring block, from the per-rank lengths of the sequence-parallel group."""
        return tuple(sum(lengths[m] for m in b) for b in self.blocks)

    def mask_in_ring_order(self, key_mask: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
        """`key_mask` `(B, S)` in rank order -> in ring-block order (blocks concatenated; a no-op for contiguous
        Ulysses groups)."""
        if self.contiguous:
            return key_mask
        order = self._order.get((lengths, key_mask.device))
        if order is None:
            starts = [0, *itertools.accumulate(lengths)]
            idx = [i for b in self.blocks for m in b for i in range(starts[m], starts[m] + lengths[m])]
            order = self._order[(lengths, key_mask.device)] = torch.tensor(idx, device=key_mask.device)
        return key_mask.index_select(1, order)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
    """(output, log-sum-exp of the scores) of softmax attention; q `(B, H, S, D)`, k/v `(B, H, T, D)`,
    key_mask `(B, T)` bool (True = attend) or None. The output is in q's dtype, the lse `(B, H, S)` fp32."""
    bias = None
    if key_mask is not None:
        # rows padded to a multiple of 16 elements: CUDA's efficient kernel needs an aligned batch stride
        # (filled in place: an out-of-place fill would return a contiguous, unaligned copy)
        B, T = key_mask.shape
        bias = torch.zeros(B, -(-T // 16) * 16, dtype=q.dtype, device=q.device)
        bias[:, :T].masked_fill_(~key_mask, float("-inf"))
        bias = bias[:, None, None, :T]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)
    elif bias is None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = _cuda_attention_with_lse(q, k, v)
    else:
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False)[:2]
        lse = lse[..., : q.shape[2]]  # the kernel pads the lse's sequence dim
    lse = lse.float()
    if key_mask is not None:
        # a block with no key to attend to contributes nothing (the kernels report lse 0 and output 0 there)
        empty = ~key_mask.any(-1)[:, None, None]
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


# (device, dtype, head dim) -> whether cuDNN's attention agrees with the flash kernel there (checked once)
_CUDNN_AGREES: dict[tuple, bool] = {}


def _cuda_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(output, lse `(B, H, S)`) of unmasked half-precision attention on CUDA, with the kernel PyTorch's SDPA would
    pick for these tensors (what the Ulysses path runs): cuDNN's attention where SDPA prefers it and a one-time
    check on this device agrees with the flash kernel, else flash, else the memory-efficient kernel."""
    from torch.nn.attention import SDPBackend

    choice = torch._fused_sdp_choice(q, k, v)
    if choice == int(SDPBackend.CUDNN_ATTENTION) and _cudnn_agrees(q):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
        return out, lse.reshape(q.shape[:3])
    if choice == int(SDPBackend.EFFICIENT_ATTENTION):
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)[:2]
        return out, lse[..., : q.shape[2]]
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]


def _cudnn_agrees(q: torch.Tensor) -> bool:
    """Whether cuDNN's attention gives the flash kernel's output and log-sum-exp (the layout of its statistics
    included) for q's device, dtype and head dim: checked once on small inputs, outside any CUDA-graph capture
    (inside one, before the check has run, the answer is no and the flash kernel runs)."""
    key = (q.device, q.dtype, q.shape[-1])
    hit = _CUDNN_AGREES.get(key)
    if hit is not None:
        return hit
    if torch.cuda.is_current_stream_capturing():
        return False
    g = torch.Generator(device=q.device).manual_seed(0)
    a, b, c = (torch.randn(1, 2, n, q.shape[-1], device=q.device, generator=g).to(q.dtype) for n in (100, 77, 77))
    try:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(a, b, c, None, True)[:2]
        ref, ref_lse = torch.ops.aten._scaled_dot_product_flash_attention(a, b, c, 0.0, False, False)[:2]
        ok = lse.numel() == ref_lse.numel() and bool(
            torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
            and torch.allclose(lse.reshape(ref_lse.shape).float(), ref_lse.float(), atol=1e-3, rtol=1e-3)
        )
    except RuntimeError:
        ok = False
    _CUDNN_AGREES[key] = ok
    return ok


def _merge(acc: torch.Tensor | None, acc_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor):
    """Fold a block's (output, lse) into the running fp32 (output, lse), in place; rows that attended to nothing
    so far (lse -inf on both sides) stay at output 0, lse -inf."""
    if acc is None:
        return out.float().masked_fill(torch.isinf(lse)[..., None], 0.0), lse
    new = torch.logaddexp(acc_lse, lse)
    ref = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # -inf - -inf would be NaN
    acc.mul_(torch.exp(acc_lse - ref)[..., None]).add_(out.float() * torch.exp(lse - ref)[..., None])
    return acc, new


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring: Ring,
    block_lengths: tuple[int, ...],
    key_mask: torch.Tensor | None = None,
    stats=None,
) -> torch.Tensor:
    """Attention of this rank's queries over the K/V blocks of the whole ring.

    Args:
        q, k, v: `(B, H, S_j, D)` for this rank's block j (`S_j = block_lengths[ring.rank]`).
        ring: this rank's `Ring`.
        block_lengths: tokens of every ring position's block.
        key_mask: `(B, sum(block_lengths))` bool over all blocks in ring order, or None.
        stats: a `CommStats` whose `ring_bytes` counts the blocks sent.
    Returns:
        `(B, H, S_j, D)` in q's dtype.
    """
    R = ring.degree
    offsets = [0, *itertools.accumulate(block_lengths)]
    acc = acc_lse = None
    kv = (k, v)  # sent as they are: no staging copy before a hop
    for step in range(R):
        src = (ring.rank - step) % R  # whose block is in hand
        pending = None
        if step < R - 1:  # start the next hop before computing on this block
            nxt = (ring.rank - step - 1) % R
            pending = _hop(kv, block_lengths[nxt], ring, stats, slot=step % 2)
        if block_lengths[src] > 0 and q.shape[2] > 0:
            mask = None if key_mask is None else key_mask[:, offsets[src] : offsets[src + 1]]
            out, lse = attention_with_lse(q, kv[0], kv[1], mask)
            acc, acc_lse = _merge(acc, acc_lse, out, lse)
        if pending is not None:
            kv = _arrived(pending)
    if acc is None:  # no query, or no key anywhere
        return torch.zeros_like(q)
    return acc.to(q.dtype)


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """`(B, H, S, D)` -> its `(S, B, H, D)` view: contiguous for what the Ulysses exchange delivers (its receive
    buffer is token-major) and for rows selected with `_select_rows`, so a hop sends without a staging copy."""
    t = t.permute(2, 0, 1, 3)
    return t if t.is_contiguous() else t.contiguous()


def _select_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens `idx` of `x` `(B, H, S, D)`, gathered token-major (a `(B, H, K, D)` view of contiguous rows)."""
    return x.permute(2, 0, 1, 3).index_select(0, idx).permute(1, 2, 0, 3)


def _hop(tensors, n: int, ring: Ring, stats, slot: int):
    """Send `tensors` (`(B, H, S, D)` blocks, then optionally the `(K,)` token indices) to the ring's successor and
    receive the predecessor's, `n` tokens, into the ring's receive buffers of `slot`, in one batch of
    point-to-point ops: (works, received)."""
    ops, received = [], []
    for part, t in enumerate(tensors):
        wire = _token_major(t) if t.dim() == 4 else t
        r = ring.receive_buffer(wire, n, slot, part)
        ops += [dist.P2POp(dist.isend, wire, ring.next, ring.group), dist.P2POp(dist.irecv, r, ring.prev, ring.group)]
        received.append(r)
        if stats is not None:
            stats.ring_bytes += wire.numel() * wire.element_size()
    return dist.batch_isend_irecv(ops), received


def _arrived(pending) -> tuple:
    """Wait for a hop (orders streams on NCCL, no host sync) and return its tensors, blocks as `(B, H, n, D)`."""
    works, received = pending
    for work in works:
        work.wait()
    return tuple(r.permute(1, 2, 0, 3) if r.dim() == 4 else r for r in received)


class RingCaches:
    """V-Major on the ring's hops, one layer and CFG branch: `ref` (the V this rank last sent for its block) and
    the K/V this rank holds for every ring block (its own slot unused). Persistent: CUDA graphs read them at
    their addresses, and `VMajor.preserved` snapshots them around a graph's warm-up."""

    def __init__(self, like: torch.Tensor, block_lengths: tuple[int, ...], own: int):
        B, H, _, D = like.shape
        self.ref = torch.zeros_like(like)
        self.k = [like.new_zeros(B, H, n, D) if j != own else None for j, n in enumerate(block_lengths)]
        self.v = [like.new_zeros(B, H, n, D) if j != own else None for j, n in enumerate(block_lengths)]

    def tensors(self) -> list[torch.Tensor]:
        return [self.ref] + [t for t in self.k + self.v if t is not None]


def _most_changed(v: torch.Tensor, ref: torch.Tensor, count: int) -> torch.Tensor:
    """Indices `(count,)` of the tokens whose V moved most (relative L1 over batch, heads and dim) since sent."""
    diff = (v - ref).abs().sum((0, 1, 3), dtype=torch.float32)
    norm = ref.abs().sum((0, 1, 3), dtype=torch.float32)
    return (diff / (norm + 1e-6)).topk(count, sorted=False).indices


def ring_attention_vmajor(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring: Ring,
    block_lengths: tuple[int, ...],
    caches: RingCaches,
    counts: tuple[int, ...] | None,
    key_mask: torch.Tensor | None = None,
    stats=None,
) -> torch.Tensor:
    """`ring_attention` where each block travels as its V-Major selection: the `counts[j]` tokens of block j whose
    V changed most since block j's owner last sent them (the owner selects; every hop forwards the same rows and
    their indices), and every rank attends to its cached K/V of the other blocks with those rows updated. Its
    own block is always exact. `counts=None`: a full call, every row travels and refills the caches."""
    R, me = ring.degree, ring.rank
    offsets = [0, *itertools.accumulate(block_lengths)]
    # the message of a hop: (K rows, V rows) of a block, plus their token indices on a selective call
    if counts is None:
        caches.ref.copy_(v)
        msg = (k, v)
    else:
        idx = _most_changed(v, caches.ref, counts[me])
        v_rows = _select_rows(v, idx)
        caches.ref.index_copy_(2, idx, v_rows)
        msg = (_select_rows(k, idx), v_rows, idx)
    acc = acc_lse = None
    for step in range(R):
        src = (me - step) % R
        pending = None
        if step < R - 1:  # forward the message in hand (its block's rows) while attending to its block
            nxt = (me - step - 1) % R
            pending = _hop(msg, block_lengths[nxt] if counts is None else counts[nxt], ring, stats, slot=step % 2)
        if step == 0:
            kb, vb = k, v
        else:  # the message in hand updates this rank's copy of block src
            if counts is None:
                caches.k[src].copy_(msg[0])
                caches.v[src].copy_(msg[1])
            else:
                caches.k[src].index_copy_(2, msg[2], msg[0])
                caches.v[src].index_copy_(2, msg[2], msg[1])
            kb, vb = caches.k[src], caches.v[src]
        if block_lengths[src] > 0 and q.shape[2] > 0:
            mask = None if key_mask is None else key_mask[:, offsets[src] : offsets[src + 1]]
            acc, acc_lse = _merge(acc, acc_lse, *attention_with_lse(q, kb, vb, mask))
        if pending is not None:
            msg = _arrived(pending)
    if acc is None:
        return torch.zeros_like(q)
    return acc.to(q.dtype)


def build_ring(
    group, ulysses: int, degree: int, *, placement: str = "ulysses_inner", ring_options=None, heads_options=None
):
    """(this rank's Ulysses group, its `Ring`) for `group` (the whole world) as `degree` ring positions x `ulysses`
    ranks placed by `placement` (`layout`). Collective: every rank creates every sub-group, in the same order.
    `ring_options` / `heads_options`: process group options of the rings / Ulysses groups (slow-tier emulation's
    CTA cap on the groups that cross the slow tier)."""
    parent = dist.get_process_group_ranks(group)
    me = dist.get_rank(group)
    blocks = layout(len(parent), ulysses, placement)
    heads_group = ring_group = None
    position = next(j for j, b in enumerate(blocks) if me in b)
    for j, members in enumerate(blocks):
        g = dist.new_group([parent[m] for m in members], pg_options=heads_options)
        if j == position:
            heads_group = g
    for u in range(ulysses):
        members = [blocks[j][u] for j in range(degree)]
        g = dist.new_group([parent[m] for m in members], pg_options=ring_options)
        if me in members:
            ring_group = g
    return heads_group, Ring(ring_group, degree, position, blocks)


def split_degree(world: int, heads: int, ring_degree: int | None, fits=lambda ulysses: True) -> tuple[int, int]:
    """(Ulysses degree, ring degree) for `world` ranks and the model's smallest head count.

    `ring_degree=None` (automatic): 1 when the heads allow Ulysses over all ranks (heads >= world; heads that do not
    divide are padded), else the smallest ring that leaves Ulysses a degree the heads allow and `fits` accepts
    (the topology: the Ulysses groups must cover whole inner tiers)."""
    if ring_degree is None:
        if heads >= world:
            return world, 1
        for u in range(min(heads, world), 0, -1):
            if world % u == 0 and fits(u):
                return u, world // u
    if world % ring_degree:
        raise ValueError(
            f"cocodiff.parallelize: ring_degree={ring_degree} does not divide the {world} ranks; use a divisor of "
            f"{world}"
        )
    return world // ring_degree, ring_degree
