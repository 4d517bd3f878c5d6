"""What V-First's row slices cost: a single-stream block's input projection as one GEMM or as its slices.

V-First computes a single-stream block's projection in pieces so that V's exchange can start before Q's and K's
projections, and the MLP part runs in two halves under K's and the output's exchanges. FLUX.2 fuses all of it
into one Linear (`to_qkv_mlp_proj`, 6144 -> 55296); FLUX.1 has separate Q, K, V and MLP Linears (3072 -> 3072 x 3,
12288), the MLP split in two by V-First. This times, on one GPU, per rank count P (M = the rank's tokens):

- `whole`: the model's own GEMMs (FLUX.2: one; FLUX.1: Q, K, V, MLP);
- `sliced`: V-First's pieces (V, Q, K, the MLP's two halves), row slices of the same weights.

CUDA events around each variant replayed as a CUDA graph of `--reps` repetitions (no launch gaps), median of
`--iters`; bf16, random values. Writes OUT/split_gemms.json and .md.

    python benchmarks/split_gemms.py --out OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (family, K, [(piece, rows)] in V-First's order, the model's own GEMMs as groups of those pieces, bias)
SHAPES = {
    "flux": dict(k=3072, pieces=[3072, 3072, 3072, 6144, 6144], whole=[[0], [1], [2], [3, 4]], bias=True),
    "flux2": dict(k=6144, pieces=[6144, 6144, 6144, 18432, 18432], whole=[[0, 1, 2, 3, 4]], bias=False),
}
TEXT = {"flux": 512, "flux2": 512}


def measure(args) -> dict:
    import torch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows = []
    for family, shape in SHAPES.items():
        k, pieces = shape["k"], shape["pieces"]
        n = sum(pieces)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) if shape["bias"] else None
        starts = [sum(pieces[:i]) for i in range(len(pieces) + 1)]
        groups = {
            "sliced": [(starts[i], starts[i + 1]) for i in range(len(pieces))],
            "whole": [(starts[g[0]], starts[g[-1] + 1]) for g in shape["whole"]],
        }
        for size in args.sizes:
            tokens = (size // 16) ** 2 + TEXT[family]
            for p in args.ranks:
                m = -(-tokens // p)
                x = torch.randn(1, m, k, device=dev, dtype=torch.bfloat16)
                row = {"family": family, "size": size, "P": p, "M": m, "K": k, "N": n}
                for variant, spans in groups.items():

                    def run(spans=spans):
                        for lo, hi in spans:
                            torch.nn.functional.linear(x, w[lo:hi], None if b is None else b[lo:hi])

                    for _ in range(3):
                        run()
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        for _ in range(args.reps):
                            run()
                    times = []
                    for _ in range(args.iters):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        g.replay()
                        e.record()
                        e.synchronize()
                        times.append(s.elapsed_time(e) / args.reps)
                    row[f"{variant}_ms"] = statistics.median(times)
                    row[f"{variant}_gemms"] = len(spans)
                    del g
                flops = 2 * m * k * n
                row["whole_tflops"] = flops / row["whole_ms"] / 1e9
                row["sliced_tflops"] = flops / row["sliced_ms"] / 1e9
                row["slicing_cost"] = row["sliced_ms"] / row["whole_ms"] - 1
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {
        "gpu": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "reps": args.reps,
        "iters": args.iters,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "# A single-stream block's input projection: the model's GEMMs against V-First's row slices",
        "",
        f"{result['gpu']}, torch {result['torch']} (CUDA {result['cuda']}), bf16; per call: median of "
        f"{result['iters']} graph replays of {result['reps']} calls.",
        "",
        "| family | size | P | M (tokens) | whole ms (GEMMs) | sliced ms (GEMMs) | slicing cost | whole TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['family']} | {r['size']}^2 | {r['P']} | {r['M']} | {r['whole_ms']:.3f} ({r['whole_gemms']}) | "
            f"{r['sliced_ms']:.3f} ({r['sliced_gemms']}) | {100 * r['slicing_cost']:+.1f}% | {r['whole_tflops']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--report", metavar="JSON", help="only write the markdown of a run's JSON into --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = json.loads(Path(args.report).read_text()) if args.report else measure(args)
    if not args.report:
        (out / "split_gemms.json").write_text(json.dumps(result, indent=1))
    (out / "split_gemms.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
