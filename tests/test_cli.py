"""Command-line errors are found before any rank starts: one line each, exit code 2; rank counts follow the
model's heads; help shows defaults and choices."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

import _tiny_pipelines as tiny
from cocodiff.apps import cli, generate
from cocodiff.apps.pipelines import inspect_model


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return tiny.save_pipeline("flux", tmp_path_factory.mktemp("cli") / "flux")


@pytest.fixture
def no_spawn(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a rank was started for a command line that cannot run")

    monkeypatch.setattr(generate, "spawn", refuse)


def _error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or (len(err) == 2 and "CPU ranks" in err[0]), err  # the error, after a note at most
    return err[-1]


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["--topology", "3x3", "--ranks", "4"],
            "--topology 3x3: its tiers hold 9 ranks, this run has 4; use --ranks 9",
        ),
        (["--ranks", "5"], "--ranks 5: cocodiff small model (shipped) has 4 attention heads, fewer than 5 ranks"),
        (["--ranks", "0"], "argument --ranks: 0 is less than 1"),
        (["--ranks", "two"], "argument --ranks: 'two' is not an integer"),
        (["--prompt", "dog"], "--prompt 'dog': the cocodiff small model knows only its classes: ihc, retina"),
        (["--height", "64"], "the cocodiff small model generates 32x32 images only"),
        (["--guidance", "3"], "--guidance: the cocodiff small model is class-conditional"),
        (["--cuda-graph", "--cpu"], "--cuda-graph need GPU ranks"),
        (["--preset", "cocodiff"], "V-Major selects what crosses the slow (outermost) tier"),
        (["--preset", "fast"], "--preset fast needs GPU ranks (CUDA graphs); this run uses CPU ranks"),
        (["--preset", "turbo"], "argument --preset: invalid choice: 'turbo'"),
        (["--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
    ],
)
def test_small_model_errors_before_any_rank_starts(argv, expected, capsys, no_spawn):
    assert expected in _error(capsys, ["generate", *argv])


def test_pipeline_folder_errors_before_any_rank_starts(flux_folder, tmp_path, capsys, no_spawn):
    base = ["generate", "--model", str(flux_folder), "--prompt", "a cat"]
    assert "attention heads, fewer than 9 ranks" in _error(capsys, [*base, "--ranks", "9"])
    assert "--height 30: FluxPipeline takes sizes that are multiples of 4 px; use 28 or 32" in _error(
        capsys, [*base, "--height", "30"]
    )
    assert "--prompt is needed with a pipeline folder" in _error(capsys, base[:3])
    assert "holds a transformer alone" in _error(capsys, ["generate", "--model", str(flux_folder / "transformer")])
    other = shutil.copytree(flux_folder, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    assert "pipeline 'StableDiffusionPipeline' is not supported" in _error(capsys, ["generate", "--model", str(other)])
    shutil.rmtree(other / "vae")
    (other / "model_index.json").write_text(json.dumps(index))
    assert "model_index.json names vae/, which is missing" in _error(capsys, ["generate", "--model", str(other)])


def test_demo_errors_before_any_rank_starts(capsys, no_spawn):
    assert "--ranks 5" in _error(capsys, ["demo", "--ranks", "5"])
    assert "--topology 2x2: its tiers hold 4 ranks, this run has 2" in _error(capsys, ["demo", "--topology", "2x2"])


def _args(**kw):
    return SimpleNamespace(**{"cpu": False, "ranks": None, "topology": None, **kw})


def test_rank_count_follows_the_heads_and_the_gpus(monkeypatch):
    info = inspect_model(None)  # 4 heads
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 6)
    ranks, cuda, note = cli.choose_ranks(_args(), info)
    assert (ranks, cuda) == (4, True) and "using 4 of the 6 GPUs" in note and "4 attention heads" in note
    monkeypatch.setattr("torch.cuda.device_count", lambda: 3)
    assert cli.choose_ranks(_args(), info)[0] == 2
    with pytest.raises(ValueError, match="only 3 GPUs here"):
        cli.choose_ranks(_args(ranks=4), info)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    ranks, cuda, note = cli.choose_ranks(_args(), info)
    assert (ranks, cuda) == (2, False) and "CPU ranks" in note


def test_presets_on_gpu_and_cpu_ranks():
    def config(preset, cuda, **flags):
        args = SimpleNamespace(preset=preset, topology="2x2", v_first=False, **flags)
        return cli.config_from_args(args, cuda=cuda)

    assert config("auto", True).preset_name == "fast" and config("auto", False).preset_name == "flat"
    # V-Major on GPU ranks runs with fast's switches (eagerly it measured slower than the exact fast preset)
    gpu, cpu = config("cocodiff", True), config("cocodiff", False)
    assert gpu.v_major is not None and gpu.fuse_qk and gpu.compile_blocks and gpu.cuda_graph
    assert gpu.label == "cocodiff+fuse_qk+compiled+cuda_graph" and gpu.topology == "2x2"
    assert cpu.v_major is not None and not (cpu.fuse_qk or cpu.compile_blocks or cpu.cuda_graph)
    assert not config("vfirst", True).cuda_graph  # the other named presets stay as they are
    assert config("cocodiff", True, all_to_all="flat").all_to_all == "flat"  # flags still apply on top
    eager = config("cocodiff", True, cuda_graph=False, compile_blocks=False)  # --no-cuda-graph --no-compile-blocks
    assert eager.v_major is not None and eager.fuse_qk and not (eager.cuda_graph or eager.compile_blocks)
    assert not config("fast", True, cuda_graph=False).cuda_graph
    # on the command line: unset (None: the preset's), --x (True) or --no-x (False)
    args = cli.build_parser().parse_args(["generate", "--preset", "cocodiff", "--no-cuda-graph", "--fuse-qk"])
    assert (args.cuda_graph, args.fuse_qk, args.compile_blocks) == (False, True, None)
    cfg = cli.config_from_args(args, cuda=True)
    assert cfg.v_major is not None and cfg.fuse_qk and cfg.compile_blocks and not cfg.cuda_graph


def test_help_shows_defaults_and_choices(capsys):
    for argv in (["generate", "--help"], ["demo", "--help"], ["bench", "a2a", "--help"]):
        assert cli.main(argv) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: " in text, argv
        if argv[0] == "generate":
            assert "{auto,flat,tapa,vfirst,cocodiff,fast}" in text and "(default: auto)" in text
    assert cli.main(["quality", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "flat, flat+vfirst, tapa" in text and "(default: 2,4; on GPUs those the visible GPUs allow" in text


def test_bench_e2e_reads_xdit_peer_rows():
    # xdit_peer's JSON (the rows rank 0 wrote on 2 H200, committed) -> bench e2e rows, a failed stage -> a reason
    import json
    from pathlib import Path

    from cocodiff.apps.bench_e2e import report, xdit_rows_from_report

    doc = Path(__file__).parent.parent / "docs/benchmarks/2026-11-30-e2e/xdit_flux_P2.json"
    result = json.loads(doc.read_text())
    rows = xdit_rows_from_report(result, [1024, 2048], ["eager", "compile"], 2, 0, "log")
    ok = {(r["size"], r["mode"]): r for r in rows}
    assert ok[(1024, "eager")]["ms_per_step"] == result["rows"][0]["ms_median"]
    assert ok[(1024, "compile")]["config"] == "USP compile (reduce-overhead)"
    assert "no row" in ok[(2048, "eager")]["error"]
    failed = {"failed_stage": {"stage": "import", "error": "ImportError: x"}, "rows": []}
    assert xdit_rows_from_report(failed, [1024], ["eager"], 2, 1, "log")[0]["error"] == "import: ImportError: x"
    # the best peer: xDiT's compiled row (8.7e-2 from one GPU) is listed, not used as the peer to beat
    cocodiff = {"family": "flux", "size": 1024, "P": 2, "engine": "cocodiff", "mode": "fast", "ms_per_step": 100.0}
    one = {"family": "flux", "size": 1024, "P": 1, "engine": "diffusers", "mode": "eager", "ms_per_step": 200.0}
    opts = {"families": ["flux"], "sizes": [1024], "steps": [28], "iters": 5, "warmup": 2, "cuda": True}
    env = {"date": "d", "gpu": "g", "torch": "t"}
    text = report({"env": env, "options": opts, "rows": [one, cocodiff, ok[(1024, "eager")], ok[(1024, "compile")]]})
    line = next(x for x in text.splitlines() if "| cocodiff |" in x)
    assert f"{ok[(1024, 'eager')]['ms_per_step'] / 100:.2f}x" in line


def test_bench_e2e_on_cpu_ranks(tmp_path, capsys):
    # the whole command on CPU ranks (tiny configs): rows for 1 and 2 ranks, the reference, the report files;
    # diffusers' own parallelism needs an accelerator, so its P=2 row says why instead of a time
    import json

    assert cli.main(["bench", "e2e", "--cpu", "--peers", "eager", "--iters", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "e2e.json").read_text())
    rows = {(r["P"], r["engine"]): r for r in result["rows"]}
    assert set(rows) == {(p, e) for p in (1, 2) for e in ("diffusers", "cocodiff", "xDiT")}
    assert "not requested" in rows[(2, "xDiT")]["error"]  # a peer that does not run is a row that says why
    assert rows[(2, "cocodiff")]["rel_err_vs_1gpu"] < 1e-5 and rows[(1, "cocodiff")]["rel_err_vs_1gpu"] < 1e-5
    assert "s_per_image_2" in rows[(2, "cocodiff")] and "error" in rows[(2, "diffusers")]
    # the compute-only bound of the P=2 row (exchanges made no-ops), its exposed exchange in the report and plot
    assert rows[(2, "cocodiff")]["no_exchange_ms"] > 0 and "no_exchange_ms" not in rows[(1, "cocodiff")]
    assert (tmp_path / "e2e.md").read_text().startswith("# cocodiff bench e2e") and (tmp_path / "e2e.png").exists()
    assert (tmp_path / "e2e_breakdown.png").exists() and "exposed" in (tmp_path / "e2e.md").read_text()
    # xDiT asked for on CPU ranks: rows saying why; --routes: each preset once per route at P > 1
    # and --head-chunks: each once per value
    argv = ["bench", "e2e", "--cpu", "--peers", "eager", "xdit", "--iters", "1", "--routes", "flat", "tapa"]
    assert cli.main([*argv, "--presets", "vfirst", "--head-chunks", "1", "2", "--out", str(tmp_path / "xdit")]) == 0
    rows = json.loads((tmp_path / "xdit" / "e2e.json").read_text())["rows"]
    assert [r["error"] for r in rows if r["engine"] == "xDiT"] == ["xDiT needs CUDA GPUs"] * 2
    coco = {(r["P"], r["mode"]): r for r in rows if r["engine"] == "cocodiff"}
    assert set(coco) == {(1, "vfirst")} | {(2, f"vfirst@{r}/hc{n}") for r in ("flat", "tapa") for n in (1, 2)}
    row = coco[(2, "vfirst@flat/hc2")]
    assert row["config"] == "vfirst+flat+chunks2" and row["rel_err_vs_1gpu"] < 1e-5
    assert coco[(2, "vfirst@tapa/hc1")]["config"] == "vfirst" and coco[(2, "vfirst@tapa/hc1")]["rel_err_vs_1gpu"] < 1e-5
    assert cli.main(["bench", "e2e", "--cpu", "--head-chunks", "0", "--out", str(tmp_path)]) == 2
    assert "--head-chunks [0]" in capsys.readouterr().err
    assert cli.main(["bench", "e2e", "--cpu", "--routes", "copy_engine", "--out", str(tmp_path)]) == 2
    assert "--routes copy_engine needs GPU ranks" in capsys.readouterr().err
    assert cli.main(["bench", "e2e", "--cpu", "--peers", "regional-compile", "--out", str(tmp_path)]) == 2
    assert "--peers must include eager" in capsys.readouterr().err
    # cocodiff's rows over an emulated slow tier (2 emulated nodes of 1 rank at P=2), exact and with V-Major (lossy:
    # its steps are timed over a generation, past its exact warm-up, and its whole-run error is reported)
    argv = ["bench", "e2e", "--cpu", "--peers", "eager", "--topology", "2x1", "--emulate", "--iters", "1"]
    argv += ["--presets", "vfirst", "cocodiff", "--v-major", "default", "fixed0.9", "--steps", "6"]
    assert cli.main([*argv, "--out", str(tmp_path / "emulated")]) == 0
    rows = json.loads((tmp_path / "emulated" / "e2e.json").read_text())["rows"]
    emulated = {r["mode"]: r for r in rows if r["P"] == 2 and r["engine"] == "cocodiff"}
    # --v-major VARIANT...: each row also with V-Major, once per variant
    assert set(emulated) == {"vfirst", "vfirst+vmajor", "vfirst+vmajor-fixed0.9", "cocodiff"}
    assert "emulated" in emulated["vfirst"]["config"] and emulated["vfirst"]["rel_err_vs_1gpu"] < 1e-5
    assert emulated["vfirst"]["rel_err_run_6_vs_1gpu"] < 1e-5  # exact: the whole run too
    assert emulated["vfirst+vmajor"]["config"] == "vfirst+vmajor+emulated"
    # bytes per tier: an exact step sends every token over the slow tier; V-Major's generation (4 full warm-up
    # steps, a selective one, a full last one) sends less, and a fixed 0.9 ratio less than the default's 0.5
    full = emulated["vfirst"]["bytes_per_step_by_tier"]
    assert emulated["vfirst"]["tiers"][-1] == "node" and full[-1] > 0, emulated["vfirst"]
    left = {m: emulated[m]["slow_tier_bytes_left"] for m in ("cocodiff", "vfirst+vmajor", "vfirst+vmajor-fixed0.9")}
    assert left["vfirst+vmajor-fixed0.9"] < left["vfirst+vmajor"] == left["cocodiff"] < 1, left
    assert emulated["vfirst+vmajor"]["bytes_generation_by_tier"][-1] == round(6 * full[-1] * left["vfirst+vmajor"])
    for vm in (emulated["cocodiff"], emulated["vfirst+vmajor"], emulated["vfirst+vmajor-fixed0.9"]):
        assert "error" not in vm, vm
        assert vm["timed_steps"] == "5-6" and len(vm["ms_per_step_all"]) == 6 and 0 < vm["rel_err_run_6_vs_1gpu"] < 0.5
        assert "rel_err_vs_1gpu" not in vm  # no step error for a lossy row: its run's error stands for it
    assert "of the slow-tier bytes)" in (tmp_path / "emulated" / "e2e.md").read_text()
    assert "V-Major needs at least 2 ranks" in [r for r in rows if r["P"] == 1 and r["mode"] == "cocodiff"][0]["error"]
    assert "6-step run" in (tmp_path / "emulated" / "e2e.md").read_text()


def test_bench_e2e_without_pipeline_runs(tmp_path, capsys):
    # --no-pipeline (size sweeps): transformer steps only, every row still with its step error against one GPU;
    # refused with V-Major, whose only error is its pipeline run's
    import json

    argv = ["bench", "e2e", "--cpu", "--peers", "eager", "--iters", "1", "--no-pipeline"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    coco = [r for r in rows if r["engine"] == "cocodiff"]
    assert [r["P"] for r in coco] == [1, 2] and all(r["rel_err_vs_1gpu"] < 1e-5 for r in coco)
    assert not any(k.startswith(("s_per_image", "rel_err_run")) for r in rows for k in r)
    text = (tmp_path / "e2e.md").read_text()
    assert "--no-pipeline" in text and "s/image" not in text
    at = next(i for i, x in enumerate(text.splitlines()) if x.startswith("| P |"))
    header, rule = text.splitlines()[at : at + 2]
    assert header.count("|") == rule.count("|") and "|  |" not in header  # no empty column for the missing runs
    # every row is in rows.jsonl as soon as it is measured (a run killed mid-way keeps them)
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [r for r in rows if r["engine"] != "xDiT"]
    assert cli.main([*argv, "--v-major", "--topology", "2x1", "--out", str(tmp_path)]) == 2
    assert "--no-pipeline with --v-major" in capsys.readouterr().err
    assert cli.main([*argv, "--steps", "28", "--out", str(tmp_path)]) == 2
    assert "drop --steps [28]" in capsys.readouterr().err


def test_bench_e2e_resumes_a_run_cut_short(tmp_path, capsys):
    # a run killed by a time limit keeps its rows in rows.jsonl; --resume in the same folder with the same options
    # runs only the rest (the kept rows are the same measurements), refuses other options or an empty folder
    import json

    argv = ["bench", "e2e", "--cpu", "--peers", "eager", "--iters", "1", "--no-pipeline", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    first = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    cut = lines[:3] + [lines[3][:20]]  # the P=1 rows and the P=2 diffusers row, then a line cut by the kill
    (tmp_path / "rows.jsonl").write_text("\n".join(cut) + "\n")
    assert cli.main([*argv, "--resume"]) == 0
    result = json.loads((tmp_path / "e2e.json").read_text())
    again = result["rows"]
    assert [(r["P"], r["engine"], r["mode"]) for r in again] == [(r["P"], r["engine"], r["mode"]) for r in first]
    p1 = [r for r in again if r["P"] == 1 and r["engine"] != "xDiT"]
    assert p1 == [r for r in first if r["P"] == 1 and r["engine"] != "xDiT"]  # kept, not measured again
    coco2 = next(r for r in again if (r["P"], r["engine"]) == (2, "cocodiff"))
    assert coco2["rel_err_vs_1gpu"] < 1e-5  # measured now, against the kept run's one-GPU reference
    assert result["resumed_rows"] == 2  # the P=2 diffusers row failed (no accelerator): it ran again
    assert cli.main([*argv, "--resume", "--iters", "2"]) == 2
    assert "had other options (iters)" in capsys.readouterr().err
    assert cli.main([*argv[:-1], str(tmp_path / "none"), "--resume"]) == 2
    assert "no earlier run" in capsys.readouterr().err
