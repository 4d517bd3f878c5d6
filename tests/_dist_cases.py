"""Bodies of the distributed tests: they run on every rank of a WorkerPool (module-level, so they pickle).

Each returns something small (or raises: an assertion error on any rank fails the test with its traceback).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import cocodiff
from cocodiff.apps import families as zoo
from cocodiff.exchange import FlatExchange
from cocodiff.layout import SeqLayout, split_sizes, start_head_to_seq, start_seq_to_head
from cocodiff.topology import Topology

_GROUPS: dict[int, object] = {}


def subgroup(world: int):
    """A group of ranks [0, world) (created collectively, cached: every rank calls in the same order)."""
    if world == dist.get_world_size():
        return dist.group.WORLD
    if world not in _GROUPS:
        _GROUPS[world] = dist.new_group(list(range(world)))
    return _GROUPS[world]


def _exchange_setup(world, lengths, B, H, D, seed):
    group = subgroup(world)
    rank = dist.get_rank()
    if rank >= world:
        return None
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, sum(lengths), H, D, generator=g)  # same on every rank
    lay = SeqLayout(tuple(lengths), rank)
    exchange = FlatExchange(group=group, topology=Topology((world,)), rank=rank)
    off = sum(lengths[:rank])
    local = full[:, off : off + lengths[rank]].contiguous()
    return group, rank, full, lay, exchange, local


def exchange_matches_gather_reference(world, lengths, B=2, H=4, D=3, seed=0):
    """seq->head equals a reference built by all-gathering the local slices and slicing this rank's heads."""
    setup = _exchange_setup(world, lengths, B, H, D, seed)
    if setup is None:
        return None
    group, rank, full, lay, exchange, local = setup
    got = start_seq_to_head(local, lay, exchange).wait()  # (B, H_LOCAL, S, D)
    # reference: real all-gather of the (padded) local slices, then slice
    l_max = max(lengths)
    padded = torch.zeros(B, l_max, H, D)
    padded[:, : lengths[rank]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    gathered = torch.cat([p[:, :n] for p, n in zip(parts, lengths)], dim=1)  # (B, S, H, D)
    hl = H // world
    ref = gathered[:, :, rank * hl : (rank + 1) * hl].permute(0, 2, 1, 3)
    assert torch.equal(got, ref), "seq->head differs from the gather+slice reference"
    assert torch.equal(gathered, full)
    # byte accounting: (P - 1) padded blocks leave this rank
    block = l_max * B * hl * D * 4
    assert exchange.stats.bytes_by_tier == [(world - 1) * block], (exchange.stats.bytes_by_tier, block)
    return True


def exchange_producer_paths(world, lengths, H, B=1, D=3, seed=2):
    """The paths that save the exchanges their pack copies deliver what the packing paths do, bit for bit:
    a kernel's result in the send layout (`pack_tokens`, as `fused_qk.run` returns it), streams written side
    by side (`SendSpec.parts`), an attention output that is token-major in memory (sent in place, when the
    layout is uniform) and an output unpacked into a slice of a wider buffer (`into`)."""
    from cocodiff.layout import (
        ChunkedOutput,
        SendBlocks,
        SendSpec,
        pack_head_to_seq,
        pack_seq_to_head,
        pack_tokens,
        start_head_to_seq_chunk,
        start_seq_to_head_chunks,
    )

    setup = _exchange_setup(world, lengths, B, H, D, seed)
    if setup is None:
        return None
    group, rank, full, lay, exchange, local = setup
    ref = start_seq_to_head(local, lay, exchange).wait()  # (B, H_LOCAL, S, D)
    blocks = pack_tokens(local, world, lay.l_max)
    assert torch.equal(blocks, pack_seq_to_head(local, lay, exchange))
    assert torch.equal(start_seq_to_head(SendBlocks(blocks, H), lay, exchange).wait(), ref)
    cut = local.shape[1] // 2
    joined = SendSpec(lay, exchange).parts([local[:, :cut], local[:, cut:]])
    assert isinstance(joined, SendBlocks) == (H % world == 0)  # padded heads: the concatenation instead
    assert torch.equal(start_seq_to_head(joined, lay, exchange).wait(), ref)
    # the attention output, token-major in memory as flash kernels write it: (S, B, H_LOCAL, D) viewed as
    # (B, H_LOCAL, S, D)
    o = ref.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    send = pack_head_to_seq(o, lay, exchange)
    assert (send.data_ptr() == o.data_ptr()) == (lay.uniform and B == 1)  # sent in place: no pack copy
    back = start_head_to_seq(o, lay, exchange, heads=H).wait()
    assert torch.equal(back, local)
    wide = torch.full((B, local.shape[1], H * D + 5), float("nan"))
    into = wide[..., 2 : 2 + H * D]
    got = start_head_to_seq(o, lay, exchange, heads=H, into=into).wait()
    assert got is into and torch.equal(into, local.flatten(2, 3))
    assert wide[..., :2].isnan().all() and wide[..., 2 + H * D :].isnan().all()  # nothing written beside it
    # head groups (`head_chunks`): one send buffer per group of this rank's heads, written by the kernel or packed;
    # each group's exchange delivers its heads, and the groups' outputs land where one exchange puts them
    h_local = ref.shape[1]
    chunks = h_local
    grouped = pack_tokens(local, world, lay.l_max, chunks)
    assert torch.equal(grouped, pack_seq_to_head(local, lay, exchange, chunks))
    for x in (local, SendBlocks(grouped, H, chunks)):
        parts = [h.wait() for h in start_seq_to_head_chunks(x, lay, exchange, chunks)]
        assert torch.equal(torch.cat(parts, dim=1), ref)
    for into in (None, wide[..., 2 : 2 + H * D]):
        wide.fill_(float("nan"))
        out = ChunkedOutput(lay, o, batch=B, h_local=h_local, head_dim=D, heads=H, chunks=chunks, into=into)
        for h in [start_head_to_seq_chunk(o[:, i : i + 1].contiguous(), lay, exchange, out, i) for i in range(chunks)]:
            h.wait()
        got = out.result()
        assert torch.equal(got, local.flatten(2, 3)) and (into is None or got is into)
        assert wide[..., :2].isnan().all() and wide[..., 2 + H * D :].isnan().all()
    return True


def exchange_round_trip(world, lengths, B=2, H=4, D=3, seed=1):
    """head->seq(seq->head(x)) is the identity, bit for bit."""
    setup = _exchange_setup(world, lengths, B, H, D, seed)
    if setup is None:
        return None
    group, rank, full, lay, exchange, local = setup
    heads = start_seq_to_head(local, lay, exchange).wait()
    back = start_head_to_seq(heads, lay, exchange).wait()
    assert back.shape == local.shape
    assert torch.equal(back, local)
    return True


def reference_and_parallel(family, group, cfg):
    """(single-process model, its parallelised copy) with the same tiny weights; one thread per rank."""
    torch.set_num_threads(1)
    model = zoo.build_model(family, "tiny", seed=0)
    par = copy.deepcopy(model)
    cocodiff.parallelize(par, cfg, group=group)
    return model, par


def model_matches_single_process(family, world, v_first, cases):
    """The parallel model's output equals the single-process output for every (rows, cols, n_txt, batch)."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    model, par = reference_and_parallel(family, group, cocodiff.ParallelConfig(v_first=v_first))
    diffs = []
    for rows, cols, n_txt, batch, *rest in cases:
        mask = bool(rest and rest[0])
        inputs = zoo.make_inputs(
            family, model, rows=rows, cols=cols, n_txt=n_txt, batch=batch, seed=rows * 31 + cols, text_mask=mask
        )
        with torch.no_grad():
            ref = model(**inputs).sample
            out = par(**inputs).sample
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
        assert par.cocodiff.step_stats.exchanges > 0
        diffs.append((out - ref).abs().max().item())
    return diffs


def ranks_disagree(world):
    """Rank 1 calls with a different image size: every rank must raise a clear error, none may hang."""
    group = subgroup(world)
    rank = dist.get_rank()
    if rank >= world:
        return None
    model = zoo.build_model("flux", "tiny", seed=0)
    cocodiff.parallelize(model, cocodiff.ParallelConfig(), group=group)
    cols = 4 if rank != 1 else 5
    inputs = zoo.make_inputs("flux", model, rows=4, cols=cols, n_txt=4)
    try:
        with torch.no_grad():
            model(**inputs)
    except ValueError as exc:
        return str(exc)
    return "no error"


def bad_heads(world):
    """Fewer heads than ranks without a ring (ring_degree=1): ValueError at parallelize, naming heads and degree,
    before any collective."""
    model = zoo.build_model("flux", "tiny", seed=0, num_attention_heads=3, attention_head_dim=8)
    try:
        cocodiff.parallelize(model, cocodiff.ParallelConfig(ring_degree=1))
    except ValueError as exc:
        return str(exc)
    return "no error"


def layout_sizes(n, world):
    return split_sizes(n, world)


def tapa_equals_flat(world, spec, lengths, chunks_list=(1, 3), emulate=False, B=2, H=None, D=3, seed=2):
    """TAPA (and the emulated fair flat) deliver the same bytes to the same place as the flat exchange:
    seq->head and head->seq, bit for bit."""
    from cocodiff.config import ParallelConfig, SlowTierEmulation
    from cocodiff.exchange import build_exchange, needs_groups
    from cocodiff.topology import build_groups

    group = subgroup(world)
    rank = dist.get_rank()
    if rank >= world:
        return None
    H = H or 2 * world
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, sum(lengths), H, D, generator=g)
    lay = SeqLayout(tuple(lengths), rank)
    topo = Topology.from_spec(spec, world)
    flat = FlatExchange(group=group, topology=topo, rank=rank)
    off = sum(lengths[:rank])
    local = full[:, off : off + lengths[rank]].contiguous()
    ref_heads = start_seq_to_head(local, lay, flat).wait()
    ref_back = start_head_to_seq(ref_heads, lay, flat).wait()
    checked = []
    emu = SlowTierEmulation() if emulate else None
    configs = [
        ParallelConfig(all_to_all="tapa", tapa_plan="phases", tapa_chunks=c, topology=spec, emulate_slow_tier=emu)
        for c in chunks_list
    ]
    if emulate:
        configs.append(ParallelConfig(all_to_all="flat", topology=spec, emulate_slow_tier=emu))
    for cfg in configs:
        route = build_exchange(cfg, topo, build_groups(topo, group, **needs_groups(cfg)), rank)
        stats = route.stats
        heads = start_seq_to_head(local, lay, route).wait()
        assert torch.equal(heads, ref_heads), (spec, cfg.tapa_chunks, cfg.all_to_all)
        back = start_head_to_seq(heads, lay, route).wait()
        assert torch.equal(back, ref_back) and torch.equal(back, local)
        checked.append((route.name, list(stats.bytes_by_tier), list(stats.messages_by_tier)))
    return checked


def model_with_config(family, world, cfg_kwargs, cases):
    """Like model_matches_single_process, for any ParallelConfig (e.g. preset "tapa" on a 2x2 topology)."""
    from cocodiff.config import ParallelConfig, SlowTierEmulation

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    kwargs = dict(cfg_kwargs)
    if kwargs.pop("emulate", False):
        kwargs["emulate_slow_tier"] = SlowTierEmulation()
    preset = kwargs.pop("preset", None)
    cfg = ParallelConfig.preset(preset, **kwargs) if preset else ParallelConfig(**kwargs)
    model, par = reference_and_parallel(family, group, cfg)
    diffs = []
    for rows, cols, n_txt, batch in cases:
        inputs = zoo.make_inputs(family, model, rows=rows, cols=cols, n_txt=n_txt, batch=batch, seed=rows + cols)
        with torch.no_grad():
            ref = model(**inputs).sample
            out = par(**inputs).sample
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
        diffs.append((out - ref).abs().max().item())
    decisions = getattr(par.cocodiff.exchange, "decisions", {})
    return diffs, sorted(set(decisions.values())), par.cocodiff.step_stats.as_dict()


def _flux_on(world, **cfg):
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None, None
    model = zoo.build_model("flux", "tiny", seed=0)
    cocodiff.parallelize(model, cocodiff.ParallelConfig(**cfg), group=group)
    return model, group


def memory_budget_refused(world):
    """A budget too small for the exchange buffers: every rank raises the same error, none hangs."""
    model, _ = _flux_on(world, memory_budget_gb=1e-7)
    if model is None:
        return None
    try:
        with torch.no_grad():
            model(**zoo.make_inputs("flux", model, rows=4, cols=4, n_txt=4))
    except ValueError as exc:
        return str(exc)
    return "no error"


def dtype_mismatch_refused(world):
    model, _ = _flux_on(world)
    if model is None:
        return None
    inputs = zoo.make_inputs("flux", model, rows=4, cols=4, n_txt=4)
    inputs["hidden_states"] = inputs["hidden_states"].double()
    try:
        model(**inputs)
    except TypeError as exc:
        return str(exc)
    return "no error"


def inputs_diverge_later(world):
    """With check_inputs="every_call", ranks whose second call differs are caught at that call."""
    model, _ = _flux_on(world, check_inputs="every_call")
    if model is None:
        return None
    with torch.no_grad():
        model(**zoo.make_inputs("flux", model, rows=4, cols=4, n_txt=4))
        cols = 5 if dist.get_rank() == 1 else 4
        try:
            model(**zoo.make_inputs("flux", model, rows=4, cols=cols, n_txt=4))
        except ValueError as exc:
            return str(exc)
    return "no error"


def generate_twice(world, seed_a, seed_b):
    """The small model's images on `world` ranks for two seeds (same config, same process)."""
    from cocodiff.apps.smallmodel import generate, random_small_model

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    sm = random_small_model(seed=0)
    cocodiff.parallelize(sm.transformer, cocodiff.ParallelConfig(v_first=True), group=group)
    labels = torch.zeros(2, dtype=torch.long)
    a = generate(sm, labels, steps=3, seed=seed_a)
    b = generate(sm, labels, steps=3, seed=seed_b)
    return a, b


def heads_config(family: str, heads: int, head_dim: int) -> dict:
    """Tiny-config overrides giving `heads` heads of `head_dim` (RoPE axes and projections that follow)."""
    over = dict(num_attention_heads=heads, attention_head_dim=head_dim)
    if family == "flux":
        over["axes_dims_rope"] = (head_dim // 4, head_dim // 4, head_dim // 2)
    elif family == "qwenimage":
        over["axes_dims_rope"] = (head_dim // 4, head_dim // 4, head_dim // 2)
    elif family == "flux2":
        over["axes_dims_rope"] = (head_dim // 4,) * 4
    elif family == "sd3":
        over["caption_projection_dim"] = heads * head_dim
    return over


def property_case(case: dict):
    """One generated case: the parallel model equals the single-process model, or a clear ValueError is
    raised on every participating rank before any collective."""
    world = case["world"]
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    fam = case["family"]
    model = zoo.build_model(fam, "tiny", seed=case["seed"], **heads_config(fam, case["heads"], case["head_dim"]))
    par = copy.deepcopy(model)
    # the invalid cases have fewer heads than ranks and no ring (with ring_degree=None a ring would take the rest)
    ring = {} if case.get("valid", True) else {"ring_degree": 1}
    cfg = cocodiff.ParallelConfig(topology=case["spec"], **case["config"], **ring)
    try:
        cocodiff.parallelize(par, cfg, group=group)
    except ValueError as exc:
        return ("error", str(exc))
    inputs = zoo.make_inputs(
        fam, model, rows=case["rows"], cols=case["cols"], n_txt=case["n_txt"], batch=case["batch"], seed=case["seed"]
    )
    with torch.no_grad():
        ref = model(**inputs).sample
        out = par(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=3e-5)
    return ("ok", (out - ref).abs().max().item())


def one_rank_bad_input(world):
    """Only rank 1 passes float64 inputs: rank 1 raises its TypeError, the others a ValueError naming it."""
    model, _ = _flux_on(world)
    if model is None:
        return None
    inputs = zoo.make_inputs("flux", model, rows=4, cols=4, n_txt=4)
    if dist.get_rank() == 1:
        inputs["hidden_states"] = inputs["hidden_states"].double()
    try:
        with torch.no_grad():
            model(**inputs)
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def fused_projections_refused(world):
    """Fused QKV projections are refused at parallelize, on every rank, before any engine exists."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    model = zoo.build_model("flux", "tiny", seed=0)
    if dist.get_rank() == 0:
        model.fuse_qkv_projections()  # only one rank is wrong: the others must still raise
    before = {n: type(m.processor).__name__ for n, m in model.named_modules() if hasattr(m, "processor")}
    try:
        cocodiff.parallelize(model, cocodiff.ParallelConfig(), group=group)
    except ValueError as exc:
        after = {n: type(m.processor).__name__ for n, m in model.named_modules() if hasattr(m, "processor")}
        return str(exc), before == after, getattr(model, "cocodiff", None) is None
    return "no error", None, None


def overlap_output_order(family, world):
    """Where the MLP branch of a single-stream block runs: with overlap_output its activation runs while
    exchanges are in flight (FLUX.1: the first half under V/Q/K's, the second under the output's; FLUX.2:
    the SwiGLU gate under V/Q/K's), without it with none in flight. Both orders give the same output (up to
    the rounding of half-width GEMMs). Returns {overlap_output: [exchanges in flight at each activation]}."""
    from cocodiff import exchange as comm

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    model = zoo.build_model(family, "tiny", seed=0)
    cocodiff.parallelize(model, cocodiff.ParallelConfig(v_first=True), group=group)
    eng = model.cocodiff
    block = model.single_transformer_blocks[0]
    act = block.act_mlp if family == "flux" else block.attn.mlp_act_fn.gate_fn
    waited = [0]
    original_wait = comm.Handle.wait

    def counting_wait(self):
        waited[0] += not self._done
        return original_wait(self)

    seen = {}
    block.register_forward_pre_hook(lambda m, a: seen.update(block=eng.stats.exchanges - waited[0], act=[]))
    act.register_forward_pre_hook(lambda m, a: seen["act"].append(eng.stats.exchanges - waited[0] - seen["block"]))
    inputs = zoo.make_inputs(family, model, rows=3, cols=5, n_txt=5, batch=2, seed=3)
    res = {}
    comm.Handle.wait = counting_wait
    try:
        for overlap in (False, True):
            eng.set_schedule(overlap_output=overlap)
            with torch.no_grad():
                out = model(**inputs).sample
            res[overlap] = (seen["act"], out)
    finally:
        comm.Handle.wait = original_wait
    torch.testing.assert_close(res[False][1], res[True][1], rtol=1e-5, atol=1e-6)
    return {k: v[0] for k, v in res.items()}


def hooked_projection_called_whole(family, world):
    """A hooked (or LoRA-wrapped) projection is never replaced by weight slices: a forward hook that changes
    the single blocks' MLP/fused projection output must act the same in the parallel model under V-First
    and overlap_output. Returns the max abs difference against the single process."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    model = zoo.build_model(family, "tiny", seed=0)
    for block in model.single_transformer_blocks:
        proj = block.proj_mlp if family == "flux" else block.attn.to_qkv_mlp_proj
        proj.register_forward_hook(lambda m, a, out: out * 1.5 + 0.25)
    par = copy.deepcopy(model)
    cocodiff.parallelize(par, cocodiff.ParallelConfig(v_first=True), group=group)
    inputs = zoo.make_inputs(family, model, rows=3, cols=5, n_txt=5, batch=1, seed=4)
    with torch.no_grad():
        ref = model(**inputs).sample
        out = par(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return (out - ref).abs().max().item()


def fused_qk_path_matches(family, world):
    """`fuse_qk` wiring on CPU ranks: the fused path is forced on (its uncompiled reference stands in for the
    CUDA kernel) and must reproduce the single-process model; returns (max diff, fused calls)."""
    from cocodiff import fused_qk as kernels

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    model, par = reference_and_parallel(family, group, cocodiff.ParallelConfig(v_first=True, fuse_qk=True))
    calls = [0]

    def uncompiled(fn):
        calls[0] += 1
        return fn

    saved = kernels.fused_device, kernels.compiled
    kernels.fused_device, kernels.compiled = (lambda x: True), uncompiled
    try:
        inputs = zoo.make_inputs(family, model, rows=3, cols=5, n_txt=5, batch=2, seed=5)
        with torch.no_grad():
            ref = model(**inputs).sample
            out = par(**inputs).sample
    finally:
        kernels.fused_device, kernels.compiled = saved
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return (out - ref).abs().max().item(), calls[0]


def gpu_options_refused_on_cpu_ranks(world):
    """GPU-only engine options on gloo ranks: every rank raises the same clear error, nothing is installed."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    msgs = []
    for cfg in (cocodiff.ParallelConfig(cuda_graph=True), cocodiff.ParallelConfig(all_to_all="copy_engine")):
        model = zoo.build_model("flux", "tiny", seed=0)
        try:
            cocodiff.parallelize(model, cfg, group=group)
            msgs.append("no error")
        except ValueError as exc:
            assert getattr(model, "cocodiff", None) is None
            msgs.append(str(exc))
    return msgs


def forward_wrapper_after_parallelize(world):
    """What `cuda_graph=True` does to the model, minus CUDA: `model.forward` replaced by a (*args, **kwargs)
    wrapper after parallelize. The sharding hooks must still bind the call (by the model's own signature),
    split the inputs and gather the output: the result equals the single process."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    model, par = reference_and_parallel("flux", group, cocodiff.ParallelConfig(v_first=True))
    inner = par.forward
    seen = []

    def wrapper(*args, **kwargs):
        seen.append(kwargs["hidden_states"].shape[1])  # the wrapper sees this rank's shard
        return inner(*args, **kwargs)

    par.forward = wrapper
    inputs = zoo.make_inputs("flux", model, rows=3, cols=5, n_txt=5, batch=2, seed=6)
    with torch.no_grad():
        ref = model(**inputs).sample
        out = par(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return seen


def hosts_compared(world):
    """The agreement all-gather of parallelize also compares host names when an option needs one host."""
    import socket
    from unittest import mock

    from cocodiff.parallelize import _raise_together

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    out = []
    with mock.patch.object(socket, "gethostname", return_value=f"host{dist.get_rank(group)}"):
        for same_host in (None, "all_to_all='copy_engine'"):
            try:
                _raise_together(None, group, torch.device("cpu"), same_host=same_host)
                out.append("ok")
            except ValueError as exc:
                out.append(str(exc))
    return out


def wrapped_single_blocks_kept(world):
    """A single-stream block whose forward is already wrapped (as diffusers' hooks do) keeps its wrapper:
    parallelize warns and does not replace it; the output still equals the single process."""
    import warnings

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    model = zoo.build_model("flux", "tiny", seed=0)
    par = copy.deepcopy(model)
    block = par.single_transformer_blocks[0]
    calls = [0]
    own = block.forward

    def hooked(*args, **kwargs):
        calls[0] += 1
        return own(*args, **kwargs)

    block.forward = hooked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cocodiff.parallelize(par, cocodiff.ParallelConfig(v_first=True), group=group)
    inputs = zoo.make_inputs("flux", model, rows=3, cols=5, n_txt=5, batch=1, seed=7)
    with torch.no_grad():
        ref = model(**inputs).sample
        out = par(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return calls[0], [str(w.message) for w in caught if "wrapped forward" in str(w.message)]


def _eager_recorder():
    """A `StepGraphs` whose "replay" re-runs the step eagerly on the static inputs: the `cuda_graph=True` switch's
    logic on CPU ranks."""
    from cocodiff.exchange import CommStats
    from cocodiff.graph import StepGraphs

    class EagerRecorder(StepGraphs):
        def _warm_up(self, static_args, static_kwargs):
            for _ in range(self.warmup):
                self.fn(*static_args, **static_kwargs)

        def _record(self, static_args, static_kwargs):
            static_out = self.fn(*static_args, **static_kwargs)
            recorder = self

            class Replay:
                def replay(self):
                    # a real replay runs no Python: keep the byte counters as they are
                    kept = CommStats(recorder.stats.tier_names)
                    kept.add(recorder.stats)
                    fresh = recorder.fn(*static_args, **static_kwargs)
                    static_out[0].copy_(fresh[0])
                    recorder.stats.reset()
                    recorder.stats.add(kept)

            return Replay(), static_out

    return EagerRecorder


def deleted_model_is_freed(world, cfg: dict, graphs: bool):
    """Whether a parallelised model that ran a few steps, and its engine, are freed as soon as the model's last
    reference goes (with the cycle collector off): [model alive, engine alive, any weight alive, engine alive
    after a collection]. Nothing of ours may point back at them in a cycle, or a deleted model's weights, CUDA
    graphs and exchange buffers stay on the GPU until Python's collector happens to run."""
    import gc
    import weakref

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    cfg = dict(cfg)
    if "v_major" in cfg:
        cfg["v_major"] = cocodiff.VMajorConfig(**cfg["v_major"])
    gc.collect()
    gc.disable()
    try:
        model = zoo.build_model("flux", "tiny", seed=0)
        cocodiff.parallelize(model, cocodiff.ParallelConfig(**cfg), group=group)
        if graphs:
            model.cocodiff.install_graphs(model, _eager_recorder())
        if "v_major" in cfg:
            model.cocodiff.steps.begin_generation(total_steps=3)
        inputs = zoo.make_inputs("flux", model, rows=4, cols=5, n_txt=5, seed=3)
        with torch.no_grad():
            for _ in range(3):  # V-Major: one exact step, then two that select
                model(**inputs)
        refs = [weakref.ref(model), weakref.ref(model.cocodiff)]  # the engine holds the graphs and buffers
        weights = [weakref.ref(p) for p in model.parameters()]
        del model
        alive = [r() is not None for r in refs] + [any(w() is not None for w in weights)]
    finally:
        gc.enable()
    gc.collect()
    alive.append(refs[1]() is not None)
    dist.barrier(group)
    return alive


def _recorded_flux(world):
    """A tiny FLUX.1 and a V-First copy of it parallelised over the first `world` ranks, its `cuda_graph` switch
    run by the eager recorder: (model, parallelised copy, its graphs, group), or None on the other ranks."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    model = zoo.build_model("flux", "tiny", seed=0)
    par = copy.deepcopy(model)
    cocodiff.parallelize(par, cocodiff.ParallelConfig(v_first=True), group=group)
    return model, par, par.cocodiff.install_graphs(par, _eager_recorder()), group


def cuda_graph_switch_logic(world):
    """The `cuda_graph=True` switch's bookkeeping on CPU ranks: a recorder that "replays" by re-running the
    step eagerly on the static inputs stands in for CUDA graphs. Checks the per-signature capture, that a
    replay reads new inputs and returns a copy, the byte counts under replay, that a schedule change drops
    the graphs, and the clear refusal with gradients on."""
    setup = _recorded_flux(world)
    if setup is None:
        return None
    model, par, graphs, group = setup
    plain = copy.deepcopy(model)
    cocodiff.parallelize(plain, cocodiff.ParallelConfig(v_first=True), group=group)
    a = zoo.make_inputs("flux", model, rows=3, cols=5, n_txt=5, batch=2, seed=8)
    b = zoo.make_inputs("flux", model, rows=3, cols=5, n_txt=5, batch=2, seed=9)
    with torch.no_grad():
        plain(**a)
        one_step = plain.cocodiff.step_stats.as_dict()
        first = par(**a, return_dict=False)[0]  # captures
        assert len(graphs) == 1 and par.cocodiff.step_stats.as_dict() == one_step
        second = par(**b, return_dict=False)[0]  # replays on new inputs
        assert len(graphs) == 1 and par.cocodiff.step_stats.as_dict() == one_step
        torch.testing.assert_close(first, model(**a).sample, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(second, model(**b).sample, rtol=1e-4, atol=2e-5)
        third = par(**a, return_dict=False)[0]
        assert torch.equal(third, first) and not torch.equal(second, first)  # outputs are copies
        par(**a)  # return_dict=True: another signature
        assert len(graphs) == 2
        par.cocodiff.set_schedule(v_first=False)
        assert len(graphs) == 0
    try:
        par(**a)  # gradients on: refused before any collective
        return "no error with gradients enabled"
    except ValueError as exc:
        assert "inference-only" in str(exc), exc
    assert len(graphs) == 0
    return True


def release_logic(world):
    """`cocodiff.release`: drops every graph captured over a model (the engine's switch and a `GraphedStep`-like
    holder registered with it), keeps the model usable (the next call captures again, same output), finds the
    transformer of a pipeline, and counts what it released; a model never parallelised releases nothing."""
    import types

    from cocodiff.exchange import CommStats

    setup = _recorded_flux(world)
    if setup is None:
        return None
    model, par, graphs, group = setup
    EagerRecorder = type(graphs)
    # stands in for a GraphedStep over the model (CUDA only)
    held = EagerRecorder(lambda x: (x * 2,), stats=CommStats(("local",)))
    par.cocodiff.external_graphs.add(held)
    inputs = zoo.make_inputs("flux", model, rows=3, cols=5, n_txt=5, seed=4)
    with torch.no_grad():
        first = par(**inputs, return_dict=False)[0]
        held(torch.ones(2))
        assert len(graphs) == 1 and len(held) == 1
        assert cocodiff.release(par) == 1
        assert len(graphs) == 0 and len(held) == 0
        again = par(**inputs, return_dict=False)[0]  # captures again
        assert len(graphs) == 1 and torch.equal(again, first)
        torch.testing.assert_close(again, model(**inputs).sample, rtol=1e-4, atol=2e-5)
        assert cocodiff.release(types.SimpleNamespace(transformer=par)) == 1 and len(graphs) == 0
        par(**inputs)
        assert cocodiff.release() >= 1 and len(graphs) == 0  # every engine of this process
    assert cocodiff.release(model) == 0  # never parallelised
    try:
        cocodiff.release(object())
        return "no error for an object without a transformer"
    except TypeError as exc:
        assert "transformer" in str(exc), exc
    dist.barrier(group)
    return True


def uneven_heads_match(family, world, heads=10):
    """Heads that do not divide over the ranks (padded with zero heads) give the single-process output."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    model = zoo.build_model(family, "tiny", seed=0, **heads_config(family, heads, 8))
    par = copy.deepcopy(model)
    cocodiff.parallelize(par, cocodiff.ParallelConfig(v_first=True), group=group)
    inputs = zoo.make_inputs(family, model, rows=3, cols=5, n_txt=5, batch=2, seed=11)
    with torch.no_grad():
        ref = model(**inputs).sample
        out = par(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return (out - ref).abs().max().item()


# ---- video families (tests/test_video.py) ---------------------------------------------------------------
def _video_config(cfg_kwargs):
    kwargs = dict(cfg_kwargs)
    preset = kwargs.pop("preset", None)
    return cocodiff.ParallelConfig.preset(preset, **kwargs) if preset else cocodiff.ParallelConfig(**kwargs)


def video_matches_single_process(family, size, world, cfg_kwargs, cases):
    """A video model (config `size`) sharded over `world` ranks with `ParallelConfig(**cfg_kwargs)` equals the
    single-process model for every case (`make_video_inputs` arguments); returns the max differences and the
    last call's byte counts."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    model = zoo.build_model(family, size, seed=0)
    par = copy.deepcopy(model)
    cocodiff.parallelize(par, _video_config(cfg_kwargs), group=group)
    diffs = []
    for case in cases:
        inputs = zoo.make_video_inputs(family, model, **case)
        with torch.no_grad():
            ref = model(**inputs).sample
            out = par(**inputs).sample
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
        assert par.cocodiff.step_stats.exchanges > 0
        diffs.append((out - ref).abs().max().item())
    return diffs, par.cocodiff.step_stats.as_dict()


def _attempt(fn):
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def video_refusals(world):
    """Inputs and models the video plans cannot shard exactly: every rank raises the same clear ValueError
    (before any exchange), none hangs. Returns {case: message}."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    out = {}
    wan = zoo.build_model("wan", "tiny", seed=0)
    cocodiff.parallelize(wan, cocodiff.ParallelConfig(), group=group)
    good = zoo.make_video_inputs("wan", wan, frames=2, rows=2, cols=3, n_txt=5, per_token_timestep=True)
    one_token = zoo.make_video_inputs("wan", wan, frames=1, rows=1, cols=1, n_txt=5, per_token_timestep=True)

    def call(model, inputs):
        def run():
            with torch.no_grad():
                model(**inputs)

        return run

    out["wan_timestep_length"] = _attempt(call(wan, {**good, "timestep": good["timestep"][:, :-1]}))
    out["wan_timestep_tokens"] = _attempt(call(wan, one_token))
    out["wan_4d"] = _attempt(call(wan, {**good, "hidden_states": good["hidden_states"][:, :, 0]}))
    with torch.no_grad():  # still usable after refusals
        wan(**good)
    hv = zoo.build_model("hunyuanvideo", "tiny", seed=0)
    cocodiff.parallelize(hv, cocodiff.ParallelConfig(), group=group)
    few = zoo.make_video_inputs("hunyuanvideo", hv, frames=2, rows=2, cols=3, n_txt=world - 1)
    out["hunyuan_text_tokens"] = _attempt(call(hv, few))
    ok = zoo.make_video_inputs("hunyuanvideo", hv, frames=2, rows=2, cols=3, n_txt=6)
    out["hunyuan_mask"] = _attempt(call(hv, {**ok, "encoder_attention_mask": ok["encoder_attention_mask"][:, :-1]}))
    # set-up refusals: fewer heads than ranks without a ring (the cross-attention's heads are not sharded: not named),
    # fused projections
    odd = zoo.build_model("wan", "tiny", seed=0, num_attention_heads=3, attention_head_dim=6)
    out["wan_heads"] = _attempt(lambda: cocodiff.parallelize(odd, cocodiff.ParallelConfig(ring_degree=1), group=group))
    out["wan_sharded_attentions"] = sorted({n.rsplit(".", 1)[-1] for n, _ in wan.cocodiff.plan.attention_modules(wan)})
    fused = zoo.build_model("wan", "tiny", seed=0)
    fused.fuse_qkv_projections()
    out["wan_fused"] = _attempt(lambda: cocodiff.parallelize(fused, cocodiff.ParallelConfig(), group=group))
    small = zoo.build_model("wan", "tiny", seed=0)
    cocodiff.parallelize(small, cocodiff.ParallelConfig(memory_budget_gb=1e-7), group=group)
    out["wan_memory"] = _attempt(call(small, good))
    return out


def video_fused_qk_path(family, world, case):
    """`fuse_qk` wiring of a video family on CPU ranks: the fused path is forced on (the uncompiled reference
    stands in for the compiled CUDA kernel) and must reproduce the single-process model (diffusers' eager
    norms and RoPE); returns (max diff, fused calls)."""
    from cocodiff import fused_qk as kernels

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    calls = [0]

    def uncompiled(fn):
        calls[0] += 1
        return fn

    model = zoo.build_model(family, "tiny", seed=0)
    par = copy.deepcopy(model)
    cocodiff.parallelize(par, cocodiff.ParallelConfig(v_first=True, fuse_qk=True), group=group)
    saved = kernels.fused_device, kernels.compiled
    kernels.fused_device, kernels.compiled = (lambda x: True), uncompiled
    try:
        inputs = zoo.make_video_inputs(family, model, **case)
        with torch.no_grad():
            ref = model(**inputs).sample
            out = par(**inputs).sample
    finally:
        kernels.fused_device, kernels.compiled = saved
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return (out - ref).abs().max().item(), calls[0]


def hunyuan_single_block_overlap(world):
    """HunyuanVideo's single blocks under `overlap_output`: the MLP activation runs while exchanges are in flight
    (first half under V/Q/K's, second under the output's), without it with none in flight; both equal the single
    process, also when `proj_mlp` is hooked (then called whole) and when the attention projects its output. Returns
    {(variant, overlap): [exchanges in flight at each activation]}."""
    from cocodiff import exchange as comm

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    model = zoo.build_model("hunyuanvideo", "tiny", seed=0)
    hooked = copy.deepcopy(model)
    for block in hooked.single_transformer_blocks:
        block.proj_mlp.register_forward_hook(lambda m, a, out: out * 1.5 + 0.25)
    # single-block attentions given an output projection (diffusers' processor applies one when present): the
    # attention output then comes back projected and is copied into proj_out's input by the block
    projected = copy.deepcopy(model)
    for block in projected.single_transformer_blocks:
        dim = block.attn.inner_dim
        block.attn.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])
    inputs = zoo.make_video_inputs("hunyuanvideo", model, frames=2, rows=3, cols=5, n_txt=5, batch=2, text_mask=True)
    waited = [0]
    original_wait = comm.Handle.wait

    def counting_wait(self):
        waited[0] += not self._done
        return original_wait(self)

    res = {}
    comm.Handle.wait = counting_wait
    try:
        for name, single in (("plain", model), ("hooked", hooked), ("projected", projected)):
            par = copy.deepcopy(single)
            cocodiff.parallelize(par, cocodiff.ParallelConfig(v_first=True), group=group)
            eng, block, seen = par.cocodiff, par.single_transformer_blocks[0], {}
            block.register_forward_pre_hook(lambda m, a: seen.update(block=eng.stats.exchanges - waited[0], act=[]))
            block.act_mlp.register_forward_pre_hook(
                lambda m, a: seen["act"].append(eng.stats.exchanges - waited[0] - seen["block"])
            )
            with torch.no_grad():
                ref = single(**inputs).sample
                for overlap in (False, True):
                    eng.set_schedule(overlap_output=overlap)
                    out = par(**inputs).sample
                    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
                    res[(name, overlap)] = seen["act"]
    finally:
        comm.Handle.wait = original_wait
    return res


def _tiny_wan_pipeline(two_experts: bool):
    """A WanPipeline of tiny components built from configs (no tokenizer or text encoder: the prompts come as
    embeddings); the same weights on every rank."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=zoo.build_model("wan", "tiny", seed=0),
        transformer_2=zoo.build_model("wan", "tiny", seed=1) if two_experts else None,
        boundary_ratio=0.5 if two_experts else None,
    )


def wan_pipeline_matches_single_process(world, two_experts=False, cfg_kwargs=None):
    """A tiny WanPipeline, text-to-video with CFG, end to end (denoising loop and VAE decode) on `world` ranks
    through `cocodiff.parallelize(pipe, cfg)`, equals the same pipeline in one process. With `two_experts`,
    Wan 2.2's high-/low-noise pair (`transformer_2`, `boundary_ratio`). Returns (max diff of the frames,
    transformer calls that exchanged on each expert)."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    ref_pipe, pipe = _tiny_wan_pipeline(two_experts), _tiny_wan_pipeline(two_experts)
    cocodiff.parallelize(pipe, _video_config(cfg_kwargs or {"v_first": True}), group=group)
    experts = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
    calls = [0] * len(experts)
    for i, m in enumerate(experts):
        m.register_forward_hook(
            lambda mod, a, o, i=i: calls.__setitem__(i, calls[i] + (mod.cocodiff.stats.exchanges > 0))
        )
    g = torch.Generator().manual_seed(5)
    embeds = torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    kwargs = dict(
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        height=48,
        width=80,  # latent 3 x 6 x 10 -> 3 x 3 x 5 = 45 tokens: uneven over 2 and 4 ranks
        num_frames=9,
        num_inference_steps=4 if two_experts else 2,
        guidance_scale=4.0,
        output_type="pt",
    )
    with torch.no_grad():
        ref = ref_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return (out - ref).abs().max().item(), calls


def hunyuan_pipeline_matches_single_process(world):
    """A tiny HunyuanVideoPipeline (padded prompt embeddings with their mask, as its Llama encoder gives them;
    no text encoders) end to end on `world` ranks equals one process. Returns (max diff, sharded calls)."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)

    def build():
        torch.manual_seed(0)
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        ).eval()
        return HunyuanVideoPipeline(
            text_encoder=None,
            tokenizer=None,
            transformer=zoo.build_model("hunyuanvideo", "tiny", seed=0),
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder_2=None,
            tokenizer_2=None,
        )

    ref_pipe, pipe = build(), build()
    cocodiff.parallelize(pipe, cocodiff.ParallelConfig(v_first=True), group=group)
    calls = [0]
    pipe.transformer.register_forward_hook(
        lambda m, a, o: calls.__setitem__(0, calls[0] + (m.cocodiff.stats.exchanges > 0))
    )
    g = torch.Generator().manual_seed(6)
    mask = torch.ones(1, 9, dtype=torch.long)
    mask[:, 6:] = 0  # the prompt's last 3 tokens are padding
    kwargs = dict(
        prompt_embeds=torch.randn(1, 9, 16, generator=g),
        pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        prompt_attention_mask=mask,
        height=48,
        width=80,  # latent 3 x 6 x 10 -> 3 x 3 x 5 = 45 video tokens
        num_frames=9,
        num_inference_steps=2,
        output_type="pt",
    )
    with torch.no_grad():
        ref = ref_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return (out - ref).abs().max().item(), calls[0]


def compiled_blocks_match(family, world, cfg_kwargs, cases, video=False, user_compile=False):
    """`compile_blocks=True` (TorchDynamo with the "aot_eager" backend: the tracing, graph cuts and guards of
    inductor without its code generation) equals the single-process model; repeating a case with new values
    (as a denoising step does) traces nothing new. With `user_compile`, the blocks are compiled by diffusers'
    own `compile_repeated_blocks` after `parallelize` instead. Returns (blocks compiled, max differences,
    graphs traced by the first calls, graphs traced by the repeats, the names of the block pieces compiled inside
    our attention processors: `compiled.compiled_piece`)."""
    from torch._dynamo.utils import counters

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch._dynamo.reset()  # fresh caches: code objects are shared with other tests in this process
    torch.set_num_threads(1)
    model = zoo.build_model(family, "tiny", seed=0)
    par = copy.deepcopy(model)
    if user_compile:
        cocodiff.parallelize(par, cocodiff.ParallelConfig(**cfg_kwargs), group=group)
        par.compile_repeated_blocks(backend="aot_eager", dynamic=False)
        blocks = None
    else:
        cfg = cocodiff.ParallelConfig(compile_blocks=True, compile_options={"backend": "aot_eager"}, **cfg_kwargs)
        cocodiff.parallelize(par, cfg, group=group)
        blocks = par.cocodiff.compiled_blocks

    def make(case, seed):
        if video:
            return zoo.make_video_inputs(family, model, **{**case, "seed": seed})
        rows, cols, n_txt, batch = case
        return zoo.make_inputs(family, model, rows=rows, cols=cols, n_txt=n_txt, batch=batch, seed=seed)

    def compare(inputs):
        with torch.no_grad():
            ref = model(**inputs).sample
            out = par(**inputs).sample
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
        return (out - ref).abs().max().item()

    start = counters["stats"]["unique_graphs"]
    diffs = [compare(make(case, seed=i)) for i, case in enumerate(cases)]
    first = counters["stats"]["unique_graphs"] - start
    diffs += [compare(make(case, seed=100 + i)) for i, case in enumerate(cases)]
    repeats = counters["stats"]["unique_graphs"] - start - first
    pieces = sorted(fn.__name__ for fn, _ in getattr(par.cocodiff, "_compiled_pieces", {}))
    return blocks, diffs, first, repeats, pieces


def inductor_blocks_match(world):
    """compile_blocks with inductor itself (C++ kernels on CPU ranks) on tiny FLUX.1: equal to one process."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch._dynamo.reset()
    model, par = reference_and_parallel("flux", group, cocodiff.ParallelConfig(v_first=True, compile_blocks=True))
    inputs = zoo.make_inputs("flux", model, rows=4, cols=6, n_txt=5, batch=1, seed=0)
    with torch.no_grad():
        out, ref = par(**inputs).sample, model(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return (out - ref).abs().max().item()


def ring_matches(family, world, cfg_kwargs, cases, heads=None, video=False):
    """Ulysses x ring (`ParallelConfig(**cfg_kwargs)`, `heads` heads of width 8 if given) equals the single
    process for every case (`make_inputs` (rows, cols, n_txt, batch, text_mask) tuples, or `make_video_inputs`
    dicts); returns (max differences, (Ulysses degree, ring degree), the config label)."""
    from torch._dynamo.utils import counters  # noqa: F401  (compiled cases reset Dynamo below)

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch._dynamo.reset()
    torch.set_num_threads(1)
    over = {} if heads is None else heads_config(family, heads, 8)
    model = zoo.build_model(family, "tiny", seed=0, **over)
    par = copy.deepcopy(model)
    kwargs = dict(cfg_kwargs)
    if kwargs.pop("emulate", False):
        kwargs["emulate_slow_tier"] = cocodiff.SlowTierEmulation()
    cfg = cocodiff.ParallelConfig(**kwargs)
    cocodiff.parallelize(par, cfg, group=group)
    diffs = []
    for i, case in enumerate(cases):
        if video:
            inputs = zoo.make_video_inputs(family, model, **case)
        else:
            rows, cols, n_txt, batch, mask = case
            inputs = zoo.make_inputs(
                family, model, rows=rows, cols=cols, n_txt=n_txt, batch=batch, seed=i, text_mask=mask
            )
        with torch.no_grad():
            ref = model(**inputs).sample
            out = par(**inputs).sample
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
        diffs.append((out - ref).abs().max().item())
    eng = par.cocodiff
    degrees = (eng.heads_world, 1 if eng.ring is None else eng.ring.degree)
    phases = sorted(eng.groups.tiers)  # TAPA: the tiers with a phase group inside this rank's Ulysses group
    return diffs, degrees, cfg.label, eng.topology.spec, phases, type(eng.exchange).__name__, eng.step_stats.ring_bytes


def ring_refusals(world):
    """What a ring dimension does not run with yet, and a degree that does not divide: one clear ValueError."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    out = {}
    for name, kwargs in {
        "vmajor-fp8": dict(ring_degree=2, topology="2x2", v_major=cocodiff.VMajorConfig(fp8=True)),
        "not-a-divisor": dict(ring_degree=3),
    }.items():
        try:
            model = zoo.build_model("flux", "tiny", seed=0)
            cocodiff.parallelize(model, cocodiff.ParallelConfig(**kwargs), group=group)
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    return out


def flux128_one_step(world):
    """One transformer call of the shipped 4096-token model (flux128) on `world` ranks: its output on rank 0."""
    from cocodiff.apps.smallmodel import load_small_model, velocity

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    sm = load_small_model("flux128")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4096, 12, generator=g)
    if world > 1:
        cocodiff.parallelize(sm.transformer, cocodiff.ParallelConfig(v_first=True), group=group)
    with torch.no_grad():
        out = velocity(sm, x, torch.tensor([0.3, 0.8]), torch.tensor([0, 5]))
    return out if dist.get_rank() == 0 else None


def qwen_text_mask_paths(world, v_first):
    """Qwen-Image with padded text masks on `world` ranks against one process: one sample (its padded keys are
    dropped, attention unmasked), two samples with the same mask (the same), two that differ (masked attention).
    Returns [(max abs diff, engine.text_masked)] per case."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    model, par = reference_and_parallel("qwenimage", group, cocodiff.ParallelConfig(v_first=v_first))
    out = []
    for batch, masked in ((1, [2]), (2, [3, 3]), (2, [1, 3])):
        inputs = zoo.make_inputs("qwenimage", model, rows=3, cols=5, n_txt=7, batch=batch, seed=5)
        mask = torch.ones(batch, 7, dtype=torch.bool)
        for b, n in enumerate(masked):
            mask[b, 7 - n :] = False
        inputs["encoder_hidden_states_mask"] = mask
        with torch.no_grad():
            ref = model(**inputs).sample
            got = par(**inputs).sample
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)
        out.append(((got - ref).abs().max().item(), par.cocodiff.text_masked))
    return out


def head_groups_match(family, world, heads, chunks, fuse=False, video=False):
    """`head_chunks`: K's exchange, the attention and the output's exchange in groups of each rank's heads give
    the one-group output bit for bit, and the single-process output; returns (max diff vs one process, exchanges
    per call with one group, with `chunks`). With `fuse` the fused Q/K path is forced on (its uncompiled reference
    stands in for the CUDA kernel), so K's send buffer is written per group by the kernel's packing step."""
    from cocodiff import fused_qk as kernels

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    if video:
        model = zoo.build_model(family, "tiny", seed=0, num_attention_heads=heads)
        inputs = zoo.make_video_inputs(family, model, frames=3, rows=3, cols=5, n_txt=7, batch=2, seed=7)
    else:
        model = zoo.build_model(family, "tiny", seed=0, **heads_config(family, heads, 8))
        inputs = zoo.make_inputs(family, model, rows=3, cols=5, n_txt=5, batch=2, seed=7)
    outs, exchanges = [], []
    saved = kernels.fused_device, kernels.compiled
    if fuse:
        kernels.fused_device, kernels.compiled = (lambda x: True), (lambda fn: fn)
    try:
        for n in (1, chunks):
            par = copy.deepcopy(model)
            cfg = cocodiff.ParallelConfig(v_first=True, fuse_qk=fuse, head_chunks=n)
            cocodiff.parallelize(par, cfg, group=group)
            with torch.no_grad():
                outs.append(par(**inputs).sample)
            exchanges.append(par.cocodiff.step_stats.exchanges)
        with torch.no_grad():
            ref = model(**inputs).sample
    finally:
        kernels.fused_device, kernels.compiled = saved
    assert torch.equal(outs[0], outs[1]), "head groups changed the output"
    torch.testing.assert_close(outs[1], ref, rtol=1e-4, atol=2e-5)
    return (outs[1] - ref).abs().max().item(), exchanges[0], exchanges[1]


def sharded_modulation(family, world, shard=True, compiled=False, video=False):
    """`shard_modulation`: every rank poisons (NaN) the weights of the modulation Linears it does not own; the
    output must still equal the single process, so each layer's result came from its owner through the
    all-gather. With `shard=False` the same poisoning must show in the output (the check can fail). Returns
    (layers sharded, this rank's layer count, whether the output is finite, max difference or None,
    bit-equal to the replicated run)."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch._dynamo.reset()
    torch.set_num_threads(1)
    model = zoo.build_model(family, "tiny", seed=0)
    extra = dict(compile_blocks=True, compile_options={"backend": "aot_eager"}) if compiled else {}
    par = copy.deepcopy(model)
    cocodiff.parallelize(par, cocodiff.ParallelConfig(v_first=True, shard_modulation=shard, **extra), group=group)
    plain = copy.deepcopy(model)
    cocodiff.parallelize(plain, cocodiff.ParallelConfig(v_first=True, shard_modulation=False), group=group)
    if video:
        inputs, other = (
            zoo.make_video_inputs(family, model, frames=2, rows=3, cols=4, n_txt=6, batch=2, seed=s) for s in (3, 4)
        )
    else:
        inputs, other = (zoo.make_inputs(family, model, rows=3, cols=5, n_txt=5, batch=2, seed=s) for s in (3, 4))
    with torch.no_grad():
        replicated = plain(**inputs).sample
    mod = par.cocodiff.modulation
    if shard:
        layers, mine = mod.layers, len(mod.mine)
        poisoned = [ref() for i, ref in enumerate(mod._linears) if i not in mod.mine]
    else:
        assert mod is None
        from cocodiff.sharding import resolve_modules

        found = [m for p in par.cocodiff.plan.modulation.linears for _, m in resolve_modules(par, p)]
        layers, mine = len(found), 0
        poisoned = found[:1] if dist.get_rank() == 0 else []  # one rank, one layer: enough without sharding
    with torch.no_grad():
        for m in poisoned:
            m.weight.fill_(float("nan"))
        ref = model(**inputs).sample
        out = par(**inputs).sample
        # a second call with other values (another step's timestep) must read its own gather
        ref2, out2 = model(**other).sample, par(**other).sample
    finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(out2).all())
    if not finite:
        return layers, mine, False, None, False
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=2e-5)
    if shard and mod.mine:  # after the call a Linear computes itself again (no stale result)
        assert not mod.gathered
        lin = mod._linears[mod.mine[0]]()
        x = torch.randn(2, lin.in_features)
        with torch.no_grad():
            assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    return layers, mine, True, (out - ref).abs().max().item(), torch.equal(out, replicated)


def modulation_compiles_every_block_alike(world):
    """With compiled blocks (TorchDynamo, aot_eager), sharded modulation traces as many graphs as replicated, on
    a model with more blocks than Dynamo's recompile limit (a per-layer constant in the Linears' forward would
    retrace every block). Returns (graphs sharded, graphs replicated, blocks)."""
    from torch._dynamo.utils import counters

    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    model = zoo.build_model("flux", "tiny", seed=0, num_layers=6, num_single_layers=12)
    inputs = zoo.make_inputs("flux", model, rows=3, cols=4, n_txt=4, batch=1, seed=5)
    graphs = []
    for shard in (True, False):
        torch._dynamo.reset()
        par = copy.deepcopy(model)
        cfg = cocodiff.ParallelConfig(
            v_first=True, compile_blocks=True, compile_options={"backend": "aot_eager"}, shard_modulation=shard
        )
        cocodiff.parallelize(par, cfg, group=group)
        start = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            out = par(**inputs).sample
            ref = model(**inputs).sample
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
        graphs.append(counters["stats"]["unique_graphs"] - start)
    return graphs[0], graphs[1], 18


def modulation_applies(world):
    """Models whose Linears take other inputs than silu(temb) are not sharded (Qwen-Image's zero_cond_t,
    HunyuanVideo-I2V's token-replace blocks) and still equal the single process; a hook on one rank's Linear only
    makes every rank raise at parallelize. Returns (zero_cond_t sharded?, token_replace sharded?, the errors)."""
    group = subgroup(world)
    if dist.get_rank() >= world:
        return None
    torch.set_num_threads(1)
    sharded = []
    for family, overrides in (
        ("qwenimage", {"zero_cond_t": True}),
        ("hunyuanvideo", {"image_condition_type": "token_replace"}),
    ):
        model = zoo.build_model(family, "tiny", seed=0, **overrides)
        par = copy.deepcopy(model)
        cocodiff.parallelize(par, cocodiff.ParallelConfig(v_first=True), group=group)
        sharded.append(par.cocodiff.modulation is not None)
    model = zoo.build_model("flux", "tiny", seed=0)
    if dist.get_rank() == 0:
        model.transformer_blocks[0].norm1.linear.register_forward_hook(lambda *a: None)
    try:
        cocodiff.parallelize(model, cocodiff.ParallelConfig(), group=group)
        error = None
    except ValueError as exc:
        error = str(exc)
    return sharded[0], sharded[1], error
