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

from dataclasses import asdict
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


def _quantile(x: torch.Tensor, q: float) -> float:
    """`torch.quantile` (nearest rank) without its 2^24-element limit: a 50-step study has more tokens."""
    k = min(x.numel(), max(1, round(q * (x.numel() - 1)) + 1))
    return float(x.flatten().kthvalue(k).values)


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
    med = [[_quantile(c, 0.5) for c in changes[n]] for n in names]
    p90 = [[_quantile(c, 0.9) for c in changes[n]] for n in names]
    everything = torch.cat([c for n in names for c in changes[n]])
    return {
        "layers": names,
        "steps": steps,
        "median": med,
        "p90": p90,
        "overall_median": _quantile(everything, 0.5),
        "overall_p90": _quantile(everything, 0.9),
        "frac_tokens_below": {str(th): float((everything < th).float().mean()) for th in (0.05, 0.1, 0.2)},
    }


@torch.no_grad()
def v_drift_vs_sent(
    sm: SmallDiT, labels: torch.Tensor, *, steps: int = 20, seed: int = 0, ranks: int = 4, vmajor=None
) -> dict[str, Any]:
    """What V-Major's receivers hold, simulated on one `generate` trajectory (single process, exact model).

    Every V projection's tokens are split into `ranks` contiguous blocks (one per rank, as the sequence is
    sharded). Per step, `vmajor.step_ratio` (default `VMajorConfig()`) gives the cache ratio; each block sends its
    K most-changed tokens, the change being V's relative L1 distance to the value last sent for the token (the
    selection `VMajor.select` makes, summed over the batch); the rest keep the value last sent. A full step sends
    every token. The trajectory itself is exact (V-Major is not applied to the model), so this isolates the
    drift of what is cached from its effect on later steps.

    Returns, per step (index 0 = the second step): "drift_vs_sent_median" / "_p90" (over all layers' tokens,
    before selecting), "stale_error_median" / "_p90" / "_max" (relative L1 error of the value receivers use
    after selecting; 0 on full steps), "sent_fraction"; plus the layer names and the config used.
    """
    from ..config import VMajorConfig
    from ..vmajor import active_rows, step_ratio

    vm = vmajor or VMajorConfig()
    projections = v_projections(sm.transformer)
    sent: dict[str, torch.Tensor] = {}
    per_step: dict[int, dict[str, list]] = {}
    step_of_call = [0]

    def make_hook(name):
        def hook(module, inputs, output):  # output: (B, S, C)
            v = output.detach().float()
            if name not in sent:  # the generation's first call sends everything
                sent[name] = v.clone()
                return
            ref = sent[name]
            rec = per_step.setdefault(step_of_call[0], {"drift": [], "stale": [], "rows": [0, 0]})
            rec["drift"].append(_relative_change(v, ref))
            plan = step_ratio(vm, step_of_call[0], steps)
            S = v.shape[1]
            if plan is None:
                ref.copy_(v)
                n_sent = S
            else:
                bounds = [round(S * r / ranks) for r in range(ranks + 1)]
                n_sent = 0
                for lo, hi in zip(bounds[:-1], bounds[1:]):
                    if hi == lo:
                        continue
                    diff = (v[:, lo:hi] - ref[:, lo:hi]).abs().sum((0, 2))
                    norm = ref[:, lo:hi].abs().sum((0, 2))
                    k = active_rows(plan[0], hi - lo)
                    idx = (diff / (norm + 1e-6)).topk(k).indices + lo
                    ref[:, idx] = v[:, idx]
                    n_sent += k
            rec["stale"].append(_relative_change(ref, v))
            rec["rows"][0] += n_sent
            rec["rows"][1] += S

        return hook

    def on_step(i, x):
        step_of_call[0] = i + 1

    hooks = [lin.register_forward_hook(make_hook(name)) for name, lin in projections]
    try:
        generate(sm, labels, steps=steps, seed=seed, callback=on_step)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Any] = {"layers": [n for n, _ in projections], "steps": steps, "ranks": ranks, "config": asdict(vm)}
    for s in range(1, steps):
        rec = per_step[s]
        drift, stale = torch.cat(rec["drift"]), torch.cat(rec["stale"])
        for key, value in (
            ("full_step", step_ratio(vm, s, steps) is None),
            ("drift_vs_sent_median", _quantile(drift, 0.5)),
            ("drift_vs_sent_p90", _quantile(drift, 0.9)),
            ("stale_error_median", _quantile(stale, 0.5)),
            ("stale_error_p90", _quantile(stale, 0.9)),
            ("stale_error_max", float(stale.max())),
            ("sent_fraction", rec["rows"][0] / rec["rows"][1]),
        ):
            out.setdefault(key, []).append(value)
    return out
