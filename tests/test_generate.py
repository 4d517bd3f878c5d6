"""`cocodiff generate` on tiny pipelines saved by `save_pretrained` (text encoders and tokenizers included,
built from configs, nothing downloaded): the images of 2 CPU ranks equal the same pipeline on one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import _tiny_pipelines as tiny
from cocodiff.apps.cli import main

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return tiny.save_pipeline("flux", tmp_path_factory.mktemp("pipelines") / "flux")


def _one_process(folder, cls_name: str, **kwargs) -> np.ndarray:
    """The same pipeline call without cocodiff: (N, H, W, 3) in [0, 1]."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(kwargs.pop("seed")), output_type="np", **kwargs).images


def _pngs(out, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out / f"image_{i:03d}.png")) for i in range(n)])


def _run(folder, out, family_args: list[str]) -> dict:
    argv = ["generate", "--model", str(folder), "--ranks", "2", "--out", str(out), "--compare-single"]
    assert main(argv + family_args) == 0
    return json.loads((out / "generate.json").read_text())


def test_flux_with_true_cfg_on_two_ranks_equals_one_process(flux_folder, tmp_path, capfd):
    args = ["--prompt", "a red cat", "--negative-prompt", "blurry", "--true-cfg", "2", "--guidance", "3"]
    args += ["--height", "32", "--width", "24", "--steps", "3", "--num-images", "2", "--seed", "5"]
    args += ["--max-sequence-length", "16", "--v-first"]
    record = _run(flux_folder, tmp_path, args)
    err = capfd.readouterr().err

    assert record["ranks"] == 2 and record["pipeline"] == "FluxPipeline" and record["config"]["v_first"]
    assert record["max_abs_diff_vs_single_process"] < 1e-5
    assert record["transformer_calls"] == 6  # true CFG: conditional and unconditional call per step
    assert len(record["timings"]["ms_per_step"]) == 3 and record["bytes_per_rank"]["total_by_tier"]["local"] > 0
    assert {"torch", "diffusers", "transformers", "cocodiff", "python"} <= set(record["versions"])
    # rank 0 alone writes, and exactly what it lists
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(record["files"])
    # an independent check: the PNGs equal the pipeline run here, without cocodiff, to 8-bit rounding
    ref = _one_process(
        flux_folder,
        "FluxPipeline",
        prompt="a red cat",
        negative_prompt="blurry",
        true_cfg_scale=2.0,
        guidance_scale=3.0,
        height=32,
        width=24,
        num_inference_steps=3,
        num_images_per_prompt=2,
        seed=5,
        max_sequence_length=16,
    )
    got = _pngs(tmp_path, 2).astype(np.int16)
    assert got.shape == (2, 32, 24, 3)
    assert np.abs(got - np.round(ref * 255).astype(np.int16)).max() <= 1
    # one progress bar (rank 0's, naming the rank count), no loading bars or library notices
    assert err.count("FluxPipeline, 2 cpu ranks: 100%") >= 1
    assert "Loading" not in err and "FutureWarning" not in err and "accelerate" not in err


@pytest.mark.slow
def test_sd3_with_cfg_on_two_ranks_equals_one_process(tmp_path):
    folder = tiny.save_pipeline("sd3", tmp_path / "sd3")
    args = ["--prompt", "a cat", "--negative-prompt", "blurry", "--guidance", "2", "--steps", "3"]
    record = _run(folder, tmp_path / "out", args + ["--max-sequence-length", "16"])
    assert record["height"] == 32 and record["max_abs_diff_vs_single_process"] < 1e-5


@pytest.mark.slow  # the README's `cocodiff generate --prompt moon` runs this path in tests/test_readme.py
def test_small_model_by_class_name(tmp_path):
    args = ["generate", "--prompt", "moon", "--steps", "2", "--num-images", "2", "--ranks", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    record = json.loads((tmp_path / "generate.json").read_text())
    assert record["pipeline"] == "cocodiff small model" and record["prompt"] == "moon"
    assert (tmp_path / "images.png").is_file() and _pngs(tmp_path, 2).shape == (2, 32, 32, 3)
