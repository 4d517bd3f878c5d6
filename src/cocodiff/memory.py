"""Memory the engine needs beyond the model: communication buffers, estimated before the first exchange.

Per attention layer, the exchanges keep up to nine buffers of one padded sequence x all heads in flight:
Q, K and V each as a send and a receive buffer, the attention output, and the output exchange's send and
receive buffers. TAPA adds two more per phase of the tensor in flight (its permuted copy and its receive
buffer) for each of Q, K, V and the output. Buffers are freed between layers, so this is a peak, not a
sum over layers. (V-Major's cache, when it exists, adds per-layer Q/K/V copies and is accounted there.)
"""

from __future__ import annotations

import os

import torch


def comm_buffer_bytes(*, l_max: int, batch: int, inner_dim: int, elem: int, world: int, tapa_phases: int = 0) -> int:
    """Peak bytes of exchange buffers for one attention layer.

    Args:
        l_max: the longest local sequence (tokens) of any rank.
        inner_dim: heads x head dim of the widest attention.
        elem: bytes per element.
        tapa_phases: phases of the TAPA route (0 for flat).
    """
    one = l_max * batch * inner_dim * elem  # (P, L_MAX, B, H_LOCAL, D): P * H_LOCAL = H
    return one * (9 + 2 * 4 * tapa_phases)


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
