"""What every launcher shares: the compile target of a device, the choice of a kernel config, compiling through the
kernel cache, and allocating outputs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import Any

import torch

from autotune.lookup import select
from dsa import env, hardware
from tl_kernels import build as tl_build
from tl_kernels import dsl

logger = logging.getLogger(__name__)

_TILELANG_LOGGER = "tilelang"
# The DSA_LOG level last applied to TileLang's logger (None: not yet in this process).
_applied_log_level: list[int | None] = [None]


def target_for(device: torch.device) -> dsl.Target:
    """The C target for CPU tensors (CPU tier); for CUDA tensors the architecture
    :func:`dsa.hardware.target_for_capability` names for the device (sm_90a on Hopper, never on anything else).

    Raises:
        RuntimeError: a CUDA device without kernels (the dispatcher sends none here; a direct launcher call might).
    """
    if device.type == "cpu":
        return dsl.CPU_TARGET
    target = hardware.device_target(device)
    if target is None:
        major, minor = hardware.cuda_capability(device)
        raise RuntimeError(f"no TileLang kernels are built for {device} (compute capability {major}.{minor})")
    return target


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor a kernel fully overwrites, uninitialised (the tests replace this one function to poison every
    launcher's outputs with NaN, so that an element a kernel forgot to write fails)."""
    return torch.empty(shape, dtype=dtype, device=device)


def select_config(
    kernel_name: str, kernels: ModuleType, static: dict[str, Any], sizes: dict[str, int], device: torch.device
) -> Any:
    """The tuned config of ``kernels`` (a ``tl_kernels`` module) for this launch, else its default config.

    ``static`` holds the kernel's static parameters (without the target); ``sizes`` the runtime sizes (``batch``,
    ``seq_len``, ``seq_len_kv``, ...). CPU launches are never tuned. :func:`autotune.lookup.select.config_for` returns a
    config already checked for this target, or ``None`` (then the default, which works for every shape). The portable
    schedule on Hopper (``DSA_PORTABLE=1``) always runs its default.
    """
    target = target_for(device)
    # Tuned configs are stored per SKU for its own schedule: the portable schedule that DSA_PORTABLE=1 builds on
    # Hopper (a check of the kernels other GPUs run) runs its default, never a config tuned for sm_90a.
    if device.type == "cuda" and not (env.portable() and hardware.is_hopper(device)):
        tuned = select.config_for(kernel_name, static, sizes, device, target=target, cache_dir=env.cache_dir())
        if tuned is not None:
            return tuned
    return kernels.default_config({**static, "target": target})


def checked_config(kernels: ModuleType, static: dict[str, Any], config: Any, device: torch.device) -> Any:
    """``config`` (a caller's override) after the kernel module's ``check_config`` for this launch's target."""
    kernels.check_config({**static, "target": target_for(device)}, config)
    return config


def launch_config(
    kernel_name: str,
    kernels: ModuleType,
    static: dict[str, Any],
    sizes: dict[str, int],
    device: torch.device,
    config: Any = None,
) -> Any:
    """The config a launch runs: the caller's ``config`` after :func:`checked_config`, else :func:`select_config`."""
    if config is None:
        return select_config(kernel_name, kernels, static, sizes, device)
    return checked_config(kernels, static, config, device)


def get_kernel(builder: Callable[..., Any], target: dsl.Target, **params: Hashable) -> Any:
    """``tl_kernels.build.get_kernel`` with the settings of ``dsa.env``: the g++ flags of C-target kernels, and
    TileLang's log level (``DSA_LOG``; its per-compile INFO lines stay off a user's stderr unless asked for)."""
    level = env.log_level()
    if _applied_log_level[0] != level:
        logging.getLogger(_TILELANG_LOGGER).setLevel(level)
        _applied_log_level[0] = level
    if dsl.is_cpu(target):
        return tl_build.get_kernel(builder, target=target, cpu_flags=env.cpu_compile_flags(), **params)
    return tl_build.get_kernel(builder, target=target, **params)
