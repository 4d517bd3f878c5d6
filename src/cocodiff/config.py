"""User-facing configuration: what to parallelise and how.

`ParallelConfig` is a keyword-only dataclass validated at construction, so an impossible combination fails
when it is written, not inside a forward pass or a collective. Presets name the paper's configurations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from .topology import parse_topology_spec

ALL_TO_ALL_KINDS = ("flat", "tapa", "copy_engine")
TAPA_PLANS = ("auto", "phases")
PRESETS = ("flat", "tapa", "vfirst", "cocodiff")


@dataclass(kw_only=True, frozen=True)
class VMajorConfig:
    """Schedule of V-Major selective communication (lossy; paper section "V-Major").

    Args:
        warmup_steps: leading denoising steps that always communicate every token.
        cache_ratio_start: fraction of tokens reused from cache right after warm-up.
        cache_ratio_end: fraction reused at the last step (the ratio rises linearly in between).
        refresh_every: every this many steps all tokens are sent again (0 = never).
    """

    warmup_steps: int = 4
    cache_ratio_start: float = 0.1
    cache_ratio_end: float = 0.5
    refresh_every: int = 10

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"VMajorConfig.warmup_steps={self.warmup_steps} must be >= 0")
        for name in ("cache_ratio_start", "cache_ratio_end"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"VMajorConfig.{name}={value} must be in [0, 1)")
        if self.refresh_every < 0:
            raise ValueError(f"VMajorConfig.refresh_every={self.refresh_every} must be >= 0 (0 disables refresh)")


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
        fuse_qk: FLUX.1/FLUX.2 on CUDA: Q/K RMSNorm, the [text, image] concatenation and RoPE in one
            `torch.compile`d kernel per shape (cocodiff.kernels) instead of diffusers' chain of eager kernels.
            Same math; agrees with the eager path to bf16 rounding. The first call per shape compiles (seconds).
        cuda_graph: CUDA ranks: capture the sharded step as a CUDA graph per input signature and replay it on
            later calls (`cocodiff.graph`), so the host leaves the step; pipelines need no change.
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
    cuda_graph: bool = False
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
        for name in ("fuse_qk", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ParallelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.overlap_output is not None and not isinstance(self.overlap_output, bool):
            raise TypeError(f"ParallelConfig.overlap_output must be None or a bool, got {self.overlap_output!r}")
        if self.v_major is not None:
            if not isinstance(self.v_major, VMajorConfig):
                raise TypeError(
                    f"ParallelConfig.v_major must be None or a VMajorConfig, got {type(self.v_major).__name__}"
                )
            raise ValueError(
                "ParallelConfig.v_major: V-Major selective communication is not available in this version of "
                "cocodiff; use v_major=None (exact communication)"
            )
        if self.topology is not None:
            parse_topology_spec(self.topology)  # raises ValueError naming the bad spec
        if self.check_inputs not in (True, False, "every_call"):
            raise ValueError(f"ParallelConfig.check_inputs={self.check_inputs!r} must be True, False or 'every_call'")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"ParallelConfig.memory_budget_gb={self.memory_budget_gb!r} must be > 0 or None")

    @classmethod
    def preset(cls, name: str, **overrides) -> ParallelConfig:
        """Named configurations: "flat" (paper baseline), "tapa", "vfirst" (TAPA + V-First), "cocodiff"
        (TAPA + V-First + V-Major). Keyword overrides replace preset fields."""
        if name == "flat":
            cfg = cls(all_to_all="flat", v_first=False, preset_name=name, **overrides)
        elif name == "tapa":
            cfg = cls(all_to_all="tapa", v_first=False, preset_name=name, **overrides)
        elif name == "vfirst":
            cfg = cls(all_to_all="tapa", v_first=True, preset_name=name, **overrides)
        elif name == "cocodiff":
            cfg = cls(all_to_all="tapa", v_first=True, v_major=VMajorConfig(), preset_name=name, **overrides)
        else:
            raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
        return cfg

    @property
    def overlaps_output(self) -> bool:
        """Whether the output exchange runs under independent work (`overlap_output`, default: `v_first`)."""
        return self.v_first if self.overlap_output is None else self.overlap_output

    def with_(self, **changes) -> ParallelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def label(self) -> str:
        if self.preset_name:
            return self.preset_name
        emu = "+emulated" if self.emulate_slow_tier is not None else ""
        return f"{self.all_to_all}{'+vfirst' if self.v_first else ''}{emu}"
