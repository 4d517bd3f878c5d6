"""Replay the transformer step as a CUDA graph: the host leaves the step.

At 1024^2 on 4 H200s the per-rank GPU work of a FLUX-sized step is ~45 ms, while Python and kernel
launches of a 57-block model take several times that; replaying the captured step removes the host
from the critical path. The sharded step has no host synchronisation (exchanges only make streams wait
on each other; token layouts, index maps, exchange plans and buffers are set up in the eager warm-up), so
it captures with its collectives inside.

Two ways in:

- `ParallelConfig(cuda_graph=True)`: the switch. The engine wraps the model's `forward`, so a diffusers
  pipeline (or any caller) gets graph replays without changing a line: the first call with a new input
  signature runs eagerly twice and captures, later calls copy their inputs into the graph's buffers and
  replay. The wrapper sits inside the sharding hooks: it sees this rank's shard of the inputs and returns
  the gathered output.
- `GraphedStep(model)`: an explicit wrapper for benchmarks (`replay_only` replays without copying inputs).

Each distinct signature (tensor shapes/dtypes/devices and the values of other arguments) gets its own
graph, in one memory pool. Changing the schedule (`engine.set_schedule`, `use_exchange`) drops the graphs.
Parameters are read from their memory at replay: updating weights in place (LoRA fusing, `load_state_dict`)
is seen by the graph; replacing parameter tensors by new ones after capture is not, so call
`engine.drop_graphs()` after doing that. Calls with gradients enabled, or with tensors inside container
arguments, run eagerly. Before the process group is destroyed, `cocodiff.release()` drops every graph here
(each `StepGraphs` is in a process-wide weak set): graphs holding NCCL work can hang the group's destruction.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch


def _key(args: tuple, kwargs: dict[str, Any]):
    parts = []
    for k, v in list(enumerate(args)) + sorted(kwargs.items()):
        if isinstance(v, torch.Tensor):
            parts.append((k, tuple(v.shape), v.dtype, v.device))
        else:
            parts.append((k, repr(v)))
    return tuple(parts)


def _nested_tensor(v) -> bool:
    if isinstance(v, (list, tuple)):
        return any(isinstance(x, torch.Tensor) or _nested_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(isinstance(x, torch.Tensor) or _nested_tensor(x) for x in v.values())
    return False


def _clone_out(out):
    """A copy of the graph's static output (the next replay overwrites it)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if hasattr(out, "to_tuple") and isinstance(out, dict):  # diffusers BaseOutput
        return type(out)(**{k: _clone_out(v) for k, v in out.items()})
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_out(v) for v in out)
    return out


class _Captured:
    def __init__(self, graph, static_args: tuple, static_kwargs: dict, static_out, stats=None):
        self.graph = graph
        self.static_args = static_args
        self.static_kwargs = static_kwargs
        self.static_out = static_out
        self.stats = stats  # the exchanges one replay performs (CommStats), for the byte counters


def _changing_args(graphs: dict) -> list:
    """Names of non-tensor arguments whose values differ between the captured signatures."""
    seen: dict = {}
    for args_key, _ in graphs:
        for part in args_key:
            if len(part) == 2:  # (name, repr): a non-tensor argument
                seen.setdefault(part[0], set()).add(part[1])
    return sorted(str(k) for k, values in seen.items() if len(values) > 1)


def _weakly(fn: Callable) -> Callable[[], Callable | None]:
    """A reference to `fn` that does not keep a bound method's object alive: the objects whose methods a
    `StepGraphs` calls (the model whose `forward` it replaces, its engine, a `GraphedStep`) own it, and a strong
    reference back would keep a deleted model's weights and graph pools on the GPU until Python's cycle
    collector happens to run."""
    return weakref.WeakMethod(fn) if inspect.ismethod(fn) else (lambda: fn)


def _alive(ref: Callable[[], Callable | None]) -> Callable:
    fn = ref()
    if fn is None:
        raise RuntimeError("cocodiff: the model these CUDA graphs replay has been deleted")
    return fn


_LIVE_GRAPHS: weakref.WeakSet = weakref.WeakSet()  # every StepGraphs / GraphedStep of this process (`release`)


class StepGraphs:
    """Captured CUDA graphs of `fn`, one per input signature; calling it replays (capturing on first sight).

    Args:
        fn: the step (e.g. a model's original `forward`); must not synchronise with the host.
        warmup: eager calls on a side stream before capture (lets lazy state settle: index maps, exchange
            buffers and plans, cuBLAS workspaces, compiled kernels).
        stats: the engine's `CommStats`. A replay runs no Python, so it counts nothing by itself: the counts
            of the captured call are recorded and added at each replay (the engine resets them per call).
        key: returns what besides the arguments selects a graph (V-Major's plan for the call).
        preserve: returns a context manager around the eager warm-up that restores state the warm-up
            changes (V-Major's caches), so that the captured step runs once on the state it was called with.
    """

    MANY = 8  # input signatures (not graphs) after which a warning suggests that a changing argument defeats reuse

    def __init__(
        self,
        fn: Callable,
        *,
        warmup: int = 2,
        stats=None,
        key: Callable[[], Any] | None = None,
        preserve: Callable[[], Any] | None = None,
    ):
        self._fn = _weakly(fn)
        self.warmup = warmup
        self.stats = stats
        self._key = _weakly(key or (lambda: None))  # the engine's methods: the engine owns this switch
        self._preserve_ref = _weakly(preserve or contextlib.nullcontext)
        self._graphs: dict[Any, _Captured] = {}
        self._pool = None
        self._warned = False
        _LIVE_GRAPHS.add(self)  # `cocodiff.release` finds it even when no engine knows of it

    @property
    def fn(self) -> Callable:
        return _alive(self._fn)

    def _extra_key(self):
        return _alive(self._key)()

    def _preserve(self):
        return _alive(self._preserve_ref)()

    def clear(self) -> None:
        """Drop every captured graph (the next call per signature captures again).

        The memory pool goes with them: once the last graph of a pool is destroyed the caching allocator
        releases the pool, and capturing into its old handle fails ("use_count > 0" at capture_begin)."""
        self._graphs.clear()
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, args: tuple, kwargs: dict[str, Any]) -> _Captured:
        static_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        static_kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        with self._preserve():
            self._warm_up(static_args, static_kwargs)
        if self.stats is not None:
            self.stats.reset()  # from here on: the captured call's exchanges only
        graph, static_out = self._record(static_args, static_kwargs)
        snapshot = None
        if self.stats is not None:
            snapshot = type(self.stats)(self.stats.tier_names)
            snapshot.add(self.stats)
        return _Captured(graph, static_args, static_kwargs, static_out, snapshot)

    def _warm_up(self, static_args: tuple, static_kwargs: dict[str, Any]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                self.fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def _record(self, static_args: tuple, static_kwargs: dict[str, Any]):
        """Capture one call of `fn` on the static inputs: returns (graph with `replay()`, static output)."""
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: CUDA calls of other threads (NCCL's watchdog polling its events) must not invalidate
        # the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"), torch.no_grad():
            static_out = self.fn(*static_args, **static_kwargs)
        torch.cuda.synchronize()
        return graph, static_out

    def __call__(self, *args, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # inside an outer capture
            return self.fn(*args, **kwargs)
        if torch.is_grad_enabled() or any(_nested_tensor(v) for v in list(args) + list(kwargs.values())):
            if not self._warned:
                warnings.warn(
                    "cocodiff cuda_graph: a call with gradients enabled or with tensors inside container "
                    "arguments runs eagerly (no graph)",
                    stacklevel=2,
                )
                self._warned = True
            return self.fn(*args, **kwargs)
        key = (_key(args, kwargs), self._extra_key())
        cap = self._graphs.get(key)
        if cap is None:
            new_signature = all(k != key[0] for k, _ in self._graphs)
            cap = self._capture(args, kwargs)
            self._graphs[key] = cap
            # (graphs of one signature that differ in the extra key alone, V-Major's levels, are by design)
            if new_signature and len({k for k, _ in self._graphs}) == self.MANY:
                changing = _changing_args(self._graphs)
                warnings.warn(
                    f"cocodiff cuda_graph: {self.MANY} input signatures captured, a graph each (per V-Major level) "
                    f"(non-tensor arguments whose values differ between them: {changing}); a value "
                    "that changes every call, such as a float timestep, defeats graph reuse: pass it as "
                    "a tensor, or call engine.graphs.clear()",
                    stacklevel=2,
                )
        else:
            for buf, a in zip(cap.static_args, args):
                if isinstance(buf, torch.Tensor):
                    buf.copy_(a)
            for k, buf in cap.static_kwargs.items():
                if isinstance(buf, torch.Tensor):
                    buf.copy_(kwargs[k])
            if cap.stats is not None:
                self.stats.add(cap.stats)
        cap.graph.replay()
        return _clone_out(cap.static_out)

    def replay_only(self) -> None:
        """Replay the last captured graph without copying inputs (for timing)."""
        next(reversed(self._graphs.values())).graph.replay()


class GraphedStep(StepGraphs):
    """`model(**kwargs)` captured per input signature and replayed; returns the output tensor (`sample`).

    Args:
        model: the (possibly parallelised) transformer, on CUDA.
        warmup: see `StepGraphs`.
    """

    def __init__(self, model: torch.nn.Module, *, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs CUDA")
        engine = getattr(model, "cocodiff", None)
        if engine is not None and engine.vmajor is not None:
            # its graphs would ignore which V-Major level a call needs: the engine's own switch keys them by it
            raise ValueError("GraphedStep takes exact engines; with V-Major use ParallelConfig(cuda_graph=True)")
        self.model = model
        super().__init__(self._call, warmup=warmup)
        if engine is not None:
            engine.external_graphs.add(self)  # `cocodiff.release(model)` drops these graphs too

    def _call(self, **kwargs):
        out = self.model(**kwargs, return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    def __call__(self, **kwargs) -> torch.Tensor:
        kwargs.pop("return_dict", None)
        with torch.no_grad():  # inference only
            return super().__call__(**kwargs)


def live_graphs() -> list[StepGraphs]:
    """Every `StepGraphs` (the `cuda_graph=True` switches and `GraphedStep`s) of this process that is alive."""
    return list(_LIVE_GRAPHS)
