"""Video DiTs (Wan 2.x, HunyuanVideo) sharded over 2, 3 and 4 gloo CPU ranks equal the single process (fp32):
flat, V-First, TAPA on a 2x2 topology, the fused Q/K path, I2V conditioning, a WanPipeline end to end, and
clear refusals of what cannot be sharded exactly."""

import pytest
import torch

import _dist_cases as cases
from cocodiff.apps import families as zoo
from cocodiff.apps.launch import spawn

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out

# make_video_inputs arguments: a (frames, rows, cols) token grid that no degree divides evenly, batch 2; a
# latent one row and column larger than the patch grid, with Wan 2.2 TI2V's per-token timesteps; and a video
# of two tokens (ranks holding none at 3 and 4 ranks).
CASES = {
    "wan": [
        dict(frames=3, rows=3, cols=5, n_txt=7, batch=2),
        dict(frames=2, rows=2, cols=3, n_txt=5, extra=1, per_token_timestep=True),
        dict(frames=1, rows=1, cols=2, n_txt=3),
    ],
    "hunyuanvideo": [
        dict(frames=3, rows=3, cols=5, n_txt=7, batch=2, text_mask=True),  # padded text, per-sample lengths
        dict(frames=2, rows=2, cols=3, n_txt=5, extra=1),
        dict(frames=1, rows=1, cols=2, n_txt=4),
    ],
}
MODES = {"flat": {}, "vfirst": {"v_first": True}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("family", zoo.VIDEO_FAMILIES)
def test_parallel_equals_single_process(pools, family, world, mode):
    diffs, _ = pools(4).run(cases.video_matches_single_process, family, "tiny", world, MODES[mode], CASES[family])[0]
    assert len(diffs) == len(CASES[family]) and max(diffs) < 2e-5


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", zoo.VIDEO_FAMILIES)
def test_tapa_2x2_equals_single_process(pools, family, mode):
    # TAPA's phases on a 2 x 2 topology (the group spans the whole pool of 4), with and without V-First
    cfg = {"all_to_all": "tapa", "tapa_plan": "phases", "topology": "2x2", **MODES[mode]}
    diffs, stats = pools(4).run(cases.video_matches_single_process, family, "tiny", 4, cfg, CASES[family][:2])[0]
    assert max(diffs) < 2e-5
    assert stats["bytes_by_tier"]["local"] > 0 and stats["bytes_by_tier"]["node"] > 0


@pytest.mark.parametrize("world", [2, 3])
def test_wan_i2v_image_context_equals_single_process(pools, world):
    # Wan 2.1 I2V: CLIP image tokens join the (local) cross-attention's keys; diffusers hard-codes 512 text tokens
    case = dict(frames=2, rows=3, cols=3, n_txt=512, image_tokens=5, batch=2)
    diffs, _ = pools(4).run(cases.video_matches_single_process, "wan", "tiny-i2v", world, {"v_first": True}, [case])[0]
    assert max(diffs) < 2e-5


@pytest.mark.parametrize("world", [3, 4])
def test_hunyuan_token_replace_equals_single_process(pools, world):
    # HunyuanVideo-I2V's token_replace: the first frame's 12 tokens span ranks 0 and 1 at 3 and 4 ranks
    case = dict(frames=2, rows=3, cols=4, n_txt=6, batch=2, text_mask=True)
    out = pools(4).run(cases.video_matches_single_process, "hunyuanvideo", "tiny-token-replace", world, {}, [case])
    assert max(out[0][0]) < 2e-5


@pytest.mark.parametrize("family", zoo.VIDEO_FAMILIES)
def test_fused_qk_path_equals_single_process(pools, family):
    case = dict(frames=2, rows=3, cols=5, n_txt=5, batch=2, text_mask=True)
    diff, calls = pools(4).run(cases.video_fused_qk_path, family, 3, case)[0]
    assert diff < 2e-5
    assert calls > 0  # the fused path was taken


def test_hunyuan_single_block_mlp_runs_under_the_exchanges(pools):
    for in_flight in pools(4).run(cases.hunyuan_single_block_overlap, 2)[:2]:
        for plain in ("plain", "projected"):
            assert in_flight[(plain, False)] == [0] and in_flight[(plain, True)] == [3, 1]
        assert in_flight[("hooked", False)] == [0] and in_flight[("hooked", True)] == [1]  # whole, under O's


def test_copied_single_block_forward_is_current():
    # the reordered copy in models/hunyuan_video.py follows diffusers' forward of this hash
    import hashlib
    import inspect

    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoSingleTransformerBlock

    from cocodiff.models import hunyuan_video

    source = inspect.getsource(HunyuanVideoSingleTransformerBlock.forward)
    assert hashlib.sha256(source.encode()).hexdigest() == hunyuan_video.SINGLE_BLOCK_FORWARD_SHA256, (
        "diffusers changed HunyuanVideoSingleTransformerBlock.forward: update single_block_forward and the hash"
    )


def test_refusals_are_clear_and_shared_by_all_ranks(pools):
    out = pools(4).run(cases.video_refusals, 4)
    assert all(o == out[0] for o in out)  # every rank raised the same error
    msgs = out[0]
    assert "timestep" in msgs["wan_timestep_length"] and "(B, 12)" in msgs["wan_timestep_length"]
    assert "at least one video token per rank" in msgs["wan_timestep_tokens"]
    assert "(B, C, F, H, W)" in msgs["wan_4d"]
    assert "encoder_hidden_states has 3 text tokens" in msgs["hunyuan_text_tokens"]
    assert "pad" in msgs["hunyuan_text_tokens"]
    assert "encoder_attention_mask" in msgs["hunyuan_mask"]
    assert "blocks.0.attn1" in msgs["wan_heads"] and "3 heads" in msgs["wan_heads"]
    assert msgs["wan_sharded_attentions"] == ["attn1"]  # the cross-attentions keep diffusers' processor
    assert "unfuse_qkv_projections" in msgs["wan_fused"]
    assert "communication buffers" in msgs["wan_memory"]


@pytest.mark.parametrize("world", [2, 3])
def test_wan_pipeline_end_to_end_equals_single_process(pools, world):
    diff, calls = pools(4).run(cases.wan_pipeline_matches_single_process, world)[0]
    assert diff < 2e-5
    assert calls == [4]  # 2 steps x (conditional, unconditional), each sharded


def test_wan22_two_expert_pipeline_shards_both_experts(pools):
    diff, calls = pools(4).run(cases.wan_pipeline_matches_single_process, 2, True)[0]
    assert diff < 2e-5
    assert calls[0] > 0 and calls[1] > 0 and sum(calls) == 8  # 4 steps x CFG, split at the boundary


def test_hunyuan_pipeline_end_to_end_equals_single_process(pools):
    diff, calls = pools(4).run(cases.hunyuan_pipeline_matches_single_process, 3)[0]
    assert diff < 2e-5
    assert calls == 2  # 2 steps (guidance-distilled: one call per step), each sharded


def test_benchmark_dry_run(tmp_path):
    # benchmarks/video_step.py through its code path on CPU (one process, tiny Wan): it imports, parses, writes JSON
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "video_step.py"
    args = ["--dry-run", "--families", "wan", "--resolutions", "480p", "--warmup", "0", "--iters", "1"]
    args += ["--ref-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "out")]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, timeout=120)
    result = json.loads((tmp_path / "out" / "wan_P1.json").read_text())
    assert result["resolutions"]["480p"]["single"]["eager_ms_median"] > 0


# ---- GPU (skipped without CUDA) -------------------------------------------------------------------------
def _gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _video_cuda_graph(family):
    import torch.distributed as dist

    import cocodiff

    dev = torch.device("cuda", torch.cuda.current_device())
    model = zoo.build_model(family, "tiny", device=dev, seed=0)
    ref = zoo.build_model(family, "tiny", device=dev, seed=0)
    cocodiff.parallelize(model, cocodiff.ParallelConfig(v_first=True, cuda_graph=True))
    cocodiff.parallelize(ref, cocodiff.ParallelConfig(v_first=True))
    kw = dict(frames=3, rows=3, cols=5, n_txt=7, batch=2, device=dev, text_mask=True)
    if family == "wan":
        kw = {**kw, "per_token_timestep": True, "text_mask": False}
    a = zoo.make_video_inputs(family, model, seed=1, **kw)
    b = zoo.make_video_inputs(family, model, seed=2, **kw)
    with torch.no_grad():
        first = model(**a).sample  # captures
        second = model(**b).sample  # replays with new inputs
        assert len(model.cocodiff.graphs) == 1
        torch.testing.assert_close(first, ref(**a).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, ref(**b).sample, rtol=1e-5, atol=1e-5)
    return dist.get_rank()


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("family", zoo.VIDEO_FAMILIES)
def test_cuda_graph_replays_the_sharded_video_step(family):
    assert spawn(_video_cuda_graph, 2, family, backend="nccl", timeout_s=300) == [0, 1]


def _video_fused_qk_close(family):
    import torch.distributed as dist

    import cocodiff
    from cocodiff import fused_qk as kernels

    dev = torch.device("cuda", torch.cuda.current_device())
    calls, compiled = [0], kernels.compiled

    def counting(fn):
        calls[0] += 1
        return compiled(fn)

    out = {}
    kernels.compiled = counting
    try:
        for fused in (False, True):
            model = zoo.build_model(family, "tiny", device=dev, dtype=torch.bfloat16, seed=0)
            cocodiff.parallelize(model, cocodiff.ParallelConfig(v_first=True, fuse_qk=fused))
            inputs = zoo.make_video_inputs(family, model, frames=3, rows=4, cols=5, n_txt=7, device=dev, text_mask=True)
            with torch.no_grad():
                out[fused] = model(**inputs).sample.float()
            assert (calls[0] > 0) == fused, (fused, calls[0])  # the compiled kernel ran exactly when asked
    finally:
        kernels.compiled = compiled
    err = ((out[True] - out[False]).norm() / out[False].norm()).item()
    assert err < 1e-2, err  # bf16 rounding of a different kernel order, not a different function
    return dist.get_rank()


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("family", zoo.VIDEO_FAMILIES)
def test_fused_qk_kernel_close_to_eager_path(family):
    assert spawn(_video_fused_qk_close, 2, family, backend="nccl", timeout_s=300) == [0, 1]


@pytest.mark.parametrize("family", zoo.VIDEO_FAMILIES)
def test_head_groups_equal_one_group_and_single_process(pools, family):
    # 12 heads over 2 ranks: 6 per rank in 3 groups of 2
    diff, one, grouped = pools(4).run(cases.head_groups_match, family, 2, 12, 3, False, True)[0]
    assert diff < 2e-5
    assert grouped > one and (grouped - one) % 4 == 0, (one, grouped)
