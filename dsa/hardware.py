"""Device capability checks and backend selection, decided in one place.

Which implementation an op runs is a function of the input tensors' device, whether their dtype is one the TileLang
kernels take, and ``DSA_BACKEND`` (read through ``dsa.env``, per call, never at import):

| device | ``auto`` (default) | ``tilelang`` | ``reference`` |
|---|---|---|---|
| CUDA, compute capability >= 9.0 (Hopper) | TileLang (sm_90a) | TileLang (sm_90a) | reference |
| CUDA, older | reference + one warning per device | ``RuntimeError`` (the kernels are sm_90a only) | reference |
| CPU | reference | TileLang C-target kernels | reference |
| anything else | reference | reference | reference |

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

# The kernels use wgmma/TMA and are compiled for sm_90a; compare with >= so later Hopper-class parts qualify.
HOPPER_MIN_CAPABILITY = (9, 0)

# Per-process caches: the capability of a CUDA device never changes, and each device is warned about once.
_capabilities: dict[int, tuple[int, int]] = {}
_warned_devices: set[int] = set()


def reset_caches() -> None:
    """Forget cached capabilities and warnings (tests fake device capabilities)."""
    _capabilities.clear()
    _warned_devices.clear()


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


def is_hopper(device: torch.device) -> bool:
    """True for a CUDA device of compute capability >= 9.0 (the only GPUs the sm_90a kernels run on)."""
    return device.type == "cuda" and cuda_capability(device) >= HOPPER_MIN_CAPABILITY


def _warn_not_hopper_once(device: torch.device, capability: tuple[int, int]) -> None:
    index = _cuda_index(device)
    if index in _warned_devices:
        return
    _warned_devices.add(index)
    logger.warning(
        "DSA: CUDA device %d has compute capability %d.%d < %d.%d; the TileLang kernels need Hopper (sm_90a), "
        "so the PyTorch reference runs instead (slow). Set DSA_BACKEND=reference to silence this warning.",
        index,
        *capability,
        *HOPPER_MIN_CAPABILITY,
    )


def select_backend(device: torch.device, kernel_dtype: bool) -> Backend:
    """The implementation an op runs for inputs on ``device`` (see the module table).

    Args:
        device: the device of the op's inputs.
        kernel_dtype: whether the inputs' dtypes are ones the TileLang kernels take.

    Raises:
        RuntimeError: ``DSA_BACKEND=tilelang`` on a CUDA device older than Hopper.
    """
    requested = env.backend()
    if requested == REFERENCE or not kernel_dtype:
        return REFERENCE
    if device.type == "cpu":
        return TILELANG if requested == TILELANG else REFERENCE
    if device.type != "cuda":
        return REFERENCE
    if is_hopper(device):
        return TILELANG
    capability = cuda_capability(device)
    if requested == TILELANG:
        raise RuntimeError(
            f"DSA_BACKEND=tilelang, but CUDA device {device} has compute capability {capability[0]}.{capability[1]}; "
            f"the TileLang kernels need >= {HOPPER_MIN_CAPABILITY[0]}.{HOPPER_MIN_CAPABILITY[1]} (sm_90a). "
            "Use DSA_BACKEND=auto or reference on this GPU."
        )
    _warn_not_hopper_once(device, capability)
    return REFERENCE


# Under torch.compile the choice is made once, when a graph is traced, by running this function as Python (it reads
# the environment and may query the CUDA driver, neither of which Dynamo should trace). This is what
# torch.compiler.assume_constant_result sets; the attribute is written directly because importing that decorator
# imports torch._dynamo (seconds), and nothing here may be slow at import time.
select_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]
