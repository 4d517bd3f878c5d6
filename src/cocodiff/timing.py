"""Measurement helpers shared by the benchmarks: timings with device events on CUDA (warm-up excluded), a host
clock on CPU; the relative error of an output against a reference."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], *, warmup: int, iters: int, cuda: bool = True) -> list[float]:
    """Milliseconds of each of `iters` calls of `fn` after `warmup` untimed calls.

    On CUDA each call is bracketed by CUDA events on the current stream (the device time of the call,
    including any gap the host leaves); on CPU a perf_counter around the call.
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 on the CPU (the benchmarks' error against one GPU)."""
    out, ref = out.float().cpu(), ref.float().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def release_memory() -> None:
    """Between benchmark rows: free what unreachable objects still hold (a model a peer's hooks keep in a
    reference cycle stays allocated until the cycle collector runs), then return cached blocks to the driver, so
    that each row's peak memory is its own."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
