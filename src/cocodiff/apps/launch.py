"""Starting ranks without a launcher: CPU ranks on gloo (tests, the demo on a machine with no GPU) and one
process per local GPU on NCCL; and running the same rank function under torchrun.

Every rank reports through its own pipe, and the parent waits on those pipes and on the processes
themselves (their sentinels), so it learns at once when a rank raises, exits without reporting or dies by a
signal. After the first failure the other ranks get a short grace period to report (they usually fail fast:
their peer's sockets closed), then the launcher stops them, so a run never outlives a dead rank by more
than that grace. A rank that hangs while the others wait is caught by the process group's timeout: the others
raise, and the hung rank is stopped and named. Pipes hold no semaphores, ranks ignore Ctrl-C (the parent
stops them) and watch their parent, so nothing is left behind when the parent is interrupted or killed.

`WorkerPool` keeps P processes with an initialised process group alive and runs functions on all of them,
so a test suite pays process start-up and group set-up once, not per test.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import re
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

MULTI_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GRACE_S = 5.0  # how long the other ranks may take to report after the first failure before they are stopped


def set_multi_gpu_env() -> None:
    """NVLink multicast off (shared hosts): keep these set for every multi-GPU run."""
    for k, v in MULTI_GPU_ENV.items():
        os.environ.setdefault(k, v)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """A function failed on one or more ranks. `summary` is one line naming the rank that failed first and
    its error; `details` holds every failed rank's traceback; `str()` is both."""

    def __init__(self, summary: str, details: str = "", root: str = "", *, what: str = ""):
        super().__init__(f"{what}: {summary}{details}" if what else summary + details)
        self.summary, self.details, self.root = summary, details, root


# ---- running under torchrun ---------------------------------------------------------------------------
def under_launcher() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def release_together() -> None:
    """Every rank frees what its work left behind (the copy-engine exchange's symmetric-memory buffers
    included) at the same point, while the process group still lives, then waits for the others. Left to
    interpreter exit, that teardown runs at a different moment on each rank, and a rank can wait there for a
    peer that has already gone (a suspected cause of runs that wrote their results and did not exit)."""
    import gc

    from ..engine import release_all

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    release_all()  # models still referenced: their captured graphs and symmetric buffers (`cocodiff.release`)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()


def run_launched(fn: Callable, *args, cuda: bool, collective_timeout_s: float) -> Any:
    """Run `fn(*args)` in this torchrun rank: NCCL on this process's GPU (LOCAL_RANK) or gloo on the CPU."""
    set_multi_gpu_env()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=collective_timeout_s))
    try:
        out = fn(*args)
        release_together()
        return out
    finally:
        from ..engine import release_all

        release_all(at_exit=True)  # after an error too: no graph holding NCCL work outlives the group
        dist.destroy_process_group()


# ---- rank processes ------------------------------------------------------------------------------------
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


def _detach_from_terminal(parent_pid: int) -> None:
    """In a rank: Ctrl-C is the parent's to handle (it stops the ranks), and a rank whose parent is gone exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # tqdm's default lock is a multiprocessing semaphore, left behind when a rank is killed
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())
    except ImportError:
        pass

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="cocodiff-parent-watch").start()


def _send(conn, item) -> None:
    # plain pickle, by value: torch's multiprocessing pickler shares tensors through this process's
    # memory, which is gone once the rank exits
    conn.send_bytes(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))


def _die(conn, item) -> None:
    """Report and exit at once: closing this process's sockets makes peers blocked in a collective with
    it fail now ("connection closed") instead of at their timeout; a group that saw a failure is not reused."""
    try:
        _send(conn, item)
    finally:
        os._exit(1)


def _spawn_entry(rank, world, port, backend, collective_timeout_s, fn, args, conn, parent_pid):
    _detach_from_terminal(parent_pid)
    try:
        _init_group(rank, world, port, backend, collective_timeout_s)
        out = fn(*args)
        release_together()
        _send(conn, ("ok", out))
    except BaseException:
        _die(conn, ("err", traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()


def _pool_worker(rank, world, port, threads, collective_timeout_s, tasks, conn, parent_pid):
    _detach_from_terminal(parent_pid)
    torch.set_num_threads(threads)
    try:
        _init_group(rank, world, port, "gloo", collective_timeout_s)
    except BaseException:
        _die(conn, ("err", traceback.format_exc()))
    _send(conn, ("ok", "ready"))
    while True:
        try:
            item = pickle.loads(tasks.recv_bytes())
        except (EOFError, OSError):
            break  # the parent closed the pool
        if item is None:
            break
        fn, args, kwargs = item
        try:
            _send(conn, ("ok", fn(*args, **kwargs)))
        except BaseException:
            _die(conn, ("err", traceback.format_exc()))
    dist.destroy_process_group()


# ---- watching ranks ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Failure:
    kind: str  # "error" (raised: text is its traceback), "died" (no report), "stopped" (killed by us)
    text: str


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class _Ranks:
    """Processes of one launch and the read ends of their report pipes."""

    def __init__(self, procs: list, readers: list):
        self.procs, self.readers = procs, readers

    def _read(self, r: int):
        reader = self.readers[r]
        try:
            if reader.poll():
                return pickle.loads(reader.recv_bytes())
        except (EOFError, OSError):
            pass
        return None

    def collect(self, what: str, *, timeout_s: float, grace_s: float = GRACE_S) -> list[Any]:
        """One report from every rank; raise `RankError` (a rank failed) or `TimeoutError` (none finished
        in `timeout_s`), after stopping every rank that is still running."""
        world = len(self.procs)
        out: list[Any] = [None] * world
        failures: dict[int, _Failure] = {}
        pending = set(range(world))
        deadline = time.monotonic() + timeout_s
        first_failure = None
        while pending:
            now = time.monotonic()
            limit = deadline if first_failure is None else min(deadline, first_failure + grace_s)
            if now >= limit:
                break
            readers = {id(self.readers[r]): r for r in pending}
            sentinels = {self.procs[r].sentinel: r for r in pending}
            ready = mpc.wait([self.readers[r] for r in pending] + list(sentinels), timeout=limit - now)
            for obj in ready:
                r = readers[id(obj)] if id(obj) in readers else sentinels[obj]
                if r not in pending:
                    continue
                msg = self._read(r)
                if msg is None:
                    proc = self.procs[r]
                    proc.join(timeout=1.0)  # EOF on the pipe: the rank is exiting
                    if proc.is_alive():
                        continue
                    failures[r] = _Failure("died", f"{_exit_text(proc.exitcode)} without reporting an error")
                else:
                    status, payload = msg
                    if status == "ok":
                        out[r] = payload
                    else:
                        failures[r] = _Failure("error", payload)
                pending.discard(r)
            if failures and first_failure is None:
                first_failure = time.monotonic()
        if pending and not failures:
            self.stop()
            raise TimeoutError(
                f"{what}: ranks {sorted(pending)} did not finish within {timeout_s:.0f}s and were stopped"
            )
        for r in pending:
            failures[r] = _Failure("stopped", f"still running {grace_s:.0f}s after the first failure; stopped")
        if failures:
            self.stop()
            summary, root = summarize(failures)
            raise RankError(summary, _fmt(failures), root, what=what)
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        end = time.monotonic() + 3.0
        for p in self.procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)

    def close(self) -> None:
        self.stop()
        for reader in self.readers:
            reader.close()


def _start(target, world: int, make_args: Callable[[int, Any], tuple], *, daemon: bool = True) -> _Ranks:
    ctx = mp.get_context("spawn")
    procs, readers, writers = [], [], []
    for r in range(world):
        reader, writer = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=target, args=make_args(r, writer), daemon=daemon))
        readers.append(reader)
        writers.append(writer)
    try:
        for p in procs:
            p.start()
    finally:
        for w in writers:
            w.close()  # the ranks hold their ends: EOF here means the rank is gone
    return _Ranks(procs, readers)


_SECONDARY = (
    "timed out",
    "by peer",
    "pair closure",
    "timeout",
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "nccl communicator was aborted",
    "watchdog",
)


def short_error(line: str) -> str:
    """An error line without gloo's source location prefix ("[/.../pair.cc:537] Read error ...")."""
    return re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", line.strip())


def _last_line(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return short_error(lines[-1]) if lines else "unknown error"


def is_secondary(tb: str) -> bool:
    """A rank that failed only because a peer was gone (timeout, closed connection)."""
    return any(k in _last_line(tb).lower() for k in _SECONDARY)


def summarize(errors: dict[int, str | _Failure]) -> tuple[str, str]:
    """(one line naming the rank(s) that failed first and the ranks that then stopped waiting for them,
    the first root rank's traceback or reason). Roots: ranks that died or raised an error of their own; else
    ranks stopped while the others had timed out waiting for them (hung); else every failed rank."""
    failures = {r: f if isinstance(f, _Failure) else _Failure("error", f) for r, f in errors.items()}
    own = {r for r, f in failures.items() if f.kind == "died" or (f.kind == "error" and not is_secondary(f.text))}
    roots = sorted(own or {r for r, f in failures.items() if f.kind == "stopped"} or failures)
    by_msg: dict[str, list[int]] = {}
    for r in roots:
        f = failures[r]
        msg = {"error": "failed: " + _last_line(f.text), "died": "died: " + f.text}.get(f.kind, f.text)
        by_msg.setdefault(msg, []).append(r)
    head = "; ".join(f"{'rank ' + str(rs[0]) if len(rs) == 1 else 'ranks ' + str(rs)} {m}" for m, rs in by_msg.items())
    waiting = sorted(r for r in failures if r not in roots and failures[r].kind == "error")
    if waiting:
        why = _last_line(failures[waiting[0]].text).split(". ")[0][:120]  # gloo adds advice after the first sentence
        head += f"; ranks {waiting} stopped waiting for it ({why})"
    stopped = sorted(r for r in failures if r not in roots and failures[r].kind == "stopped")
    if stopped:
        head += f"; ranks {stopped} were stopped"
    first = failures[roots[0]]
    return head, first.text if first.kind == "error" else ""


def _fmt(errors: dict[int, _Failure]) -> str:
    return "".join(f"\n--- rank {r} ---\n{f.text}" for r, f in sorted(errors.items()))


def spawn(
    fn: Callable,
    world: int,
    *args,
    backend: str = "gloo",
    timeout_s: float = 3600.0,
    collective_timeout_s: float = 120.0,
    grace_s: float = GRACE_S,
) -> list[Any]:
    """Run `fn(*args)` once on `world` fresh ranks and return their results (rank order).

    Raises:
        RankError: a rank raised, exited without reporting or died by a signal (or hung while the others
            timed out waiting for it); its `summary` names it and its error. All ranks are stopped first.
        TimeoutError: no rank failed but not all finished within `timeout_s`.
    """
    if world < 1:
        raise ValueError(f"spawn: world={world} must be >= 1")
    port, parent = free_port(), os.getpid()
    ranks = _start(
        _spawn_entry,
        world,
        lambda r, conn: (r, world, port, backend, collective_timeout_s, fn, args, conn, parent),
        daemon=False,  # ranks may start processes of their own (data loaders)
    )
    try:
        return ranks.collect(getattr(fn, "__name__", "task"), timeout_s=timeout_s, grace_s=grace_s)
    finally:
        ranks.close()


class WorkerPool:
    """P persistent CPU ranks on gloo.

    Args:
        world: number of ranks.
        timeout_s: default bound on one `run` call.
        collective_timeout_s: gloo's timeout, so a rank stuck in a collective raises instead of waiting forever.
        threads: torch threads per rank.
    """

    def __init__(self, world: int, *, timeout_s: float = 300.0, collective_timeout_s: float = 60.0, threads: int = 1):
        self.world = world
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
        self._tasks = [w for _, w in pipes]
        port, parent = free_port(), os.getpid()
        self._ranks = _start(
            _pool_worker,
            world,
            lambda r, conn: (r, world, port, threads, collective_timeout_s, pipes[r][0], conn, parent),
        )
        for reader, _ in pipes:
            reader.close()
        self.broken = False
        try:
            self._ranks.collect("start-up", timeout_s=120.0)
        except BaseException:
            self.close()
            raise

    def run(self, fn: Callable, *args, timeout_s: float | None = None, **kwargs) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank; return the per-rank results (rank order)."""
        if self.broken:
            raise RuntimeError("this WorkerPool is broken by an earlier failure; start a new one")
        task = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self._tasks:
                conn.send_bytes(task)
            return self._ranks.collect(getattr(fn, "__name__", "task"), timeout_s=timeout_s or self.timeout_s)
        except BaseException:
            self.close()  # a failed collective can leave the group unusable: start a new pool
            raise

    def close(self) -> None:
        self.broken = True
        for conn in self._tasks:
            try:
                conn.send_bytes(pickle.dumps(None))
                conn.close()
            except OSError:
                pass
        end = time.monotonic() + 5.0
        for p in self._ranks.procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
        self._ranks.close()
