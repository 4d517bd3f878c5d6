"""Loading a local diffusers transformer checkpoint, with one clear error line for every way it can be wrong.

A checkpoint is a directory holding `config.json` (with diffusers' `_class_name` and `_diffusers_version`)
and safetensors weights, as `save_pretrained` writes it (or the `transformer/` folder of a pipeline).
Problems are reported before any process group work, naming the path and the fix:
missing path or config, unreadable JSON, a class cocodiff has no plan for, a config written by a newer
diffusers than the installed one, missing or corrupt weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .compat import version_tuple
from .models import supported


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line naming the path and the fix."""


def inspect_checkpoint(path: str | Path) -> dict:
    """Read and validate a transformer checkpoint's config without loading weights.

    Returns:
        the config dict.
    Raises:
        FileNotFoundError: the path or its config.json does not exist.
        CheckpointError: the config is unreadable, of an unsupported class, or from a newer diffusers.
    """
    import diffusers

    path = Path(path)
    if path.is_dir() and (path / "transformer" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "transformer"  # a pipeline directory
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: pass a diffusers transformer directory (save_pretrained)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{cfg_file} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); the checkpoint is corrupt"
        ) from None
    cls = cfg.get("_class_name")
    if cls not in supported():
        saved = cfg.get("_diffusers_version", "?")
        hint = ""
        if version_tuple(saved) > version_tuple(diffusers.__version__):
            hint = f" (it was saved by diffusers {saved}, newer than the installed {diffusers.__version__})"
        raise CheckpointError(
            f"{cfg_file}: model class {cls!r} is not supported by cocodiff{hint}; supported: {', '.join(supported())}"
        )
    saved = cfg.get("_diffusers_version")
    if saved and version_tuple(saved)[:2] > version_tuple(diffusers.__version__)[:2]:
        raise CheckpointError(
            f"{cfg_file} was written by diffusers {saved}, newer than the installed {diffusers.__version__}; "
            f"install diffusers>={saved} or re-save the checkpoint with {diffusers.__version__}"
        )
    cfg["_path"] = str(path)
    return cfg


def load_transformer(path: str | Path, *, dtype=torch.float32, device="cpu"):
    """Load a supported diffusers transformer from a local checkpoint (see `inspect_checkpoint`)."""
    import diffusers

    cfg = inspect_checkpoint(path)
    path = Path(cfg["_path"])
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"no weights (*.safetensors) in {path}")
    cls = getattr(diffusers, cfg["_class_name"])
    try:
        model = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load the weights in {path}: {type(exc).__name__}: {first[:300]}") from None
    return model.to(device).eval()
