"""Every code block of README.md is run here, so the README cannot go stale.

python blocks run for real on CPU ranks: `my_script.py` under torchrun on 2 CPU ranks with a tiny saved
FluxPipeline; the API block on 4 gloo ranks with a tiny FLUX transformer standing for the names it leaves to
the reader (`transformer_or_pipeline`, `transformer`, `full_inputs`). bash blocks: `make` targets are
dry-run (`make -n`: they exist and expand), `export` must set the multi-GPU variables cocodiff sets,
`cocodiff` commands without placeholders run on CPU ranks, and commands with placeholders (`/path/to/...`,
`HOST0`, a GPU count) are parsed by cocodiff's parser and checked as far as possible before a rank would
start, on a tiny saved pipeline. A line of another kind fails the test: give it a rule here.
Blocks without a language (the layout tree) are not code.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import _tiny_pipelines as tiny
from cocodiff.apps import cli, generate
from cocodiff.apps.launch import MULTI_GPU_ENV

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The command lines of a bash block, comments dropped, continuations joined."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return tiny.save_pipeline("flux", tmp_path_factory.mktemp("readme") / "flux")


def test_the_readme_has_the_blocks_this_file_runs():
    assert len(blocks("bash")) >= 4 and len(blocks("python")) == 2
    assert sum(b.startswith("# my_script.py") for b in blocks("python")) == 1


def _check_cocodiff(argv: list[str], folder: Path, tmp_path: Path) -> None:
    """Parse with cocodiff's parser; run it on CPU ranks, or (placeholders) check it before spawning."""
    has_placeholder = any("/path/to/" in a for a in argv)
    argv = [str(folder) if "/path/to/" in a else a for a in argv]
    args = cli.build_parser().parse_args(argv)  # exits 2 on an unknown subcommand or flag
    if not has_placeholder and args.command in ("generate", "demo") and "--out" in argv:
        assert cli.main(argv + ["--ranks", "2", "--cpu", "--out", str(tmp_path / "out")]) == 0
        return
    if args.command == "generate":
        args.cpu, args.cuda_graph, args.fuse_qk = True, False, False  # GPU switches are checked on GPUs only
        assert generate.prepare(args, model=args.model).ranks == 2


@pytest.mark.slow
def test_bash_blocks(flux_folder, tmp_path):
    seen = set()
    for block in blocks("bash"):
        for line in commands(block):
            words = shlex.split(line)
            if words[0] == "make":
                target = words[1]
                proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
                assert proc.returncode == 0, f"README: `{line}`: {proc.stderr}"
                seen.add("make")
            elif words[0] == "export":
                assert dict(w.split("=", 1) for w in words[1:]) == MULTI_GPU_ENV, line
                seen.add("export")
            elif words[0] == "cocodiff":
                _check_cocodiff(words[1:], flux_folder, tmp_path)
                seen.add("cocodiff")
            elif words[0] == "torchrun":
                if "-m" in words:
                    module = words[words.index("-m") + 1]
                    assert module == "cocodiff", f"README: `{line}`: run `-m cocodiff`"
                    _check_cocodiff(words[words.index("-m") + 2 :], flux_folder, tmp_path)
                else:
                    script = next(w for w in words[1:] if w.endswith(".py"))
                    assert script == "my_script.py", f"README: `{line}`: no rule for {script}"
                    assert any(b.startswith("# my_script.py") for b in blocks("python")), line
                seen.add("torchrun")
            else:
                raise AssertionError(f"README: `{line}`: no rule in tests/test_readme.py for this command")
    assert seen == {"make", "export", "cocodiff", "torchrun"}, seen


def _api_block(code: str) -> str:
    """Run the README's API block on this rank with a tiny FLUX.1 transformer for the names it leaves open."""
    import torch

    from cocodiff.apps import families

    model = families.build_model("flux", "tiny")
    inputs = families.make_inputs("flux", model, rows=4, cols=4, n_txt=3)
    reference = model(**inputs).sample
    namespace = {"transformer_or_pipeline": model, "transformer": model, "full_inputs": inputs}
    with torch.no_grad():
        exec(compile(code, "README.md (API block)", "exec"), namespace)
    torch.testing.assert_close(namespace["out"], reference)
    return type(namespace["fast"]).__name__


def test_python_api_block(pools):
    (code,) = [b for b in blocks("python") if not b.startswith("# my_script.py")]
    assert pools(4).run(_api_block, code) == ["ParallelConfig"] * 4


@pytest.mark.slow
def test_python_my_script_block_under_torchrun(flux_folder, tmp_path):
    (code,) = [b for b in blocks("python") if b.startswith("# my_script.py")]
    (tmp_path / "my_script.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "my_script.py", str(flux_folder)]
    proc = subprocess.run(cmd + ["32"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "lighthouse.png").stat().st_size > 0
