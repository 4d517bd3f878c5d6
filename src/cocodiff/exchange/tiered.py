"""The tiered route: blocks to near ranks over the fast tier's group, blocks to far ranks over the slow tier.

"Near" ranks share this rank's outermost topology coordinate (its node); the others are "far". The near
blocks travel in one all-to-all over the node's group, the far blocks in one all-to-all over the slow
group, both at once, as NCCL runs a flat all-to-all on a real cluster (NVLink inside the node, the NIC
across). Same bytes in the same place as the flat route.

Two uses:
- slow-tier emulation (`SlowTierEmulation`): the slow group is CTA-capped and stands in for the network;
  this is then the fair "flat" route of an emulated cluster (each pair's bytes over the link it would use).
- V-Major: `start(..., rows=RowPlan)` sends only some rows (tokens) of each far block and scatters the
  rows that arrive into a persistent receive buffer whose other rows keep what arrived at earlier steps.
  The near blocks always travel whole: the fast tier stays exact. With `RowPlan.fp8_group` the chosen rows
  cross as 8-bit floats (e4m3) with one fp32 scale per group of values (a head), about half the bytes.

Blocks are "token-aligned": dim 1 of a block `(P, L_MAX, ...)` is the token row, as the Ulysses packing
lays them out (`layout.py`), so a row is one token's payload for the destination's heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..topology import Topology
from .base import BlockExchange, CommStats, Handle


@dataclass(eq=False)
class RowPlan:
    """Which rows of the far blocks travel, and where arriving rows land (see the module docstring).

    Args:
        send_rows: `(N_FAR, K)` int64, for each far destination in rank order the rows of its block to send;
            or `(K,)`, the same rows for every far destination; or None: every row travels (into `recv`).
        recv: the persistent receive buffer `(P, L_MAX, ...)`: near blocks are overwritten, far blocks are
            updated in place at the arriving rows and keep the rest.
        recv_rows: `(N_FAR, K)` int64 rows of each far source's block that arrive, or a callable returning
            them when they are known only later (carried by an earlier exchange); None when `carry_rows`.
        carry_rows: send each row's index with it (a few bytes per row), so the receiver learns which rows
            the sender chose without another collective; after `wait()` they are in `arrived_rows`.
        fp8_group: send the rows as 8-bit floats (e4m3) with one fp32 scale per group of this many values
            (a head's D values): about half the bytes of bf16, lossy; None sends them as they are.
        send_index, recv_index: the same rows as indices of the `(P * L_MAX, ...)` view of the buffers
            (`TieredExchange.global_rows`), when the caller has them already (a tensor, or for `recv_index` a
            callable): the exchanges of one layer share one index computation instead of one small kernel each.
            None: computed from the rows. With `carry_rows`, the arrived rows' index is kept in
            `arrived_index` after `wait()`.
        send_values: the chosen rows already gathered from the send buffer, `(N_FAR * K, ...)` in `send_index`
            order, when the caller needed them too (V-Major's reference update): not gathered twice.
    """

    send_rows: torch.Tensor | None
    recv: torch.Tensor
    recv_rows: torch.Tensor | Callable[[], torch.Tensor] | None = None
    carry_rows: bool = False
    fp8_group: int | None = None
    arrived_rows: torch.Tensor | None = None
    send_index: torch.Tensor | None = None
    recv_index: torch.Tensor | Callable[[], torch.Tensor] | None = None
    arrived_index: torch.Tensor | None = None
    send_values: torch.Tensor | None = None

    def rows_in(self) -> torch.Tensor:
        if self.carry_rows:
            if self.arrived_rows is None:
                raise RuntimeError("RowPlan: the carried rows are known only after wait()")
            return self.arrived_rows
        rows = self.recv_rows() if callable(self.recv_rows) else self.recv_rows
        if rows is None:
            raise ValueError("RowPlan needs recv_rows or carry_rows=True")
        return rows


_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0  # the largest finite e4m3 value


def quantize_rows(picked: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N_FAR, K, F)` -> (e4m3 values `(N_FAR, K, F)`, fp32 scales `(N_FAR, K, F // group)`): one scale per
    `group` values (a head's D values), its largest magnitude mapped to e4m3's largest finite value."""
    n_far, k, f = picked.shape
    x = picked.float().view(n_far, k, f // group, group)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / _FP8_MAX
    return (x / scale).to(_FP8).view(n_far, k, f), scale.view(n_far, k, f // group)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_rows` (up to e4m3's rounding): `(N_FAR, K, F)` in `dtype`."""
    n_far, k, f = q.shape
    g = scale.shape[-1]
    return (q.float().view(n_far, k, g, f // g) * scale.view(n_far, k, g, 1)).view(n_far, k, f).to(dtype)


def _pack_rows(picked: torch.Tensor, rows: torch.Tensor | None, fp8_group: int | None, piece=None) -> torch.Tensor:
    """The message of the chosen rows `(N_FAR, K, F)`: `(N_FAR, K, W)` in the payload's dtype, or bytes with fp8.

    Row layout: the F values (or, with fp8, F one-byte values then one fp32 scale per group), then the row's
    int32 index when `rows` is given, its bits stored in the message's dtype. `piece` wraps the quantisation
    (see `TieredExchange`)."""
    parts = []
    if fp8_group is None:
        parts.append(picked)
        word = picked.dtype
    else:
        n_far, k, f = picked.shape
        q, scale = (piece or _eager)(quantize_rows)(picked, fp8_group)
        parts.append(q.view(torch.uint8))
        parts.append(scale.contiguous().view(torch.uint8))
        word = torch.uint8
    if rows is not None:
        idx = rows.to(torch.int32).unsqueeze(-1)  # (N_FAR, K, 1)
        parts.append(idx.view(torch.uint8) if word == torch.uint8 else _as_words(idx, word))
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=-1)


def _eager(fn):
    return fn


def _as_words(idx: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """int32 `(..., 1)` viewed as elements of `word` (int64 when `word` is wider than 4 bytes)."""
    if torch.empty((), dtype=word).element_size() > 4:
        idx = idx.long()
    return idx.view(word)


def _unpack_rows(arrived: torch.Tensor, f: int, dtype: torch.dtype, carried: bool, fp8_group: int | None, piece=None):
    """Inverse of `_pack_rows`: (values `(N_FAR, K, F)` in `dtype`, carried rows `(N_FAR, K)` or None)."""
    n_far, k, _ = arrived.shape
    if fp8_group is None:
        values, tail = arrived[..., :f], arrived[..., f:]
    else:
        g = f // fp8_group
        q = arrived[..., :f].contiguous().view(_FP8)
        scale = arrived[..., f : f + 4 * g].contiguous().view(torch.float32)
        values = (piece or _eager)(dequantize_rows)(q, scale, dtype)
        tail = arrived[..., f + 4 * g :]
    rows = None
    if carried:
        tail = tail.contiguous()
        rows = (
            tail.view(torch.int32) if tail.dtype == torch.uint8 or tail.element_size() <= 4 else tail.view(torch.int64)
        )
        rows = rows.reshape(n_far, k).long()
    return values, rows


class TieredExchange(BlockExchange):
    """Near blocks over `near_group`, far blocks over `far_group`, concurrently.

    Args:
        near: group ranks `(lo, hi)` that count as near (this rank's node; `(rank, rank + 1)` makes every
            peer far, which V-Major uses on a single tier).
        near_group: process group of the near ranks (None when there is only this rank).
        far_group: process group of all P ranks over which far blocks travel (CTA-capped under emulation).
        topology, rank, stats, sync: see `BlockExchange`.
        name: label in reports ("flat" when it is the emulated flat route).
        piece: wraps the fp8 rows' quantisation kernels (`quantize_rows`, `dequantize_rows`); V-Major passes
            its engine's `compiled.compiled_piece`, so with `compile_blocks` each is one fused kernel instead
            of five or three eager passes over the rows in fp32 (the byte views and the message's `cat` stay
            eager; on GPUs before sm_89 all of it does). None: eager.
    """

    def __init__(
        self,
        *,
        topology: Topology,
        rank: int,
        stats: CommStats | None = None,
        near: tuple[int, int],
        near_group,
        far_group,
        sync: bool = False,
        name: str = "tiered",
        piece: Callable[[Callable], Callable] | None = None,
    ):
        super().__init__(topology=topology, rank=rank, stats=stats, sync=sync)
        self.name = name
        self.piece = piece
        self.lo, self.hi = near
        if not self.lo <= rank < self.hi:
            raise ValueError(f"TieredExchange: rank {rank} is not in its near range {near}")
        self.near_group = near_group if self.hi - self.lo > 1 else None
        self.far_group = far_group
        self.far = [r for r in range(self.world) if not self.lo <= r < self.hi]
        self._far_contiguous = self.lo == 0 or self.hi == self.world
        tiers = len(topology.tiers)
        self._near_peers, self._far_peers = [0] * tiers, [0] * tiers
        for r in range(self.world):
            if r != rank:
                counts = self._near_peers if self.lo <= r < self.hi else self._far_peers
                counts[topology.tier_between(rank, r)] += 1
        self._index_cache: dict = {}

    # ---- whole blocks ---------------------------------------------------------------------------
    def _near(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Near blocks into `recv[lo:hi]` (a contiguous view: NCCL writes in place)."""
        lo, hi = self.lo, self.hi
        if self.near_group is None:
            recv[self.rank].copy_(send[self.rank])
            return []
        return [dist.all_to_all_single(recv[lo:hi], send[lo:hi].contiguous(), group=self.near_group, async_op=True)]

    def _far_splits(self, per_far: int) -> list[int]:
        return [0 if self.lo <= r < self.hi else per_far for r in range(self.world)]

    def start(
        self,
        send: torch.Tensor,
        post: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        rows: RowPlan | None = None,
    ) -> Handle:
        self._check(send)
        if rows is not None and rows.send_rows is not None:
            return self._start_rows(send, post, rows)
        send = send.contiguous()
        self._count(send)
        recv = torch.empty_like(send) if rows is None else self._recv_buffer(rows, send)
        works = self._near(send, recv)
        if not self.far:
            return self._finish(Handle(works, recv, post))
        lo, hi = self.lo, self.hi
        far_send = send[hi:] if lo == 0 else send[:lo] if hi == self.world else torch.cat([send[:lo], send[hi:]])
        far_recv = (recv[hi:] if lo == 0 else recv[:lo]) if self._far_contiguous else torch.empty_like(far_send)
        splits = self._far_splits(1)
        works.append(
            dist.all_to_all_single(
                far_recv,
                far_send.contiguous(),
                output_split_sizes=splits,
                input_split_sizes=splits,
                group=self.far_group,
                async_op=True,
            )
        )
        if self._far_contiguous:
            return self._finish(Handle(works, recv, post))

        def assemble(out: torch.Tensor) -> torch.Tensor:
            out[:lo].copy_(far_recv[:lo])
            out[hi:].copy_(far_recv[lo:])
            return out if post is None else post(out)

        return self._finish(Handle(works, recv, assemble))

    @staticmethod
    def _recv_buffer(plan: RowPlan, send: torch.Tensor) -> torch.Tensor:
        if plan.recv.shape != send.shape or plan.recv.dtype != send.dtype:
            raise ValueError(
                f"RowPlan.recv {tuple(plan.recv.shape)}/{plan.recv.dtype} does not match the send buffer "
                f"{tuple(send.shape)}/{send.dtype}"
            )
        return plan.recv

    def _piece_for(self, x: torch.Tensor):
        """`piece` where it can compile the fp8 kernels: inductor's e4m3 conversion needs sm_89 or later (Ada,
        Hopper); on older GPUs the eager conversion runs."""
        if self.piece is not None and x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
            return None
        return self.piece

    # ---- selected rows of the far blocks ----------------------------------------------------------
    def global_rows(self, rows: torch.Tensor, l_max: int) -> torch.Tensor:
        """(N_FAR, K) rows within far blocks -> `(N_FAR * K,)` rows of the `(P * L_MAX, F)` view."""
        key = (rows.device, l_max)
        base = self._index_cache.get(key)
        if base is None:
            base = torch.tensor(self.far, dtype=torch.long, device=rows.device)[:, None] * l_max
            self._index_cache[key] = base
        return (rows + base).reshape(-1)

    def _start_rows(self, send: torch.Tensor, post, plan: RowPlan) -> Handle:
        P, l_max = send.shape[0], send.shape[1]
        n_far = len(self.far)
        send = send.contiguous()
        recv = self._recv_buffer(plan, send)
        rows = plan.send_rows
        if rows.dim() == 1:
            rows = rows.expand(n_far, -1)
        K = rows.shape[1]
        F = send[0, 0].numel()
        works = self._near(send, recv)
        if n_far == 0:  # every rank is near: nothing to select
            self._count(send)
            return self._finish(Handle(works, recv, post))
        # (P, L_MAX, ...) -> (P * L_MAX, F) -> the chosen rows of the far blocks -> their message (N_FAR, K, W)
        flat = send.view(P * l_max, F)
        if plan.send_values is not None:
            picked = plan.send_values.view(n_far, K, F)
        else:
            index = plan.send_index if plan.send_index is not None else self.global_rows(rows, l_max)
            picked = flat.index_select(0, index).view(n_far, K, F)
        compact = _pack_rows(picked, rows if plan.carry_rows else None, plan.fp8_group, self._piece_for(send))
        # byte accounting: near blocks whole, far blocks K rows (with their scales and carried indices)
        block_bytes = send[0].numel() * send.element_size()
        row_bytes = compact.shape[-1] * compact.element_size()
        for t in range(len(self.peers)):
            self.stats.bytes_by_tier[t] += self._near_peers[t] * block_bytes + self._far_peers[t] * K * row_bytes
            self.stats.messages_by_tier[t] += self._near_peers[t] + self._far_peers[t]
        self.stats.exchanges += 1
        arrived = torch.empty_like(compact)
        splits = self._far_splits(K * compact.shape[-1])
        works.append(
            dist.all_to_all_single(
                arrived.view(-1),
                compact.view(-1),
                output_split_sizes=splits,
                input_split_sizes=splits,
                group=self.far_group,
                async_op=True,
            )
        )

        def scatter(out: torch.Tensor) -> torch.Tensor:
            values, carried = _unpack_rows(
                arrived, F, send.dtype, plan.carry_rows, plan.fp8_group, self._piece_for(send)
            )
            if carried is not None:
                plan.arrived_rows = carried
                index = plan.arrived_index = self.global_rows(carried, l_max)
            elif plan.recv_index is not None:
                index = plan.recv_index() if callable(plan.recv_index) else plan.recv_index
                if index is None:
                    raise RuntimeError(
                        "RowPlan.recv_index: the rows' index is known only after the exchange carrying them"
                    )
            else:
                index = self.global_rows(plan.rows_in(), l_max)
            dest = out.view(P * l_max, F)
            dest.index_copy_(0, index, values.reshape(n_far * K, F))
            return out if post is None else post(out)

        return self._finish(Handle(works, recv, scatter))
