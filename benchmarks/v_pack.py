"""V written straight into its send layout: one GEMM and a pack copy against a GEMM per destination block.

Under Ulysses V's projection `(L, H*D)` is packed into the seq->head send buffer `(P, L, H_LOCAL*D)` by a copy
(`SendSpec.parts`). Here, on one GPU in bf16, for FLUX.1's (3072) and FLUX.2's (6144) width and the per-rank token
counts of 1024^2 / 2048^2 at P = 2, 4, 8: the GEMM + copy (what the engine does), the GEMM alone (the floor), one
batched GEMM over the P blocks (`baddbmm`, x broadcast) and P GEMMs (`addmm`, one per block, each into its block).
CUDA events, median of 30 after 5 warm-up calls; the largest difference from the GEMM + copy result. Writes the
rows as JSON to the path given.

    python benchmarks/v_pack.py OUT/v_pack.json
"""

import json
import statistics
import sys
from pathlib import Path

import torch

from cocodiff.timing import time_ms


def main() -> None:
    dev = torch.device("cuda")
    res = []
    for hidden in (3072, 6144):
        for L in (2304, 4608, 8448, 1152, 576):
            for P in (2, 4, 8):
                if L * P > 40000:
                    continue
                K = N = hidden
                n = N // P
                x = torch.randn(1, L, K, device=dev, dtype=torch.bfloat16)
                w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
                b = torch.randn(N, device=dev, dtype=torch.bfloat16)
                send = torch.empty(P, L, 1, n, device=dev, dtype=torch.bfloat16)
                wb = w.view(P, n, K).transpose(1, 2)  # (P, K, n)
                bb = b.view(P, 1, n)

                def ref():
                    v = torch.nn.functional.linear(x, w, b)
                    send.copy_(v.view(1, L, P, n).permute(2, 1, 0, 3))

                def mm_only():
                    torch.nn.functional.linear(x, w, b)

                def bmm():
                    torch.baddbmm(bb, x[0].expand(P, L, K), wb, out=send.view(P, L, n))

                def loop():
                    for j in range(P):
                        torch.addmm(b[j * n : (j + 1) * n], x[0], w[j * n : (j + 1) * n].t(), out=send[j].view(L, n))

                ref()
                r = send.clone()
                bmm()
                e1 = float((send.float() - r.float()).abs().max())
                loop()
                e2 = float((send.float() - r.float()).abs().max())
                row = {"hidden": hidden, "L": L, "P": P, "max_diff_bmm": e1, "max_diff_loop": e2}
                for name, f in (("mm+copy", ref), ("mm", mm_only), ("bmm", bmm), ("loop", loop)):
                    row[name] = statistics.median(time_ms(f, warmup=5, iters=30))
                res.append(row)
                print(json.dumps(row), flush=True)
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
