"""Fault injection for the chaos tests: make one rank die, exit, hang or raise at a chosen point.

Set `COCODIFF_DEBUG_FAULT="RANK:POINT[:STEP[:ACTION]]"` in the environment of a run:
    POINT   setup (after the process group, before the model loads), step (inside transformer call STEP,
            at its last block, between exchanges) or between (after denoising step STEP)
    ACTION  kill (SIGKILL itself: dies by a signal, default), exit (exits 0 without reporting),
            hang (sleeps forever) or raise (RuntimeError)
The older `COCODIFF_DEBUG_FAIL_RANK=R` / `COCODIFF_DEBUG_FAIL_STEP=S` mean "R:between:S:raise".
Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ENV = "COCODIFF_DEBUG_FAULT"
POINTS = ("setup", "step", "between")
ACTIONS = ("kill", "exit", "hang", "raise")


@dataclass(frozen=True, kw_only=True)
class Fault:
    rank: int
    point: str
    step: int = 0
    action: str = "kill"

    def __post_init__(self) -> None:
        if self.point not in POINTS or self.action not in ACTIONS:
            raise ValueError(f"{ENV}: point must be one of {POINTS} and action one of {ACTIONS}, got {self}")

    def trigger(self, rank: int, point: str, step: int = 0) -> None:
        """Carry out the fault if this is its rank, point and step."""
        if rank != self.rank or point != self.point or (point != "setup" and step != self.step):
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "exit":
            os._exit(0)
        elif self.action == "hang":
            while True:
                time.sleep(60)
        raise RuntimeError(f"injected failure on rank {rank} at {point} {step}")


def from_env() -> Fault | None:
    spec = os.environ.get(ENV)
    if spec:
        parts = spec.split(":")
        try:
            return Fault(
                rank=int(parts[0]),
                point=parts[1],
                step=int(parts[2]) if len(parts) > 2 else 0,
                action=parts[3] if len(parts) > 3 else "kill",
            )
        except (IndexError, ValueError):
            raise ValueError(f"{ENV}={spec!r} is not RANK:POINT[:STEP[:ACTION]]") from None
    legacy = os.environ.get("COCODIFF_DEBUG_FAIL_RANK")
    if legacy is not None:
        return Fault(
            rank=int(legacy), point="between", step=int(os.environ.get("COCODIFF_DEBUG_FAIL_STEP", 1)), action="raise"
        )
    return None


def install_inside_steps(fault: Fault | None, transformer, rank: int) -> None:
    """For a "step" fault: a hook on the transformer's last block that triggers at call `fault.step`."""
    if fault is None or fault.point != "step" or fault.rank != rank:
        return
    import torch

    blocks = [
        m
        for name in ("single_transformer_blocks", "transformer_blocks")
        if isinstance(m := getattr(transformer, name, None), torch.nn.ModuleList) and len(m)
    ]
    target = blocks[0][-1] if blocks else transformer
    calls = [0]

    def hook(module, args):
        fault.trigger(rank, "step", calls[0])
        calls[0] += 1

    target.register_forward_pre_hook(hook)
