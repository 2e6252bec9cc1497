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
from tl_kernels import topk as kernels

__all__ = ["KERNEL_NAME", "static_params", "topk_indices"]

KERNEL_NAME = "topk"
"""Name of the kernel in the tuner, the config cache and the benchmark."""


def static_params(k: int) -> dict[str, Any]:
    """The kernel's static parameters: ``{"k": k}``."""
    return {"k": int(k)}


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
    static = static_params(k)
    sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}
    config = common.launch_config(KERNEL_NAME, kernels, static, sizes, device, config)
    kernel = common.get_kernel(kernels.build, common.target_for(device), **static, **dataclasses.asdict(config))
    indices = common.new_output((batch, seq, static["k"]), torch.int32, device)
    kernel(scores, indices)
    return indices
