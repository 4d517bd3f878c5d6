"""GPU-only checks (skipped without CUDA): the CUDA paths the CPU suite cannot reach.

- TAPA's multi-stream CUDA route (side streams, pipelined chunks, overlapping exchanges as under V-First)
  delivers the same bytes as flat — a buffer-reuse race once broke exactly this on H200.
- A CUDA-graph replay of the sharded step equals the eager step.
"""

import pytest
import torch

from cocodiff.apps.launch import spawn

pytestmark = pytest.mark.gpu


def _gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _tapa_cuda_equals_flat(spec):
    import torch.distributed as dist

    from cocodiff.config import ParallelConfig
    from cocodiff.exchange import FlatExchange, build_exchange, needs_groups
    from cocodiff.layout import SeqLayout, start_head_to_seq, start_seq_to_head
    from cocodiff.topology import Topology, build_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    topo = Topology.from_spec(spec, world)
    flat = FlatExchange(group=dist.group.WORLD, topology=topo, rank=rank)
    lengths = tuple([300] * (world - 1) + [257])
    lay = SeqLayout(lengths, rank)
    for chunks in (1, 3):
        cfg = ParallelConfig(all_to_all="tapa", tapa_plan="phases", tapa_chunks=chunks, topology=spec)
        route = build_exchange(cfg, topo, build_groups(topo, dist.group.WORLD, **needs_groups(cfg)), rank)
        for trial in range(5):
            xs = [torch.randn(2, lengths[rank], 2 * world, 64, device=dev, dtype=torch.bfloat16) for _ in range(3)]
            # three exchanges in flight at once (V, Q, K under V-First), waited in reverse order
            hs = [start_seq_to_head(x, lay, route) for x in xs]
            got = [h.wait() for h in reversed(hs)][::-1]
            ref = [start_seq_to_head(x, lay, flat).wait() for x in xs]
            for g, r in zip(got, ref):
                assert torch.equal(g, r), (spec, chunks, trial)
            back = start_head_to_seq(got[0], lay, route).wait()
            assert torch.equal(back, xs[0])
    return True


@pytest.mark.skipif(_gpus() < 4, reason="needs 4 GPUs")
def test_tapa_cuda_path_bit_identical_to_flat():
    assert spawn(_tapa_cuda_equals_flat, 4, "2x2", backend="nccl", timeout_s=300) == [True] * 4


def _graph_equals_eager(all_to_all="flat"):
    import torch.distributed as dist

    import cocodiff
    from cocodiff.apps import families as zoo
    from cocodiff.graph import GraphedStep

    dev = torch.device("cuda", torch.cuda.current_device())
    model = zoo.build_model("flux", "tiny", device=dev, seed=0)
    ref_model = zoo.build_model("flux", "tiny", device=dev, seed=0)
    cocodiff.parallelize(model, cocodiff.ParallelConfig(all_to_all=all_to_all, v_first=True))
    inputs = zoo.make_inputs("flux", model, rows=6, cols=5, n_txt=7, batch=2, device=dev)
    with torch.no_grad():
        eager = model(**inputs).sample
        ref = ref_model(**inputs).sample
    step = GraphedStep(model)
    graphed = step(**inputs)
    again = step(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    torch.testing.assert_close(eager, ref, rtol=1e-4, atol=1e-4)
    return dist.get_rank()


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_graph_replay_equals_eager():
    assert spawn(_graph_equals_eager, 2, backend="nccl", timeout_s=300) == [0, 1]


def _copy_engine_equals_flat():
    import torch.distributed as dist

    from cocodiff.exchange import FlatExchange
    from cocodiff.exchange.copy_engine import CopyEngineExchange
    from cocodiff.layout import SeqLayout, start_head_to_seq, start_seq_to_head
    from cocodiff.topology import Topology

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    topo = Topology((world,))
    flat = FlatExchange(group=dist.group.WORLD, topology=topo, rank=rank)
    ce = CopyEngineExchange(group=dist.group.WORLD, topology=topo, rank=rank)
    for lengths in ([300] * world, [300] * (world - 1) + [257]):
        lay = SeqLayout(tuple(lengths), rank)
        for trial in range(6):  # more exchanges than slots: the ring wraps
            xs = [torch.randn(2, lengths[rank], 2 * world, 64, device=dev, dtype=torch.bfloat16) for _ in range(3)]
            hs = [start_seq_to_head(x, lay, ce) for x in xs]  # three in flight, as under V-First
            got = [h.wait() for h in reversed(hs)][::-1]
            ref = [start_seq_to_head(x, lay, flat).wait() for x in xs]
            for g, r in zip(got, ref):
                assert torch.equal(g, r), (lengths, trial)
            assert torch.equal(start_head_to_seq(got[0], lay, ce).wait(), xs[0])
    return True


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_copy_engine_exchange_bit_identical_to_flat():
    n = min(_gpus(), 4)
    assert spawn(_copy_engine_equals_flat, n, backend="nccl", timeout_s=300) == [True] * n


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_copy_engine_step_graph_equals_eager_and_single_gpu():
    assert spawn(_graph_equals_eager, 2, "copy_engine", backend="nccl", timeout_s=300) == [0, 1]


def _fused_qk_close_to_eager():
    import torch.distributed as dist

    import cocodiff
    from cocodiff import fused_qk as kernels
    from cocodiff.apps import families as zoo

    dev = torch.device("cuda", torch.cuda.current_device())
    calls = [0]
    compiled = kernels.compiled

    def counting(fn):
        calls[0] += 1
        return compiled(fn)

    kernels.compiled = counting
    out = {}
    try:
        for fused in (False, True):
            model = zoo.build_model("flux", "tiny", device=dev, dtype=torch.bfloat16, seed=0)
            cocodiff.parallelize(model, cocodiff.ParallelConfig(v_first=True, fuse_qk=fused))
            inputs = zoo.make_inputs("flux", model, rows=8, cols=8, n_txt=7, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                out[fused] = model(**inputs).sample.float()
            assert (calls[0] > 0) == fused, (fused, calls[0])  # the compiled kernel ran exactly when asked
            del model
    finally:
        kernels.compiled = compiled
    err = ((out[True] - out[False]).norm() / out[False].norm()).item()
    assert err < 1e-2, err  # bf16 rounding of a different kernel order, not a different function
    return dist.get_rank()


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_fused_qk_kernel_close_to_eager_path():
    assert spawn(_fused_qk_close_to_eager, 2, backend="nccl", timeout_s=300) == [0, 1]


def _cuda_graph_switch():
    import torch.distributed as dist

    import cocodiff
    from cocodiff.apps import families as zoo

    dev = torch.device("cuda", torch.cuda.current_device())
    model = zoo.build_model("flux", "tiny", device=dev, seed=0)
    ref = zoo.build_model("flux", "tiny", device=dev, seed=0)
    cocodiff.parallelize(model, cocodiff.ParallelConfig(v_first=True, cuda_graph=True))
    cocodiff.parallelize(ref, cocodiff.ParallelConfig(v_first=True))
    a = zoo.make_inputs("flux", model, rows=6, cols=5, n_txt=7, batch=2, device=dev, seed=1)
    b = zoo.make_inputs("flux", model, rows=6, cols=5, n_txt=7, batch=2, device=dev, seed=2)
    with torch.no_grad():
        first = model(**a).sample  # captures
        ref(**a)
        assert model.cocodiff.step_stats.as_dict() == ref.cocodiff.step_stats.as_dict()  # one step's bytes
        second = model(**b, return_dict=False)[0]  # return_dict is part of the signature: captures again
        assert len(model.cocodiff.graphs) == 2
        third = model(**b).sample  # replays the first graph with new inputs
        assert len(model.cocodiff.graphs) == 2
        assert model.cocodiff.step_stats.as_dict() == ref.cocodiff.step_stats.as_dict()  # replays count too
        # the graph's static inputs are contiguous copies of this rank's shards, while the eager model reads
        # strided views of the full inputs: GEMMs may take another path and round differently
        torch.testing.assert_close(first, ref(**a).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, ref(**b).sample, rtol=1e-5, atol=1e-5)
        assert torch.equal(third, second)  # the same graph on the same inputs
        assert not torch.allclose(first, second)  # the replay read the new inputs
        model.cocodiff.set_schedule(v_first=False)  # a new schedule drops the graphs
        assert len(model.cocodiff.graphs) == 0
        torch.testing.assert_close(model(**a).sample, first, rtol=1e-5, atol=1e-5)
    return dist.get_rank()


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_cuda_graph_switch_replays_the_sharded_step():
    assert spawn(_cuda_graph_switch, 2, backend="nccl", timeout_s=300) == [0, 1]


def _copy_engine_grows_without_breaking_graphs():
    import torch.distributed as dist

    from cocodiff.exchange import FlatExchange
    from cocodiff.exchange.copy_engine import CopyEngineExchange
    from cocodiff.layout import SeqLayout, start_seq_to_head
    from cocodiff.topology import Topology

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    topo = Topology((world,))
    flat = FlatExchange(group=dist.group.WORLD, topology=topo, rank=rank)
    ce = CopyEngineExchange(group=dist.group.WORLD, topology=topo, rank=rank)
    small, big = SeqLayout(tuple([64] * world), rank), SeqLayout(tuple([512] * world), rank)
    x = torch.randn(1, 64, 2 * world, 32, device=dev)
    out = {}

    def step():
        out["y"] = start_seq_to_head(x, small, ce).wait().clone()

    for _ in range(2):
        step()  # eager warm-up allocates the small buffer
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        step()
    xb = torch.randn(1, 512, 2 * world, 32, device=dev)
    assert torch.equal(start_seq_to_head(xb, big, ce).wait(), start_seq_to_head(xb, big, flat).wait())  # grows
    x.copy_(torch.randn_like(x))
    g.replay()  # the graph still uses the small buffer, which must still exist
    torch.cuda.synchronize()
    assert torch.equal(out["y"], start_seq_to_head(x, small, flat).wait())
    return True


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_copy_engine_buffer_growth_keeps_captured_graphs_valid():
    assert spawn(_copy_engine_grows_without_breaking_graphs, 2, backend="nccl", timeout_s=300) == [True, True]


def _families_on_gpus():
    """Every family x {flat, V-First, V-First + CUDA graph, copy engine + V-First + graph} equals one GPU (fp32
    tiny models), Qwen-Image with padded text masks (two samples padded differently: masked attention; one
    sample: its masked keys dropped); heads that do not divide (3 ranks need 3 GPUs: here 5 heads over 2)
    included."""
    import copy

    import torch.distributed as dist

    import cocodiff
    from cocodiff.apps import families as zoo

    dev = torch.device("cuda", torch.cuda.current_device())
    configs = {
        "flat": dict(),
        "vfirst": dict(v_first=True),
        "vfirst+graph": dict(v_first=True, cuda_graph=True),
        "ce+vfirst+graph": dict(all_to_all="copy_engine", v_first=True, cuda_graph=True),
    }
    errors = {}
    for family in zoo.FAMILIES:
        for heads in (4, 5):
            over = {"num_attention_heads": heads, "attention_head_dim": 8}
            if family in ("flux", "qwenimage"):
                over["axes_dims_rope"] = (2, 2, 4)
            elif family == "flux2":
                over["axes_dims_rope"] = (2, 2, 2, 2)
            else:
                over["caption_projection_dim"] = heads * 8
            ref = zoo.build_model(family, "tiny", device=dev, seed=0, **over)
            masked = family == "qwenimage"
            a = zoo.make_inputs(family, ref, rows=6, cols=5, n_txt=7, batch=2, device=dev, seed=1, text_mask=masked)
            b = zoo.make_inputs(family, ref, rows=6, cols=5, n_txt=7, batch=2, device=dev, seed=2, text_mask=masked)
            inputs = [a, b]
            if masked:  # one sample: its masked keys are dropped and attention runs unmasked
                inputs.append(zoo.make_inputs(family, ref, rows=6, cols=5, n_txt=7, device=dev, seed=3, text_mask=True))
            with torch.no_grad():
                want = [ref(**x).sample for x in inputs]
            for name, cfg in configs.items():
                model = copy.deepcopy(ref)
                cocodiff.parallelize(model, cocodiff.ParallelConfig(**cfg))
                with torch.no_grad():  # graphs: capture, replay on new inputs, then replay each again
                    got = [model(**x).sample for x in (*inputs, *inputs)]
                for g, w in zip(got, want + want):
                    err = ((g - w).norm() / w.norm()).item()
                    if not err < 1e-4:
                        errors[f"{family}/{heads}h/{name}"] = err
                del model
    assert not errors, errors
    return dist.get_rank()


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_every_family_and_route_on_gpus_equals_one_gpu():
    assert spawn(_families_on_gpus, 2, backend="nccl", timeout_s=420) == [0, 1]


def _vmajor_graphs_equal_eager(fp8=False, compiled=False):
    """V-Major replayed as CUDA graphs (one per branch and level) equals V-Major eager, step by step, with the
    slow tier emulated (CTA-capped NCCL); every graph's eager warm-up leaves the caches as they were. With
    `compiled`, both runs compile the blocks and V-Major's own pieces (change scores; fp8 rows' quantisation, which
    recompiles with dynamic row counts at the second level, inside a graph's warm-up, never during capture)."""
    import torch.distributed as dist

    import cocodiff
    from cocodiff.apps import families as zoo

    dev = torch.device("cuda", torch.cuda.current_device())
    out = {}
    for graph in (False, True):
        model = zoo.build_model("flux", "tiny", device=dev, seed=0)
        vm = cocodiff.VMajorConfig(warmup_steps=2, levels=3, fp8=fp8)
        emu = cocodiff.SlowTierEmulation(max_ctas=1)
        cfg = cocodiff.ParallelConfig(
            topology="2x1",
            emulate_slow_tier=emu,
            v_first=True,
            v_major=vm,
            cuda_graph=graph,
            compile_blocks=compiled,
        )
        cocodiff.parallelize(model, cfg)
        inputs = zoo.make_inputs("flux", model, rows=6, cols=5, n_txt=7, device=dev, seed=1)
        out[graph] = _loop_cuda(model, inputs, steps=10)
        if graph:
            graphs = len(model.cocodiff.graphs)
            assert graphs <= 4, graphs  # full + 3 levels
    (xe, ce), (xg, cg) = out[False], out[True]
    assert ce == cg, (ce, cg)  # the same bytes per step
    torch.testing.assert_close(xg, xe, rtol=1e-4, atol=1e-5)
    return dist.get_rank()


def _loop_cuda(model, inputs, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(steps)
    model.cocodiff.steps.follow(sched)
    x = inputs["hidden_states"]
    counts = []
    for t in sched.timesteps:
        with torch.no_grad():
            v = model(**{**inputs, "hidden_states": x, "timestep": (t / 1000).expand(1).to(x.device)}).sample
        counts.append(list(model.cocodiff.step_stats.bytes_by_tier))
        x = sched.step(v, t, x, return_dict=False)[0]
    return x, counts


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-rows", "fp8-rows"])
def test_vmajor_graph_replay_equals_eager(fp8, compiled):
    assert spawn(_vmajor_graphs_equal_eager, 2, fp8, compiled, backend="nccl", timeout_s=420) == [0, 1]


def _tiny_family_on_gpu(family: str, dev):
    """A tiny model of the family on `dev`, two inputs (batch 2; Qwen-Image with a padded text mask) and its
    one-GPU outputs for them."""
    from cocodiff.apps import families as zoo

    ref = zoo.build_model(family, "tiny", device=dev, seed=0)
    if family in zoo.VIDEO_FAMILIES:
        case = dict(frames=2, rows=3, cols=5, n_txt=7, batch=2, device=dev)
        inputs = [zoo.make_video_inputs(family, ref, **case, seed=s) for s in (1, 2)]
    else:
        masked = family == "qwenimage"
        inputs = [
            zoo.make_inputs(family, ref, rows=6, cols=5, n_txt=7, batch=2, device=dev, seed=s, text_mask=masked)
            for s in (1, 2)
        ]
    with torch.no_grad():
        want = [ref(**x).sample for x in inputs]
    return ref, inputs, want


def _compiled_blocks_on_gpus():
    """compile_blocks (inductor's Triton kernels) inside the fastest one-host configuration (copy engine, V-First,
    fuse_qk, the step captured as a CUDA graph), every family, image and video: equal to one GPU; a new step
    with the same shapes traces nothing new."""
    import copy

    import torch.distributed as dist
    from torch._dynamo.utils import counters

    import cocodiff
    from cocodiff.apps import families as zoo

    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = cocodiff.ParallelConfig(
        all_to_all="copy_engine", v_first=True, fuse_qk=True, compile_blocks=True, cuda_graph=True
    )
    errors, traced = {}, {}
    for family in zoo.FAMILIES + zoo.VIDEO_FAMILIES:
        torch._dynamo.reset()
        ref, (a, b), want = _tiny_family_on_gpu(family, dev)
        model = copy.deepcopy(ref)
        cocodiff.parallelize(model, cfg)
        with torch.no_grad():
            got = [model(**a).sample]  # compile, warm up, capture
            start = counters["stats"]["unique_graphs"]
            got += [model(**x).sample for x in (b, a)]  # replays
        traced[family] = counters["stats"]["unique_graphs"] - start
        for g, w in zip(got, want + want[:1]):
            err = ((g - w).norm() / w.norm()).item()
            if not err < 1e-4:
                errors[family] = err
        del model
    assert not errors, errors
    assert not any(traced.values()), traced
    return dist.get_rank()


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_compiled_blocks_in_the_graphed_step_equal_one_gpu():
    assert spawn(_compiled_blocks_on_gpus, 2, backend="nccl", timeout_s=540) == [0, 1]


def _sharded_modulation_on_gpus():
    """shard_modulation inside the `fast` step (compiled blocks, the step captured as a CUDA graph, NCCL; FLUX.1
    also over the copy engine): every rank poisons (NaN) the modulation Linears it does not own, and the
    captured step and its replays still equal one GPU, so every layer's result came through the all-gather."""
    import copy

    import torch.distributed as dist

    import cocodiff

    dev = torch.device("cuda", torch.cuda.current_device())
    errors, counts = {}, {}
    runs = [("flux", "flat"), ("flux", "copy_engine"), ("sd3", "flat"), ("qwenimage", "flat"), ("hunyuanvideo", "flat")]
    for family, route in runs:
        torch._dynamo.reset()
        ref, (a, b), want = _tiny_family_on_gpu(family, dev)
        model = copy.deepcopy(ref)
        cocodiff.parallelize(model, cocodiff.ParallelConfig.preset("fast", all_to_all=route))
        mod = model.cocodiff.modulation
        counts[f"{family}/{route}"] = (mod.layers, len(mod.mine))
        with torch.no_grad():
            for i, lin in enumerate(mod._linears):
                if i not in mod.mine:
                    lin().weight.fill_(float("nan"))
            got = [model(**x).sample for x in (a, b, a)]  # compile, warm up, capture; then replays
        for g, w in zip(got, want + want[:1]):
            err = ((g - w).norm() / w.norm()).item()
            if not err < 1e-4:  # (NaN fails too)
                errors[f"{family}/{route}"] = err
        cocodiff.release(model)
        del model
    assert not errors, errors
    assert all(0 < mine < layers for layers, mine in counts.values()), counts
    return dist.get_rank()


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_sharded_modulation_in_the_fast_step_equals_one_gpu():
    assert spawn(_sharded_modulation_on_gpus, 2, backend="nccl", timeout_s=540) == [0, 1]


def _ring_on_gpus():
    """Ulysses x ring on CUDA: NCCL point-to-point hops, the efficient/flash kernels' log-sum-exp, V-First and
    the step captured as a CUDA graph, FLUX.1 (bf16 inputs through fp32 tiny weights: fp32 here) and
    Qwen-Image with a padded text mask; equal to one GPU."""
    import copy

    import torch.distributed as dist

    import cocodiff
    from cocodiff.apps import families as zoo

    dev = torch.device("cuda", torch.cuda.current_device())
    world = dist.get_world_size()
    errors = {}
    for family, masked in (("flux", False), ("qwenimage", True)):
        ref = zoo.build_model(family, "tiny", device=dev, seed=0)
        a, b = (
            zoo.make_inputs(family, ref, rows=6, cols=5, n_txt=7, batch=2, device=dev, seed=s, text_mask=masked)
            for s in (1, 2)
        )
        with torch.no_grad():
            want = [ref(**x).sample for x in (a, b)]
        for graph in (False, True):
            model = copy.deepcopy(ref)
            cfg = cocodiff.ParallelConfig(ring_degree=world, v_first=True, cuda_graph=graph)
            cocodiff.parallelize(model, cfg)
            with torch.no_grad():
                got = [model(**x).sample for x in (a, b, a)]
            for g, w in zip(got, want + want[:1]):
                err = ((g - w).norm() / w.norm()).item()
                if not err < 1e-4:
                    errors[f"{family}/graph={graph}"] = err
            del model
    assert not errors, errors
    return dist.get_rank()


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_ring_attention_on_gpus_equals_one_gpu():
    n = min(_gpus(), 4)
    assert spawn(_ring_on_gpus, n, backend="nccl", timeout_s=300) == list(range(n))


def _ring_vmajor_graphs_equal_eager():
    """V-Major on the ring's hops replayed as CUDA graphs (one per branch and level) equals it eager, step by
    step, with the ring's hops over the emulated slow link (2 "nodes" of 1 GPU: pure ring)."""
    import torch.distributed as dist

    import cocodiff
    from cocodiff.apps import families as zoo

    dev = torch.device("cuda", torch.cuda.current_device())
    out = {}
    for graph in (False, True):
        model = zoo.build_model("flux", "tiny", device=dev, seed=0)
        vm = cocodiff.VMajorConfig(warmup_steps=2, levels=3)
        emu = cocodiff.SlowTierEmulation(max_ctas=1)
        cfg = cocodiff.ParallelConfig(
            topology="2x1", ring_degree=2, emulate_slow_tier=emu, v_first=True, v_major=vm, cuda_graph=graph
        )
        cocodiff.parallelize(model, cfg)
        inputs = zoo.make_inputs("flux", model, rows=6, cols=5, n_txt=7, device=dev, seed=1)
        out[graph] = _loop_cuda(model, inputs, steps=10)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-5)
    return dist.get_rank()


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_ring_vmajor_graph_replay_equals_eager():
    assert spawn(_ring_vmajor_graphs_equal_eager, 2, backend="nccl", timeout_s=300) == [0, 1]


def _head_groups_on_gpus():
    """`head_chunks` on NCCL with V-First, the fused Q/K kernels writing K's send buffer per head group and the
    step captured as a CUDA graph (the `fast` preset less the compiled blocks, which change nothing here and take
    minutes to compile), every family: equal to one GPU, and to the same step with one group (the groups'
    attention is the same per-head computation)."""
    import copy

    import torch.distributed as dist

    import cocodiff
    from cocodiff.apps import families as zoo

    dev = torch.device("cuda", torch.cuda.current_device())
    errors = {}
    for family in zoo.FAMILIES + zoo.VIDEO_FAMILIES:
        torch._dynamo.reset()
        ref, (a, b), want = _tiny_family_on_gpu(family, dev)
        got = {}
        for groups in (1, 3):
            model = copy.deepcopy(ref)
            cfg = cocodiff.ParallelConfig(v_first=True, fuse_qk=True, cuda_graph=True, head_chunks=groups)
            cocodiff.parallelize(model, cfg)
            with torch.no_grad():
                got[groups] = [model(**x).sample for x in (a, b, a)]  # capture, replays
            exchanges = model.cocodiff.step_stats.exchanges
            if groups == 1:
                one = exchanges
            elif not exchanges > one:
                errors[f"{family}: groups did not run"] = (one, exchanges)
            del model
        for g, w in zip(got[3], want + want[:1]):
            err = ((g - w).norm() / w.norm()).item()
            if not err < 1e-4:
                errors[family] = err
        for g, w in zip(got[3], got[1]):
            err = ((g - w).norm() / w.norm()).item()
            if not err < 1e-5:
                errors[f"{family} vs one group"] = err
    assert not errors, errors
    return dist.get_rank()


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_head_groups_in_the_fast_step_equal_one_gpu():
    assert spawn(_head_groups_on_gpus, 2, backend="nccl", timeout_s=540) == [0, 1]


_RELEASE_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
import cocodiff
from cocodiff.apps import families as zoo

dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
model = zoo.build_model("flux", "tiny", seed=0).to(dev, torch.bfloat16)
route = sys.argv[1]
cocodiff.parallelize(model, cocodiff.ParallelConfig(all_to_all=route, v_first=True, cuda_graph=True))
inputs = zoo.make_inputs("flux", model, rows=8, cols=8, n_txt=8, device=dev, dtype=torch.bfloat16, seed=1)
with torch.no_grad():
    first = [model(**inputs).sample for _ in range(3)]  # capture, replays
    assert len(model.cocodiff.graphs) == 1
    assert cocodiff.release(model) == 1 and len(model.cocodiff.graphs) == 0
    ex = model.cocodiff.exchange
    assert getattr(ex, "_buf", None) is None and not getattr(ex, "_retired", []), "symmetric buffers kept"
    again = model(**inputs).sample  # usable after release: captures (and allocates) again
    assert torch.equal(again, first[-1]), "the step after release differs"
cocodiff.release()  # the README's order: every rank, then the group goes while the model is still alive
dist.destroy_process_group()
print("exited", dist.is_initialized(), flush=True)
"""


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("route", ["flat", "copy_engine"])
def test_a_users_script_with_graphs_exits_after_release(route, tmp_path):
    # the README's own-script pattern (torchrun, CUDA graphs, destroy_process_group at the end while the model
    # lives) must exit: graphs that captured NCCL work and outlive the group can hang its destruction
    # (pytorch/pytorch#115388); a P=2 benchmark script of this shape wrote its results and never exited
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "user_script.py"
    script.write_text(_RELEASE_SCRIPT)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), route]
    log = tmp_path / "log.txt"
    with log.open("w") as f:  # a file, not a pipe: ranks that outlive torchrun cannot block the read
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired as exc:
            ranks = _children(proc.pid)  # torchrun puts each rank in a session of its own
            proc.terminate()  # torchrun stops its ranks on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            for pid in ranks:  # whatever is left must not hold the GPUs for the next test
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"{route}: the script did not exit within 240 s: {log.read_text()[-2000:]}") from exc
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert out.count("exited False") == 2, out[-2000:]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    import os

    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return kids
