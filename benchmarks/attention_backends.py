"""SDPA's backends at the per-rank attention shapes of Ulysses at P = 1, 2, 4, 8.

Under Ulysses each rank attends over the whole sequence with H / P heads, so the attention kernel gets fewer
independent (head, query block) tiles as P grows, and a kernel that filled the GPU at P = 1 can leave SMs idle
in its last wave. This times each of PyTorch's SDPA backends (cuDNN, flash, memory-efficient) on
`(1, H / P, S, D)` bf16 for the given models' heads and sequence lengths: CUDA events, median of `--iters`
after warm-up, one GPU. Per shape it reports the milliseconds, the time per head relative to P = 1 (1.0 is
perfect scaling) and the fastest backend. Writes OUT/attention_backends.json.

    python benchmarks/attention_backends.py --out OUT --heads 24 --seqs 4608 16896 --dim 128
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cocodiff.timing import time_ms

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--heads", type=int, nargs="+", default=[24])
    ap.add_argument("--seqs", type=int, nargs="+", default=[4608, 16896])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    dev = torch.device("cuda")
    result = {
        "gpu": torch.cuda.get_device_name(dev),
        "sms": torch.cuda.get_device_properties(dev).multi_processor_count,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "rows": [],
    }
    for heads in args.heads:
        for seq in args.seqs:
            base = {}
            for p in args.degrees:
                h = -(-heads // p)  # the largest rank's share of uneven heads
                g = torch.Generator(device=dev).manual_seed(0)
                q, k, v = (
                    torch.randn(1, h, seq, args.dim, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3)
                )
                row = {"heads": heads, "seq": seq, "degree": p, "local_heads": h, "ms": {}}
                default = F.scaled_dot_product_attention(q, k, v).float()
                for name, backend in backends.items():
                    try:
                        with sdpa_kernel(backend):
                            out = F.scaled_dot_product_attention(q, k, v).float()
                            ms = statistics.median(
                                time_ms(lambda: F.scaled_dot_product_attention(q, k, v), warmup=3, iters=args.iters)
                            )
                        row["ms"][name] = ms
                        row.setdefault("rel_diff_vs_default", {})[name] = float((out - default).norm() / default.norm())
                    except RuntimeError as exc:
                        row["ms"][name] = None
                        row.setdefault("errors", {})[name] = str(exc)[:200]
                ok = {n: t for n, t in row["ms"].items() if t is not None}
                row["fastest"] = min(ok, key=ok.get)
                for name, t in ok.items():
                    if p == args.degrees[0]:
                        base[name] = t / h
                    if name in base:
                        row.setdefault("per_head_vs_first_degree", {})[name] = (t / h) / base[name]
                result["rows"].append(row)
                print(json.dumps({k: row[k] for k in ("heads", "seq", "degree", "ms", "fastest")}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_backends.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
