"""Memory the engine needs beyond the model: communication buffers, estimated before the first exchange.

Peak of one attention layer, in units of one padded local sequence x all heads (L_MAX x B x H x D): before
the seq->head exchanges are waited for, the local Q, K, V projections, their packed send buffers and their
receive buffers are alive (9); after attention the engine drops Q/K/V and their handles, so the output
exchange (attention output, send, receive, unpacked result: 4) stays below that. Routes add their own
(`BlockExchange.extra_buffers`): TAPA a permuted copy and a receive buffer per phase for each tensor in
flight, the copy engine its slots. Not counted: the model's own activations, padding compaction copies for
uneven lengths (at most one buffer at a time), the automatic plan's one-off tuning sample. V-Major's caches
persist across calls and are accounted by `vmajor.cache_bytes`. A ring dimension adds its K/V blocks
(`ring_buffers`).
"""

from __future__ import annotations

import os

import torch


def comm_buffer_bytes(*, l_max: int, batch: int, inner_dim: int, elem: int, extra_buffers: int = 0) -> int:
    """Peak bytes of exchange buffers for one attention layer.

    Args:
        l_max: the longest local sequence (tokens) of any rank.
        inner_dim: heads x head dim of the widest attention.
        elem: bytes per element.
        extra_buffers: message-sized buffers the route keeps beyond send and receive buffers with four
            exchanges in flight (`BlockExchange.extra_buffers(4)`: TAPA's per-phase copies, the copy
            engine's slots).
    """
    one = l_max * batch * inner_dim * elem  # (P, L_MAX, B, H_LOCAL, D): P * H_LOCAL = H
    return one * (9 + extra_buffers)


def ring_buffers(ring, elem: int) -> int:
    """Buffers (same units) of ring attention, None = no ring: the K/V block in hand and the one arriving (2 + 2),
    one block's partial output, the fp32 accumulator of the output and the merge's two fp32 temporaries
    (3 x 4 / elem)."""
    if ring is None:
        return 0
    return 5 + 3 * -(-4 // elem)


def free_bytes(device: torch.device) -> int:
    """Free memory on `device` (CUDA: the driver's free memory; CPU: available physical pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def format_gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
