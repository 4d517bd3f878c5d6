"""Trajectory probes: how much V changes between adjacent denoising steps (the premise of V-Major).

V-Major sends only the tokens whose V changed most since it was last sent, so it pays off when most
tokens' V barely moves from one step to the next. `v_step_change` measures that on a single process: it
hooks every attention module's V projections (`to_v` for image tokens / the joint sequence of single blocks,
`add_v_proj` for text tokens of the dual-stream blocks), runs `generate`, and reports per layer and per step
the per-token relative L1 change

    r[token] = ||V_t[token] - V_{t-1}[token]||_1 / ||V_{t-1}[token]||_1

as its median and 90th percentile over tokens (and the batch).
"""

from __future__ import annotations

from typing import Any

import torch

from .smallmodel import SmallDiT, generate


def v_projections(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, linear) for every V projection of a FLUX-style transformer, in forward order."""
    out = []
    for name, mod in transformer.named_modules():
        for attr in ("to_v", "add_v_proj"):
            lin = getattr(mod, attr, None)
            if isinstance(lin, torch.nn.Module) and hasattr(mod, "heads"):
                out.append((f"{name}.{attr}", lin))
    return out


def _relative_change(new: torch.Tensor, old: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, S, C) x2 -> (B*S,) per-token relative L1 change."""
    num = (new - old).abs().sum(-1)
    den = old.abs().sum(-1).clamp_min(eps)
    return (num / den).flatten()


@torch.no_grad()
def v_step_change(sm: SmallDiT, labels: torch.Tensor, *, steps: int = 20, seed: int = 0) -> dict[str, Any]:
    """Per-layer, per-step relative change of V along one `generate` trajectory.

    Returns:
        {"layers": [names], "steps": steps, "median": [[layer][step-1]], "p90": [[layer][step-1]],
         "overall_median": float, "overall_p90": float, "frac_tokens_below": {"0.05": f, "0.1": f, "0.2": f}},
        where entry s of a layer's list compares step s+1 with step s (steps - 1 entries per layer).
    """
    projections = v_projections(sm.transformer)
    last: dict[str, torch.Tensor] = {}
    changes: dict[str, list[torch.Tensor]] = {name: [] for name, _ in projections}
    hooks = []

    def make_hook(name):
        def hook(module, inputs, output):  # output: (B, S, H*D)
            out = output.detach().float()
            if name in last:
                changes[name].append(_relative_change(out, last[name]))
            last[name] = out

        return hook

    for name, lin in projections:
        hooks.append(lin.register_forward_hook(make_hook(name)))
    try:
        generate(sm, labels, steps=steps, seed=seed)
    finally:
        for h in hooks:
            h.remove()
    names = [name for name, _ in projections]
    med = [[float(c.median()) for c in changes[n]] for n in names]
    p90 = [[float(c.quantile(0.9)) for c in changes[n]] for n in names]
    everything = torch.cat([c for n in names for c in changes[n]])
    return {
        "layers": names,
        "steps": steps,
        "median": med,
        "p90": p90,
        "overall_median": float(everything.median()),
        "overall_p90": float(everything.quantile(0.9)),
        "frac_tokens_below": {str(th): float((everything < th).float().mean()) for th in (0.05, 0.1, 0.2)},
    }
