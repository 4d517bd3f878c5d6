"""Model families: one small declarative plan each. `plan_for(model)` picks the plan by class."""

from __future__ import annotations

from torch import nn

from ..sharding import ModelPlan

SUPPORTED = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "QwenImageTransformer2DModel": "qwenimage",
    "Flux2Transformer2DModel": "flux2",
}


def plan_for(model: nn.Module) -> ModelPlan:
    """The sharding plan for a diffusers transformer instance.

    Raises:
        TypeError: naming the class when no plan exists for it.
    """
    name = type(model).__name__
    family = SUPPORTED.get(name)
    if family is None:
        raise TypeError(
            f"cocodiff has no sharding plan for {name}; supported transformer classes: "
            f"{', '.join(sorted(SUPPORTED))}"
        )
    if family == "flux":
        from .flux import PLAN
    elif family == "sd3":
        from .sd3 import PLAN
    elif family == "qwenimage":
        from .qwenimage import PLAN
    else:
        from .flux2 import PLAN
    return PLAN
