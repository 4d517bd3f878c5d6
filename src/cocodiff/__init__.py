"""CoCoDiff: exact, fast Ulysses sequence-parallel inference for diffusers Diffusion Transformers.

    import cocodiff
    cfg = cocodiff.ParallelConfig.preset("flat")
    cocodiff.parallelize(transformer_or_pipeline, cfg)

The engine lives in this package's top-level modules and `exchange/`, `models/`; the applications (demo,
quality harness, training, benchmarks' helpers, rank launching) in `cocodiff.apps`, which the engine never
imports.
"""

from . import checkpoint
from .config import ParallelConfig, SlowTierEmulation, VMajorConfig
from .parallelize import parallelize, release
from .topology import Topology

__all__ = ["ParallelConfig", "SlowTierEmulation", "Topology", "VMajorConfig", "checkpoint", "parallelize", "release"]
__version__ = "0.1.0"
