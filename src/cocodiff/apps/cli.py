"""`cocodiff` command line: a thin layer that builds configs, checks them, and calls the library.

Subcommands:
    generate  images from a prompt with a local diffusers pipeline folder (or the shipped small model)
    demo      the shipped small model end to end on CPU ranks or GPUs, compared with one process
    quality   compare communication modes on the shipped model (PSNR/SSIM table and plot)
    bench a2a all-to-all microbenchmark: flat vs TAPA over message sizes, real or emulated tiers
    bench e2e cocodiff beside diffusers on the same GPUs: ms per step, s per image, memory, error

Argument errors (sizes, rank counts, topology, heads vs ranks) are found before any rank starts: one line,
exit code 2. A failed rank: one line naming it and its error, its traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..config import PRESETS, ParallelConfig
from ..topology import parse_topology_spec


class _Formatter(argparse.HelpFormatter):
    """Help that shows each option's default, where it has one and the text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "default" in text or any(action.default is v for v in (None, False)):
            return text
        if action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


_FORMATTER = _Formatter


class UsageError(ValueError):
    """A command line that cannot run, found before any rank started; the message is one line naming the fix."""


def checked(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with its ValueError, TypeError and FileNotFoundError turned into `UsageError`."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (exit code 2), pointing at --help rather than printing the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def add_parallel_args(p: argparse.ArgumentParser, *, engine_options: bool = False) -> None:
    """--preset, --v-first, --topology (and with `engine_options` the route and GPU switches; then the preset
    defaults to "auto": "fast" on GPU ranks, "flat" on CPU ranks)."""
    p.add_argument(
        "--preset",
        default="auto" if engine_options else "flat",
        choices=(("auto",) if engine_options else ()) + PRESETS,
        help="ParallelConfig preset"
        + (
            ": auto = fast on GPU ranks (V-First, fuse_qk, compiled blocks, CUDA graph), flat on CPU ranks; "
            "cocodiff (V-Major) on GPU ranks also takes fast's fuse_qk, compiled blocks and CUDA graph (--no-... "
            "turns one off)"
        )
        * engine_options,
    )
    p.add_argument("--v-first", action="store_true", help="project V first and overlap its exchange")
    p.add_argument("--topology", default=None, help="tier spec, outermost first, e.g. 2x2; sizes multiply to the ranks")
    if not engine_options:
        return
    p.add_argument(
        "--all-to-all",
        default=None,
        choices=["flat", "tapa", "copy_engine"],
        help="exchange route (default: the preset's)",
    )
    # on / off over the preset's own value (--no-cuda-graph: a preset's switch off)
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--fuse-qk", action=on_off, help="GPU: fused Q/K RMSNorm + RoPE kernel (torch.compile)")
    p.add_argument("--cuda-graph", action=on_off, help="GPU: replay each step as a CUDA graph")
    p.add_argument("--compile-blocks", action=on_off, help="compile the transformer blocks' compute (torch.compile)")


def _add_run_args(p: argparse.ArgumentParser, *, out: str) -> None:
    p.add_argument(
        "--ranks",
        type=_int_at_least(1),
        default=None,
        help="ranks to start without a launcher (default: the most local GPUs the model's heads allow, or "
        "2 CPU ranks without a GPU); under torchrun its world size",
    )
    p.add_argument("--cpu", action="store_true", help="use CPU ranks (gloo) even when GPUs are present")
    p.add_argument("--seed", type=int, default=0, help="every rank seeds its generator with it")
    p.add_argument("--out", default=out, help="output folder (rank 0 writes it)")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds a rank waits in a collective for a peer before giving up (a dead peer never hangs the run)",
    )
    add_parallel_args(p, engine_options=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cocodiff", description=__doc__.splitlines()[0], formatter_class=_FORMATTER)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser(
        "generate",
        help="images from a prompt with a local diffusers pipeline folder (default: the shipped small model)",
        description="Generate images on several ranks. Without --model: the shipped small model (its prompts "
        "are its class names).",
        formatter_class=_FORMATTER,
    )
    gen.add_argument(
        "--model",
        default=None,
        help="diffusers pipeline folder (model_index.json: FLUX.1, SD3/3.5, Qwen-Image, FLUX.2), a small model "
        "saved by cocodiff, or a shipped one by name (small; flux128: 128x128 px, 4096 tokens, for GPUs); "
        "default: the shipped small model",
    )
    gen.add_argument("--prompt", default=None, help="the text (small model: a class name; default: every class)")
    gen.add_argument(
        "--negative-prompt", default=None, help="what to steer away from (SD3; FLUX.1/Qwen with --true-cfg)"
    )
    gen.add_argument("--height", type=_int_at_least(1), default=None, help="pixels (default: the pipeline's)")
    gen.add_argument("--width", type=_int_at_least(1), default=None, help="pixels (default: the pipeline's)")
    gen.add_argument("--steps", type=_int_at_least(1), default=None, help="denoising steps (default: the pipeline's)")
    gen.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)")
    gen.add_argument("--true-cfg", type=float, default=None, help="true_cfg_scale (FLUX.1, Qwen-Image)")
    gen.add_argument("--num-images", type=_int_at_least(1), default=1, help="images of the one pipeline call")
    gen.add_argument("--max-sequence-length", type=_int_at_least(1), default=None, help="text tokens (pipeline's)")
    gen.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on GPU, fp32 on CPU"
    )
    gen.add_argument(
        "--compare-single", action="store_true", help="rank 0 also runs the job on one process and records the gap"
    )
    _add_run_args(gen, out="cocodiff-out/generate")

    demo = sub.add_parser(
        "demo",
        help="the shipped small model on several ranks, compared with one process",
        description="Generate with the shipped small model on several ranks and compare with one process.",
        formatter_class=_FORMATTER,
    )
    demo.add_argument("--steps", type=_int_at_least(1), default=20, help="denoising steps")
    demo.add_argument("--num-images", type=_int_at_least(1), default=4, help="images to generate (one batch)")
    demo.add_argument(
        "--model",
        default=None,
        help="a small model folder saved by cocodiff, or a shipped one by name: small (the default; 32x32 px) or "
        "flux128 (128x128 px, 4096 tokens as FLUX.1 at 1024^2; for GPUs)",
    )
    demo.add_argument("--no-reference", action="store_true", help="skip the single-process comparison")
    _add_run_args(demo, out="cocodiff-out/demo")

    from . import bench_a2a, quality

    bench_a2a.add_parser(sub, _FORMATTER)
    quality.add_parser(sub, add_parallel_args, _FORMATTER)
    return parser


def config_from_args(args, *, cuda: bool = False) -> ParallelConfig:
    """The `ParallelConfig` the flags describe on GPU (`cuda`) or CPU ranks (ValueError naming the problem)."""
    preset = args.preset
    if preset == "auto":
        preset = "fast" if cuda else "flat"
    elif not cuda and preset == "fast":
        raise ValueError("--preset fast needs GPU ranks (CUDA graphs); this run uses CPU ranks: use --preset flat")
    gpu_switches = {}
    if cuda and preset == "cocodiff":
        # V-Major's selection is many small kernels: on 2 H200 over a 19 GB/s emulated link, in one launch, the
        # fast preset + V-Major took 97.5 ms a step (exact fast 145.0), eager flat + V-Major 165.3 (eager flat
        # 189.9); V-Major's layers take its tiered route whatever the preset's, so this preset + these switches
        # runs the same exchanges (docs/benchmarks/2026-11-30-compiled-pieces)
        gpu_switches = dict(fuse_qk=True, compile_blocks=True, cuda_graph=True)
    cfg = ParallelConfig.preset(preset, topology=args.topology, **gpu_switches)
    changes = {}
    if args.v_first:
        changes["v_first"] = True
    if getattr(args, "all_to_all", None):
        changes["all_to_all"] = args.all_to_all
    for name in ("fuse_qk", "cuda_graph", "compile_blocks"):
        value = getattr(args, name, None)
        if value is not None:  # --x or --no-x given: over the preset's
            changes[name] = value
    return cfg.with_(preset_name=None, **changes) if changes else cfg


def choose_ranks(args, info) -> tuple[int, bool, str | None]:
    """(ranks, GPU ranks?, a note for the user) for a run of `info` (a `pipelines.ModelInfo`), checked against
    the GPUs present, the model's heads and --topology before any rank starts."""
    import torch

    from .launch import under_launcher

    cuda = torch.cuda.is_available() and not args.cpu
    note = None
    if under_launcher():
        ranks = int(os.environ["WORLD_SIZE"])
        info.check_ranks(ranks, flag=f"torchrun's world size {ranks}:")
    elif args.ranks is not None:
        ranks = args.ranks
        gpus = torch.cuda.device_count() if cuda else 0
        if cuda and ranks > gpus:
            raise ValueError(f"--ranks {ranks}: only {gpus} GPUs here; use --ranks {gpus} or less, or --cpu")
        info.check_ranks(ranks)
    else:
        gpus = torch.cuda.device_count() if cuda else 0
        ranks = max(info.divisors(gpus or 2))
        if not gpus:
            note = f"no GPU in use: {ranks} CPU ranks (--ranks N for another count)"
        elif ranks < gpus:
            note = (
                f"using {ranks} of the {gpus} GPUs: {info.label} has {info.heads} attention heads and the rank "
                f"count must divide them (--ranks N to choose among {info.divisors(gpus)})"
            )
    if args.topology is not None:
        need = math.prod(parse_topology_spec(args.topology))
        if need != ranks:
            raise ValueError(
                f"--topology {args.topology}: its tiers hold {need} ranks, this run has {ranks}; "
                f"use --ranks {need} or a topology whose sizes multiply to {ranks}"
            )
    gpu_only = [
        flag
        for flag, on in (
            ("--cuda-graph", getattr(args, "cuda_graph", False)),
            ("--fuse-qk", getattr(args, "fuse_qk", False)),
            ("--all-to-all copy_engine", getattr(args, "all_to_all", None) == "copy_engine"),
        )
        if on
    ]
    if gpu_only and not cuda:
        raise ValueError(f"{', '.join(gpu_only)} need GPU ranks; this run uses CPU ranks (drop the flag)")
    return ranks, cuda, note


def _rank_prefix() -> str:
    return f"rank {os.environ['RANK']}: " if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error, already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    prog = f"cocodiff {args.command}"
    from .launch import RankError, is_secondary, short_error

    try:
        if args.command == "generate":
            from .generate import run_generate

            return run_generate(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args)
        if args.command == "bench":
            if args.bench == "e2e":
                from .bench_e2e import run_e2e

                return run_e2e(args)
            from .bench_a2a import run_bench

            return run_bench(args)
        if args.command == "quality":
            from .quality import run_quality

            return run_quality(args)
    except UsageError as exc:  # found before any rank started
        if os.environ.get("LOCAL_RANK", "0") == "0":  # under torchrun: once per node, not once per rank
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except RankError as exc:
        print(f"\n{prog}: {exc.summary}", file=sys.stderr)
        if exc.root:
            print(exc.root.rstrip(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; all ranks stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # this process failed (under torchrun: this rank)
        if isinstance(exc, (ValueError, TypeError, FileNotFoundError)) and not _rank_prefix():
            print(f"{prog}: error: {str(exc).splitlines()[0]}", file=sys.stderr)  # a check in this process
            return 2
        name = type(exc).__name__
        first = short_error(str(exc).splitlines()[0]) if str(exc) else name
        lost = " (lost a peer: it died, exited or hung; the launcher's report names it)" if is_secondary(first) else ""
        print(f"\n{prog}: {_rank_prefix()}{name}: {first}{lost}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
