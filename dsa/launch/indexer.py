"""Launcher of the lightning indexer: picks the config, compiles through the cache, allocates and runs the kernel.

Inputs are assumed validated (``dsa.validation.check_index_scores(..., kernel=True)``): right dtypes, shapes,
contiguity, one device (CPU or CUDA), ``k_scale`` exactly for FP8, ``starts``/``ends`` together. On CPU the kernel is
TileLang's C-target build (bf16 travels as uint16 bits, e4m3 as uint8); on CUDA the sm_90a build.
"""

import dataclasses
from typing import Any

import torch

from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import indexer as kernels

__all__ = ["KERNEL_NAME", "index_scores", "kernel_inputs", "static_params"]

KERNEL_NAME = "indexer"
"""Name of the kernel in the tuner, the config cache and the benchmark."""

_DTYPE_NAMES: dict[torch.dtype, str] = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn"}


def static_params(q: torch.Tensor, *, ranged: bool) -> dict[str, Any]:
    """The kernel's static parameters for ``q [B, S, H_i, D_i]`` (``ranged``: starts/ends given)."""
    return {
        "heads": int(q.shape[2]),
        "dim": int(q.shape[3]),
        "dtype": _DTYPE_NAMES[q.dtype],
        "mode": "range" if ranged else "causal",
    }


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
    static = static_params(q, ranged=starts is not None)
    sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}
    config = common.launch_config(KERNEL_NAME, kernels, static, sizes, device, config)

    kernel = common.get_kernel(kernels.build, target, **static, **dataclasses.asdict(config))
    scores = common.new_output((batch, seq, seq_kv), torch.float32, device)
    kernel(*kernel_inputs(q, k, weights, k_scale, starts, ends, target), scores)
    return scores


def kernel_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    k_scale: torch.Tensor | None,
    starts: torch.Tensor | None,
    ends: torch.Tensor | None,
    target: Any,
) -> list[torch.Tensor]:
    """The input arguments of an indexer-family kernel (the indexer, the fused selection) in their order: q and k as
    the target carries them (bits on the C target), weights, then k_scale for FP8 and starts/ends when given."""
    args = [tl_build.to_kernel_arg(q, target), tl_build.to_kernel_arg(k, target), weights]
    if k_scale is not None:
        args.append(k_scale)
    if starts is not None:
        args += [starts, ends]
    return args
