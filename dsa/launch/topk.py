"""Launcher of the top-k selector: picks the config, compiles through the cache, allocates and runs the kernel.

Inputs are assumed validated (``dsa.validation.check_topk_indices(..., kernel=True)``): ``scores [B, S, S_kv]``
float32, contiguous, non-empty, on CPU or CUDA, and ``k >= 1``. On CPU the kernel is TileLang's C-target build of
``tl_kernels.topk`` (the same selection logic, serial loops); on CUDA the sm_90a radix-select kernel. ``k`` is the
only static parameter; ``B``, ``S`` and ``S_kv`` are symbolic, so one compiled kernel serves every shape.
"""

import dataclasses
from typing import Any

import torch

from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import topk as kernels


__all__ = ["KERNEL_NAME", "new_output", "select_config", "static_params", "topk_indices"]

KERNEL_NAME = "topk_indices"
"""Name of the kernel in the tuned-config cache."""


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a tensor the kernel fully overwrites (uninitialised; tests replace this to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def static_params(k: int) -> dict[str, Any]:
    """The kernel's static parameters: ``{"k": k}``."""
    return {"k": int(k)}


def select_config(static: dict[str, Any], sizes: dict[str, int], device: torch.device) -> kernels.Config:
    """The tuned config for this launch when the tuning cache has a valid one, else the kernel's default config.

    ``static`` holds the kernel's static parameters (without the target); ``sizes`` the runtime sizes (``batch``,
    ``seq_len``, ``seq_len_kv``). CPU launches are never tuned. A missing, failing or invalid entry is logged and
    ignored.
    """
    return common.select_config(KERNEL_NAME, kernels, static, sizes, device)


def topk_indices(scores: torch.Tensor, k: int, *, config: kernels.Config | None = None) -> torch.Tensor:
    """Positions of the ``k`` largest finite scores per row (contract: ``dsa.reference.topk_indices``).

    Args:
        scores (torch.Tensor): ``[B, S, S_kv]``, float32, contiguous, CPU or CUDA.
        k (int): ``>= 1``; may exceed ``S_kv``.
        config (Config | None): overrides the config selection (tests and the tuner).

    Returns:
        indices (torch.Tensor): ``[B, S, k]``, int32, on the device of ``scores``: a set per row (order unspecified),
        ``-1`` padding when a row has fewer than ``k`` finite scores.
    """
    batch, seq, seq_kv = scores.shape
    device = scores.device
    target = common.target_for(device)
    static = static_params(k)
    if config is None:
        config = select_config(static, {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}, device)
    else:
        kernels.check_config({**static, "target": target}, config)
    kernel = tl_build.get_kernel(kernels.build, target=target, **static, **dataclasses.asdict(config))
    indices = new_output((batch, seq, static["k"]), torch.int32, device)
    kernel(scores, indices)
    return indices
