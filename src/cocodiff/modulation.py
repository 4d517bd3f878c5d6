"""Sharded AdaLN modulation: each rank computes 1/P of the blocks' modulation GEMVs, one all-gather shares them.

Every block of FLUX.1, SD3 / SD3.5, Qwen-Image and HunyuanVideo projects the same conditioning vector,
`silu(temb)`, through a Linear of its own (`norm1.linear`, `norm1_context.linear`, the single blocks'
`norm.linear`, Qwen-Image's `img_mod` / `txt_mod`) to get its shifts, scales and gates. Under sequence
parallelism every rank used to compute all of them: about 3.2 billion weights of FLUX.1's 12 billion, read
from memory at every step on every rank, whatever P is (2.2 ms per step on one H200; docs/benchmarks/
2026-11-30-sharding-cost). Their input is replicated and their output small, so they shard for nearly free:

- when the model computes `temb` (`ModulationPlan.source`), each rank runs the GEMVs of its own contiguous
  range of the layers (ranges balanced by output width), each the same `addmm` as the layer's own call, writing
  a flat send buffer: layer i's `(B, out_i)` result is a contiguous block of it;
- one all-gather over the engine's group gives every rank every layer's result (FLUX.1 at batch 1: about
  1 MB from each of 2 ranks);
- each of those Linears' `forward` returns its block of the gathered buffer (a contiguous `(B, out_i)` view,
  the layout of its own output) instead of computing it.

Exact: the same operation on the same values, computed by one rank instead of all (bit for bit in eager mode;
with compiled blocks the `silu` is eager here and inductor's inside the blocks, which can differ in the last bit
of bf16, as every compiled piece does). The Linears stay in the model (state dict, weights, LoRA loading); a
Linear that is not a bare `nn.Linear` (a LoRA wrapper, a hook) keeps computing itself. A Linear called with
another input than the gathered one (another batch size, dtype or device) computes itself too.

The override is traceable: with compiled blocks TorchDynamo reads the gathered buffer as a graph input, and
with `cuda_graph` the GEMVs and the all-gather are captured in the step's graph. The gathered buffers are kept
per (batch, dtype) for the engine's life, so a captured graph never writes memory that was handed back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .exchange import all_gather_into


@dataclass(frozen=True)
class ModulationPlan:
    """Where a family's modulation comes from.

    Args:
        source: module path whose output (`index`: that element of a tuple output) is `temb`.
        linears: module path patterns ("*" matches one segment) of the Linears whose input is `silu(temb)`,
            each called once per forward.
        index: the element of a tuple output that is `temb`; None: the output itself.
        applies: for models whose configuration changes that contract (a Linear called twice with different
            inputs): False turns sharding off for that model.
    """

    source: str
    linears: tuple[str, ...]
    index: int | None = None
    applies: Callable[[nn.Module], bool] | None = None


def partition(widths: list[int], parts: int) -> list[int]:
    """Contiguous ranges of `widths` for `parts` ranks, balanced by their sums: returns the first index of
    each range and the end (`parts + 1` values; a range may be empty)."""
    total = sum(widths)
    bounds = [0]
    prefix = 0
    i = 0
    for r in range(1, parts):
        target = total * r / parts
        # take layers while that brings the prefix closer to the target
        while i < len(widths) and abs(prefix + widths[i] - target) <= abs(prefix - target):
            prefix += widths[i]
            i += 1
        bounds.append(i)
    bounds.append(len(widths))
    return bounds


class ShardedModulation:
    """The installed sharding of one model's modulation Linears (`ParallelConfig.shard_modulation`)."""

    def __init__(self, model: nn.Module, plan: ModulationPlan, engine):
        from .sharding import resolve_modules

        self._engine = weakref.ref(engine)
        self.group = engine.group
        self.world = engine.world
        self.rank = engine.rank
        found: list[tuple[str, nn.Linear]] = []
        for pattern in plan.linears:
            found += resolve_modules(model, pattern)
        # model order (the blocks' order), each once; only bare Linears can be replaced by a lookup
        order = {id(m): i for i, m in enumerate(model.modules())}
        seen = set()
        linears: list[tuple[str, nn.Linear]] = []
        self.skipped: list[str] = []  # matched, but not bare Linears: they compute themselves
        for name, m in sorted(found, key=lambda nm: order[id(nm[1])]):
            if id(m) in seen:
                continue
            seen.add(id(m))
            if type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks:
                linears.append((name, m))
            else:
                self.skipped.append(name)
        # weakly: the Linears' forward holds this object, so strong references back would make cycles that keep
        # a deleted model's weights allocated until Python's cycle collector runs
        self.names = [name for name, _ in linears]
        self._linears = [weakref.ref(m) for _, m in linears]
        widths = [m.out_features for _, m in linears]
        bounds = partition(widths, self.world)
        # where layer i's result lies in the gathered buffer: (owner rank, offset, width) in units of B values
        self.where: list[tuple[int, int, int]] = []
        sizes = []
        for r in range(self.world):
            off = 0
            for i in range(bounds[r], bounds[r + 1]):
                self.where.append((r, off, widths[i]))
                off += widths[i]
            sizes.append(off)
        self.chunk = max(sizes) if sizes else 0  # per rank, per batch row (ranges padded to the largest)
        self.mine = list(range(bounds[self.rank], bounds[self.rank + 1]))
        self.gathered: torch.Tensor | None = None  # (world * B * chunk,): the call in progress's, rank by rank
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._x_meta: tuple | None = None  # (B, dtype, device) of the gathered call's input
        self._source_handle = None
        self._index = plan.index
        if linears:
            from .compiled import opaque_to_compile

            source = model.get_submodule(plan.source)
            self._source_handle = source.register_forward_hook(opaque_to_compile(self._on_source))
            for i, (_, m) in enumerate(linears):
                m.forward = _lookup_forward(self, i, m)

    @property
    def layers(self) -> int:
        return len(self._linears)

    def remove(self) -> None:
        """Give the Linears their own forward back and drop the buffers."""
        if self._source_handle is not None:
            self._source_handle.remove()
            self._source_handle = None
        for ref in self._linears:
            m = ref()
            if m is not None:
                m.__dict__.pop("forward", None)
        self._linears = []
        self.mine = []
        self.gathered = None
        self._buffers.clear()

    def _on_source(self, module, args, output):
        temb = output if self._index is None else output[self._index]
        self.gathered = None
        if not isinstance(temb, torch.Tensor) or temb.dim() != 2 or torch.is_grad_enabled():
            return output  # (the engine refuses gradient calls; any other shape: every layer computes itself)
        x = F.silu(temb)
        B = x.shape[0]
        key = (B, x.dtype, x.device)
        bufs = self._buffers.get(key)
        if bufs is None:
            send = x.new_zeros(B * self.chunk)  # zeros: a rank's padding is gathered too
            bufs = self._buffers[key] = (send, x.new_empty(self.world * B * self.chunk))
        send, gathered = bufs
        for i in self.mine:
            _, off, n = self.where[i]
            m = self._linears[i]()
            out = send[B * off : B * (off + n)].view(B, n)
            if m.bias is None:
                torch.mm(x, m.weight.t(), out=out)
            else:
                torch.addmm(m.bias, x, m.weight.t(), out=out)
        all_gather_into(gathered, send, group=self.group)
        self.gathered = gathered
        self._x_meta = (B, x.dtype, x.device)
        return output

    def result(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Layer i's gathered `(B, out)` result for input `x`, or None when it was not gathered for that input."""
        g = self.gathered
        if g is None or x.dim() != 2 or (x.shape[0], x.dtype, x.device) != self._x_meta:
            return None
        r, off, n = self.where[i]
        B = x.shape[0]
        start = B * (r * self.chunk + off)
        return g[start : start + B * n].view(B, n)


def _lookup_forward(store: ShardedModulation, i: int, m: nn.Linear):
    # closes over the Linear weakly: an instance attribute holding it would be a reference cycle that keeps a
    # deleted model's weights allocated until Python's cycle collector runs
    ref = weakref.ref(m)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = store.result(i, x)
        if out is None:
            lin = ref()
            return F.linear(x, lin.weight, lin.bias)
        return out

    return forward
