"""Variants of one preset, side by side in one launch: which exact configuration is fastest on this machine.

Per family and size, every rank builds the full-size model once (random bf16 weights) and one more module tree per
further variant that shares its parameters and buffers (so even FLUX.2 fits once per GPU), parallelises each with
the preset plus the variant's overrides, and times them in alternating rounds (CUDA events, warm-up excluded; the
median of every round's calls per variant; the order rotates every round), so clock drift under the power cap falls
on every variant alike. The first variant is the reference: the others' relative error against its output is
recorded (exact variants differ by rounding order only). Writes OUT/config_ab_P{P}.json and a markdown table.

A variant is `NAME=KEY:VALUE,KEY:VALUE` with `ParallelConfig` fields (values as Python literals, else strings),
or `NAME=` for the preset as it is. The key `nccl_stream:high` runs that variant's engine on a process group of
its own whose NCCL stream has high priority (`ProcessGroupNCCL.Options(is_high_priority_stream=True)`): its
kernels' CTAs are scheduled before the compute's when both wait for SMs.

    torchrun --nproc-per-node 2 benchmarks/config_ab.py --out OUT --runs flux2:1024 \\
        --variants nccl= copy_engine=all_to_all:copy_engine nccl_high=nccl_stream:high
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
from pathlib import Path

GROUP_KEYS = {"nccl_stream": ("high",)}  # variant keys that pick the process group, not a ParallelConfig field


def parse_variant(spec: str) -> tuple[str, dict]:
    """`NAME=KEY:VALUE,...` -> (NAME, {KEY: value}); values are Python literals where they parse, else strings."""
    name, sep, body = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"variant {spec!r}: write NAME=KEY:VALUE,KEY:VALUE (or NAME= for the preset as it is)")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, sep, raw = item.partition(":")
        if not sep:
            raise ValueError(f"variant {spec!r}: {item!r} is not KEY:VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if key in GROUP_KEYS and value not in GROUP_KEYS[key]:
            raise ValueError(f"variant {spec!r}: {key} must be one of {GROUP_KEYS[key]}, got {value!r}")
        overrides[key] = value
    return name, overrides


def parse_variants(specs: list[str], preset: str, cpu: bool) -> dict[str, dict]:
    """Every variant parsed and its `ParallelConfig` built, so that bad input fails before any rank starts: at
    least two distinct names, fields the config knows, and `nccl_stream` only on GPU ranks."""
    from cocodiff import ParallelConfig

    variants = {}
    for spec in specs:
        name, overrides = parse_variant(spec)
        if name in variants:
            raise ValueError(f"--variants: the name {name!r} is given twice; give each variant its own name")
        if cpu and "nccl_stream" in overrides:
            raise ValueError(f"variant {spec!r}: nccl_stream needs NCCL (GPU ranks), not --cpu")
        ParallelConfig.preset(preset, **{k: v for k, v in overrides.items() if k not in GROUP_KEYS})
        variants[name] = overrides
    if len(variants) < 2:
        raise ValueError(f"--variants: give at least two, got {specs}")
    return variants


def label(config_label: str, overrides: dict) -> str:
    """The engine's config label, plus the variant's process-group choice (not a config field)."""
    return config_label + ("+nccl_high" if overrides.get("nccl_stream") == "high" else "")


def time_alternating(steps: dict, *, rounds: int, iters: int, cuda: bool) -> dict[str, list[float]]:
    """ms per call of each of `steps` (name -> callable), timed in `rounds` rounds of `iters` calls each; the order
    of the steps rotates by one every round, so that no step always runs first (right after another's calls)."""
    from cocodiff.timing import time_ms

    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name] += time_ms(steps[name], warmup=1, iters=iters, cuda=cuda)
    return times


def header(args, world: int, device, cuda: bool) -> dict:
    """The launch's description at the top of a result: ranks, preset, hardware and versions, the timing plan."""
    import torch

    return {
        "world": world,
        "preset": args.preset,
        "gpu": torch.cuda.get_device_name(device) if cuda else "CPU (gloo; checks the script, not speed)",
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "rounds": args.rounds,
        "iters": args.iters,
        "runs": [],
    }


def image_step(family: str, model, size: int, *, cuda: bool, device, dtype):
    """`step(m)`: one no-grad transformer call of `m` (the parallelised `model` or a copy of it) on inputs of a
    `size`^2 image with the family's pipeline text length (5 tokens on CPU ranks), returning the output tensor."""
    import torch

    from cocodiff.apps import families as zoo

    rows, cols = zoo.image_tokens(family, model, size, size)
    n_txt = zoo.TEXT_TOKENS_IMAGE[family] if cuda else 5
    inputs = zoo.make_inputs(family, model, rows=rows, cols=cols, n_txt=n_txt, device=device, dtype=dtype, seed=1)

    def step(m):
        with torch.no_grad():
            return m(**inputs, return_dict=False)[0]

    return step


def measure(args) -> dict:
    import copy

    import torch
    import torch.distributed as dist

    from cocodiff import ParallelConfig, parallelize, release
    from cocodiff.apps import families as zoo
    from cocodiff.timing import release_memory

    cuda = not args.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    world = dist.get_world_size()
    variants = parse_variants(args.variants, args.preset, args.cpu)
    groups = {}
    for name, overrides in variants.items():  # every rank makes the same groups in the same order
        if overrides.get("nccl_stream") == "high":
            options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
            groups[name] = dist.new_group(backend="nccl", pg_options=options)
    result = {**header(args, world, device, cuda), "variants": variants}
    for spec in args.runs:
        family, size = spec.split(":")
        size = int(size)
        base = zoo.build_model(family, args.model_size, dtype=dtype, device=device, seed=0)
        shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
        # copies of the plain model first (weights shared, modules not), then each is parallelised
        models = {name: base if i == 0 else copy.deepcopy(base, memo=dict(shared)) for i, name in enumerate(variants)}
        weights_shared = all(
            a is b for m in models.values() for a, b in zip(base.parameters(), m.parameters(), strict=True)
        )
        for name, model in models.items():
            fields = {k: v for k, v in variants[name].items() if k not in GROUP_KEYS}
            parallelize(model, ParallelConfig.preset(args.preset, **fields), group=groups.get(name))
        step = image_step(family, base, size, cuda=cuda, device=device, dtype=dtype)
        outs = {}
        for name, model in models.items():
            for _ in range(3):  # compile, capture, warm up
                outs[name] = step(model).clone()
        times = time_alternating(
            {name: (lambda m=model: step(m)) for name, model in models.items()},
            rounds=args.rounds,
            iters=args.iters,
            cuda=cuda,
        )
        ref_name = next(iter(models))
        ref = outs[ref_name].float()
        row = {
            "family": family,
            "size": size,
            "reference": ref_name,
            "ms": {name: statistics.median(t) for name, t in times.items()},
            "ms_all": times,
            "rel_error_vs_reference": {
                name: ((o.float() - ref).norm() / ref.norm()).item() for name, o in outs.items() if name != ref_name
            },
            "labels": {name: label(m.cocodiff.config.label, variants[name]) for name, m in models.items()},
            "weights_shared": weights_shared,
        }
        result["runs"].append(row)
        if dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "ms_all"}), flush=True)
        for model in models.values():
            release(model)
        del models, model, base, outs, shared, times
        release_memory()  # the next family's model is built with this one's weights freed
    return result


def markdown(result: dict) -> str:
    names = list(result["variants"])
    lines = [
        f"# Variants of preset `{result['preset']}`, P={result['world']}",
        "",
        f"{result['gpu']}, torch {result['torch']}"
        + (f", NCCL {result['nccl']}" if result.get("nccl") else "")
        + f"; ms per transformer step, median of {result['rounds']} alternating rounds x {result['iters']} calls "
        "per variant. Variants (overrides of the preset):",
        "",
    ]
    lines += [f"- `{n}`: {result['variants'][n] or 'the preset as it is'}" for n in names]
    lines += [
        "",
        "| family, size | " + " | ".join(f"{n} ms" for n in names) + " | rel. error vs the first |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for r in result["runs"]:
        errors = ", ".join(f"{n} {e:.1e}" for n, e in r["rel_error_vs_reference"].items())
        best = min(r["ms"].values())
        cells = [f"**{r['ms'][n]:.1f}**" if r["ms"][n] == best else f"{r['ms'][n]:.1f}" for n in names]
        lines.append(f"| {r['family']}, {r['size']}^2 | " + " | ".join(cells) + f" | {errors} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", nargs="+", default=["flux:1024"], help="family:size")
    ap.add_argument("--variants", nargs="+", default=["nccl=", "copy_engine=all_to_all:copy_engine"])
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--model-size", default="full", help="families' config size (tiny: with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="gloo CPU ranks (with --preset vfirst, --model-size tiny)")
    ap.add_argument("--tag", default="", help="suffix of the output files' names")
    ap.add_argument("--report", metavar="JSON", help="only write the markdown of a run's JSON into --out")
    args = ap.parse_args()
    parse_variants(args.variants, args.preset, args.cpu)  # bad input fails here, before any rank starts
    out = Path(args.out)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        out.mkdir(parents=True, exist_ok=True)
        (out / (Path(args.report).stem + ".md")).write_text(markdown(result))
        return
    import os

    from cocodiff.apps.launch import run_launched

    result = run_launched(measure, args, cuda=not args.cpu, collective_timeout_s=300)
    if int(os.environ.get("RANK", 0)) == 0:
        out.mkdir(parents=True, exist_ok=True)
        stem = f"config_ab_P{result['world']}{args.tag}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
