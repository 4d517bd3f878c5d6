"""Model families: one small declarative plan each; the registry is built from the plans.

Adding a DiT family is one plan module (its `PLAN`) listed in `_PLAN_MODULES`, plus its test cases.
"""

from __future__ import annotations

import importlib

from torch import nn

from ..sharding import ModelPlan

_PLAN_MODULES = ("flux", "sd3", "qwenimage", "flux2", "wan", "hunyuan_video")


def plans() -> dict[str, ModelPlan]:
    """Class name -> plan, for every supported diffusers transformer."""
    out = {}
    for mod in _PLAN_MODULES:
        plan = importlib.import_module(f"{__name__}.{mod}").PLAN
        out[plan.model_class.__name__] = plan
    return out


def supported() -> list[str]:
    return sorted(plans())


def plan_for(model: nn.Module) -> ModelPlan:
    """The sharding plan for a diffusers transformer instance.

    Raises:
        TypeError: naming the class when no plan exists for it.
    """
    name = type(model).__name__
    plan = plans().get(name)
    if plan is None or not isinstance(model, plan.model_class):
        raise TypeError(
            f"cocodiff has no sharding plan for {name}; supported transformer classes: {', '.join(supported())}"
        )
    return plan
