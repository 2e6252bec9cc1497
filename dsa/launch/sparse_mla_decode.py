"""Launcher of sparse MLA decoding over paged caches: splits each query's slot list over thread blocks, runs the split
attention kernel once per source (the cache, and the extra cache when given) into one float32 partial buffer, then
the combine kernel (``tl_kernels.sparse_mla_decode``).

Inputs are assumed validated (``dsa.validation.check_sparse_mla_decode(..., kernel=True)``): bfloat16 ``q``, a
bfloat16 cache or FP8 bytes in ``dsa.cache.FP8Layout.for_width(d_qk, d_rope)``, int32 indices/lengths, contiguous,
on one CPU or CUDA device. On CPU the kernels are TileLang's C-target builds (serial loops), on CUDA the sm_90a builds
(or the portable schedule elsewhere). The kernel is not tuned yet: it runs the forward kernel's default schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from dsa import cache, validation
from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import sparse_mla_decode as kernels

__all__ = ["KERNEL_NAME", "MIN_STEPS_PER_SPLIT", "WAVES", "fits", "num_splits", "sparse_mla_decode", "static_params"]

KERNEL_NAME = "sparse_mla_decode"
WAVES = 2
"""Thread blocks per streaming multiprocessor that the split count aims for (flash-decoding): a small batch spreads
each query's slots over enough blocks to fill the GPU twice over."""
MIN_STEPS_PER_SPLIT = 2
"""The fewest ``block_k``-row steps a split takes: below it each split's fixed cost (loading the 64 x 576 query tile,
the final normalisation, one partial row of ``d_v`` float32 per head) outweighs its gather."""


def static_params(*, heads: int, d_qk: int, d_v: int, fp8_layout: cache.FP8Layout | None) -> dict[str, Any]:
    """The attention kernel's static parameters for a bf16 cache (``fp8_layout=None``) or an FP8 one."""
    if fp8_layout is None:
        return {"heads": heads, "d_qk": d_qk, "d_v": d_v, "kv_format": kernels.KV_FORMAT_BF16, "d_rope": 0, "tile": 1}
    return {
        "heads": heads, "d_qk": d_qk, "d_v": d_v, "kv_format": kernels.KV_FORMAT_FP8, "d_rope": fp8_layout.d_rope,
        "tile": fp8_layout.tile,
    }  # fmt: skip


def fits(q: torch.Tensor, d_v: int, caches: list[torch.Tensor], d_rope: int) -> bool:
    """Whether the kernels serve these widths on ``q``'s device: CUDA wants ``d_qk`` and ``d_v`` in whole 64-column
    swizzle atoms (V3.2: 576/512), the C target takes any (the op runs the reference where this is False)."""
    heads, d_qk = q.shape[2], q.shape[3]
    target = common.target_for(q.device)
    for kv_cache in caches:
        layout = cache.FP8Layout.for_width(d_qk, d_rope) if validation.is_fp8_cache(kv_cache) else None
        static = {**static_params(heads=heads, d_qk=d_qk, d_v=d_v, fp8_layout=layout), "target": target}
        try:
            kernels.check_config(static, kernels.default_config(static))
        except ValueError:
            return False
    return True


def num_splits(
    *, batch: int, s_q: int, heads: int, topk: int, config: kernels.Config, device: torch.device
) -> int:
    """How many splits each query's slot list gets: enough thread blocks for ``WAVES`` per SM on CUDA, never a split
    shorter than ``MIN_STEPS_PER_SPLIT`` steps; one on CPU (the C target runs blocks one after another)."""
    if device.type != "cuda":
        return 1
    blocks = batch * s_q * math.ceil(heads / config.block_h)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = math.ceil(WAVES * sms / blocks)
    most = max(1, math.ceil(topk / config.block_k) // MIN_STEPS_PER_SPLIT)
    return max(1, min(wanted, most))


def _lengths(topk_length: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor:
    """``[B, s_q]`` int32 row lengths: ``topk_length`` broadcast over the queries of a sequence, else the full width."""
    batch, s_q, width = indices.shape
    if topk_length is None:
        return torch.full((batch, s_q), width, dtype=torch.int32, device=indices.device)
    if topk_length.dim() == 1:
        return topk_length.view(batch, 1).expand(batch, s_q).contiguous()
    return topk_length


def _cache_args(kv_cache: torch.Tensor, layout: cache.FP8Layout | None, target: Any) -> tuple[torch.Tensor, ...]:
    """The kernel's cache arguments: the bf16 rows as ``[num_slots, d_qk]``, or three views of the FP8 bytes (e4m3
    values, float32 scales, bf16 RoPE values; ``tl_kernels.sparse_mla_decode.fp8_views``). No copies."""
    rows = kv_cache.view(-1, kv_cache.shape[-1])
    if layout is None:
        return (tl_build.to_kernel_arg(rows, target),)
    raw = rows.view(torch.uint8)
    return (
        tl_build.to_kernel_arg(raw.view(torch.float8_e4m3fn), target),
        raw.view(torch.float32),
        tl_build.to_kernel_arg(raw.view(torch.bfloat16), target),
    )


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    *,
    sm_scale: float,
    d_v: int,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_kv_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    d_rope: int = 64,
    config: kernels.Config | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA decoding (contract: ``dsa.reference.sparse_mla_decode``).

    Args:
        q (torch.Tensor): ``[B, s_q, H, d_qk]``, bfloat16.
        kv_cache (torch.Tensor): ``[num_pages, page_size, d_qk]`` bfloat16, or ``[num_pages, page_size, bytes]``
            FP8-layout bytes (uint8/int8/float8_e4m3fn).
        indices (torch.Tensor): ``[B, s_q, topk]``, int32 slots.
        sm_scale (float), d_v (int), d_rope (int): as in ``dsa.ops.sparse_mla_decode``.
        topk_length (torch.Tensor | None): ``[B]`` or ``[B, s_q]``, int32.
        attn_sink (torch.Tensor | None): ``[H]``, float32.
        extra_kv_cache, extra_indices, extra_topk_length: the second source (same conventions and cache format).
        config (Config | None): overrides the default schedule (tests).
        splits (int | None): overrides the split count of every source (tests; default :func:`num_splits`).

    Returns:
        out ``[B, s_q, H, d_v]`` bfloat16 and lse ``[B, s_q, H]`` float32 (natural log, the sink excluded; ``-inf``
        and ``out = 0`` for a query with nothing valid).
    """
    batch, s_q, heads, d_qk = q.shape
    device = q.device
    target = common.target_for(device)
    sources = [(kv_cache, indices, topk_length)]
    if extra_kv_cache is not None:
        sources.append((extra_kv_cache, extra_indices, extra_topk_length))
    # Each source may be bf16 or FP8 on its own: one attention kernel per cache format, one config for both (the
    # formats share every constraint but the FP8 layout's).
    layouts = [cache.FP8Layout.for_width(d_qk, d_rope) if validation.is_fp8_cache(c) else None for c, _, _ in sources]
    statics = [static_params(heads=heads, d_qk=d_qk, d_v=d_v, fp8_layout=layout) for layout in layouts]
    if config is None:
        config = kernels.default_config({**statics[0], "target": target})
    for static in statics:
        common.checked_config(kernels, static, config, device)
    counts = [
        splits or num_splits(batch=batch, s_q=s_q, heads=heads, topk=idx.shape[-1], config=config, device=device)
        for _, idx, _ in sources
    ]
    # Every part is written by the attention kernel (an empty split writes 0 and -inf), so new_output suffices.
    out_partial = common.new_output((sum(counts), batch, s_q, heads, d_v), torch.float32, device)
    lse_partial = common.new_output((sum(counts), batch, s_q, heads), torch.float32, device)
    q_arg = tl_build.to_kernel_arg(q, target)
    first = 0
    for (source, idx, length), layout, static, count in zip(sources, layouts, statics, counts, strict=True):
        attention = common.get_kernel(kernels.build, target, **static, **dataclasses.asdict(config))
        part = slice(first, first + count)
        attention(
            q_arg, *_cache_args(source, layout, target), idx, _lengths(length, idx), float(sm_scale),
            out_partial[part], lse_partial[part],
        )  # fmt: skip
        first += count

    combine = common.get_kernel(kernels.build_combine, target, heads=heads, d_v=d_v, has_sink=attn_sink is not None)
    if attn_sink is None:
        attn_sink = torch.zeros((1,), dtype=torch.float32, device=device)
    out = common.new_output((batch, s_q, heads, d_v), torch.bfloat16, device)
    lse = common.new_output((batch, s_q, heads), torch.float32, device)
    combine(out_partial, lse_partial, attn_sink, tl_build.to_kernel_arg(out, target), lse)
    return out, lse
