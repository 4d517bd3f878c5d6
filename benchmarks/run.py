"""One runner for the GPU benchmarks: a benchmark script under torchrun for each GPU count, and the GPU tests.

    python benchmarks/run.py OUT --gpus 1 2 4 -- flux_step.py --graph --configs flat vfirst+fused
    python benchmarks/run.py OUT --gpus 2 -- vmajor_speed.py --sizes 1024 --steps 28 50
    python benchmarks/run.py OUT --tests                      # tests/test_gpu.py, log in OUT/test_gpu.log
    python benchmarks/run.py OUT --gpus 4 --cli -- bench a2a --topology 2x2 --emulate

Every script is given `--out OUT`; a GPU count larger than the host has is skipped with a line saying so.
NVLink multicast stays off in every child (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1). The scripts import the installed `cocodiff` package: when it is not importable the
runner installs this checkout first (`pip install --no-deps -e .`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _ensure_installed() -> None:
    if importlib.util.find_spec("cocodiff") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output directory (passed to every script as --out)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[], help="GPU counts to run the script on")
    ap.add_argument("--tests", action="store_true", help="run tests/test_gpu.py first")
    ap.add_argument("--cli", action="store_true", help="the command after -- is a `cocodiff` subcommand")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    cmd = argv[cut + 1 :]  # the script (or cocodiff subcommand) and its arguments
    _ensure_installed()
    env = {**os.environ, **ENV}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rc = 0
    if args.tests:
        with open(out / "test_gpu.log", "w") as log:
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-rs",
                    "-p",
                    "no:cacheprovider",
                    str(ROOT / "tests/test_gpu.py"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.timeout,
                cwd=ROOT,
            )
        print(f"test_gpu rc={r.returncode}: " + (out / "test_gpu.log").read_text().strip().splitlines()[-1], flush=True)
        rc |= r.returncode
    have = _gpus()
    for p in args.gpus:
        if p > have:
            print(f"skipped: {p} GPUs asked for, this host has {have}", flush=True)
            continue
        if not cmd:
            break
        target = ["-m", "cocodiff", *cmd] if args.cli else [str(HERE / cmd[0]), *cmd[1:]]
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}", *target]
        print(f"$ {' '.join(launch[2:])} --out {out}", flush=True)
        try:
            r = subprocess.run([*launch, "--out", str(out)], env=env, timeout=args.timeout, cwd=ROOT)
            rc |= r.returncode
            print(f"[{p} GPUs] rc={r.returncode}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"[{p} GPUs] timed out after {args.timeout}s", flush=True)
            rc |= 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
