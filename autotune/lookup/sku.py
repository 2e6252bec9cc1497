"""Canonical SKU ids for CUDA devices.

Tuned configs are stored per SKU, not per compute capability: an H20 (78 SMs, low clocks) and an H100 SXM (132 SMs)
share ``sm_90a`` but want different tiles. The id is decided by a small table of rules over the device name, compute
capability, SM count and memory; a device that matches no rule gets ``sm<major><minor>-<sanitised name>``, so a MIG
slice or an unknown board never borrows the tuned configs of a full-size card.

No device is queried at import time; :func:`current_sku` asks torch the first time it is called for a device and
remembers the answer for the process.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import torch

_GIB = 1 << 30
# MIG slices and cut-down boards report the same name stem with fewer SMs or far less memory; a rule only matches a
# device with at least this share of the full card's memory.
_MIN_MEMORY_SHARE = 0.75


@dataclass(frozen=True)
class DeviceProps:
    """What identifies a GPU model.

    Attributes:
        name: the driver's device name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        major: compute capability major version (9 for Hopper, 10 for B200).
        minor: compute capability minor version.
        sm_count: number of streaming multiprocessors.
        total_memory: device memory in bytes.
    """

    name: str
    major: int
    minor: int
    sm_count: int
    total_memory: int


@dataclass(frozen=True)
class SkuRule:
    """One row of the SKU table: a device matches when every field matches.

    Attributes:
        sku: the canonical id given to matching devices.
        name_pattern: regular expression searched (case-insensitively) in the device name.
        capability: required ``(major, minor)``.
        sm_counts: accepted SM counts (full-size boards only; MIG slices have fewer).
        memory_gib: nominal memory of the smallest full-size variant, in GiB.
        exclude_pattern: a device whose name matches this is not this SKU (e.g. ``PCIe`` for the SXM part).
    """

    sku: str
    name_pattern: str
    capability: tuple[int, int]
    sm_counts: frozenset[int]
    memory_gib: float
    exclude_pattern: str | None = None

    def matches(self, props: DeviceProps) -> bool:
        """Whether ``props`` describes a full-size device of this SKU."""
        if (props.major, props.minor) != self.capability:
            return False
        if props.sm_count not in self.sm_counts:
            return False
        if props.total_memory < self.memory_gib * _MIN_MEMORY_SHARE * _GIB:
            return False
        if not re.search(self.name_pattern, props.name, flags=re.IGNORECASE):
            return False
        return not (self.exclude_pattern and re.search(self.exclude_pattern, props.name, flags=re.IGNORECASE))


_HOPPER = (9, 0)
_AMPERE = (8, 0)
_AMPERE_GA10X = (8, 6)
_ADA = (8, 9)
_BLACKWELL = (10, 0)
_BLACKWELL_ULTRA = (10, 3)
_BLACKWELL_GEFORCE = (12, 0)
# The patterns are mutually exclusive (GH200 vs H200 vs H20, A10 vs A100, L40S vs L40 are told apart by word
# boundaries and memory sizes in the name), which tests/test_sku.py checks. SM counts and memory are the full boards'
# public figures; Blackwell data-centre parts accept the counts their variants are listed with.
SKU_TABLE: tuple[SkuRule, ...] = (
    SkuRule("gh200", r"\bGH200\b", _HOPPER, frozenset({132}), 94.0),
    SkuRule("h200", r"\bH200\b", _HOPPER, frozenset({132}), 141.0, exclude_pattern=r"\bNVL\b"),
    SkuRule("h20", r"\bH20\b", _HOPPER, frozenset({78}), 96.0),
    SkuRule("h800", r"\bH800\b", _HOPPER, frozenset({132}), 80.0, exclude_pattern=r"PCIe|\bNVL\b"),
    SkuRule("h100-pcie", r"\bH100\b.*PCIe", _HOPPER, frozenset({114}), 80.0),
    SkuRule("h100-sxm", r"\bH100\b", _HOPPER, frozenset({132}), 80.0, exclude_pattern=r"PCIe|\bNVL\b"),
    # A100 names: "A100-SXM4-40GB", "A100-SXM4-80GB", "A100-PCIE-40GB", "A100 80GB PCIe".
    SkuRule("a100-sxm-40gb", r"\bA100\b.*SXM.*\b40GB\b", _AMPERE, frozenset({108}), 40.0),
    SkuRule("a100-sxm-80gb", r"\bA100\b.*SXM.*\b80GB\b", _AMPERE, frozenset({108}), 80.0),
    SkuRule("a100-pcie-40gb", r"\bA100\b.*PCIe.*\b40GB\b", _AMPERE, frozenset({108}), 40.0),
    SkuRule("a100-pcie-80gb", r"\bA100\b.*\b80GB\b.*PCIe", _AMPERE, frozenset({108}), 80.0),
    SkuRule("a10", r"\bA10\b", _AMPERE_GA10X, frozenset({72}), 24.0),
    SkuRule("l4", r"\bL4\b", _ADA, frozenset({58}), 24.0),
    SkuRule("l40s", r"\bL40S\b", _ADA, frozenset({142}), 48.0),
    SkuRule("rtx4090", r"\bRTX 4090\b", _ADA, frozenset({128}), 24.0, exclude_pattern=r"Laptop|\bD\b"),
    SkuRule("rtx5090", r"\bRTX 5090\b", _BLACKWELL_GEFORCE, frozenset({170}), 32.0, exclude_pattern=r"Laptop|\bD\b"),
    SkuRule("gb200", r"\bGB200\b", _BLACKWELL, frozenset({148, 152}), 186.0),
    SkuRule("b200", r"\bB200\b", _BLACKWELL, frozenset({148}), 180.0),
    SkuRule("b300", r"\bB300\b", _BLACKWELL_ULTRA, frozenset({148, 160}), 270.0),
)
KNOWN_SKUS: tuple[str, ...] = tuple(rule.sku for rule in SKU_TABLE)


@dataclass(frozen=True)
class PerfSpec:
    """A SKU's datasheet figures, for cost models (``benchmarks.cost``): never measured here.

    Attributes:
        sm_count: streaming multiprocessors of the full board (as in :data:`SKU_TABLE`).
        bf16_tflops: peak dense bfloat16 tensor-core TFLOP/s (no structured sparsity); FP8 is twice this on Hopper.
        dram_gbps: peak DRAM bandwidth in GB/s (1e9 bytes per second).
        clock_mhz: the clock the tensor peak is quoted at (``bf16_tflops = sm_count * per-SM FLOP/cycle * clock``).
    """

    sm_count: int
    bf16_tflops: float
    dram_gbps: float
    clock_mhz: float

    @property
    def mma_flops_per_cycle(self) -> float:
        """bf16 tensor-core FLOPs one SM does per cycle (4096 on the full-rate Hopper parts)."""
        return self.bf16_tflops * 1e12 / (self.sm_count * self.clock_mhz * 1e6)


# NVIDIA's datasheets: H100 SXM5 / H800 SXM5 / H200 / GH200 989.4 dense bf16 TFLOP/s (132 SMs x 4096 FLOP/cycle x
# 1830 MHz), H100 PCIe 756 (114 SMs, 1620 MHz), H20 148 (78 SMs, a cut tensor rate at 1980 MHz); HBM: H100 SXM and
# H800 3.35 TB/s, H200 4.8, GH200 (96 GB HBM3) 4.0, H100 PCIe 2.0, H20 4.0.
PERF_TABLE: dict[str, PerfSpec] = {
    "h100-sxm": PerfSpec(132, 989.4, 3350.0, 1830.0),
    "h800": PerfSpec(132, 989.4, 3350.0, 1830.0),
    "h200": PerfSpec(132, 989.4, 4800.0, 1830.0),
    "gh200": PerfSpec(132, 989.4, 4000.0, 1830.0),
    "h100-pcie": PerfSpec(114, 756.0, 2000.0, 1620.0),
    "h20": PerfSpec(78, 148.0, 4000.0, 1980.0),
}
"""Datasheet figures per known Hopper SKU id (the cost model's hardware; other SKUs have none)."""


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources that bound how many thread blocks one SM holds at once (CUDA's occupancy rules).

    Attributes:
        registers: 32-bit registers per SM. register_unit: a warp's registers are allocated in multiples of this.
        smem_bytes: shared memory per SM. smem_reserved: shared memory the system reserves per resident block.
        threads: resident threads per SM. blocks: resident blocks per SM.
    """

    registers: int = 65536
    register_unit: int = 256
    smem_bytes: int = 228 * 1024
    smem_reserved: int = 1024
    threads: int = 2048
    blocks: int = 32


HOPPER_SM = SmLimits()
"""Compute capability 9.0 (CUDA programming guide, occupancy table): 64K registers, 228 KB shared memory (227 KB to
one block, 1 KB reserved per block), 2048 threads and 32 blocks per SM."""


def blocks_per_sm(*, registers: int, threads: int, smem_bytes: int, limits: SmLimits = HOPPER_SM) -> int:
    """Thread blocks of ``threads`` threads, ``registers`` registers per thread and ``smem_bytes`` shared memory each
    that one SM holds at once (0 when one block does not fit)."""
    if registers < 1 or threads < 1 or smem_bytes < 0:
        raise ValueError(f"blocks_per_sm: needs registers, threads >= 1 and smem_bytes >= 0, got "
                         f"{registers}, {threads}, {smem_bytes}")  # fmt: skip
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // limits.register_unit) * limits.register_unit
    by_registers = limits.registers // (per_warp * warps)
    by_smem = limits.smem_bytes // (smem_bytes + limits.smem_reserved)
    by_threads = limits.threads // (warps * 32)
    return max(0, min(by_registers, by_smem, by_threads, limits.blocks))
_SKU_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def sanitise(name: str) -> str:
    """Lower-case ``name`` and collapse every run of other characters than ``[a-z0-9]`` into one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sku_from_props(props: DeviceProps) -> str:
    """The canonical SKU id of a device described by ``props``.

    Returns one of :data:`KNOWN_SKUS`, else ``sm<major><minor>-<sanitised name>`` (e.g. ``sm90-nvidia-foo``).
    """
    for rule in SKU_TABLE:
        if rule.matches(props):
            return rule.sku
    return f"sm{props.major}{props.minor}-{sanitise(props.name) or 'unknown'}"


def is_valid_sku(sku: str) -> bool:
    """Whether ``sku`` is usable as an id and as a directory name (lower-case letters, digits, dashes)."""
    return bool(_SKU_ID_RE.match(sku))


def capability_for_sku(sku: str) -> tuple[int, int]:
    """The compute capability of a SKU id, from which ``dsa.hardware.target_for_capability`` derives what kernels for
    it are built for.

    ``sku`` is a known id (:data:`KNOWN_SKUS`), a family that names several known ids of one capability (``a100``
    for the four A100 boards), or a fallback id ``sm<major><minor>-...`` (``sm100-nvidia-b200`` is 10.0).
    """
    for rule in SKU_TABLE:
        if rule.sku == sku:
            return rule.capability
    family = {rule.capability for rule in SKU_TABLE if rule.sku.startswith(f"{sku}-")}
    if len(family) == 1:
        return family.pop()
    match = re.match(r"^sm(\d+)(\d)-", sku)
    if not match:
        raise ValueError(
            f"unknown SKU id {sku!r}: use one of {', '.join(KNOWN_SKUS)}, a family such as 'a100', or sm<cc>-<name>"
        )
    return int(match.group(1)), int(match.group(2))


def props_of(device: torch.device | int | str) -> DeviceProps:
    """Query torch for the :class:`DeviceProps` of a CUDA device."""
    p = torch.cuda.get_device_properties(device)
    return DeviceProps(p.name, p.major, p.minor, p.multi_processor_count, p.total_memory)


_cache: dict[int, str] = {}
_lock = threading.Lock()


def current_sku(device: torch.device | int | str | None = None) -> str:
    """The SKU id of a CUDA device (default: the current one), queried once per device per process."""
    if device is None:
        index = torch.cuda.current_device()
    else:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if dev.type != "cuda":
            raise ValueError(f"current_sku needs a CUDA device, got {dev}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    sku = _cache.get(index)
    if sku is None:
        with _lock:
            sku = _cache.get(index)
            if sku is None:
                sku = sku_from_props(props_of(index))
                _cache[index] = sku
    return sku
