"""`parallelize(obj, config)`: shard a diffusers transformer (or a pipeline's transformer) over a process group.

After it returns, every rank calls the model exactly as a single-GPU user would, with the full inputs, and
every rank receives the full output. Ranks must agree on those inputs: a pipeline guarantees it when every
rank uses the same prompt, the same settings and a generator seeded identically (or latents broadcast
from rank 0); with `ParallelConfig(check_inputs=True)` the first call verifies that the shapes agree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .compat import warn_if_untested
from .config import ParallelConfig
from .engine import UlyssesEngine
from .exchange import all_gather_into, check_route, needs_groups, needs_one_host
from .layout import local_heads
from .models import plan_for
from .models.joint import check_unfused
from .ring import split_degree
from .topology import Topology, build_groups, check_groups, slow_link_options


def _find_transformer(obj, what: str = "parallelize") -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer
    raise TypeError(
        f"cocodiff.{what}: expected a diffusers transformer or a pipeline with a `.transformer`, "
        f"got {type(obj).__name__}"
    )


def _second_transformer(obj, model: nn.Module) -> nn.Module | None:
    """A pipeline's second transformer (Wan 2.2 A14B: the low-noise expert, `transformer_2`), sharded with
    the first so that every denoising step runs parallel."""
    second = getattr(obj, "transformer_2", None) if obj is not model else None
    return second if isinstance(second, nn.Module) and second is not model else None


def _group_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _covers(topology: Topology, ulysses: int) -> bool:
    try:
        topology.inner(ulysses)
    except ValueError:
        return False
    return True


def _validate(obj, config: ParallelConfig, group, world: int, device: torch.device):
    model = _find_transformer(obj)
    if getattr(model, "cocodiff", None) is not None:
        raise ValueError("cocodiff.parallelize: this model is already parallelised")
    plan = plan_for(model)
    topology = Topology.resolve(config.topology, world, dist.get_process_group_ranks(group))
    attentions = plan.attention_modules(model)
    heads_min = min((attn.heads for _, attn in attentions), default=world)
    inner = config.ring_placement == "ulysses_inner"
    ulysses, ring = split_degree(world, heads_min, config.ring_degree, fits=lambda u: not inner or _covers(topology, u))
    for name, attn in attentions:
        heads = attn.heads
        if heads < ulysses:
            # heads that do not divide are padded (layout.py); fewer heads than ranks would leave ranks idle
            raise ValueError(
                f"cocodiff.parallelize: attention {name!r} has {heads} heads, fewer than the Ulysses degree "
                f"{ulysses} (ring_degree={config.ring_degree}); use ring_degree=None (automatic: Ulysses takes what "
                f"the heads allow, a ring the rest) or a Ulysses degree of at most {heads}"
            )
        check_unfused(attn)
    if ring > 1:
        config.check_ring()  # options that do not compose with a ring yet
        if inner:
            topology.inner(ulysses)  # raises when the Ulysses groups would not cover whole inner tiers
        if world != dist.get_world_size():
            raise ValueError(
                "cocodiff.parallelize: a ring dimension needs the group to be the whole world (its sub-groups are "
                "created by every rank); pass group=None"
            )
    if config.cuda_graph and device.type != "cuda":
        raise ValueError(
            f"cocodiff.parallelize: cuda_graph=True needs CUDA ranks (NCCL), this group uses "
            f"{dist.get_backend(group)}; use cuda_graph=False"
        )
    if config.compile_blocks:
        from .compiled import find_blocks

        find_blocks(model, plan)  # raises, naming the classes, when the model has none
    hosts = Topology.from_launcher(world, dist.get_process_group_ranks(group))
    check_route(config, backend=dist.get_backend(group), hosts=hosts.sizes[-1] if len(hosts.tiers) > 1 else 1)
    check_groups(topology, group, **needs_groups(config))
    if config.v_major is not None:
        from .vmajor import check_vmajor

        check_vmajor(config, topology, world)
    param = next(model.parameters(), None)
    if param is not None and (
        param.device.type != device.type or (device.type == "cuda" and param.device.index != device.index)
    ):
        raise ValueError(
            f"cocodiff.parallelize: the model is on {param.device} but this rank communicates on {device} "
            f"({dist.get_backend(group)}); move the model to {device} first"
        )
    return model, plan, topology, (ulysses, ring)


def _raise_together(error: Exception | None, group, device: torch.device, *, same_host: str | None = None) -> None:
    """All ranks learn whether any rank failed its local checks and raise together: a rank raising alone
    would leave the others waiting in their next collective. With `same_host` (the option that needs it),
    the same all-gather compares the ranks' host names."""
    import socket
    import zlib

    world = dist.get_world_size(group)
    host = zlib.crc32(socket.gethostname().encode())
    mine = torch.tensor([0 if error is None else 1, host], dtype=torch.int64, device=device)
    rows = torch.empty(world * 2, dtype=torch.int64, device=device)
    all_gather_into(rows, mine, group=group)
    rows = rows.view(world, 2).cpu().tolist()
    failed = [r for r, (flag, _) in enumerate(rows) if flag]
    if error is not None:
        raise error
    if failed:
        raise ValueError(
            f"cocodiff.parallelize: ranks {failed} refused the model or config (their own error "
            "names the problem); no engine was set up"
        )
    hosts = len({h for _, h in rows})
    if same_host is not None and hosts > 1:
        raise ValueError(
            f"cocodiff.parallelize: {same_host} needs all ranks on one host, this group spans {hosts} "
            "hosts; use all_to_all='flat' or 'tapa' across hosts"
        )


def parallelize(obj, config: ParallelConfig | None = None, *, group=None):
    """Shard `obj`'s transformer with Ulysses sequence parallelism, in place.

    Args:
        obj: a supported diffusers transformer (FLUX.1, SD3/3.5, Qwen-Image, FLUX.2, Wan 2.x, HunyuanVideo) or a
            pipeline holding one; a pipeline's `transformer_2` (Wan 2.2's second expert) is sharded too.
        config: a `ParallelConfig` (default: the "flat" preset).
        group: the process group of the Ulysses ranks (default: the default group).

    Returns:
        `obj`, with `obj` (or its transformer) carrying a `cocodiff` attribute: the `UlyssesEngine`, which
        exposes byte counters (`engine.step_stats`) and the step context (`engine.steps`). When `obj` is a
        pipeline, the step context follows its scheduler.

    Raises:
        TypeError: for an unsupported model class.
        ValueError: for a head count that does not divide by the degree, a bad topology, fused projections, a
            model on the wrong device or already parallelised. Every rank checks locally, then one small
            all-gather lets all ranks raise together (the only collective before the engine exists).
    """
    warn_if_untested()
    config = config or ParallelConfig.preset("flat")
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"cocodiff.parallelize: config must be a ParallelConfig, got {type(config).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "cocodiff.parallelize needs torch.distributed to be initialised (launch with torchrun, or call "
            "torch.distributed.init_process_group first)"
        )
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    device = _group_device(group)

    # ---- validation: local checks, then one agreement round, before any other collective --------
    error = None
    second = None
    try:
        model, plan, topology, (ulysses, ring_degree) = _validate(obj, config, group, world, device)
        second = _second_transformer(obj, model)
        if second is not None:
            _validate(second, config, group, world, device)
    except (TypeError, ValueError) as exc:
        error = exc
    _raise_together(error, group, device, same_host=needs_one_host(config))

    ring = None
    exchange_config = config
    if ring_degree > 1:
        from .ring import build_ring

        emu = config.emulate_slow_tier
        slow = slow_link_options(group, emu.max_ctas) if emu is not None else None
        inner = config.ring_placement == "ulysses_inner"
        heads_group, ring = build_ring(
            group,
            ulysses,
            ring_degree,
            placement=config.ring_placement,
            ring_options=slow if inner else None,  # the groups that cross the emulated slow tier get its cap
            heads_options=None if inner else slow,
        )
        # V-Major selects on the ring's hops, not in the Ulysses exchanges (no node groups for it)
        exchange_config = config.with_(v_major=None)
        if inner:
            outer = len(topology.tiers)
            topology = topology.inner(ulysses)  # the head exchanges run inside the Ulysses group: its tiers
            if emu is not None and (len(topology.tiers) < outer or topology.sizes[-1] == 1):
                # the Ulysses groups lie inside one emulated node: only the ring's hops cross the slow tier
                exchange_config = exchange_config.with_(emulate_slow_tier=None)
        else:
            # strided Ulysses groups, one rank per node or so: one flat exchange over the group (capped under
            # emulation), no tier sub-groups
            topology = Topology((ulysses,))
            route = "flat" if config.all_to_all == "tapa" else config.all_to_all
            exchange_config = exchange_config.with_(emulate_slow_tier=None, all_to_all=route)
        groups = build_groups(topology, heads_group, **needs_groups(exchange_config), parent=group)
        if config.ring_degree is None and dist.get_rank(group) == 0:
            print(
                f"cocodiff: the model has fewer attention heads than the {world} ranks: Ulysses over {ulysses} "
                f"ranks x a ring of {ring_degree} (ring_degree=None chose it)",
                flush=True,
            )
    else:
        groups = build_groups(topology, group, **needs_groups(config))
    # heads x head dim of the widest attention, heads padded to a multiple of the degree (layout.py)
    attentions = plan.attention_modules(model)
    inner_dim = max(
        local_heads(attn.heads, ulysses) * ulysses * (getattr(attn, "inner_dim", 0) // attn.heads or attn.head_dim)
        for _, attn in attentions
    )
    engine = UlyssesEngine(
        config,
        groups=groups,
        topology=topology,
        plan=plan,
        inner_dim=inner_dim,
        layers=len(attentions),
        device=device,
        seq_group=group,
        ring=ring,
        exchange_config=exchange_config,
    )
    engine.attach(model)
    scheduler = getattr(obj, "scheduler", None) if obj is not model else None
    if scheduler is not None and hasattr(scheduler, "timesteps"):
        engine.steps.follow(scheduler)
    model.cocodiff = engine
    if second is not None:  # validated above, with the first
        parallelize(second, config, group=group)
        if scheduler is not None and hasattr(scheduler, "timesteps"):
            second.cocodiff.steps.follow(scheduler)
    return obj


def release(obj=None) -> int:
    """Before `torch.distributed.destroy_process_group()`: free what parallelised models hold of their group.

    Drops the CUDA graphs cocodiff captured over them (`cuda_graph=True`, `GraphedStep`) and the copy-engine
    exchange's symmetric-memory buffers. A process group destroyed while graphs that captured its NCCL work are
    alive can hang in `ncclCommDestroy` (pytorch/pytorch#115388); at interpreter exit cocodiff drops its graphs
    itself, which does not help a script that destroys the group first. Graphs cocodiff did not make (your own
    `torch.cuda.graph`, `torch.compile(mode="reduce-overhead")`) are yours to delete before. The models stay
    usable: their next call captures and allocates again. Every rank must release the same models at the same
    point (freeing symmetric memory can be collective).

    Args:
        obj: a parallelised transformer or pipeline (its `transformer_2` too); None: every parallelised model of
            this process, and every graph cocodiff captured.

    Returns:
        how many engines were released (0 for a model that was never parallelised).

    Raises:
        TypeError: `obj` is neither a transformer nor a pipeline with one.
    """
    from .engine import release_all
    from .graph import live_graphs

    if obj is None:
        return release_all()
    model = _find_transformer(obj, "release")
    models = [m for m in (model, _second_transformer(obj, model)) if m is not None]
    engines = [m.cocodiff for m in models if hasattr(m, "cocodiff")]
    for engine in engines:
        engine.release()
    for graphs in live_graphs():  # GraphedSteps over these models that no engine knew of (built before parallelize)
        if any(getattr(graphs, "model", None) is m for m in models):
            graphs.clear()
    return len(engines)
