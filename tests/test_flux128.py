"""The 4096-token model (flux128) and the training code behind both shipped models: the weights load with the
FLUX.1 sequence length, are trained, run equal on 1 and 2 ranks; training resumes bit for bit from its
checkpoint and refuses another run's; the V-Major drift probe keeps its contract; `--model flux128` resolves."""

from __future__ import annotations

import pytest
import torch

import _dist_cases as cases
from cocodiff.apps.smallmodel import SHIPPED_MODELS, load_small_model, random_small_model, resolve_model


def test_the_flux128_weights_are_installed():
    folder = SHIPPED_MODELS["flux128"]
    for name in ("cocodiff_small.json", "conditioner.safetensors", "transformer/config.json"):
        assert (folder / name).is_file(), f"missing {folder / name}: the package was installed without its assets"


@pytest.fixture(scope="module")
def flux128():
    return load_small_model("flux128")


def test_flux128_has_flux1_sequence_length_and_ships_small(flux128):
    sm = flux128
    assert sm.trained and sm.image_size == 128 and sm.patch == 2
    assert (sm.image_size // sm.patch) ** 2 == 4096
    assert sm.transformer.config.num_attention_heads == 8  # divides 1, 2, 4 and 8 ranks
    assert len(sm.classes) >= 10
    assert sm.meta["preset"] == "flux128" and sm.meta["train_config"]["image_size"] == 128
    assert all(p.dtype == torch.float32 for p in sm.transformer.parameters())
    size = sum(f.stat().st_size for f in SHIPPED_MODELS["flux128"].rglob("*") if f.is_file())
    assert size < 30e6, f"flux128 is {size / 1e6:.1f} MB"


@pytest.mark.slow
def test_flux128_beats_random_weights_on_heldout_crops(flux128):
    from cocodiff.apps.train import heldout_crops, heldout_loss

    torch.set_num_threads(2)
    images, labels = heldout_crops(
        flux128.classes[:4], image_size=128, per_class=1, downscale=flux128.meta["train_config"]["downscale"]
    )
    trained = heldout_loss(flux128, images, labels)
    rand = random_small_model(
        classes=flux128.classes, image_size=128, config=dict(flux128.transformer.config), n_text_tokens=8
    )
    assert trained < 0.5 * heldout_loss(rand, images, labels), trained


@pytest.mark.slow
def test_flux128_one_step_equal_on_one_and_two_ranks(pools):
    single = pools(1).run(cases.flux128_one_step, 1)[0]
    par = pools(2).run(cases.flux128_one_step, 2)[0]
    assert single.shape == (2, 4096, 12) and torch.isfinite(single).all()
    torch.testing.assert_close(par, single, rtol=1e-5, atol=2e-5)


def test_model_names_resolve_to_the_shipped_folders(tmp_path, monkeypatch):
    assert resolve_model("flux128") == SHIPPED_MODELS["flux128"]
    assert resolve_model(None) is None
    assert resolve_model(str(tmp_path)) == tmp_path
    (tmp_path / "flux128").mkdir()
    monkeypatch.chdir(tmp_path)  # a folder of that name where the command runs wins over the shipped name
    assert resolve_model("flux128").resolve() == (tmp_path / "flux128").resolve()


def _tiny_train_config(tmp_path, **over):
    from cocodiff.apps.smallmodel import SMALL_FLUX_CONFIG
    from cocodiff.apps.train import TrainConfig

    base = dict(
        classes=("brick", "camera"),
        downscale={"camera": 4},
        image_size=16,
        steps=5,
        batch_size=2,
        warmup=2,
        log_every=1,
        eval_every=100,
        checkpoint=str(tmp_path / "state.pt"),
        checkpoint_every=2,
        bf16=True,
        model_config=dict(SMALL_FLUX_CONFIG, num_layers=1, num_single_layers=1),
    )
    return TrainConfig(**{**base, **over})


def test_training_resumes_bit_for_bit(tmp_path):
    from cocodiff.apps.train import train

    torch.set_num_threads(1)
    straight, h1 = train(_tiny_train_config(tmp_path / "a"), log=lambda s: None)
    (tmp_path / "b").mkdir()
    # the first call stops after its first step (a 0-minute limit), the second resumes from the checkpoint
    _, partial = train(_tiny_train_config(tmp_path / "b", max_minutes=0.0), log=lambda s: None)
    assert partial["steps_done"] == 1
    resumed, h2 = train(_tiny_train_config(tmp_path / "b"), log=lambda s: None)
    assert h2["resumed_at"] == [1] and h2["steps_done"] == 5
    for a, b in zip(straight.transformer.state_dict().values(), resumed.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert [round(v, 6) for _, v in h1["train"]] == [round(v, 6) for _, v in h2["train"]]


def test_training_refuses_another_runs_checkpoint(tmp_path):
    from cocodiff.apps.train import train

    (tmp_path / "a").mkdir()
    train(_tiny_train_config(tmp_path / "a", steps=1), log=lambda s: None)
    with pytest.raises(ValueError, match="other batch_size"):
        train(_tiny_train_config(tmp_path / "a", batch_size=3), log=lambda s: None)


def test_train_config_rejects_bad_downscale():
    from cocodiff.apps.train import TrainConfig

    with pytest.raises(ValueError, match="downscale"):
        TrainConfig(downscale={"brick": 0})
    with pytest.raises(ValueError, match="downscale"):
        TrainConfig(downscale={"nosuch": 2})


def test_vmajor_drift_probe_contract():
    from cocodiff.apps.probes import v_drift_vs_sent
    from cocodiff.config import VMajorConfig

    torch.set_num_threads(1)
    sm = random_small_model(seed=1)
    labels = torch.zeros(2, dtype=torch.long)
    half = VMajorConfig(warmup_steps=2, schedule="fixed", cache_ratio_start=0.5, final_full_steps=1)
    d = v_drift_vs_sent(sm, labels, steps=6, ranks=4, vmajor=half)
    assert d["full_step"] == [True, False, False, False, True]  # steps 2..6: warm-up, 3 selective, last full
    for i, full in enumerate(d["full_step"]):
        if full:
            assert d["sent_fraction"][i] == 1.0 and d["stale_error_max"][i] == 0.0
        else:
            assert 0.45 < d["sent_fraction"][i] < 0.55
            # receivers hold either the fresh value or one that drifted at most as far as the least-changed sent
            assert 0.0 < d["stale_error_median"][i] <= d["drift_vs_sent_p90"][i]
    everything = VMajorConfig(warmup_steps=2, schedule="fixed", cache_ratio_start=0.0, max_cache_ratio=0.0)
    d = v_drift_vs_sent(sm, labels, steps=6, ranks=4, vmajor=everything)
    assert max(d["stale_error_max"]) == 0.0


def test_quality_refuses_more_gpu_ranks_than_gpus(monkeypatch, tmp_path):
    from cocodiff.apps import quality
    from cocodiff.apps.cli import build_parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = build_parser().parse_args(["quality", "--ranks", "2", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="1 GPUs are visible"):
        quality.run_quality(args)


def test_quality_default_ranks_fit_the_gpus(monkeypatch, tmp_path):
    from cocodiff.apps import quality
    from cocodiff.apps.cli import build_parser

    seen = {}

    def stop_at_model(path):  # the rank counts are settled before the model is read: stop there
        seen["ranks"] = args.ranks
        raise RuntimeError("stop")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("cocodiff.apps.pipelines.inspect_model", stop_at_model)
    args = build_parser().parse_args(["quality", "--out", str(tmp_path)])
    with pytest.raises(RuntimeError, match="stop"):
        quality.run_quality(args)
    assert seen["ranks"] == "2"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: CPU ranks, as without GPUs
    args = build_parser().parse_args(["quality", "--out", str(tmp_path)])
    with pytest.raises(RuntimeError, match="stop"):
        quality.run_quality(args)
    assert seen["ranks"] == "2,4"
