"""`NoExchange`: the timing bound of a step with no communication. Every exchange hands back its send buffer
unchanged (same shapes, no byte moves, nothing counted), so a step routed through it computes what the real step
computes, on the wrong data: benchmarks time it to split a step into compute and exposed exchange. Never a route
of `build_exchange`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import BlockExchange, Handle


class NoExchange(BlockExchange):
    """Every exchange returns its send buffer as the received one (wrong output; a timing bound only)."""

    name = "none"

    def start(self, send: torch.Tensor, post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Handle:
        return Handle([], send, post)
