"""The diffusers versions this engine is tested with, and one warning outside them.

The plans hook diffusers' model classes and attention processors, and FLUX.1's single blocks carry a
reordered copy of a diffusers forward (`models/flux.py`, guarded by a hash of its source): a diffusers
outside the tested range may still work, but nothing checked it.
"""

from __future__ import annotations

import functools
import warnings

# tested: CI runs the suite with the lock's diffusers (0.42.1) and the model tests with the oldest (0.41.0)
TESTED_DIFFUSERS = ((0, 41), (0, 43))  # [lowest, first untested)


def version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def diffusers_tested(version: str) -> bool:
    lo, hi = TESTED_DIFFUSERS
    return lo <= version_tuple(version)[:2] < hi


@functools.cache
def warn_if_untested() -> None:
    """Warn once per process when the installed diffusers is outside the tested range."""
    import diffusers

    if not diffusers_tested(diffusers.__version__):
        lo, hi = (".".join(map(str, v)) for v in TESTED_DIFFUSERS)
        warnings.warn(
            f"cocodiff is tested with diffusers >={lo},<{hi}; the installed diffusers {diffusers.__version__} is "
            "outside that range (parallel outputs may differ from one process): install a tested version",
            stacklevel=3,
        )
