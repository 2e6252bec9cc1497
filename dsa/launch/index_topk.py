"""Launcher of the fused selection kernel: picks the config, compiles through the cache, allocates and runs it.

Inputs are assumed validated (``dsa.validation.check_index_topk(..., kernel=True)``): the indexer's dtypes, shapes,
contiguity and device rules, ``topk >= 1``. On CPU the kernel is TileLang's C-target build of
``tl_kernels.index_topk``; on CUDA the build for the device's architecture. ``B``, ``S`` and ``S_kv`` are symbolic:
one compiled kernel serves every length for the static parameters (heads, dim, dtype, mode, topk).
"""

import dataclasses
from typing import Any

import torch

from dsa.launch import common
from dsa.launch import indexer as indexer_launch
from tl_kernels import build as tl_build
from tl_kernels import index_topk as kernels

__all__ = ["KERNEL_NAME", "fits", "index_topk", "index_topk_paged", "paged_static_params", "static_params"]

KERNEL_NAME = "index_topk"
_SCALE_BYTES = 4
"""Name of the kernel in the tuner, the config cache and the benchmark."""


def static_params(q: torch.Tensor, topk: int, *, ranged: bool) -> dict[str, Any]:
    """The kernel's static parameters: the indexer's (heads, dim, dtype, mode) and ``topk``."""
    return {**indexer_launch.static_params(q, ranged=ranged), "topk": int(topk)}


def fits(q: torch.Tensor, topk: int, *, ranged: bool) -> bool:
    """Whether the fused kernel has a config for these static parameters on ``q``'s device (its candidate buffers
    must fit in shared memory: ``topk`` up to about 16K on Hopper)."""
    static = static_params(q, topk, ranged=ranged)
    try:
        kernels.default_config({**static, "target": common.target_for(q.device)})
    except ValueError:
        return False
    return True


def index_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    k_scale: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    config: kernels.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``index_topk`` (contract: ``dsa.reference.index_topk``) by the fused kernel: no ``[B, S, S_kv]`` buffer.

    Args:
        q (torch.Tensor): ``[B, S, H_i, D_i]``, bfloat16 or float8_e4m3fn.
        k (torch.Tensor): ``[B, S_kv, D_i]``, the dtype of ``q``.
        weights (torch.Tensor): ``[B, S, H_i]``, float32.
        topk (int): entries per query, ``>= 1``.
        k_scale (torch.Tensor | None): ``[B, S_kv]``, float32; given for FP8 inputs, None for bf16.
        starts, ends (torch.Tensor | None): ``[B, S]``, int32, together: query ``t`` sees ``starts <= s < ends``;
            omitted: causal, aligned bottom-right (``s <= t + S_kv - S``).
        config (Config | None): overrides the config selection (tests and the tuner).

    Returns:
        indices (torch.Tensor): ``[B, S, topk]``, int32, a set per row, ``-1`` padding.
        scores (torch.Tensor): ``[B, S, topk]``, float32, the index score at each index, ``-inf`` at padding.
    """
    batch, seq = q.shape[:2]
    seq_kv = k.shape[1]
    device = q.device
    target = common.target_for(device)
    static = static_params(q, topk, ranged=starts is not None)
    sizes = {"batch": batch, "seq_len": seq, "seq_len_kv": seq_kv}
    config = common.launch_config(KERNEL_NAME, kernels, static, sizes, device, config)
    kernel = common.get_kernel(kernels.build, target, **static, **dataclasses.asdict(config))
    indices = common.new_output((batch, seq, static["topk"]), torch.int32, device)
    scores = common.new_output((batch, seq, static["topk"]), torch.float32, device)
    kernel(*indexer_launch.kernel_inputs(q, k, weights, k_scale, starts, ends, target), indices, scores)
    return indices, scores


def paged_static_params(q: torch.Tensor, topk: int, *, page_size: int) -> dict[str, Any]:
    """The static parameters of the paged (decode) variant: the ranged indexer's, ``topk``, the page size and, for
    FP8 keys, the float32 column of a key row's scale (``dsa.cache.index_key_layout``: after its ``D_i`` bytes)."""
    static = {**static_params(q, topk, ranged=True), "page_size": int(page_size)}
    static["scale_col"] = int(q.shape[-1]) // _SCALE_BYTES if q.dtype == torch.float8_e4m3fn else 0
    return static


def index_topk_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    block_table: torch.Tensor,
    ends: torch.Tensor,
    starts: torch.Tensor | None = None,
    config: kernels.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``index_topk_decode`` (contract: ``dsa.reference.index_topk_decode``) by the fused kernel reading the keys
    through the block table.

    Args:
        q (torch.Tensor): ``[B, s_q, H_i, D_i]``, bfloat16 or float8_e4m3fn.
        k_cache (torch.Tensor): ``[num_pages, page_size, D_i]`` bfloat16, or ``[num_pages, page_size, D_i + 4]``
            uint8 FP8 key rows for FP8 q.
        weights (torch.Tensor): ``[B, s_q, H_i]``, float32.
        block_table (torch.Tensor): ``[B, pages_per_sequence]``, int32.
        ends, starts (torch.Tensor): ``[B, s_q]``, int32 (``starts`` default 0).
        config (Config | None): overrides the default config (tests). The paged variant is not tuned yet.

    Returns:
        positions ``[B, s_q, topk]`` int32 (``-1`` padding) and their scores ``[B, s_q, topk]`` float32.
    """
    batch, s_q = q.shape[:2]
    device = q.device
    target = common.target_for(device)
    static = paged_static_params(q, topk, page_size=k_cache.shape[1])
    if config is None:
        config = kernels.default_config({**static, "target": target})
    else:
        config = common.checked_config(kernels, static, config, device)
    kernel = common.get_kernel(kernels.build, target, **static, **dataclasses.asdict(config))
    rows = k_cache.view(-1, k_cache.shape[-1])
    if starts is None:
        starts = torch.zeros_like(ends)
    if q.dtype == torch.float8_e4m3fn:
        raw = rows.view(torch.uint8)
        keys = [tl_build.to_kernel_arg(raw.view(torch.float8_e4m3fn), target), weights, raw.view(torch.float32)]
    else:
        keys = [tl_build.to_kernel_arg(rows, target), weights]
    indices = common.new_output((batch, s_q, static["topk"]), torch.int32, device)
    scores = common.new_output((batch, s_q, static["topk"]), torch.float32, device)
    kernel(tl_build.to_kernel_arg(q, target), *keys, block_table, starts, ends, indices, scores)
    return indices, scores
