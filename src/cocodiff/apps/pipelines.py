"""What `cocodiff generate` can run, read from a model folder's JSON files before any rank starts.

A model folder is either a diffusers pipeline saved by `save_pretrained` (`model_index.json` naming one of
the supported text-to-image pipelines, with its `transformer/`, `vae/`, text encoders and tokenizers), or a
small model saved by cocodiff (`cocodiff_small.json`); no folder means the small model cocodiff ships.
Everything the command line must refuse (a missing folder, an unsupported pipeline, a head count the ranks
do not divide, a size the model cannot take) is decided here from configs alone, in one line naming the
value and the fix, so a user error costs no rank start-up and prints no per-rank tracebacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# text-to-image pipelines with a transformer cocodiff has a plan for -> model family
SUPPORTED_PIPELINES = {
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "QwenImagePipeline": "qwenimage",
    "Flux2Pipeline": "flux2",
}
# call arguments some pipelines lack (checked before start-up, not discovered inside a rank)
_NO_NEGATIVE_PROMPT = {"Flux2Pipeline"}
_TRUE_CFG = {"FluxPipeline", "QwenImagePipeline"}


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What one model folder is, from its configs.

    Args:
        path: the folder (None: the shipped small model).
        kind: "pipeline" (diffusers) or "small" (cocodiff's class-conditional small model).
        name: the pipeline class, or "cocodiff small model".
        family: flux, sd3, qwenimage or flux2.
        heads: attention heads of the transformer (the Ulysses degree must divide them).
        size_multiple: height and width must be multiples of this (pixels).
        default_size: (height, width) the pipeline generates by default.
        max_size: largest height or width the model takes (SD3's position table), None for no limit.
        classes: the small model's class names (its "prompts").
        trained: False for the small architecture with random weights (a tree without the shipped weights).
    """

    path: Path | None
    kind: str
    name: str
    family: str
    heads: int
    size_multiple: int
    default_size: tuple[int, int]
    max_size: int | None = None
    classes: list[str] = field(default_factory=list)
    trained: bool = True

    @property
    def label(self) -> str:
        where = "shipped" if self.path is None else str(self.path)
        return f"{self.name} ({where})"

    def divisors(self, limit: int | None = None) -> list[int]:
        """Rank counts the heads allow (up to `limit`)."""
        return [d for d in range(1, self.heads + 1) if self.heads % d == 0 and (limit is None or d <= limit)]

    def check_ranks(self, ranks: int, *, flag: str = "--ranks") -> None:
        """Raise a one-line ValueError when there are more ranks than heads (Ulysses splits heads over ranks;
        a count that does not divide them pads with zero heads, which works but wastes a share of the work)."""
        if ranks > self.heads:
            raise ValueError(
                f"{flag} {ranks}: {self.label} has {self.heads} attention heads, fewer than {ranks} ranks "
                f"(Ulysses splits heads over ranks); use at most {self.heads} ranks, best one of {self.divisors()}"
            )

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) with the defaults filled in; a one-line ValueError for a size the model cannot take."""
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        if self.kind == "small":
            if (height, width) != self.default_size:
                raise ValueError(
                    f"--height/--width {height}x{width}: the {self.name} generates "
                    f"{self.default_size[0]}x{self.default_size[1]} images only; drop --height/--width"
                )
            return height, width
        m = self.size_multiple
        for flag, v in (("--height", height), ("--width", width)):
            if v < m or v % m:
                fix = max(m, v - v % m)
                raise ValueError(
                    f"{flag} {v}: {self.name} takes sizes that are multiples of {m} px; use {fix} or {fix + m}"
                )
            if self.max_size is not None and v > self.max_size:
                raise ValueError(
                    f"{flag} {v}: {self.name} in {self.path} takes at most {self.max_size} px (its transformer's "
                    f"position table); use {self.max_size} or less"
                )
        return height, width


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; the model folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the model folder is corrupt") from None


def _small_info(path: Path | None) -> ModelInfo:
    from .smallmodel import ASSET_DIR, SMALL_FLUX_CONFIG

    folder = ASSET_DIR if path is None else path
    meta_file = folder / "cocodiff_small.json"
    if path is None and not meta_file.is_file():  # a tree without the shipped weights: random weights
        return ModelInfo(
            path=None,
            kind="small",
            name="cocodiff small model (random weights)",
            family="flux",
            heads=SMALL_FLUX_CONFIG["num_attention_heads"],
            size_multiple=1,
            default_size=(32, 32),
            classes=["random"],
            trained=False,
        )
    meta = _read_json(meta_file)
    cfg = _read_json(folder / "transformer" / "config.json")
    try:
        size = int(meta["image_size"])
        classes = list(meta["classes"])
        heads = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{meta_file}: corrupt cocodiff small model metadata ({exc!r})") from None
    return ModelInfo(
        path=path,
        kind="small",
        name="cocodiff small model",
        family="flux",
        heads=heads,
        size_multiple=1,
        default_size=(size, size),
        classes=classes,
    )


def inspect_model(path: str | Path | None) -> ModelInfo:
    """Read a model folder's configs (no weights).

    Raises:
        FileNotFoundError: the folder, or a file its index names, does not exist.
        ValueError: an unsupported pipeline or transformer, a transformer folder instead of a pipeline folder,
            or unreadable JSON; one line naming the path and the fix.
    """
    if path is None:
        return _small_info(None)
    from .smallmodel import resolve_model

    path = resolve_model(path)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such folder; pass a diffusers pipeline folder (model_index.json)")
    if not path.is_dir():
        raise ValueError(f"--model {path}: is a file; pass the pipeline folder that holds model_index.json")
    if (path / "cocodiff_small.json").is_file():
        return _small_info(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        hint = (
            "it holds a transformer alone (config.json); pass the pipeline folder above it"
            if (path / "config.json").is_file()
            else "save one with pipeline.save_pretrained(folder)"
        )
        raise FileNotFoundError(f"--model {path}: no model_index.json, so not a diffusers pipeline folder; {hint}")
    index = _read_json(index_file)
    name = index.get("_class_name")
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"--model {path}: pipeline {name!r} is not supported by cocodiff generate; "
            f"supported: {', '.join(SUPPORTED_PIPELINES)}"
        )
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if not (path / component).is_dir():
            raise FileNotFoundError(f"--model {path}: model_index.json names {component}/, which is missing")
    from ..checkpoint import inspect_checkpoint

    tcfg = inspect_checkpoint(path / "transformer")  # one line for an unsupported class or newer diffusers
    vae = _read_json(path / "vae" / "config.json")
    family = SUPPORTED_PIPELINES[name]
    if family == "qwenimage":
        vae_factor = 2 ** len(vae.get("temperal_downsample", [False, True, True]))
    else:
        vae_factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if family == "sd3":
        patch = int(tcfg.get("patch_size", 2))
        multiple = vae_factor * patch
        default = int(tcfg.get("sample_size", 128)) * vae_factor
        max_pos = tcfg.get("pos_embed_max_size")
        max_size = int(max_pos) * patch * vae_factor if max_pos else None
    else:
        multiple, default, max_size = vae_factor * 2, 128 * vae_factor, None
    return ModelInfo(
        path=path,
        kind="pipeline",
        name=name,
        family=family,
        heads=int(tcfg["num_attention_heads"]),
        size_multiple=multiple,
        default_size=(default, default),
        max_size=max_size,
    )


def dtype_kwargs(dtype) -> dict:
    """`from_pretrained`'s dtype argument: `dtype` where diffusers has it (0.42 deprecates `torch_dtype`)."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def check_call_options(info: ModelInfo, *, negative_prompt, true_cfg, guidance) -> None:
    """Refuse generation options the model has no use for, naming the option to drop."""
    if info.kind == "small":
        for flag, v in (("--negative-prompt", negative_prompt), ("--true-cfg", true_cfg), ("--guidance", guidance)):
            if v is not None:
                raise ValueError(f"{flag}: the {info.name} is class-conditional with no guidance; drop {flag}")
        return
    if negative_prompt is not None and info.name in _NO_NEGATIVE_PROMPT:
        raise ValueError(f"--negative-prompt: {info.name} takes no negative prompt; drop it")
    if true_cfg is not None and info.name not in _TRUE_CFG:
        raise ValueError(
            f"--true-cfg: {info.name} has no true-CFG scale (only {', '.join(sorted(_TRUE_CFG))}); use --guidance"
        )


def small_labels(info: ModelInfo, prompt: str | None, n: int) -> list[int]:
    """Class indices for `n` images of the small model: the prompt's class, or every class in turn."""
    if prompt is None:
        return [i % len(info.classes) for i in range(n)]
    wanted = prompt.strip().lower()
    if wanted not in info.classes:
        raise ValueError(
            f"--prompt {prompt!r}: the {info.name} knows only its classes: {', '.join(info.classes)}; "
            "use one of them (or pass --model with a diffusers pipeline folder for free text)"
        )
    return [info.classes.index(wanted)] * n
