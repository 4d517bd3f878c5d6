"""Which denoising step a transformer call belongs to: the step context.

Mechanisms that reuse what earlier steps sent (V-Major) need, for every transformer call: the generation it
belongs to (caches never leak between generations), the denoising step (schedules are functions of it), how
many steps the run has, and which call of the step it is (true CFG, as in Qwen-Image's pipeline, calls the
transformer twice per step: conditional, then unconditional; each branch keeps its own caches).

Sources, best first:
- a diffusers scheduler (`follow(scheduler)`; `parallelize(pipeline)` does it): the step is the scheduler's
  `step_index`, the run length `len(scheduler.timesteps)`, and a new generation begins when the pipeline
  calls `set_timesteps` (a new timesteps tensor). Nothing is read from the GPU.
- `begin_generation(total_steps)` for a sampling loop of one's own, with the timestep values marking steps.
- the timestep argument alone: a new step when its value changes, a new generation when it rises
  (samplers run from noise, high t, to data, low t). Reading the value of a CUDA tensor synchronises the
  host once per call, so this source is used on CUDA only when a mechanism needs the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CallInfo:
    """Where one transformer call stands.

    Args:
        generation: 1 for the first generation of this engine, then 2, ...
        step: denoising step index within the generation (0-based; None when untracked).
        call: which call of this step (0, then 1 for true CFG's second branch, ...).
        total_steps: steps of the run (None when unknown).
        timestep: the timestep value, when it was read.
    """

    generation: int
    step: int | None
    call: int
    total_steps: int | None
    timestep: float | None


class StepContext:
    """Tracks generations, steps and calls of one parallelised transformer (see the module docstring)."""

    def __init__(self) -> None:
        self.scheduler = None
        self.current: CallInfo | None = None
        self.history_len = 0  # transformer calls seen
        self._explicit_total: int | None = None
        self._new_generation = True
        self._timesteps_ref = None  # the scheduler's timesteps tensor of the running generation
        self._last_t: float | None = None

    # ---- sources ------------------------------------------------------------------------------------
    def follow(self, scheduler) -> None:
        """Take steps from a diffusers scheduler (its `step_index` and `timesteps`); None stops following (the
        next call begins a generation)."""
        if scheduler is not None and not hasattr(scheduler, "timesteps"):
            raise TypeError(f"cocodiff: {type(scheduler).__name__} has no `timesteps`; pass a diffusers scheduler")
        if scheduler is not self.scheduler:
            self._new_generation = True
            self._timesteps_ref = None
            self._last_t = None
        self.scheduler = scheduler

    def begin_generation(self, total_steps: int | None = None) -> None:
        """The next call starts a new generation of `total_steps` steps (own sampling loops)."""
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"begin_generation: total_steps={total_steps!r} must be a positive integer")
        self._explicit_total = total_steps
        self._new_generation = True

    # ---- per call -----------------------------------------------------------------------------------
    def on_call(self, timestep, *, read_device_values: bool) -> CallInfo:
        """Record one transformer call; `timestep` is the call's timestep argument (tensor, number or None).

        `read_device_values`: allowed to read a CUDA timestep's value (a host synchronisation)."""
        self.history_len += 1
        prev = self.current
        step, total, t = None, self._explicit_total, None
        sched = self.scheduler
        if sched is not None and getattr(sched, "timesteps", None) is not None:
            ts = sched.timesteps
            if ts is not self._timesteps_ref:  # set_timesteps ran: a new generation
                self._timesteps_ref = ts
                self._new_generation = True
            idx = getattr(sched, "step_index", None)
            step = 0 if idx is None else int(idx)
            total = len(ts)
        else:
            t = _value(timestep, read_device_values)
            if t is not None and self._last_t is not None and not self._new_generation:
                if t > self._last_t + 1e-9:
                    self._new_generation = True  # timesteps only fall within one generation
            if t is None:
                step = None
            elif self._new_generation or prev is None or prev.step is None:
                step = 0
            elif t != self._last_t:
                step = prev.step + 1
            else:
                step = prev.step
            self._last_t = t
        if self._new_generation or prev is None:
            generation = (prev.generation if prev is not None else 0) + 1
            call = 0
            self._new_generation = False
        else:
            generation = prev.generation
            call = prev.call + 1 if (step is not None and step == prev.step) else 0
        self.current = CallInfo(generation=generation, step=step, call=call, total_steps=total, timestep=t)
        return self.current


def _value(timestep, read_device_values: bool) -> float | None:
    """The first element of a timestep argument as a float, if it may be read without a device sync."""
    if timestep is None:
        return None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        if timestep.device.type != "cpu" and not read_device_values:
            return None
        return float(timestep.reshape(-1)[0].item())
    return None
