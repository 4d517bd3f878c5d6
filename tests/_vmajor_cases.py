"""Bodies of the V-Major and step-context tests: they run on every rank of a WorkerPool of exactly `world`
ranks (module-level, so they pickle; V-Major's node groups need the engine's group to span the world). A
denoising loop drives a tiny model of each family with diffusers' flow-matching scheduler, which the
engine's step context follows."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import cocodiff
from cocodiff.apps import families as zoo

ROWS, COLS, N_TXT = 4, 5, 5  # 25 tokens: uneven over 4 ranks (7, 6, 6, 6)


def denoise(
    model,
    family: str,
    steps: int,
    seed: int,
    *,
    batch: int = 1,
    cfg_scale: float | None = None,
    noise_rank: bool = False,
):
    """A flow-matching loop on `model`; returns (final latents, per-call slow/fast byte counts).

    With `cfg_scale`, true CFG: two calls per step (conditional, then unconditional with other text). With
    `noise_rank`, every rank perturbs its latents differently (ranks' V then differ wildly)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(steps)
    engine = getattr(model, "cocodiff", None)
    if engine is not None:
        engine.steps.follow(sched)
    inputs = zoo.make_inputs(family, model, rows=ROWS, cols=COLS, n_txt=N_TXT, batch=batch, seed=seed)
    uncond = zoo.make_inputs(family, model, rows=ROWS, cols=COLS, n_txt=N_TXT, batch=batch, seed=seed + 100)
    x = inputs["hidden_states"]
    if noise_rank:
        x = x + 10.0 * dist.get_rank() * torch.randn_like(x)
    counts = []
    for t in sched.timesteps:
        tt = (t if family == "sd3" else t / 1000).expand(batch)
        with torch.no_grad():
            v = model(**{**inputs, "hidden_states": x, "timestep": tt}).sample
            if engine is not None:
                counts.append(list(engine.step_stats.bytes_by_tier))
            if cfg_scale is not None:
                u = model(**{**uncond, "hidden_states": x, "timestep": tt}).sample
                if engine is not None:
                    counts.append(list(engine.step_stats.bytes_by_tier))
                v = u + cfg_scale * (v - u)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x, counts


def _tiny(family, seed=0):
    torch.set_num_threads(1)
    return zoo.build_model(family, "tiny", seed=seed)


def vmajor_exact_when_nothing_is_skipped(family, world, topology, vm_kwargs, steps=6):
    """V-Major with every step full (warm-up) or ratio 0 gives the exact engine's output, bit for bit."""
    model = _tiny(family)
    exact, vm = copy.deepcopy(model), copy.deepcopy(model)
    cocodiff.parallelize(exact, cocodiff.ParallelConfig(topology=topology, v_first=True))
    cfg = cocodiff.ParallelConfig(topology=topology, v_first=True, v_major=cocodiff.VMajorConfig(**vm_kwargs))
    cocodiff.parallelize(vm, cfg)
    want, _ = denoise(exact, family, steps, seed=1, batch=2)
    got, counts = denoise(vm, family, steps, seed=1, batch=2)
    assert torch.equal(got, want), (got - want).abs().max().item()
    ref, _ = denoise(model, family, steps, seed=1, batch=2)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)
    return counts


def vmajor_bytes_follow_the_schedule(family, world, topology, vm_kwargs, steps=8):
    """Per call: the slow tier's bytes equal what the schedule implies (K rows of each far block, plus V's
    carried row indices); the fast tier's bytes equal the exact engine's; outputs stay finite and close."""
    from cocodiff.layout import local_heads
    from cocodiff.vmajor import active_rows, step_ratio

    model = _tiny(family)
    exact, vm = copy.deepcopy(model), copy.deepcopy(model)
    vcfg = cocodiff.VMajorConfig(**vm_kwargs)
    cocodiff.parallelize(exact, cocodiff.ParallelConfig(topology=topology))
    cocodiff.parallelize(vm, cocodiff.ParallelConfig(topology=topology, v_major=vcfg))
    want, exact_counts = denoise(exact, family, steps, seed=2)
    engine = vm.cocodiff
    layer_rows = []
    engine.vmajor.begin_call = _recording(engine.vmajor, layer_rows)
    got, counts = denoise(vm, family, steps, seed=2)
    assert torch.isfinite(got).all()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.05, rel
    slow = len(engine.topology.tiers) - 1
    n_far = len(engine.vmajor.exchange.far)
    heads = model.config.num_attention_heads
    head_dim = model.config.attention_head_dim
    row_bytes = local_heads(heads, world) * head_dim * 4  # B=1, fp32
    sent_row = row_bytes // 4 + 4 * local_heads(heads, world) if vcfg.fp8 else row_bytes  # fp8: 1 B + a scale per head
    tensors = 4 if vcfg.output else 3
    for step, (c, e, rows) in enumerate(zip(counts, exact_counts, layer_rows)):
        sched = step_ratio(vcfg, step, steps) if step > 0 else None  # step 0 fills the caches
        if sched is None:
            assert c == e, (step, c, e)
            continue
        far = 0
        for _, l_max, _ in rows:  # per layer: its longest local sequence (joint or image-only attention)
            k = active_rows(sched[0], l_max)
            far += tensors * n_far * k * sent_row + n_far * k * 4  # + V's carried int32 row indices
            if not vcfg.output:
                far += n_far * l_max * row_bytes  # the output exchange stays whole
        assert c[slow] == far, (step, c, far)
        assert c[:slow] == e[:slow], (step, c, e)  # the fast tier is untouched
    return rel, [c[slow] for c in counts], [e[slow] for e in exact_counts]


def _recording(vm, out: list):
    """Wrap `vm.begin_call` so that each call's (layer, L_MAX, K) list is kept after the call."""
    begin = vm.begin_call

    def wrapped(*args, **kwargs):
        plan = begin(*args, **kwargs)
        out.append(vm.layer_rows)  # the list this call fills
        return plan

    return wrapped


def vmajor_ranks_with_wildly_different_v(world):
    """Every rank's latents (so its V) differ wildly: selections differ, message sizes do not; no hang."""
    model = _tiny("flux")
    cfg = cocodiff.ParallelConfig(v_major=cocodiff.VMajorConfig(warmup_steps=1, tiers="all", select_by="heads"))
    cocodiff.parallelize(model, cfg)
    out, counts = denoise(model, "flux", 6, seed=3, noise_rank=True)
    assert torch.isfinite(out).all()
    return counts


def vmajor_generations_and_branches(world):
    """Two generations in a row equal two fresh engines; true CFG's two branches keep separate caches (equal
    to one engine per branch)."""
    model = _tiny("flux")
    cfg = cocodiff.ParallelConfig(v_major=cocodiff.VMajorConfig(warmup_steps=1, tiers="all"))

    def fresh():
        m = copy.deepcopy(model)
        cocodiff.parallelize(m, cfg)
        return m

    one = fresh()
    a1, _ = denoise(one, "flux", 6, seed=4)
    b1, _ = denoise(one, "flux", 6, seed=5)
    a2, _ = denoise(fresh(), "flux", 6, seed=4)
    b2, _ = denoise(fresh(), "flux", 6, seed=5)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)
    gens = one.cocodiff.steps.current.generation
    # true CFG on one engine == the conditional and unconditional calls on two engines, one branch each
    both = fresh()
    x_cfg, counts = denoise(both, "flux", 6, seed=6, cfg_scale=3.0)
    assert both.cocodiff.steps.current.call == 1 and len(counts) == 12
    cond, uncond = fresh(), fresh()
    x_two = _two_engine_cfg(cond, uncond, steps=6, seed=6, scale=3.0)
    assert torch.equal(x_cfg, x_two)
    return gens


def _two_engine_cfg(cond, uncond, *, steps, seed, scale):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(steps)
    cond.cocodiff.steps.follow(sched)
    uncond.cocodiff.steps.follow(sched)
    a = zoo.make_inputs("flux", cond, rows=ROWS, cols=COLS, n_txt=N_TXT, batch=1, seed=seed)
    b = zoo.make_inputs("flux", cond, rows=ROWS, cols=COLS, n_txt=N_TXT, batch=1, seed=seed + 100)
    x = a["hidden_states"]
    for t in sched.timesteps:
        tt = (t / 1000).expand(1)
        with torch.no_grad():
            v = cond(**{**a, "hidden_states": x, "timestep": tt}).sample
            u = uncond(**{**b, "hidden_states": x, "timestep": tt}).sample
        x = sched.step(u + scale * (v - u), t, x, return_dict=False)[0]
    return x


def vmajor_refusals(world):
    """Clear errors, the same on every rank, before any collective of the failing call."""
    out = {}
    model = _tiny("flux")
    # no step information: the model called outside a followed scheduler, timesteps unknown run length
    m = copy.deepcopy(model)
    cocodiff.parallelize(m, cocodiff.ParallelConfig(v_major=cocodiff.VMajorConfig(tiers="all")))
    inputs = zoo.make_inputs("flux", m, rows=ROWS, cols=COLS, n_txt=N_TXT, seed=1)
    try:
        with torch.no_grad():
            m(**inputs)
        out["no_steps"] = "no error"
    except ValueError as exc:
        out["no_steps"] = str(exc)
    # warm-up longer than the run
    m = copy.deepcopy(model)
    cocodiff.parallelize(m, cocodiff.ParallelConfig(v_major=cocodiff.VMajorConfig(warmup_steps=9, tiers="all")))
    try:
        denoise(m, "flux", 4, seed=1)
        out["warmup"] = "no error"
    except ValueError as exc:
        out["warmup"] = str(exc)
    # a cache budget too small
    m = copy.deepcopy(model)
    vcfg = cocodiff.VMajorConfig(tiers="all", memory_budget_gb=1e-9)
    cocodiff.parallelize(m, cocodiff.ParallelConfig(v_major=vcfg))
    try:
        denoise(m, "flux", 4, seed=1)
        out["budget"] = "no error"
    except ValueError as exc:
        out["budget"] = str(exc)
    # the slow tier on a single-tier topology
    m = copy.deepcopy(model)
    try:
        cocodiff.parallelize(m, cocodiff.ParallelConfig(v_major=cocodiff.VMajorConfig()))
        out["single_tier"] = "no error"
    except ValueError as exc:
        out["single_tier"] = str(exc)
    return out


def step_context_over_generations(world):
    """The step context: steps and calls of two generations in a row, with and without a scheduler to follow;
    true CFG's second call is call 1 of its step."""
    model = _tiny("flux")
    cocodiff.parallelize(model, cocodiff.ParallelConfig())
    seen = []
    model.register_forward_pre_hook(lambda m, a: None)  # hooks of users stay harmless

    def record(steps, seed, cfg_scale=None):
        denoise(model, "flux", steps, seed, cfg_scale=cfg_scale)
        seen.append(model.cocodiff.steps.current)

    record(3, 1)
    record(4, 2, cfg_scale=2.0)
    first, second = seen
    assert (first.generation, first.step, first.call, first.total_steps) == (1, 2, 0, 3)
    assert (second.generation, second.step, second.call, second.total_steps) == (2, 3, 1, 4)
    # no scheduler: the timestep values mark steps and a rising one a new generation; the run length is unknown
    engine = model.cocodiff
    engine.steps.follow(None)
    inputs = zoo.make_inputs("flux", model, rows=ROWS, cols=COLS, n_txt=N_TXT, seed=1)
    trace = []
    with torch.no_grad():
        for t in (1.0, 1.0, 0.5, 0.5, 0.25, 1.0, 0.5):
            model(**{**inputs, "timestep": torch.full((1,), t)})
            c = engine.steps.current
            trace.append((c.generation, c.step, c.call, c.total_steps))
    assert trace == [
        (3, 0, 0, None),
        (3, 0, 1, None),
        (3, 1, 0, None),
        (3, 1, 1, None),
        (3, 2, 0, None),
        (4, 0, 0, None),
        (4, 1, 0, None),
    ], trace
    # begin_generation gives the run length to a loop without a scheduler
    engine.steps.begin_generation(total_steps=2)
    with torch.no_grad():
        model(**{**inputs, "timestep": torch.full((1,), 0.9)})
    c = engine.steps.current
    assert (c.generation, c.step, c.total_steps) == (5, 0, 2)
    return True


def _pipeline(family: str, transformer):
    """The family's diffusers pipeline around `transformer` (`families.pipeline_around`: embeddings given, latents
    out) at a small size, 6 steps; Qwen-Image's text gets one padded token (the text mask path)."""
    n_txt = 6 if family == "qwenimage" else 5
    pipe, kwargs = zoo.pipeline_around(family, transformer, height=64, width=80, steps=6, n_txt=n_txt)
    if family == "qwenimage":
        mask = kwargs["prompt_embeds_mask"].clone()
        mask[0, -1] = 0
        kwargs.update(prompt_embeds_mask=mask, negative_prompt_embeds_mask=mask)
    return pipe, kwargs


def pipeline_runs(family: str, vm_kwargs: dict | None):
    """The family's diffusers pipeline on these ranks (parallelised as a pipeline) and on one process:
    (max abs difference, relative error, slow-tier bytes of the run, calls per step seen, exact bytes)."""
    torch.set_num_threads(1)
    model = _tiny(family)
    single_pipe, kwargs = _pipeline(family, copy.deepcopy(model))
    ref = single_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    runs = {}
    for name, vcfg in (("exact", None), ("vmajor", vm_kwargs)):
        pipe, kwargs = _pipeline(family, copy.deepcopy(model))
        cfg = cocodiff.ParallelConfig(v_first=True, v_major=None if vcfg is None else cocodiff.VMajorConfig(**vcfg))
        cocodiff.parallelize(pipe, cfg)
        engine = pipe.transformer.cocodiff
        sent, calls = [0], []

        def count(module, args, output, engine=engine, sent=sent, calls=calls):
            sent[0] += sum(engine.step_stats.bytes_by_tier)
            calls.append(engine.steps.current.call)

        pipe.transformer.register_forward_hook(count)
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        runs[name] = (out, sent[0], max(calls) + 1)
    exact, vm = runs["exact"][0], runs["vmajor"][0]
    torch.testing.assert_close(exact, ref, rtol=1e-4, atol=2e-5)
    assert torch.isfinite(vm).all()
    rel = ((vm - ref).norm() / ref.norm()).item()
    return (vm - ref).abs().max().item(), rel, runs["vmajor"][1], runs["vmajor"][2], runs["exact"][1]


def video_vmajor(family: str):
    """V-Major on a video family (Wan, HunyuanVideo): a 6-step loop against the exact engine's; returns
    (relative difference of the final latents, bytes sent as a fraction of the exact run's)."""
    torch.set_num_threads(1)
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = _tiny(family)
    out = {}
    for name, vm in (("exact", None), ("vmajor", cocodiff.VMajorConfig(warmup_steps=1, tiers="all"))):
        m = copy.deepcopy(model)
        cocodiff.parallelize(m, cocodiff.ParallelConfig(v_first=True, v_major=vm))
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(6)
        m.cocodiff.steps.follow(sched)
        kw = zoo.make_video_inputs(family, m, frames=3, rows=3, cols=5, n_txt=6, batch=1, seed=1)
        x, sent = kw["hidden_states"], 0
        for t in sched.timesteps:
            with torch.no_grad():
                v = m(**{**kw, "hidden_states": x, "timestep": t.expand(x.shape[0])}).sample
            sent += sum(m.cocodiff.step_stats.bytes_by_tier)
            x = sched.step(v, t, x, return_dict=False)[0]
        out[name] = (x, sent)
    (xe, se), (xv, sv) = out["exact"], out["vmajor"]
    assert torch.isfinite(xv).all()
    return ((xv - xe).norm() / xe.norm()).item(), sv / se


def compiled_pipeline_runs(family: str, vm_kwargs: dict | None):
    """The family's pipeline with compiled blocks (TorchDynamo, "aot_eager") on these ranks: exact (and with V-Major
    when `vm_kwargs`) against one process, and the graphs traced so far after each denoising step. Returns
    (relative error, that count per step)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.set_num_threads(1)
    model = _tiny(family)
    single_pipe, kwargs = _pipeline(family, copy.deepcopy(model))
    ref = single_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe, kwargs = _pipeline(family, copy.deepcopy(model))
    vm = None if vm_kwargs is None else cocodiff.VMajorConfig(**vm_kwargs)
    cfg = cocodiff.ParallelConfig(
        v_first=True, v_major=vm, compile_blocks=True, compile_options={"backend": "aot_eager"}
    )
    cocodiff.parallelize(pipe, cfg)
    graphs = []
    pipe.transformer.register_forward_hook(lambda m, a, o: graphs.append(counters["stats"]["unique_graphs"]))
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    if vm is None:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item(), graphs


def ring_vmajor_run(family, world, ring, topology, vm_kwargs, steps=8):
    """V-Major on the ring's hops (Ulysses x ring): a denoising loop against the exact Ulysses x ring engine.
    Full steps (warm-up, the last) equal the exact engine's bytes; selective steps send fewer ring bytes, the
    Ulysses exchanges' bytes never change; the result stays close. Returns (relative error, ring bytes per call
    with V-Major, ring bytes per call exact, Ulysses bytes equal on every call)."""
    model = _tiny(family)
    exact, vm = copy.deepcopy(model), copy.deepcopy(model)
    cocodiff.parallelize(exact, cocodiff.ParallelConfig(ring_degree=ring, topology=topology, v_first=True))
    vcfg = cocodiff.VMajorConfig(**vm_kwargs)
    cocodiff.parallelize(vm, cocodiff.ParallelConfig(ring_degree=ring, topology=topology, v_first=True, v_major=vcfg))
    ring_bytes = {"exact": [], "vmajor": []}
    tiers = {"exact": [], "vmajor": []}

    def recorder(name):
        def hook(mod, args, out):  # returns None: the output is left as it is
            ring_bytes[name].append(mod.cocodiff.step_stats.ring_bytes)
            tiers[name].append(list(mod.cocodiff.step_stats.bytes_by_tier))

        return hook

    for name, m in (("exact", exact), ("vmajor", vm)):
        m.register_forward_hook(recorder(name))
    want, _ = denoise(exact, family, steps, seed=2)
    got, _ = denoise(vm, family, steps, seed=2)
    assert torch.isfinite(got).all()
    rel = ((got - want).norm() / want.norm()).item()
    return rel, ring_bytes["vmajor"], ring_bytes["exact"], tiers["vmajor"] == tiers["exact"]


# ops that only make a new view of a tensor: no kernel on a GPU
_VIEW_OPS = {
    "view",
    "_unsafe_view",
    "select",
    "slice",
    "expand",
    "alias",
    "unsqueeze",
    "squeeze",
    "detach",
    "t",
    "permute",
    "transpose",
    "as_strided",
    "reshape",
    "split",
    "split_with_sizes",
    "unbind",
    "narrow",
}


def vmajor_ops_per_layer(world: int) -> tuple[float, dict]:
    """Tensor ops beyond views that a selective V-Major call dispatches, per attention layer, above the exact
    engine's (tiny FLUX.1, eager, 2 emulated nodes of 1 rank): each is a small kernel on the step's critical
    path on a GPU. Returns (ops per layer, extra count per op name, layers)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _VIEW_OPS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    from diffusers import FlowMatchEulerDiscreteScheduler

    model = _tiny("flux")
    counts = {}
    for name in ("exact", "vmajor"):
        m = copy.deepcopy(model)
        vm = cocodiff.VMajorConfig(warmup_steps=1) if name == "vmajor" else None
        cocodiff.parallelize(m, cocodiff.ParallelConfig(topology=f"2x{world // 2}", v_first=True, v_major=vm))
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(4)
        m.cocodiff.steps.follow(sched)
        inputs = zoo.make_inputs("flux", m, rows=ROWS, cols=COLS, n_txt=N_TXT, seed=1)
        x = inputs["hidden_states"]
        for step, t in enumerate(sched.timesteps):
            count = Count()
            with torch.no_grad(), count:
                v = m(**{**inputs, "hidden_states": x, "timestep": (t / 1000).expand(1)}).sample
            if step == 2:  # a selective step (step 0 fills the caches, step 1 is past the warm-up)
                counts[name] = count.ops
            x = sched.step(v, t, x, return_dict=False)[0]
    layers = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    extra = counts["vmajor"] - counts["exact"]
    return sum(extra.values()) / layers, dict(extra), layers
