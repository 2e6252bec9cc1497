"""Launcher of the lightning indexer: picks the config, compiles through the cache, allocates and runs the kernel.

Inputs are assumed validated (``dsa.validation.check_index_scores(..., kernel=True)``): right dtypes, shapes,
contiguity, one device (CPU or CUDA). On CPU the kernel is TileLang's C-target build (bf16 travels as uint16 bits,
e4m3 as uint8); on CUDA the sm_90a build.
"""

import dataclasses
from typing import Any

import torch

from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import indexer as kernels


__all__ = ["KERNEL_NAME", "index_scores", "new_output", "select_config", "static_params"]

KERNEL_NAME = "index_scores"
"""Name of the kernel in the tuned-config cache."""

_DTYPE_NAMES: dict[torch.dtype, str] = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn"}


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a tensor the kernel fully overwrites (uninitialised; tests replace this to poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def static_params(q: torch.Tensor, *, ranged: bool) -> dict[str, Any]:
    """The kernel's static parameters for ``q [B, S, H_i, D_i]`` (``ranged``: starts/ends given)."""
    if q.dtype not in _DTYPE_NAMES:
        raise TypeError(f"the indexer kernel takes bfloat16 or float8_e4m3fn q, got {q.dtype}")
    return {
        "heads": int(q.shape[2]),
        "dim": int(q.shape[3]),
        "dtype": _DTYPE_NAMES[q.dtype],
        "mode": "range" if ranged else "causal",
    }


def select_config(static: dict[str, Any], sizes: dict[str, int], device: torch.device) -> kernels.Config:
    """The tuned config for this launch when the tuning cache has a valid one, else the kernel's default config.

    ``static`` holds the kernel's static parameters (without the target); ``sizes`` the runtime sizes (``batch``,
    ``seq_len``, ``seq_len_kv``). A missing, failing or invalid tuned entry is logged and ignored.
    """
    return common.select_config(KERNEL_NAME, kernels, static, sizes, device)


def index_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    config: kernels.Config | None = None,
) -> torch.Tensor:
    """Lightning-indexer scores (contract: ``dsa.reference.index_scores``) computed by the TileLang kernel.

    Args:
        q (torch.Tensor): ``[B, S, H_i, D_i]``, bfloat16 or float8_e4m3fn.
        k (torch.Tensor): ``[B, S_kv, D_i]``, the dtype of ``q``.
        weights (torch.Tensor): ``[B, S, H_i]``, float32.
        k_scale (torch.Tensor | None): ``[B, S_kv]``, float32; given for FP8 inputs, None for bf16 (scale 1).
        starts, ends (torch.Tensor | None): ``[B, S]``, int32, together: query ``t`` sees ``starts <= s < ends``;
            omitted: causal, aligned bottom-right (``s <= t + S_kv - S``).
        config (Config | None): overrides the config selection (tests and the tuner).

    Returns:
        scores (torch.Tensor): ``[B, S, S_kv]``, float32; exactly ``-inf`` at invisible positions.
    """
    batch, seq, _, _ = q.shape
    seq_kv = k.shape[1]
    device = q.device
    target = common.target_for(device)
    ranged = starts is not None
    static = static_params(q, ranged=ranged)
    fp8 = static["dtype"] == "float8_e4m3fn"
    if fp8 != (k_scale is not None):
        raise ValueError("k_scale must be given exactly when q and k are float8_e4m3fn")
    if ranged != (ends is not None):
        raise ValueError("starts and ends must be given together")
    if config is None:
        config = select_config(static, {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}, device)
    else:
        kernels.check_config({**static, "target": target}, config)

    kernel = tl_build.get_kernel(kernels.build, target=target, **static, **dataclasses.asdict(config))
    scores = new_output((batch, seq, seq_kv), torch.float32, device)
    args = [tl_build.to_kernel_arg(q, target), tl_build.to_kernel_arg(k, target), weights]
    if fp8:
        args.append(k_scale)
    if ranged:
        args += [starts, ends]
    kernel(*args, scores)
    return scores
