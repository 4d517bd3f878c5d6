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
- each of those Linears returns its block of the gathered buffer (a contiguous `(B, out_i)` view, the layout
  of its own output) instead of computing it, until the model's forward returns.

Exact: the same operation on the same values, computed by one rank instead of all (bit for bit in eager mode;
with compiled blocks the `silu` is eager here and inductor's inside the blocks, which can differ in the last bit
of bf16, as every compiled piece does). The Linears stay in the model (state dict, weights, LoRA loading); a
Linear that is not a bare `nn.Linear` (a LoRA wrapper, a hook) keeps computing itself. A Linear called with
another input than the gathered one (another batch size, dtype or device) computes itself too.

The all-gather runs over the engine's group on the real links: `emulate_slow_tier` does not slow it (about 1 MB
per rank per step for FLUX.1, against hundreds of MB for the exchanges).

The Linears get one shared forward (`gathered_forward`, through a subclass named as `nn.Linear`, as the
families' reordered block forwards are installed) that reads a per-Linear attribute: TorchDynamo traces every
compiled block alike and reads the result as a graph input (a forward closing over a per-layer constant would
put that constant in the guards and retrace every block). With `cuda_graph` the GEMVs and the all-gather are
captured in the step's graph. The gathered buffers are kept per (batch, dtype) for the engine's life, so a
captured graph never writes memory that was handed back.
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


ATTR = "_cocodiff_gathered"  # a Linear's gathered result for the call in progress (None outside a call)


def gathered_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward of a sharded modulation Linear: its gathered result when one was gathered for an input like
    `x` in this call, else its own computation. One function for every such Linear (`use_forward`), reading a
    per-Linear attribute, so TorchDynamo traces every block alike (no per-layer constant in the guards)."""
    out = getattr(self, ATTR, None)
    if out is not None and x.dim() == 2 and out.shape[0] == x.shape[0] and out.dtype == x.dtype:
        if out.device == x.device:
            return out
    return F.linear(x, self.weight, self.bias)


class ShardedModulation:
    """The installed sharding of one model's modulation Linears (`ParallelConfig.shard_modulation`).

    Raises:
        ValueError: on every rank when the ranks found different Linears to shard (a hook or a wrapped
            `forward` on one rank's Linear only), before any step runs.
    """

    def __init__(self, model: nn.Module, plan: ModulationPlan, engine):
        from .models.joint import use_forward
        from .sharding import resolve_modules

        self.group = engine.group
        self.world = engine.world
        self.rank = engine.rank
        found: list[tuple[str, nn.Linear]] = []
        for pattern in plan.linears:
            try:
                found += resolve_modules(model, pattern)
            except ValueError:  # a variant without such blocks (e.g. no single-stream blocks): nothing to shard
                continue
        # model order (the blocks' order), each once; only bare Linears can be replaced by a lookup (a hook
        # or a forward of its own, e.g. diffusers' offloading, would be bypassed or overwritten)
        order = {id(m): i for i, m in enumerate(model.modules())}
        seen = set()
        linears: list[tuple[str, nn.Linear]] = []
        self.skipped: list[str] = []  # matched, but not bare Linears: they compute themselves
        for name, m in sorted(found, key=lambda nm: order[id(nm[1])]):
            if id(m) in seen:
                continue
            seen.add(id(m))
            bare = type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
            if bare and "forward" not in m.__dict__:
                linears.append((name, m))
            else:
                self.skipped.append(name)
        self.names = [name for name, _ in linears]
        widths = [m.out_features for _, m in linears]
        self._agree(engine.device, widths)
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
        # weakly: the Linears are the model's (a strong reference here would keep a deleted model's weights)
        self._linears = [weakref.ref(m) for _, m in linears]
        # per (B, dtype, device): the send buffer, the gathered buffer and each layer's view of it; kept for the
        # engine's life, so a captured graph never writes memory that was handed back
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}
        self._index = plan.index
        if linears:
            from .compiled import opaque_to_compile

            for _, m in linears:
                setattr(m, ATTR, None)
                use_forward(m, gathered_forward)
            model.get_submodule(plan.source).register_forward_hook(opaque_to_compile(self._on_source))
            # the results are the call's: after it, a Linear called on its own (a user's probe, a cache hook)
            # computes itself again
            model.register_forward_hook(opaque_to_compile(self._on_end))

    @property
    def layers(self) -> int:
        return len(self._linears)

    @property
    def gathered(self) -> bool:
        """Whether the Linears hold results (inside a call)."""
        return any(getattr(ref(), ATTR, None) is not None for ref in self._linears if ref() is not None)

    def _agree(self, device: torch.device, widths: list[int]) -> None:
        """One small all-gather: every rank must shard the same Linears (else the all-gathers would not match)."""
        import zlib

        sig = zlib.crc32((",".join(self.names) + "|" + ",".join(map(str, widths))).encode())
        mine = torch.tensor([len(widths), sig], dtype=torch.int64, device=device)
        rows = torch.empty(self.world * 2, dtype=torch.int64, device=device)
        all_gather_into(rows, mine, group=self.group)
        rows = rows.view(self.world, 2).cpu().tolist()
        if any(r != rows[0] for r in rows):
            counts = [n for n, _ in rows]
            raise ValueError(
                f"cocodiff: the ranks found different AdaLN modulation Linears to shard (counts per rank {counts}): "
                "a hook or a wrapped forward on some ranks' Linears only; install it on every rank, or use "
                "ParallelConfig(shard_modulation=False)"
            )

    def _on_source(self, module, args, output):
        temb = output if self._index is None else output[self._index]
        self._clear()
        if (
            not isinstance(temb, torch.Tensor)
            or temb.dim() != 2
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled(temb.device.type)
        ):
            return output  # every layer computes itself (the engine refuses gradient calls)
        x = F.silu(temb)
        B = x.shape[0]
        key = (B, x.dtype, x.device)
        bufs = self._buffers.get(key)
        if bufs is None:
            send = x.new_zeros(B * self.chunk)  # zeros: a rank's padding is gathered too
            gathered = x.new_empty(self.world * B * self.chunk)
            views = []
            for r, off, n in self.where:
                start = B * (r * self.chunk + off)
                views.append(gathered[start : start + B * n].view(B, n))
            bufs = self._buffers[key] = (send, gathered, views)
        send, gathered, views = bufs
        for i in self.mine:
            _, off, n = self.where[i]
            m = self._linears[i]()
            out = send[B * off : B * (off + n)].view(B, n)
            if m.bias is None:
                torch.mm(x, m.weight.t(), out=out)
            else:
                torch.addmm(m.bias, x, m.weight.t(), out=out)
        all_gather_into(gathered, send, group=self.group)
        for ref, view in zip(self._linears, views):
            setattr(ref(), ATTR, view)
        return output

    def _on_end(self, module, args, output):
        self._clear()
        return output

    def _clear(self) -> None:
        for ref in self._linears:
            m = ref()
            if m is not None:
                setattr(m, ATTR, None)
