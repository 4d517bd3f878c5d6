"""Starting ranks without a launcher: CPU ranks on gloo (tests, the demo on a machine with no GPU) and one
process per local GPU on NCCL.

`WorkerPool` keeps P processes with an initialised process group alive and runs functions on all of them,
so a test suite pays process start-up and group set-up once, not per test. Every call is bounded in time:
a rank that raises or hangs fails the call with the rank and its traceback, never a hang.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MULTI_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def set_multi_gpu_env() -> None:
    """NVLink multicast off (shared hosts): keep these set for every multi-GPU run."""
    for k, v in MULTI_GPU_ENV.items():
        os.environ.setdefault(k, v)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """A function failed on one or more ranks; the message names them and carries their tracebacks."""


def _init_group(rank: int, world: int, port: int, backend: str, timeout_s: float) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank), str(world)
    if backend == "nccl":
        set_multi_gpu_env()
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _pool_worker(rank, world, port, threads, collective_timeout_s, tasks, results):
    torch.set_num_threads(threads)
    try:
        _init_group(rank, world, port, "gloo", collective_timeout_s)
    except Exception:
        results.put((rank, "err", traceback.format_exc()))
        return
    results.put((rank, "ready", None))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            out = fn(*args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:
            _die(results, (rank, "err", traceback.format_exc()))
    dist.destroy_process_group()


def _die(results, item) -> None:
    """Report and exit at once: closing this process's sockets makes peers blocked in a collective with
    it fail now ("connection closed") instead of at their timeout; a group that saw a failure is not reused."""
    results.put(item)
    results.close()
    results.join_thread()
    os._exit(1)


class WorkerPool:
    """P persistent CPU ranks on gloo.

    Args:
        world: number of ranks.
        timeout_s: default bound on one `run` call.
        collective_timeout_s: gloo's timeout, so a rank stuck in a collective raises instead of waiting forever.
    """

    def __init__(self, world: int, *, timeout_s: float = 300.0, collective_timeout_s: float = 60.0, threads: int = 1):
        self.world = world
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_pool_worker,
                args=(r, world, port, threads, collective_timeout_s, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self._procs:
            p.start()
        self.broken = False
        self._collect("ready", timeout_s=120.0)

    def _collect(self, what: str, timeout_s: float) -> list[Any]:
        out: list[Any] = [None] * self.world
        errors: dict[int, str] = {}
        got = 0
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        while got < self.world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                self.close()
                missing = [r for r in range(self.world) if out[r] is None and r not in errors]
                raise TimeoutError(f"ranks {missing} did not finish {what} within {timeout_s:.0f}s" + _fmt(errors))
            try:
                rank, status, payload = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and out[r] is None and r not in errors]
                if dead and not errors and self._results.empty():
                    time.sleep(0.5)  # a rank that reported and exited: its report may still be in the pipe
                    if self._results.empty():
                        self.close()
                        raise RankError(f"ranks {dead} died during {what} without reporting an error") from None
                continue
            got += 1
            if status == "err":
                errors[rank] = payload
            else:
                out[rank] = payload
        if errors:
            self.broken = True  # a failed collective can leave the group unusable: start a new pool
            raise RankError(f"{what}: {summarize(errors)}" + _fmt(errors))
        return out

    def run(self, fn: Callable, *args, timeout_s: float | None = None, **kwargs) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank; return the per-rank results (rank order)."""
        if self.broken:
            raise RuntimeError("this WorkerPool is broken by an earlier failure; start a new one")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", "task"), timeout_s or self.timeout_s)

    def close(self) -> None:
        self.broken = True
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


_SECONDARY = (
    "timed out",
    "timeout",
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "nccl communicator was aborted",
    "watchdog",
)


def _last_line(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


def _is_secondary(tb: str) -> bool:
    """A rank that failed only because a peer was gone (timeout, closed connection)."""
    return any(k in _last_line(tb).lower() for k in _SECONDARY)


def summarize(errors: dict[int, str]) -> str:
    """One line naming the rank(s) that failed first and the ranks that then stopped waiting for them."""
    roots = sorted(r for r, tb in errors.items() if not _is_secondary(tb)) or sorted(errors)
    waiting = sorted(r for r in errors if r not in roots)
    by_msg: dict[str, list[int]] = {}
    for r in roots:
        by_msg.setdefault(_last_line(errors[r]), []).append(r)
    head = "; ".join(
        f"{'rank ' + str(rs[0]) if len(rs) == 1 else 'ranks ' + str(rs)} failed: {msg}" for msg, rs in by_msg.items()
    )
    if waiting:
        head += f"; ranks {waiting} stopped waiting for it ({_last_line(errors[waiting[0]])[:120]})"
    return head


def _fmt(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))


def _spawn_entry(rank, world, port, backend, collective_timeout_s, fn, args, results):
    try:
        _init_group(rank, world, port, backend, collective_timeout_s)
        out = fn(*args)
        results.put((rank, "ok", out))
    except BaseException:
        _die(results, (rank, "err", traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(
    fn: Callable,
    world: int,
    *args,
    backend: str = "gloo",
    timeout_s: float = 3600.0,
    collective_timeout_s: float = 120.0,
) -> list[Any]:
    """Run `fn(*args)` once on `world` fresh ranks and return their results; raise `RankError` naming the
    failed ranks if any raised, `TimeoutError` if any did not finish in time."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_spawn_entry, args=(r, world, port, backend, collective_timeout_s, fn, args, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out: list[Any] = [None] * world
    errors: dict[int, str] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    got = 0
    try:
        while got < world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise TimeoutError(f"ranks did not finish within {timeout_s:.0f}s" + _fmt(errors))
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and p.exitcode not in (0, None) and out[r] is None and r not in errors
                ]
                if dead and not errors and results.empty():
                    time.sleep(0.5)  # a rank that reported and exited: its report may still be in the pipe
                    if results.empty():
                        raise RankError(
                            f"ranks {dead} died without reporting an error "
                            f"(exit codes {[procs[r].exitcode for r in dead]})"
                        ) from None
                continue
            got += 1
            if status == "err":
                errors[rank] = payload
            else:
                out[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RankError(summarize(errors) + _fmt(errors))
    return out
