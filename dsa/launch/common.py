"""What every launcher shares: the compile target of a device and the choice of a kernel config."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch

from tl_kernels import dsl

logger = logging.getLogger(__name__)


def target_for(device: torch.device) -> dsl.Target:
    """The C target for CPU tensors (CPU tier), sm_90a for CUDA tensors (the dispatcher sends only Hopper here)."""
    return dsl.CPU_TARGET if device.type == "cpu" else dsl.HOPPER_TARGET


def select_config(
    kernel_name: str, kernels: ModuleType, static: dict[str, Any], sizes: dict[str, int], device: torch.device
) -> Any:
    """The tuned config of ``kernels`` (a ``tl_kernels`` module) for this launch, else its default config.

    ``static`` holds the kernel's static parameters (without the target); ``sizes`` the runtime sizes (``batch``,
    ``seq_len``, ``seq_len_kv``, ...). CPU launches are never tuned. A missing, failing or invalid tuned entry is
    logged and ignored: tuning is optional, the default config works for every shape.
    """
    checked = {**static, "target": target_for(device)}
    try:
        from autotune import select  # optional layer: a failure to import means "untuned"

        tuned = select.config_for(kernel_name, static, sizes, device)
        if tuned is not None:
            config = kernels.Config(**tuned)
            kernels.check_config(checked, config)
            return config
    except Exception as exc:  # noqa: BLE001 - tuning is optional; any failure falls back to the default
        logger.warning("%s: tuned config unusable (%s: %s); using the default", kernel_name, type(exc).__name__, exc)
    return kernels.default_config(checked)
