"""The shipped small model: it loads, it is trained (beats random weights on held-out crops), it round-trips
through save/load, bad paths fail with one clear line, the samplers keep their contracts, the demo runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cocodiff.apps.smallmodel import (
    ASSET_DIR,
    generate,
    inpaint,
    load_small_model,
    random_small_model,
    save_small_model,
    velocity,
)


def test_the_shipped_weights_are_installed():
    # an installed package without its weights must fail here, not skip the small-model tests
    for name in ("cocodiff_small.json", "conditioner.safetensors", "transformer/config.json"):
        assert (ASSET_DIR / name).is_file(), f"missing {ASSET_DIR / name}: the package was installed without its assets"


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return load_small_model()


def test_shipped_weights_load_as_fp32_with_metadata(shipped):
    assert shipped.trained
    assert all(p.dtype == torch.float32 for p in shipped.transformer.parameters())
    assert all(p.dtype == torch.float32 for p in shipped.conditioner.parameters())
    meta = shipped.meta
    for key in ("trained_steps", "final_train_loss", "final_heldout_loss", "date", "command", "n_text_tokens"):
        assert key in meta, key
    assert shipped.image_size == 32 and shipped.patch == 2 and len(shipped.classes) >= 2
    heads = shipped.transformer.config.num_attention_heads
    assert heads % 2 == 0 and heads % 4 == 0
    size = sum(f.stat().st_size for f in ASSET_DIR.rglob("*") if f.is_file())
    assert size < 8e6, f"shipped model is {size / 1e6:.1f} MB"
    x = torch.randn(2, 256, 12)
    v = velocity(shipped, x, torch.tensor([0.3, 0.9]), torch.tensor([0, 1]))
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_shipped_model_beats_random_weights_on_heldout_crops(shipped):
    from cocodiff.apps.train import heldout_crops, heldout_loss

    images, labels = heldout_crops(shipped.classes, per_class=2)
    trained = heldout_loss(shipped, images, labels)
    rand = heldout_loss(random_small_model(classes=shipped.classes), images, labels)
    # Predicting v = eps - x0 with zero output costs E|eps - x0|^2 > 1; random weights are near that.
    assert trained < 0.5 * rand, (trained, rand)
    assert trained < 0.3, trained


def test_save_load_roundtrip_upcasts_fp16(tmp_path):
    sm = random_small_model(classes=["a", "b"], seed=3)
    save_small_model(sm, tmp_path / "m", meta={"note": "test"})
    back = load_small_model(tmp_path / "m")
    assert back.classes == ["a", "b"] and back.meta["note"] == "test"
    for (name, p), q in zip(sm.transformer.named_parameters(), back.transformer.parameters()):
        assert q.dtype == torch.float32, name
        torch.testing.assert_close(q, p.detach().half().float(), rtol=0, atol=0, msg=name)


def test_missing_and_corrupt_checkpoints_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        load_small_model(tmp_path / "nothing")
    bad = tmp_path / "bad"
    shutil.copytree(ASSET_DIR, bad)
    (bad / "conditioner.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=str(bad)):
        load_small_model(bad)
    bad2 = tmp_path / "bad2"
    shutil.copytree(ASSET_DIR, bad2)
    (bad2 / "cocodiff_small.json").write_text("{ truncated")
    with pytest.raises(ValueError, match=str(bad2)):
        load_small_model(bad2)


def test_inpaint_keeps_known_pixels_and_empty_mask_is_generate(shipped):
    from cocodiff.apps.train import heldout_crops

    images, labels = heldout_crops(shipped.classes[:2], per_class=1)
    known = torch.zeros(2, 1, 32, 32)
    known[0, :, :, :16] = 1  # left half known in image 0; image 1 has nothing known
    out = inpaint(shipped, images, known, labels, steps=3, seed=5)
    torch.testing.assert_close(out[0, :, :, :16], images[0, :, :, :16].clamp(-1, 1), rtol=0, atol=1e-6)
    gen = generate(shipped, labels, steps=3, seed=5)
    torch.testing.assert_close(out[1], gen[1], rtol=0, atol=0)
    assert (out[0, :, :, 16:] - images[0, :, :, 16:]).abs().mean() > 0  # the hole was really generated


@pytest.mark.slow
def test_train_runs_a_few_steps():
    from cocodiff.apps.train import TrainConfig, train

    cfg = TrainConfig(classes=("moon", "brick"), steps=3, batch_size=2, warmup=1, eval_every=3, log_every=1)
    sm, hist = train(cfg, log=lambda s: None)
    assert hist["steps_done"] == 3 and sm.trained
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in hist["train"])
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig(classes=("no-such-image",))


@pytest.mark.slow
def test_demo_uses_shipped_model(tmp_path):
    from cocodiff.apps.cli import main

    assert main(["demo", "--steps", "2", "--num-images", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["trained"] is True
    assert (tmp_path / "images.png").stat().st_size > 0
    assert report["max_abs_diff_vs_single_process"] < 1e-4
