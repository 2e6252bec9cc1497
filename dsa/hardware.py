"""Device capability checks and backend selection, decided in one place.

Which implementation an op runs is a function of the input tensors' device, whether their dtype is one the TileLang
kernels take, and ``DSA_BACKEND`` (read through ``dsa.env``, per call, never at import). Which CUDA architecture the
kernels are built for is :func:`target_for_capability`'s answer alone (launchers and tuner ask it, nothing else):

| device | ``auto`` (default) | ``tilelang`` | ``reference`` |
|---|---|---|---|
| CUDA with kernels (:data:`ARCH_BY_CAPABILITY`) | TileLang, built for that architecture | TileLang | reference |
| CUDA without kernels (7.x, 11.0) | reference + one warning per device | ``RuntimeError`` | reference |
| CPU | reference | TileLang C-target kernels | reference |
| anything else | reference | reference | reference |

Compute capability 9.0 gets the Hopper schedule (sm_90a: wgmma, TMA, ``setmaxnreg``); every other supported one the
portable schedule (mma.sync, no wgmma or TMA) built for exactly its architecture, never an sm_90a binary (which would
not load on Blackwell or Ada). ``DSA_PORTABLE=1`` builds the portable schedule on Hopper too (sm_90): how one H100/H200
checks the kernels every other GPU runs.

Inputs whose dtype the kernels do not take (float32/float64 attention, float32/float64 indexer inputs) always run the
reference, whatever ``DSA_BACKEND`` says: the reference is the float oracle and gradcheck path.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from dsa import env

logger = logging.getLogger(__name__)

Backend = Literal["tilelang", "reference"]
TILELANG: Backend = "tilelang"
REFERENCE: Backend = "reference"
BACKENDS: tuple[Backend, ...] = (TILELANG, REFERENCE)

HOPPER_CAPABILITY = (9, 0)
"""The one compute capability of the Hopper schedule (H100, H200, H800, H20)."""
HOPPER_ARCH = "sm_90a"
PORTABLE_HOPPER_ARCH = "sm_90"
"""The portable schedule built for Hopper (``DSA_PORTABLE=1``): plain sm_90, none of the ``a`` features."""

ARCH_BY_CAPABILITY: dict[tuple[int, int], str] = {
    (8, 0): "sm_80",  # A100, A30
    (8, 6): "sm_86",  # A10, A40, RTX 30xx
    (
        8,
        7,
    ): "sm_86",  # Jetson Orin: an sm_86 cubin runs on 8.7 (same major, higher minor), 99 KB configs fit
    (8, 9): "sm_89",  # L4, L40S, RTX 40xx (FP8 matrix instructions)
    HOPPER_CAPABILITY: HOPPER_ARCH,
    (10, 0): "sm_100a",  # B200, GB200: `a` targets run on exactly their capability
    (10, 3): "sm_103a",  # B300, GB300
    (12, 0): "sm_120",  # RTX 50xx, RTX PRO 6000 Blackwell
    (12, 1): "sm_120",  # DGX Spark (GB10): an sm_120 cubin runs on 12.1
}
"""The CUDA architecture the kernels are built for, per compute capability; a capability not listed has no kernels
(the reference runs). Every architecture named here is one of ``tl_kernels.dsl.ARCHS`` (a test checks; this module
does not import the kernels, so that dispatch stays cheap to import)."""

# Per-process caches: the capability of a CUDA device never changes, and each device is warned about once.
_capabilities: dict[int, tuple[int, int]] = {}
_warned_devices: set[int] = set()
# Bumped by reset_caches(): launch plans (``dsa.launch.common``) hold a target chosen from a capability, and key on
# this number, so a plan made before a reset is never reused after it.
_epoch: list[int] = [0]


def reset_caches() -> None:
    """Forget cached capabilities and warnings (tests fake device capabilities), and with them every launch plan."""
    _capabilities.clear()
    _warned_devices.clear()
    _epoch[0] += 1


def cache_epoch() -> int:
    """How many times :func:`reset_caches` ran in this process (part of every launch plan's key)."""
    return _epoch[0]


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` compute capability of a CUDA ``device``, cached per device index."""
    index = _cuda_index(device)
    capability = _capabilities.get(index)
    if capability is None:
        major, minor = torch.cuda.get_device_capability(index)
        capability = (int(major), int(minor))
        _capabilities[index] = capability
    return capability


def target_for_capability(capability: tuple[int, int], *, portable: bool = False) -> dict[str, str] | None:
    """The CUDA target the kernels are built for on a device of compute capability ``capability``, or ``None`` where
    there are no kernels (then the reference runs).

    9.0 gets sm_90a (the Hopper schedule), or sm_90 with ``portable`` (the portable schedule on Hopper); every other
    capability of :data:`ARCH_BY_CAPABILITY` its portable architecture. This is the single source of that decision.
    """
    arch = ARCH_BY_CAPABILITY.get((int(capability[0]), int(capability[1])))
    if arch is None:
        return None
    if portable and arch == HOPPER_ARCH:
        arch = PORTABLE_HOPPER_ARCH
    return {"kind": "cuda", "arch": arch}


def device_target(device: torch.device) -> dict[str, str] | None:
    """:func:`target_for_capability` of a CUDA ``device`` (``DSA_PORTABLE`` applied); ``None`` for other devices."""
    if device.type != "cuda":
        return None
    return target_for_capability(cuda_capability(device), portable=env.portable())


def is_hopper(device: torch.device) -> bool:
    """True for a CUDA device of compute capability 9.0 (the GPUs of the Hopper schedule)."""
    return device.type == "cuda" and cuda_capability(device) == HOPPER_CAPABILITY


def has_kernels(device: torch.device) -> bool:
    """True for a CUDA device whose architecture the kernels are built for (:func:`target_for_capability`)."""
    return device_target(device) is not None


def _supported_capabilities() -> str:
    return ", ".join(f"{major}.{minor}" for major, minor in ARCH_BY_CAPABILITY)


def _warn_no_kernels_once(device: torch.device, capability: tuple[int, int]) -> None:
    index = _cuda_index(device)
    if index in _warned_devices:
        return
    _warned_devices.add(index)
    logger.warning(
        "DSA: CUDA device %d has compute capability %d.%d, for which no TileLang kernels are built (supported: %s), "
        "so the PyTorch reference runs instead (slow). Set DSA_BACKEND=reference to silence this warning.",
        index,
        *capability,
        _supported_capabilities(),
    )


def select_backend(device: torch.device, kernel_dtype: bool) -> Backend:
    """The implementation an op runs for inputs on ``device`` (see the module table).

    Args:
        device: the device of the op's inputs.
        kernel_dtype: whether the inputs' dtypes are ones the TileLang kernels take.

    Raises:
        RuntimeError: ``DSA_BACKEND=tilelang`` on a CUDA device without kernels.
    """
    requested = env.backend()
    if requested == REFERENCE or not kernel_dtype:
        return REFERENCE
    if device.type == "cpu":
        return TILELANG if requested == TILELANG else REFERENCE
    if device.type != "cuda":
        return REFERENCE
    if has_kernels(device):
        return TILELANG
    capability = cuda_capability(device)
    if requested == TILELANG:
        raise RuntimeError(
            f"DSA_BACKEND=tilelang, but CUDA device {device} has compute capability {capability[0]}.{capability[1]}, "
            f"for which no TileLang kernels are built (supported: {_supported_capabilities()}). "
            "Use DSA_BACKEND=auto or reference on this GPU."
        )
    _warn_no_kernels_once(device, capability)
    return REFERENCE


# Under torch.compile the choice is made once, when a graph is traced, by running this function as Python (it reads
# the environment and may query the CUDA driver, neither of which Dynamo should trace). This is what
# torch.compiler.assume_constant_result sets; the attribute is written directly because importing that decorator
# imports torch._dynamo (seconds), and nothing here may be slow at import time.
select_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]
