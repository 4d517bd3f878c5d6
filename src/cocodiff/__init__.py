"""CoCoDiff: exact, fast Ulysses sequence-parallel inference for diffusers Diffusion Transformers.

    import cocodiff
    cfg = cocodiff.ParallelConfig.preset("flat")
    cocodiff.parallelize(transformer_or_pipeline, cfg)
"""

from .config import ParallelConfig, VMajorConfig
from .parallelize import parallelize
from .topology import Topology

__all__ = ["ParallelConfig", "VMajorConfig", "Topology", "parallelize"]
__version__ = "0.1.0"
