"""`cocodiff` command line: a thin layer that builds configs and calls the library.

Subcommands:
    demo      run the small model end to end on CPU ranks (no GPU) or GPUs, write images and a report
    quality   compare communication modes on the shipped model (PSNR/SSIM table and plot)
    bench a2a all-to-all microbenchmark: flat vs TAPA over message sizes, real or emulated tiers
"""

from __future__ import annotations

import argparse
import sys


def _add_parallel_args(p: argparse.ArgumentParser, *, engine_options: bool = False) -> None:
    p.add_argument(
        "--preset",
        default="flat",
        help="ParallelConfig preset: flat, tapa, vfirst (cocodiff = V-Major: not available yet)",
    )
    p.add_argument("--v-first", action="store_true", help="project V first and overlap its exchange")
    p.add_argument("--topology", default=None, help="tier spec, outermost first, e.g. 2x2")
    if not engine_options:
        return
    p.add_argument(
        "--all-to-all",
        default=None,
        choices=["flat", "tapa", "copy_engine"],
        help="exchange route (default: the preset's)",
    )
    p.add_argument("--fuse-qk", action="store_true", help="GPU: fused Q/K RMSNorm + RoPE kernel (torch.compile)")
    p.add_argument("--cuda-graph", action="store_true", help="GPU: replay each step as a CUDA graph")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocodiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate images with the small model on several ranks")
    demo.add_argument(
        "--ranks", type=int, default=None, help="ranks to start (default: all local GPUs, or 2 CPU ranks without a GPU)"
    )
    demo.add_argument("--steps", type=int, default=20, help="denoising steps")
    demo.add_argument("--num-images", type=int, default=4, help="images to generate (one batch)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default=None, help="directory of a small model saved by cocodiff (default: shipped)")
    demo.add_argument("--out", default="cocodiff-out/demo", help="output directory")
    demo.add_argument("--cpu", action="store_true", help="use CPU ranks even when GPUs are present")
    demo.add_argument("--no-reference", action="store_true", help="skip the single-process comparison")
    demo.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds a rank waits in a collective before giving up (a failed peer never hangs the run)",
    )
    _add_parallel_args(demo, engine_options=True)

    from . import bench_a2a

    bench_a2a.add_parser(sub)
    try:
        from . import quality
    except ImportError:
        quality = None
    if quality is not None:
        quality.add_parser(sub, _add_parallel_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args)
        if args.command == "bench":
            from .bench_a2a import run_bench

            return run_bench(args)
        if args.command == "quality":
            from .quality import run_quality

            return run_quality(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"cocodiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failed rank: one clear line, the tracebacks after it
        name = type(exc).__name__
        first = str(exc).splitlines()[0] if str(exc) else name
        print(f"\ncocodiff {args.command}: {name}: {first}", file=sys.stderr)
        rest = "\n".join(str(exc).splitlines()[1:])
        if rest:
            print(rest, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
