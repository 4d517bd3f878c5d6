"""The automatic route: per message shape, the fastest of several equivalent routes, timed at first use.

Decisions depend only on the shape and on timings max-reduced over all ranks, so every rank makes the same
choice (a rank that chose differently would issue different collectives and hang). Tuning runs
collectives, so it must happen in an eager call before any CUDA-graph capture (the graph warm-up does it).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..timing import time_ms
from .base import BlockExchange, Handle


class AutoExchange(BlockExchange):
    """Chooses among `candidates` per message shape; `candidates[0]` is the default (flat).

    Args:
        candidates: routes that deliver the same bytes (they share this route's byte counters).
        group: the engine's group (the timings are max-reduced over it).
        reps: timed exchanges per candidate (after 2 warm-up ones).
        margin: another route replaces the default only if it takes at most `margin` of its time.
    """

    name = "auto"

    def __init__(self, candidates: list[BlockExchange], *, group, reps: int = 10, margin: float = 0.97):
        first = candidates[0]
        super().__init__(topology=first.topology, rank=first.rank, stats=first.stats, sync=first.sync)
        self.candidates = candidates
        self.group = group
        self.reps = reps
        self.margin = margin
        self.decisions: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}
        self._chosen: dict[tuple, BlockExchange] = {}

    def routes(self) -> list[BlockExchange]:
        return list(self.candidates)

    def extra_buffers(self, in_flight: int) -> int:
        return max(c.extra_buffers(in_flight) for c in self.candidates)

    def _time(self, route: BlockExchange, sample: torch.Tensor) -> float:
        """Median ms of `reps` exchanges (2 warm-up), leaving the byte counters as they were."""
        saved = self.stats.copy()
        times = time_ms(lambda: route.start(sample).wait(), warmup=2, iters=self.reps, cuda=sample.is_cuda)
        self.stats.reset()
        self.stats.add(saved)
        return statistics.median(times)

    def choose(self, send: torch.Tensor) -> BlockExchange:
        key = (tuple(send.shape), send.dtype, send.device.type)
        route = self._chosen.get(key)
        if route is not None:
            return route
        if send.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"cocodiff: exchange shape {tuple(send.shape)} was not tuned before CUDA-graph capture; run the "
                "step once eagerly first (GraphedStep does)"
            )
        sample = torch.randn(send.shape, device=send.device).to(send.dtype)
        times = torch.tensor([self._time(c, sample) for c in self.candidates], dtype=torch.float64)
        times = times.to(send.device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=self.group)
        times = times.cpu().tolist()
        # another route replaces the default only if it is clearly faster (timings of ~10 runs are noisy)
        best = min(range(len(self.candidates)), key=lambda i: times[i])
        if times[best] > self.margin * times[0]:
            best = 0
        route = self.candidates[best]
        self._chosen[key] = route
        self.decisions[key] = route.name
        self.timings[key] = {c.name: t for c, t in zip(self.candidates, times)}
        return route

    def start(self, send: torch.Tensor, post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Handle:
        return self.choose(send).start(send, post)
