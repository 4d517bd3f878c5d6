"""Declarative sharding plans and the hooks that carry them out.

A model family declares data (`ModelPlan`): which module inputs/outputs are split along which dim and
whether they hold image or text tokens, which output is gathered, how to count tokens from the call's
arguments, and which attention modules get our processors. The generic code here turns that into forward
hooks; nothing model-specific lives in this file.
"""

from __future__ import annotations

import fnmatch
import inspect
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compiled import opaque_to_compile
from .exchange import all_gather_into
from .layout import TokenLayout


@dataclass(frozen=True)
class Split:
    """Split a tensor along `dim` by the per-rank sizes of `kind` ("img" or "txt") tokens."""

    kind: str
    dim: int


@dataclass(frozen=True)
class Gather:
    """Gather a tensor split along `dim` (tokens of `kind`) so that every rank has the whole."""

    kind: str
    dim: int


@dataclass(frozen=True, kw_only=True)
class ModelPlan:
    """What a model family declares.

    Args:
        family: short name ("flux", "sd3", "qwenimage", "flux2").
        model_class: the diffusers transformer class this plan is for.
        token_counts: (image tokens, text tokens) from the model and the root forward's bound arguments.
        split_inputs: module path ("" = the model; "*" matches one path segment) -> {argument name: Split}.
        split_outputs: module path -> {output index (None = the output itself): Split}.
        gather_outputs: module path -> Gather.
        processors: attention module class -> factory `(engine, layer name) -> processor`; every module of
            one of these classes has its heads sharded and gets the processor.
        install: extra set-up after the processors (e.g. FLUX.1's reordered single-block forward).
        text_mask_arg: the root argument holding a text padding mask (Qwen-Image); the engine takes it out of
            the call and hands it to the processors (`engine.text_mask`), None when it is all ones.
        check_call: raises for call arguments the plan cannot shard exactly (before any collective).
        blocks: class names of the repeated transformer blocks (`compile_blocks`); empty: diffusers'
            `_repeated_blocks` of the model class.
        modulation: the blocks' AdaLN modulation Linears and where their input comes from
            (`ParallelConfig.shard_modulation`, `cocodiff.modulation`); None: not sharded.
    """

    family: str
    model_class: type
    token_counts: Callable[[nn.Module, dict[str, Any]], tuple[int, int]]
    split_inputs: dict[str, dict[str, Split]] = field(default_factory=dict)
    split_outputs: dict[str, dict[int | None, Split]] = field(default_factory=dict)
    gather_outputs: dict[str, Gather] = field(default_factory=dict)
    processors: dict[type, Callable[[Any, str], Any]] = field(default_factory=dict)
    install: Callable[[nn.Module, Any], None] | None = None
    text_mask_arg: str | None = None
    check_call: Callable[[dict[str, Any]], None] | None = None
    blocks: tuple[str, ...] = ()
    modulation: Any = None  # a `cocodiff.modulation.ModulationPlan`

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of every attention whose heads are sharded."""
        classes = tuple(self.processors)
        return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]

    def install_processors(self, model: nn.Module, engine) -> int:
        """Set our processor on every sharded attention (then the plan's extra set-up); returns how many."""
        mods = self.attention_modules(model)
        for name, m in mods:
            factory = next(f for cls, f in self.processors.items() if isinstance(m, cls))
            m.set_processor(factory(engine, name))
        if self.install is not None:
            self.install(model, engine)
        return len(mods)


def token_counts(img_arg: str = "hidden_states", txt_arg: str = "encoder_hidden_states"):
    """`ModelPlan.token_counts` for models whose image and text tokens are dim 1 of two arguments."""

    def counts(model: nn.Module, bound: dict[str, Any]) -> tuple[int, int]:
        return bound[img_arg].shape[1], bound[txt_arg].shape[1]

    return counts


def resolve_modules(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """Modules whose dotted path matches `pattern` segment by segment ("" is the model itself)."""
    if pattern == "":
        return [("", model)]
    want = pattern.split(".")
    out = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        if len(parts) == len(want) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want)):
            out.append((name, mod))
    if not out:
        raise ValueError(f"cocodiff plan: no module matches {pattern!r} in {type(model).__name__}")
    return out


def _param_names(module: nn.Module, forward=None) -> list[str]:
    return [
        n
        for n, p in inspect.signature(forward or module.forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _split_args(engine, names: list[str], spec: dict[str, Split], args: tuple, kwargs: dict):
    args = list(args)
    for arg_name, split in spec.items():
        if arg_name in kwargs:
            if kwargs[arg_name] is not None:
                kwargs[arg_name] = engine.split(kwargs[arg_name], split.kind, split.dim)
        elif arg_name in names and names.index(arg_name) < len(args):
            i = names.index(arg_name)
            if args[i] is not None:
                args[i] = engine.split(args[i], split.kind, split.dim)
    return tuple(args), kwargs


def _set_arg(names: list[str], name: str, value, args: tuple, kwargs: dict):
    """The call's arguments with `name` set to `value` (wherever it was passed)."""
    if name in kwargs:
        kwargs[name] = value
    elif name in names and names.index(name) < len(args):
        args = list(args)
        args[names.index(name)] = value
        args = tuple(args)
    return args, kwargs


def _bind(module: nn.Module, args: tuple, kwargs: dict, signature: inspect.Signature | None = None) -> dict[str, Any]:
    bound = (signature or inspect.signature(module.forward)).bind_partial(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _input_signature(bound: dict[str, Any]) -> list[int]:
    """A fixed-size fingerprint of the call's tensor shapes and dtypes (same length on every rank)."""
    desc = []
    for k in sorted(bound):
        v = bound[k]
        if isinstance(v, torch.Tensor):
            desc.append(f"{k}:{tuple(v.shape)}:{v.dtype}")
        elif isinstance(v, (int, float, bool, str, list, tuple)) or v is None:
            desc.append(f"{k}={v!r}")  # lists/tuples too: Qwen-Image's img_shapes set the RoPE tables
    text = ";".join(desc)
    return [zlib.crc32(text.encode()), len(text)]


class PlanHooks:
    """The installed hooks of one parallelised model (kept so that they can be removed)."""

    def __init__(self, model: nn.Module, plan: ModelPlan, engine, device: torch.device):
        # the model owns these hooks: a strong reference back would make a cycle that keeps a deleted model's
        # weights on the GPU until Python's cycle collector happens to run
        self._model = weakref.ref(model)
        self._engine = weakref.ref(engine)  # the engine owns these hooks (engine.hooks): the same, the other way
        self.plan = plan
        self.device = device
        self.handles: list = []
        self._checked = False
        self._install()

    @property
    def engine(self):
        return self._engine()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # ---- hooks --------------------------------------------------------------------------------
    def _install(self) -> None:
        # every hook is opaque to TorchDynamo (compiled blocks, a user's torch.compile): they read the
        # engine's per-call layout and some run collectives
        model, plan = self._model(), self.plan
        # once, from the model's own forward: the root hook runs on every call, and `cuda_graph=True` later
        # replaces `model.forward` by a (*args, **kwargs) wrapper
        own_forward = type(model).forward.__get__(model)
        self._root_names = _param_names(model, own_forward)
        self._root_signature = inspect.signature(own_forward)
        self.handles.append(model.register_forward_pre_hook(opaque_to_compile(self._root_pre), with_kwargs=True))
        self.handles.append(model.register_forward_hook(opaque_to_compile(self._root_post)))
        for pattern, spec in plan.split_inputs.items():
            if pattern == "":
                continue  # done by the root hook, after the layout is known
            for _, mod in resolve_modules(model, pattern):
                self.handles.append(
                    mod.register_forward_pre_hook(
                        opaque_to_compile(self._make_input_splitter(mod, spec)), with_kwargs=True
                    )
                )
        for pattern, spec in plan.split_outputs.items():
            for _, mod in resolve_modules(model, pattern):
                self.handles.append(mod.register_forward_hook(opaque_to_compile(self._make_output_splitter(spec))))
        for pattern, gather in plan.gather_outputs.items():
            for _, mod in resolve_modules(model, pattern):
                self.handles.append(mod.register_forward_hook(opaque_to_compile(self._make_gatherer(gather))))

    def _root_pre(self, module, args, kwargs):
        bound = _bind(module, args, kwargs, self._root_signature)
        mode = self.engine.config.check_inputs
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        checking = not capturing and ((mode is True and not self._checked) or mode == "every_call")
        local_error = None
        try:
            if self.plan.check_call is not None:
                self.plan.check_call(bound)
            self._check_tensors(module, bound)
            n_img, n_txt = self.plan.token_counts(module, bound)
        except (ValueError, TypeError) as exc:
            if not checking:
                raise  # no agreement round at this call: the caller's contract is that ranks agree
            local_error = exc
        if checking:
            # one all-gather: every rank learns whether any rank refused its inputs, disagrees on them, or
            # lacks memory, and all raise together (a rank raising alone would leave its peers waiting)
            memory = (0, 1) if local_error is not None else self._memory_need(module, bound, n_img, n_txt)
            self._check_ranks_agree(bound, memory, local_error)
            self._checked = True
        param = next(module.parameters(), None)
        self.engine.begin_call(
            n_img,
            n_txt,
            timestep=bound.get("timestep"),
            batch=bound["hidden_states"].shape[0],
            elem=param.element_size() if param is not None else 4,
        )
        kwargs = dict(kwargs)
        if self.plan.text_mask_arg is not None:
            # the engine holds the text mask (None when all ones: unmasked attention, the fast kernels);
            # diffusers' forward gets None, so it makes no host copies a CUDA graph capture would refuse
            self.engine.hold_text_mask(bound.get(self.plan.text_mask_arg))
            args, kwargs = _set_arg(self._root_names, self.plan.text_mask_arg, None, args, kwargs)
        spec = self.plan.split_inputs.get("", {})
        return _split_args(self.engine, self._root_names, spec, args, kwargs)

    def _root_post(self, module, args, output):
        self.engine.end_call()
        return output

    def _make_input_splitter(self, mod: nn.Module, spec: dict[str, Split]):
        names = _param_names(mod)

        def hook(module, args, kwargs):
            return _split_args(self.engine, names, spec, args, dict(kwargs))

        return hook

    def _make_output_splitter(self, spec: dict[int | None, Split]):
        def hook(module, args, output):
            if None in spec:
                s = spec[None]
                return self.engine.split(output, s.kind, s.dim)
            out = list(output)
            for i, s in spec.items():
                out[i] = self.engine.split(out[i], s.kind, s.dim)
            if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
                return type(output)(*out)
            return type(output)(out) if isinstance(output, tuple) else out

        return hook

    def _make_gatherer(self, gather: Gather):
        def hook(module, args, output):
            return self.engine.gather(output, gather.kind, gather.dim)

        return hook

    # ---- validation (before any collective) -----------------------------------------------------
    def _check_tensors(self, module: nn.Module, bound: dict[str, Any]) -> None:
        param = next(module.parameters(), None)
        for name, v in bound.items():
            if not isinstance(v, torch.Tensor):
                continue
            if v.device.type != self.device.type or (
                v.device.type == "cuda" and v.device.index not in (None, self.device.index)
            ):
                raise ValueError(
                    f"cocodiff: input {name!r} is on {v.device}, but this rank communicates on {self.device}; "
                    f"move the inputs (and model) to {self.device}"
                )
            if name in ("hidden_states", "encoder_hidden_states") and param is not None and v.dtype != param.dtype:
                raise TypeError(
                    f"cocodiff: input {name!r} is {v.dtype} but the model is {param.dtype}; cast the inputs to "
                    f"{param.dtype}"
                )
        if torch.is_grad_enabled() and (
            any(isinstance(v, torch.Tensor) and v.requires_grad for v in bound.values())
            or any(p.requires_grad for p in module.parameters())
        ):
            # the exchanges are not differentiable: a graph through them would be silently wrong
            raise ValueError(
                "cocodiff: the parallelised model is inference-only, but it was called with gradients enabled "
                "(parameters or inputs require grad); call it under torch.no_grad() or torch.inference_mode(), "
                "as diffusers pipelines do"
            )

    def _memory_need(self, module: nn.Module, bound: dict[str, Any], n_img: int, n_txt: int) -> tuple[int, int]:
        """(bytes the exchange buffers need at peak, bytes available) for this call's shapes on this rank."""
        from .memory import comm_buffer_bytes, free_bytes, ring_buffers

        layout = TokenLayout(n_img=n_img, n_txt=n_txt, world=self.engine.world)
        l_max = max(layout.lengths(("txt", "img")))
        param = next(module.parameters(), None)
        elem = param.element_size() if param is not None else 4
        batch = bound["hidden_states"].shape[0]
        need = comm_buffer_bytes(
            l_max=l_max,
            batch=batch,
            inner_dim=self.engine.inner_dim,
            elem=elem,
            extra_buffers=self.engine.exchange.extra_buffers(4) + ring_buffers(self.engine.ring, elem),
        )
        budget = self.engine.config.memory_budget_gb
        have = int(budget * 2**30) if budget is not None else free_bytes(self.device)
        return need, have

    def _check_ranks_agree(self, bound: dict[str, Any], memory: tuple[int, int], local_error=None) -> None:
        """One small all-gather: a rank that refused its inputs, ranks that disagree on input shapes, or any
        rank short of memory for the exchange buffers make every rank raise a clear error together."""
        from .memory import format_gb

        flag = [1 if local_error is not None else 0]
        sig = torch.tensor(_input_signature(bound) + flag + list(memory), dtype=torch.int64, device=self.device)
        world = self.engine.world
        out = torch.empty(world * sig.numel(), dtype=torch.int64, device=self.device)
        all_gather_into(out, sig, group=self.engine.group)
        rows = out.view(world, -1).cpu().tolist()
        refused = [r for r, row in enumerate(rows) if row[-3]]
        if local_error is not None:
            raise local_error
        if refused:
            raise ValueError(
                f"cocodiff: ranks {refused} refused their inputs (their own error names the problem); every rank "
                "must call the model with the same valid inputs"
            )
        rows = [row[:-3] + row[-2:] for row in rows]
        short = [(r, row[-2], row[-1]) for r, row in enumerate(rows) if row[-2] > row[-1]]
        if short:
            r, need, have = short[0]
            raise ValueError(
                f"cocodiff: rank {r} needs {format_gb(need)} for communication buffers but has {format_gb(have)} "
                f"{'within memory_budget_gb' if self.engine.config.memory_budget_gb else 'free'}; use fewer "
                "tokens or a smaller batch, more ranks, or a larger budget"
            )
        rows = [row[:-2] for row in rows]
        bad = [r for r, row in enumerate(rows) if row != rows[0]]
        if bad:
            raise ValueError(
                f"cocodiff: ranks disagree on the inputs of this call (ranks {bad} differ from rank 0 in "
                "tensor shapes, dtypes or scalar arguments); every rank must call the model with the same "
                "full inputs (same seed / broadcast them)"
            )
