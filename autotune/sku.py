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
        major: compute capability major version (9 for Hopper).
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
# Order matters only for readability: the patterns are mutually exclusive (GH200 vs H200 vs H20 are told apart by
# word boundaries), which tests/test_autotune.py checks.
SKU_TABLE: tuple[SkuRule, ...] = (
    SkuRule("gh200", r"\bGH200\b", _HOPPER, frozenset({132}), 94.0),
    SkuRule("h200", r"\bH200\b", _HOPPER, frozenset({132}), 141.0, exclude_pattern=r"\bNVL\b"),
    SkuRule("h20", r"\bH20\b", _HOPPER, frozenset({78}), 96.0),
    SkuRule("h800", r"\bH800\b", _HOPPER, frozenset({132}), 80.0, exclude_pattern=r"PCIe|\bNVL\b"),
    SkuRule("h100-pcie", r"\bH100\b.*PCIe", _HOPPER, frozenset({114}), 80.0),
    SkuRule("h100-sxm", r"\bH100\b", _HOPPER, frozenset({132}), 80.0, exclude_pattern=r"PCIe|\bNVL\b"),
)
KNOWN_SKUS: tuple[str, ...] = tuple(rule.sku for rule in SKU_TABLE)
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


def arch_for_sku(sku: str) -> str:
    """The nvcc architecture (``sm_90a``) that kernels for ``sku`` are compiled for.

    Known SKUs are all Hopper. A fallback id ``sm<cc>-...`` maps to ``sm_<cc>``, with the ``a`` suffix from
    compute capability 9.0 on (wgmma and setmaxnreg need the architecture-specific target).
    """
    if sku in KNOWN_SKUS:
        return "sm_90a"
    match = re.match(r"^sm(\d+)-", sku)
    if not match:
        raise ValueError(f"cannot derive a CUDA architecture from SKU id {sku!r}")
    cc = int(match.group(1))
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


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
