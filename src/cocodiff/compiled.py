"""Compiled blocks: the per-block compute of a sharded model compiled by `torch.compile`, around our attention.

In a DiT step the GEMMs and the attention are a fixed cost; what the exchanges leave visible beside them is
elementwise work: adaptive-norm modulation, gates, residual adds, LayerNorms, activations (about 38% of an
eager FLUX.1 step on H200s, docs/benchmarks/2026-11-28-overlap). Inductor fuses those chains into a few
kernels. `ParallelConfig(compile_blocks=True)` compiles every transformer block of the model (the family's
repeated block classes: `ModelPlan.blocks`, else diffusers' `_repeated_blocks`) with `torch.compile`,
once per input shape.

The sharded attention stays outside the compiled regions: every cocodiff attention processor is opaque to
TorchDynamo (`torch.compiler.disable`), so a compiled block is cut at its attention call into compiled
pieces, and the attention runs our schedule as in eager mode: the exchanges, V-First's order, the output
overlap, the copy-engine route and V-Major's selection are unchanged (`fuse_qk` compiles the Q/K preparation
inside it). The pieces are plain inductor kernels (no CUDA graphs of their own), so with `cuda_graph=True`
the whole step, compiled pieces and collectives alike, is captured as one CUDA graph after the eager warm-up
has compiled everything: nothing compiles during capture and nothing is re-traced per denoising step (the
blocks take tensors whose shapes do not change between steps). V-Major's own pieces trace at its first
selective step (the change scores; with fp8 rows the quantisation, once more at the second cache level, with
dynamic row counts), which with `cuda_graph` is the warm-up of that level's graph.

Because the processors are opaque, a user's own `torch.compile(transformer)` or diffusers'
`compile_repeated_blocks()` after `cocodiff.parallelize` works the same way.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

DEFAULT_OPTIONS: dict[str, Any] = {"dynamic": False}  # one graph per shape: steps never re-trace
ALLOWED_OPTIONS = ("backend", "mode", "options", "dynamic")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor modes that add CUDA graphs of their own


def opaque_to_compile(fn):
    """Mark an attention processor's `__call__` or a sharding hook as opaque to TorchDynamo: our exchanges (NCCL
    work on side streams, symmetric-memory copies, V-Major's host-side plan) and the per-call layout are not
    traceable, so a compiled block is cut here and the function runs as in eager mode."""
    return torch.compiler.disable(fn)


def block_classes(model: nn.Module, plan) -> tuple[str, ...]:
    """Class names of the model's repeated transformer blocks: the plan's, else diffusers' `_repeated_blocks`."""
    return tuple(plan.blocks or getattr(model, "_repeated_blocks", None) or ())


def find_blocks(model: nn.Module, plan) -> list[nn.Module]:
    """The modules `compile_blocks` compiles.

    Raises:
        ValueError: when the model has none (naming the classes looked for).
    """
    names = block_classes(model, plan)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"cocodiff: compile_blocks=True found no transformer block in {type(model).__name__} (looked for "
            f"{list(names) or 'the plan blocks / diffusers _repeated_blocks, which are empty'}); "
            "use compile_blocks=False"
        )
    return blocks


def compile_blocks(model: nn.Module, plan, options: dict[str, Any] | None) -> int:
    """Compile every block in place (`nn.Module.compile`: hooks and parameters stay where they are);
    returns how many."""
    blocks = find_blocks(model, plan)
    kwargs = {**DEFAULT_OPTIONS, **(options or {})}
    for m in blocks:
        m.compile(**kwargs)
    # `nn.Module.compile` keeps the compiled `m._call_impl` on `m` itself: a reference cycle per block, so a
    # deleted model's blocks (most of its weights) would stay allocated until Python's cycle collector runs.
    # When the model goes, break those cycles (the blocks are then freed at once).
    weakref.finalize(model, _forget_compiled, [weakref.ref(m) for m in blocks])
    return len(blocks)


def _forget_compiled(blocks: list) -> None:
    for ref in blocks:
        m = ref()
        if m is not None:
            m.__dict__.pop("_compiled_call_impl", None)


def compiled_piece(engine, fn, *, varying: bool = False):
    """`fn` compiled with the blocks' options (once per shape) when the engine compiles blocks, else `fn` itself.
    For elementwise block compute that runs inside our attention processors, which are opaque to TorchDynamo:
    the single-stream blocks' MLP activation, run in two halves under the exchanges. Eager, it is one unfused
    kernel per half that reads and writes the block's widest activation (FLUX.1 at 2048^2 on one H200: 76
    kernels, about 25 ms a step, docs/benchmarks/2026-11-30-compiled-pieces). Also V-Major's per-layer work
    (`vmajor.change_scores`, the fp8 rows' quantisation). Not `fullgraph`, as the blocks: past TorchDynamo's
    recompile limit (many shapes in one process) a piece runs eagerly instead of failing.

    `varying=True`: a piece whose shapes change by design between the calls of one generation (V-Major's rows,
    one count per cache level) is compiled with automatic dynamic shapes (`dynamic=None`, unless
    `compile_options` sets `dynamic`): static first, one dynamic recompile at the second shape, instead of one
    graph per level."""
    if engine is None or not engine.config.compile_blocks:
        return fn
    cache = engine.__dict__.setdefault("_compiled_pieces", {})
    piece = cache.get((fn, varying))
    if piece is None:
        user = engine.config.compile_options or {}
        options = {**DEFAULT_OPTIONS, **user}
        if varying and "dynamic" not in user:  # (a user's own choice stands)
            options["dynamic"] = None
        piece = cache[(fn, varying)] = torch.compile(fn, **options)
    return piece
