"""User-facing configuration: what to parallelise and how.

`ParallelConfig` is a keyword-only dataclass validated at construction, so an impossible combination fails
when it is written, not inside a forward pass or a collective. Presets name the paper's configurations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

from .topology import parse_topology_spec

ALL_TO_ALL_KINDS = ("flat", "tapa", "copy_engine")
TAPA_PLANS = ("auto", "phases")
PRESETS = ("flat", "tapa", "vfirst", "cocodiff", "fast")
_PRESET_FIELDS = {  # ParallelConfig.preset; "v_major": True stands for VMajorConfig()'s defaults
    "flat": dict(all_to_all="flat", v_first=False),
    "tapa": dict(all_to_all="tapa", v_first=False),
    "vfirst": dict(all_to_all="tapa", v_first=True),
    "cocodiff": dict(all_to_all="tapa", v_first=True, v_major=True),
    "fast": dict(all_to_all="flat", v_first=True, fuse_qk=True, compile_blocks=True, cuda_graph=True),
}


@dataclass(kw_only=True, frozen=True)
class VMajorConfig:
    """V-Major selective communication (lossy): only the most-changed tokens cross the slow tier.

    Per layer, per CFG branch and per step, each rank compares its tokens' V with the V it last sent for
    them, picks its most-changed tokens (V is ready first), and sends only their Q, K and V to ranks across
    the slow tier; receivers update their cached copies of those tokens and reuse the cache for the rest.
    How many tokens are sent follows from the schedule alone (identical on every rank). The fast tier stays
    exact. See `cocodiff.vmajor`.

    Args:
        warmup_steps: leading denoising steps that send every token.
        schedule: "linear" (the cache ratio rises from `cache_ratio_start` to `cache_ratio_end` over the
            selective steps; the paper's default) or "fixed" (`cache_ratio_start` throughout).
        cache_ratio_start: fraction of tokens reused from cache at the first selective step.
        cache_ratio_end: fraction reused at the last selective step ("linear").
        max_cache_ratio: a cap on the ratio.
        refresh_every: every this many steps after warm-up, one step sends every token (0 = never).
        final_full_steps: trailing steps that send every token (the last steps change V the most).
        levels: the ratio is quantised to this many values, so a run captures at most `levels` + 1 CUDA graphs
            per input signature and CFG branch.
        tiers: "slow" (only traffic across the outermost topology tier is selected; needs a topology of at
            least two tiers) or "all" (every peer, for one tier of slow links, or testing).
        output: also select the attention-output exchange: owners reuse the cached output of their tokens
            that were not sent (saves the fourth exchange's slow-tier bytes).
        select_by: "tokens" (one selection per token, the paper's) or "heads" (one per token and destination
            head group: what Ulysses actually sends to each rank).
        With a ring dimension (`ParallelConfig.ring_degree`) the selection is on the ring's hops, per ring block
        (K and V; `output` does not apply there, `select_by="heads"` and `fp8` are refused).
        fp8: send the selected rows as 8-bit floats (e4m3, one fp32 scale per head and token): about half the
            slow-tier bytes of bf16 again, with the rounding of 3 mantissa bits on what crosses.
        memory_budget_gb: refuse caches larger than this per CFG branch (default: the device's free memory).
    """

    warmup_steps: int = 4
    schedule: Literal["linear", "fixed"] = "linear"
    cache_ratio_start: float = 0.5
    cache_ratio_end: float = 0.9
    max_cache_ratio: float = 0.95
    refresh_every: int = 0
    final_full_steps: int = 1
    levels: int = 4
    tiers: Literal["slow", "all"] = "slow"
    output: bool = True
    select_by: Literal["tokens", "heads"] = "tokens"
    fp8: bool = False
    memory_budget_gb: float | None = None

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "refresh_every", "final_full_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"VMajorConfig.{name}={value!r} must be an integer >= 0")
        if not isinstance(self.levels, int) or isinstance(self.levels, bool) or self.levels < 1:
            raise ValueError(f"VMajorConfig.levels={self.levels!r} must be an integer >= 1")
        if self.schedule not in ("linear", "fixed"):
            raise ValueError(f"VMajorConfig.schedule={self.schedule!r} must be 'linear' or 'fixed'")
        for name in ("cache_ratio_start", "cache_ratio_end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"VMajorConfig.{name}={value!r} must be in [0, 1]")
        if not isinstance(self.max_cache_ratio, (int, float)) or not 0.0 <= self.max_cache_ratio < 1.0:
            raise ValueError(
                f"VMajorConfig.max_cache_ratio={self.max_cache_ratio!r} must be in [0, 1): at least one token of "
                "each rank crosses at every step"
            )
        if self.tiers not in ("slow", "all"):
            raise ValueError(f"VMajorConfig.tiers={self.tiers!r} must be 'slow' or 'all'")
        if self.select_by not in ("tokens", "heads"):
            raise ValueError(f"VMajorConfig.select_by={self.select_by!r} must be 'tokens' or 'heads'")
        for name in ("output", "fp8"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"VMajorConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"VMajorConfig.memory_budget_gb={self.memory_budget_gb!r} must be > 0 or None")

    @property
    def label(self) -> str:
        """The name reports give these settings: "vmajor", then what differs from the defaults (e.g. "vmajor(fp8)",
        "vmajor(schedule=fixed,cache_ratio_start=0.9)"). The memory budget changes no result and is left out."""
        changed = [
            f.name if isinstance(v, bool) and v else f"{f.name}={v}"
            for f in fields(self)
            if f.name != "memory_budget_gb" and (v := getattr(self, f.name)) != f.default
        ]
        return "vmajor" + (f"({','.join(changed)})" if changed else "")


@dataclass(kw_only=True, frozen=True)
class SlowTierEmulation:
    """Make the outermost tier's links slow on one host, with real traffic, to stand in for a network.

    Every exchange then moves each pair of ranks' bytes over the link the pair would use on a cluster:
    intra-"node" pairs over the fast links, inter-"node" pairs over the emulated slow link, flat and TAPA alike.

    Args:
        max_ctas: NCCL CTA cap of the slow-tier communicators (1 CTA gives ~17 GB/s per H200; more is faster).
            Ignored on gloo (CPU ranks), where the emulation only changes the route.
        stands_for: the real link the slow tier emulates, written into every report.
        target_GBps: that link's per-GPU bandwidth (reports compare the achieved GB/s with it).
    """

    max_ctas: int = 1
    stands_for: str = "400 Gb/s NIC per GPU"
    target_GBps: float = 50.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_ctas <= 64:
            raise ValueError(f"SlowTierEmulation.max_ctas={self.max_ctas} must be in [1, 64]")
        if self.target_GBps <= 0:
            raise ValueError(f"SlowTierEmulation.target_GBps={self.target_GBps} must be > 0")


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """How `cocodiff.parallelize` shards a DiT.

    Args:
        all_to_all: "flat" (one all-to-all over the whole group, the paper's baseline), "tapa"
            (one phase per topology tier) or "copy_engine" (one host, NCCL group: peer-to-peer memcpys on the
            GPUs' copy engines through PyTorch symmetric memory instead of NCCL's SM kernels).
        v_first: project V first and start its exchange while Q/K projection, norm and RoPE run; Q's
            exchange likewise runs under K's projection. Exact.
        overlap_output: in blocks with work that does not need the attention output (FLUX.1's single-block
            MLP branch, FLUX.2's single-block MLP projection), start the output exchange first and run that
            work under it. Exact (same operations, another launch order). None (default): on with v_first.
        fuse_qk: on CUDA, every family: Q/K RMSNorm, the stream concatenation and RoPE in one
            `torch.compile`d kernel per shape (`cocodiff.fused_qk`) instead of diffusers' chain of eager kernels.
            Same math; agrees with the eager path to bf16 rounding. The first call per shape compiles (seconds).
        head_chunks: with `v_first`, in attention layers that have no independent work to hide their exchanges
            under (FLUX.1 / FLUX.2 double-stream blocks, SD3, Qwen-Image, the video families): K's exchange, the
            attention and the output's exchange run in this many groups of this rank's heads, so each group's
            attention runs while the next group's K and the previous group's output travel; only the first K
            group and the last output group stay exposed. Exact: attention is computed per head, so the groups
            give the same values as one call. Reduced to the largest divisor of the rank's heads that is not
            larger; 1 (default) is one group. Exact NCCL routes only (not the copy engine, V-Major or a ring).
        compile_blocks: compile every transformer block's compute (modulation, norms, gates, residuals, MLPs)
            with `torch.compile` (inductor), once per input shape, while the sharded attention (exchanges, V-First,
            copy engine, V-Major) runs outside the compiled pieces (`cocodiff.compiled`). Composes with
            `cuda_graph` (the compiled kernels are captured in the step's graph). Inductor fuses elementwise
            chains, so results agree with the eager model to bf16 rounding, not bit for bit; the first call per
            shape compiles (inductor's cache makes later processes start faster).
        compile_options: keyword arguments for `torch.compile` of the blocks: "backend", "mode" (not one
            that adds CUDA graphs of its own when `cuda_graph` is on), "options", "dynamic" (default False).
        shard_modulation: each rank computes 1/P of the blocks' AdaLN modulation projections (the Linears
            of `silu(temb)`, the same in every block's input: about a quarter of FLUX.1's weights) and one
            all-gather shares the results, instead of every rank computing all of them (`cocodiff.modulation`).
            Exact (the same GEMVs, each on one rank). Families with such per-block Linears: FLUX.1, SD3 / SD3.5,
            Qwen-Image, HunyuanVideo. Default True; no effect on one rank.
        cuda_graph: CUDA ranks: capture the sharded step as a CUDA graph per input signature and replay it on
            later calls (`cocodiff.graph`), so the host leaves the step; pipelines need no change.
        ring_degree: the ring dimension of Ulysses x ring (`cocodiff.ring`): the P ranks become P / ring_degree
            Ulysses ranks (contiguous ranks, inside a node) x ring_degree ring positions (across them). None
            (default): automatic, 1 when the model's heads allow Ulysses over all ranks, else the smallest ring
            that lets them (one line says so). Exact. The Ulysses groups take the topology's inner tiers
            (TAPA runs inside them). Composes with every route, V-First, fuse_qk, compiled blocks, CUDA
            graphs and slow-tier emulation (ring hops across the slow tier go over slowed links); with V-Major
            the selection moves to the ring's hops (the Ulysses exchanges stay exact).
        ring_placement: with a ring, "ulysses_inner" (default: each Ulysses group is contiguous ranks, e.g. one
            node's GPUs, and the ring crosses nodes) or "ring_inner" (the ring runs over contiguous ranks and the
            Ulysses groups are strided across nodes). Exact either way; which is faster depends on the links.
        v_major: None for exact communication, or a `VMajorConfig` for lossy selective communication.
        topology: None to take tiers from the launcher (torchrun's LOCAL_WORLD_SIZE), or a spec written
            outermost tier first, e.g. "2x4" (2 nodes of 4 GPUs) or "8x6x2" (Aurora: node x GPU x tile).
        tapa_plan: with all_to_all="tapa": "auto" times flat routing and TAPA (1 and several pipeline chunks)
            per message shape at first use and keeps the fastest; "phases" always routes in phases.
        tapa_chunks: pipeline chunks of the "phases" plan (1 = phases strictly one after the other).
        emulate_slow_tier: a `SlowTierEmulation` to run the outermost tier over slowed links (one host).
        sync: debug switch: wait for every exchange right after starting it (no overlap).
        check_inputs: True: at the first call, compare the input shapes of all ranks with one small collective
            and raise a clear error if they differ (ranks that disagree would otherwise hang or be silently
            wrong), and check the communication buffers against free memory on every rank together;
            "every_call": the same at every call (debug mode: catches ranks whose inputs diverge later;
            skipped inside CUDA-graph capture); False: no check. Ranks that make different numbers of calls
            are caught by the process group's timeout (set it in init_process_group / `cocodiff demo --timeout`).
        memory_budget_gb: refuse shapes whose communication buffers exceed this (default: free memory).
    """

    all_to_all: Literal["flat", "tapa", "copy_engine"] = "flat"
    v_first: bool = False
    overlap_output: bool | None = None
    fuse_qk: bool = False
    head_chunks: int = 1
    compile_blocks: bool = False
    compile_options: dict | None = field(default=None, hash=False)
    cuda_graph: bool = False
    shard_modulation: bool = True
    ring_degree: int | None = None
    ring_placement: Literal["ulysses_inner", "ring_inner"] = "ulysses_inner"
    v_major: VMajorConfig | None = None
    topology: str | None = None
    tapa_plan: Literal["auto", "phases"] = "auto"
    tapa_chunks: int = 1
    emulate_slow_tier: SlowTierEmulation | None = None
    sync: bool = False
    check_inputs: bool | Literal["every_call"] = True
    memory_budget_gb: float | None = None
    preset_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.all_to_all not in ALL_TO_ALL_KINDS:
            raise ValueError(f"ParallelConfig.all_to_all={self.all_to_all!r} is not one of {ALL_TO_ALL_KINDS}")
        if self.all_to_all == "copy_engine" and self.emulate_slow_tier is not None:
            raise ValueError(
                "ParallelConfig: all_to_all='copy_engine' runs on one host's links; it cannot be "
                "combined with emulate_slow_tier (use all_to_all='flat' or 'tapa')"
            )
        if self.tapa_plan not in TAPA_PLANS:
            raise ValueError(f"ParallelConfig.tapa_plan={self.tapa_plan!r} is not one of {TAPA_PLANS}")
        if not isinstance(self.tapa_chunks, int) or self.tapa_chunks < 1:
            raise ValueError(f"ParallelConfig.tapa_chunks={self.tapa_chunks!r} must be an integer >= 1")
        if self.emulate_slow_tier is not None and not isinstance(self.emulate_slow_tier, SlowTierEmulation):
            raise TypeError(
                "ParallelConfig.emulate_slow_tier must be None or a SlowTierEmulation, got "
                f"{type(self.emulate_slow_tier).__name__}"
            )
        if not isinstance(self.v_first, bool):
            raise TypeError(f"ParallelConfig.v_first must be a bool, got {self.v_first!r}")
        for name in ("fuse_qk", "cuda_graph", "compile_blocks", "shard_modulation"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ParallelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.head_chunks, int) or isinstance(self.head_chunks, bool) or self.head_chunks < 1:
            raise ValueError(f"ParallelConfig.head_chunks={self.head_chunks!r} must be an integer >= 1")
        self._check_compile_options()
        if self.overlap_output is not None and not isinstance(self.overlap_output, bool):
            raise TypeError(f"ParallelConfig.overlap_output must be None or a bool, got {self.overlap_output!r}")
        if self.v_major is not None:
            if not isinstance(self.v_major, VMajorConfig):
                raise TypeError(
                    f"ParallelConfig.v_major must be None or a VMajorConfig, got {type(self.v_major).__name__}"
                )
            if self.all_to_all == "copy_engine":
                raise ValueError(
                    "ParallelConfig: V-Major selects what crosses slow links; all_to_all='copy_engine' runs on one "
                    "host's NVLink: use all_to_all='flat' or 'tapa' with v_major"
                )
        if self.ring_placement not in ("ulysses_inner", "ring_inner"):
            raise ValueError(
                f"ParallelConfig.ring_placement={self.ring_placement!r} must be 'ulysses_inner' or 'ring_inner'"
            )
        if self.ring_degree is not None:
            if not isinstance(self.ring_degree, int) or isinstance(self.ring_degree, bool) or self.ring_degree < 1:
                raise ValueError(f"ParallelConfig.ring_degree={self.ring_degree!r} must be None or an integer >= 1")
            if self.ring_degree > 1:
                self.check_ring()
        if self.topology is not None:
            parse_topology_spec(self.topology)  # raises ValueError naming the bad spec
        if self.check_inputs not in (True, False, "every_call"):
            raise ValueError(f"ParallelConfig.check_inputs={self.check_inputs!r} must be True, False or 'every_call'")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"ParallelConfig.memory_budget_gb={self.memory_budget_gb!r} must be > 0 or None")

    def check_ring(self) -> None:
        """Raise for options that do not compose with a ring dimension (also run when it is automatic)."""
        vm = self.v_major
        if vm is not None and self.ring_placement == "ring_inner":
            raise ValueError(
                "ParallelConfig: with a ring dimension V-Major selects on the ring's hops, which with "
                "ring_placement='ring_inner' stay inside nodes; use ring_placement='ulysses_inner' with v_major"
            )
        if vm is not None and (vm.select_by == "heads" or vm.fp8):
            raise ValueError(
                "ParallelConfig: with a ring dimension V-Major selects the tokens of each ring block (their K/V "
                "travel the ring in the model's dtype); VMajorConfig(select_by='heads') and fp8=True apply to "
                "Ulysses exchanges only: use select_by='tokens', fp8=False"
            )

    def _check_compile_options(self) -> None:
        from .compiled import ALLOWED_OPTIONS, GRAPH_MODES

        opts = self.compile_options
        if opts is None:
            return
        if not self.compile_blocks:
            raise ValueError("ParallelConfig.compile_options is set but compile_blocks=False; set compile_blocks=True")
        if not isinstance(opts, dict):
            raise TypeError(f"ParallelConfig.compile_options must be a dict or None, got {type(opts).__name__}")
        bad = sorted(set(opts) - set(ALLOWED_OPTIONS))
        if bad:
            why = " (the blocks are cut at the sharded attention, so one graph per block cannot hold)"
            raise ValueError(
                f"ParallelConfig.compile_options: {bad} not accepted{why if 'fullgraph' in bad else ''}; "
                f"allowed keys: {list(ALLOWED_OPTIONS)}"
            )
        if self.cuda_graph and opts.get("mode") in GRAPH_MODES:
            raise ValueError(
                f"ParallelConfig.compile_options mode={opts['mode']!r} adds CUDA graphs of its own inside the step "
                "that cuda_graph=True captures; use mode=None or 'max-autotune-no-cudagraphs' with cuda_graph=True"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> ParallelConfig:
        """Named configurations: "flat" (paper baseline), "tapa", "vfirst" (TAPA + V-First), "cocodiff"
        (TAPA + V-First + V-Major with `VMajorConfig()`'s defaults: lossy, needs a topology of two tiers or
        `v_major=VMajorConfig(tiers="all")`; on GPU ranks give it fast's `fuse_qk`, `compile_blocks` and
        `cuda_graph` too, as the CLI does: eagerly, V-Major's selection is many small kernels launched from the
        host, docs/benchmarks/2026-11-30-compiled-pieces), "fast" (GPU ranks: V-First, fuse_qk, compiled blocks
        and the step replayed as a CUDA graph over NCCL; the fastest exact configuration measured on one H200
        host, within 1-3% of the copy-engine route, docs/benchmarks/2026-11-30-compiled). Keyword overrides
        replace preset fields."""
        if name not in _PRESET_FIELDS:
            raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
        fields = dict(_PRESET_FIELDS[name])
        if "v_major" in fields:
            fields["v_major"] = VMajorConfig()
        return cls(**{**fields, "preset_name": name, **overrides})

    @property
    def overlaps_output(self) -> bool:
        """Whether the output exchange runs under independent work (`overlap_output`, default: `v_first`)."""
        return self.v_first if self.overlap_output is None else self.overlap_output

    def with_(self, **changes) -> ParallelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def label(self) -> str:
        """A short name for reports: the preset or the route, then every switch that is on."""
        parts = [self.preset_name or self.all_to_all]
        if self.preset_name and self.all_to_all != _PRESET_FIELDS[self.preset_name]["all_to_all"]:
            parts.append(self.all_to_all)  # a preset with another route
        if not self.preset_name:
            parts += ["vfirst"] * self.v_first
        elif self.v_first != _PRESET_FIELDS[self.preset_name].get("v_first", False):
            parts.append("vfirst" if self.v_first else "no_vfirst")  # a preset with V-First switched over
        if self.v_major is not None and (
            "v_major" not in _PRESET_FIELDS.get(self.preset_name, {}) or self.v_major.label != "vmajor"
        ):
            parts.append(self.v_major.label)  # (also a preset given V-Major, or other V-Major settings, as an override)
        if (self.ring_degree or 1) > 1:
            parts += [f"ring{self.ring_degree}" + "-inner" * (self.ring_placement == "ring_inner")]
        if self.head_chunks > 1:
            parts.append(f"chunks{self.head_chunks}")
        parts += ["fuse_qk"] * self.fuse_qk + ["compiled"] * self.compile_blocks + ["cuda_graph"] * self.cuda_graph
        parts += ["emulated"] * (self.emulate_slow_tier is not None)
        parts += ["replicated_modulation"] * (not self.shard_modulation)
        return "+".join(parts)
