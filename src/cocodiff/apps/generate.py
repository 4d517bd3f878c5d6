"""`cocodiff generate`: images from a prompt on several ranks, from a local diffusers pipeline folder.

Under torchrun it runs in the launched processes; otherwise it starts the ranks itself (one per usable GPU on
NCCL, or CPU ranks on gloo). Every rank loads the pipeline, `cocodiff.parallelize` shards its transformer,
and every rank runs the same pipeline call with the same seed; rank 0 alone shows a progress bar and writes
the images and `generate.json` (the job, the config, time per step, bytes per tier, versions). Without
`--model` it runs the small model cocodiff ships (class-conditional: the prompt is a class name).

Everything that can be checked from the model's configs is checked before any rank starts (see
`pipelines.py`): one line, exit code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from . import faults
from .launch import run_launched, set_multi_gpu_env, spawn, under_launcher
from .pipelines import ModelInfo, check_call_options, dtype_kwargs, inspect_model, small_labels

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class GenerateJob:
    """One generation, as every rank runs it. Built and checked by `prepare` before any rank starts.

    Args:
        info: the model (`pipelines.inspect_model`).
        prompt, negative_prompt: text (the small model: a class name, or None for every class in turn).
        height, width: pixels (checked against the model).
        steps: denoising steps (None: the pipeline's default).
        guidance: `guidance_scale` (None: the pipeline's default); true_cfg: `true_cfg_scale` (FLUX.1, Qwen).
        seed: every rank seeds the same generator with it, so all ranks draw the same latents.
        num_images: images of the one pipeline call (`num_images_per_prompt`).
        dtype: "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16" or "fp16".
        max_sequence_length: the pipeline's text length (None: its default).
        config: how the transformer is parallelised.
        out: the folder rank 0 writes to.
        compare_single: rank 0 also runs an untouched copy on one process and records the difference.
        ranks: how many ranks run it; cuda: GPU ranks (NCCL) or CPU ranks (gloo).
        timeout_s: how long a rank waits in a collective for a peer before giving up.
        command: the command line, for the record.
    """

    info: ModelInfo
    prompt: str | None = None
    negative_prompt: str | None = None
    height: int
    width: int
    steps: int | None = None
    guidance: float | None = None
    true_cfg: float | None = None
    seed: int = 0
    num_images: int = 1
    dtype: str = "auto"
    max_sequence_length: int | None = None
    config: ParallelConfig = field(default_factory=ParallelConfig)
    out: str = "cocodiff-out/generate"
    compare_single: bool = False
    ranks: int = 1
    cuda: bool = False
    timeout_s: float = 120.0
    command: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("num_images", "ranks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError(f"--timeout {self.timeout_s}: must be > 0 seconds")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.info.kind == "small":
            return torch.float32
        return DTYPES[self.dtype] or (torch.bfloat16 if self.cuda else torch.float32)


def versions() -> dict:
    import diffusers

    import cocodiff

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cocodiff": cocodiff.__version__,
        "platform": platform.platform(),
    }
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _quiet_libraries(rank: int) -> None:
    """Loading bars and notices from diffusers/transformers: none on any rank (rank 0 has the one bar)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _load(job: GenerateJob, device: torch.device):
    """(pipeline or small model, its transformer)."""
    info = job.info
    if info.kind == "small":
        from .smallmodel import default_model, load_small_model

        sm = load_small_model(info.path, device=device) if info.path else default_model(device=device)
        return sm, sm.transformer
    import diffusers

    cls = getattr(diffusers, info.name)
    pipe = cls.from_pretrained(info.path, local_files_only=True, **dtype_kwargs(job.torch_dtype))
    pipe.set_progress_bar_config(disable=True)  # rank 0 shows one bar of its own, with the rank count
    return pipe.to(device), pipe.transformer


def _call_kwargs(job: GenerateJob, device: torch.device) -> dict:
    kw = dict(
        prompt=job.prompt if job.prompt is not None else "",
        height=job.height,
        width=job.width,
        num_images_per_prompt=job.num_images,
        generator=torch.Generator(device=device).manual_seed(job.seed),
        output_type="np",
    )
    for key, value in (
        ("negative_prompt", job.negative_prompt),
        ("num_inference_steps", job.steps),
        ("guidance_scale", job.guidance),
        ("true_cfg_scale", job.true_cfg),
        ("max_sequence_length", job.max_sequence_length),
    ):
        if value is not None:
            kw[key] = value
    return kw


def _run(job: GenerateJob, model, device: torch.device, on_step) -> torch.Tensor:
    """Run the job once; images (N, H, W, 3) float32 in [0, 1] on the CPU."""
    if job.info.kind == "small":
        from .smallmodel import generate

        labels = torch.tensor(small_labels(job.info, job.prompt, job.num_images))
        images = generate(model, labels, steps=job.steps or 20, seed=job.seed, callback=on_step)
        return ((images + 1) / 2).permute(0, 2, 3, 1).float().cpu()  # (N, 3, H, W) in [-1, 1] -> (N, H, W, 3)

    def callback(pipe, i, t, kwargs):
        if on_step is not None:
            on_step(i, None)
        return kwargs

    out = model(**_call_kwargs(job, device), callback_on_step_end=callback).images
    return torch.from_numpy(out).float()


def generate_rank(job: GenerateJob) -> dict | None:
    """One rank of a generation (any launcher). Rank 0 writes the outputs and returns the record."""
    from tqdm import tqdm

    from ..exchange import CommStats
    from ..parallelize import parallelize

    rank, world = dist.get_rank(), dist.get_world_size()
    fault = faults.from_env()
    if fault is not None:
        fault.trigger(rank, "setup")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        device = torch.device("cpu")
    _quiet_libraries(rank)
    t_load = time.perf_counter()
    model, transformer = _load(job, device)
    single = copy.deepcopy(model) if job.compare_single and rank == 0 else None
    target = model if job.info.kind == "pipeline" else transformer
    parallelize(target, job.config)
    engine = transformer.cocodiff
    faults.install_inside_steps(fault, transformer, rank)
    total = CommStats(engine.step_stats.tier_names)
    calls = [0]

    def count(module, args, output):
        total.add(engine.step_stats)
        calls[0] += 1

    transformer.register_forward_hook(count)
    load_s = time.perf_counter() - t_load

    step_ms: list[float] = []
    last = [time.perf_counter()]
    desc = f"{job.info.name}, {world} {device.type} ranks"
    bar = tqdm(total=job.steps, desc=desc, disable=rank != 0, file=sys.stderr, dynamic_ncols=True)

    def on_step(i, _x):
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_ms.append((now - last[0]) * 1e3)
        last[0] = now
        if bar.total is None and job.info.kind == "pipeline":
            bar.total = len(model.scheduler.timesteps)
        bar.update(1)
        if fault is not None:
            fault.trigger(rank, "between", i)

    t0 = last[0] = time.perf_counter()
    images = _run(job, model, device, on_step)
    run_s = time.perf_counter() - t0
    bar.close()
    if rank != 0:
        return None
    diff = None
    if single is not None:
        print("running the same job on one process for comparison ...", file=sys.stderr, flush=True)
        reference = _run(job, single, device, None)
        diff = float((images - reference).abs().max())
    timed = sorted(step_ms[1:] or step_ms)  # the first step includes one-time set-up
    record = {
        "model": job.info.label,
        "pipeline": job.info.name,
        "family": job.info.family,
        "heads": job.info.heads,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "height": job.height,
        "width": job.width,
        "steps": len(step_ms),
        "guidance": job.guidance,
        "true_cfg": job.true_cfg,
        "seed": job.seed,
        "num_images": job.num_images,
        "dtype": str(job.torch_dtype).removeprefix("torch."),
        "ranks": world,
        "device": device.type,
        "backend": dist.get_backend(),
        "config": {**dataclasses.asdict(job.config), "label": job.config.label},
        "topology": engine.topology.spec,
        "timings": {
            "load_s": load_s,
            "run_s": run_s,
            "ms_per_step": step_ms,
            "ms_per_step_median": timed[len(timed) // 2] if timed else None,
        },
        "transformer_calls": calls[0],
        "bytes_per_rank": {  # rank 0's sends; ranks send about the same
            "total_by_tier": dict(zip(total.tier_names, total.bytes_by_tier)),
            "per_step_by_tier": {k: v / max(1, len(step_ms)) for k, v in zip(total.tier_names, total.bytes_by_tier)},
            "output_gather_total": total.gather_bytes,
        },
        "max_abs_diff_vs_single_process": diff,
        "versions": versions(),
        "command": job.command,
    }
    record["files"] = write_outputs(job, images, record)
    return record


def write_outputs(job: GenerateJob, images: torch.Tensor, record: dict) -> list[str]:
    """image_000.png, ... (and images.png, a 4x enlarged row, for the small model) and generate.json."""
    from PIL import Image

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # (N, H, W, 3)
    files = []
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(out / f"image_{i:03d}.png")
        files.append(f"image_{i:03d}.png")
    if job.info.kind == "small":
        row = torch.from_numpy(pixels).repeat_interleave(4, 1).repeat_interleave(4, 2)  # (N, 4H, 4W, 3)
        Image.fromarray(torch.cat(list(row), dim=1).numpy()).save(out / "images.png")
        files.append("images.png")
    files.append("generate.json")
    (out / "generate.json").write_text(json.dumps({**record, "files": files}, indent=1))
    return files


def launch(job: GenerateJob) -> dict | None:
    """Run `job` on its ranks: in this process under torchrun, else on ranks this process starts.
    Returns rank 0's record (None on other torchrun ranks)."""
    if under_launcher():
        return run_launched(generate_rank, job, cuda=job.cuda, collective_timeout_s=job.timeout_s)
    if job.cuda:
        set_multi_gpu_env()
    return spawn(
        generate_rank,
        job.ranks,
        job,
        backend="nccl" if job.cuda else "gloo",
        timeout_s=max(3600.0, 20 * job.timeout_s),
        collective_timeout_s=job.timeout_s,
    )[0]


def prepare(args, *, model: str | None) -> GenerateJob:
    """The job of a `generate` (or `demo`) command line, checked before any rank starts (ValueError,
    FileNotFoundError: one line naming the option and the fix)."""
    from .cli import choose_ranks, config_from_args

    info = inspect_model(model)
    ranks, cuda, note = choose_ranks(args, info)
    config = config_from_args(args, cuda=cuda)
    if config.v_major is not None:
        from ..topology import Topology
        from ..vmajor import check_vmajor

        topology = Topology.from_spec(args.topology, ranks) if args.topology else Topology((ranks,))
        check_vmajor(config, topology, ranks)
    height, width = info.check_size(getattr(args, "height", None), getattr(args, "width", None))
    check_call_options(
        info,
        negative_prompt=getattr(args, "negative_prompt", None),
        true_cfg=getattr(args, "true_cfg", None),
        guidance=getattr(args, "guidance", None),
    )
    if info.kind == "small":
        small_labels(info, getattr(args, "prompt", None), 1)
    elif getattr(args, "prompt", None) is None:
        raise ValueError(f"--prompt is needed with a pipeline folder ({info.label}); e.g. --prompt 'a lighthouse'")
    job = GenerateJob(
        info=info,
        prompt=getattr(args, "prompt", None),
        negative_prompt=getattr(args, "negative_prompt", None),
        height=height,
        width=width,
        steps=args.steps,
        guidance=getattr(args, "guidance", None),
        true_cfg=getattr(args, "true_cfg", None),
        seed=args.seed,
        num_images=args.num_images,
        dtype=getattr(args, "dtype", "auto"),
        max_sequence_length=getattr(args, "max_sequence_length", None),
        config=config,
        out=args.out,
        compare_single=getattr(args, "compare_single", False),
        ranks=ranks,
        cuda=cuda,
        timeout_s=args.timeout,
        command=sys.argv[:],
    )
    if note:
        print(note, file=sys.stderr, flush=True)
    return job


def run_generate(args) -> int:
    """The `generate` subcommand."""
    from .cli import checked

    job = checked(prepare, args, model=args.model)
    record = launch(job)
    if record is not None:
        t = record["timings"]
        diff = record["max_abs_diff_vs_single_process"]
        print(
            f"{record['num_images']} image(s) {record['height']}x{record['width']}, {record['steps']} steps on "
            f"{record['ranks']} {record['device']} ranks ({record['config']['label']}): "
            f"{t['ms_per_step_median']:.1f} ms/step (median), {t['run_s']:.1f} s in all"
            + ("" if diff is None else f"; max |parallel - one process| = {diff:.2e}")
        )
        print(f"wrote {', '.join(str(Path(job.out) / f) for f in record['files'])}")
    return 0
