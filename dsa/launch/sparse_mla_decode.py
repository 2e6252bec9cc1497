"""Launcher of sparse MLA decoding over paged caches: splits each query's slot list over thread blocks, runs the split
attention kernel once per source (the cache, and the extra cache when given) into one float32 partial buffer, then
the combine kernel (``tl_kernels.sparse_mla_decode``). One source in one split (a large batch) skips both: its
attention kernel writes the bf16 output and ``lse`` directly, sink included.

Inputs are assumed validated (``dsa.validation.check_sparse_mla_decode(..., kernel=True)``): bfloat16 ``q``, a
bfloat16 cache or FP8 bytes in ``dsa.kv_format.FP8Layout.for_width(d_qk, d_rope)`` or FlashMLA's MODEL1 pages
(``dsa.kv_format.MODEL1_FP8_LAYOUT``, 584-byte rows: FlashMLA's view of its split pages, whose page stride may exceed
``page_size * 584`` by the page's padding; the kernel reads the pages in place), int32 indices/lengths, contiguous
(the MODEL1 pages: rows back to back within a page), on one CPU or CUDA device. On CPU the kernels are TileLang's
C-target builds (serial loops), on CUDA the sm_90a builds (or the portable schedule elsewhere).

The config is chosen as the prefill launchers choose theirs (``dsa.launch.common.select_config``): on CUDA the tuned
config of the widest source's kernel (its ``static_params``; the source with the most entries per query, which takes
most of the time: DeepSeek-V4's selected entries, not its 128-token window; the cache among equals) for the sizes
``batch``, ``s_q`` and ``topk`` (that source's width) from the config cache (``dsa-autotune --kernels
sparse_mla_decode``), else, and always on the C target, ``tl_kernels.sparse_mla_decode``'s default (the rule until a
GPU record decides: the forward's tiles, on sm_90a the FP8 gather prefetched a step ahead). The other source runs
the same config, or both the default where the tuned one does not suit its format. The split count is not part of
the config: it stays the launcher's whole-wave rule (:func:`split_count`), which follows the chosen config's blocks
per SM.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from autotune.lookup import sku
from dsa import kv_format, validation
from dsa.launch import common
from tl_kernels import build as tl_build
from tl_kernels import sparse_mla_decode as kernels

OptTensor = Tensor | None

__all__ = [
    "KERNEL_NAME", "MIN_STEPS_PER_SPLIT", "SPLIT_OVERHEAD_STEPS", "Plan", "num_splits", "page_stride", "plan", "run",
    "sparse_mla_decode", "split_count", "static_params",
]  # fmt: skip

KERNEL_NAME = "sparse_mla_decode"
MIN_STEPS_PER_SPLIT = 2
"""The fewest ``block_k``-row steps a split takes: below it each split's fixed cost (loading the 64 x 576 query tile,
the final normalisation, one partial row of ``d_v`` float32 per head) outweighs its gather."""
SPLIT_OVERHEAD_STEPS = 4
"""A split's fixed cost in gather steps: the 64 x 576 bf16 query tile it loads (72 KB) and the 64 x 512 float32
partial it writes and the combine reads back (128 KB twice) move about as many bytes as ten 32-row FP8 steps (21 KB
each), mostly through L2; four steps is the rule's guess until a GPU record measures it."""


def static_params(
    *, heads: int, d_qk: int, d_v: int, fp8_layout: kv_format.FP8Layout | None, page_size: int = 1,
    page_bytes: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The attention kernel's static parameters for a bf16 cache (``fp8_layout=None``) or an FP8 one; a split layout
    (MODEL1) also takes its ``page_size`` and the bytes from one page to the next (default: the layout's padded
    page, ``fp8_layout.page_bytes(page_size)``)."""
    if fp8_layout is None:
        return {"heads": heads, "d_qk": d_qk, "d_v": d_v, "kv_format": kernels.KV_FORMAT_BF16, "d_rope": 0, "tile": 1}
    static = {"heads": heads, "d_qk": d_qk, "d_v": d_v, "d_rope": fp8_layout.d_rope, "tile": fp8_layout.tile}
    if not fp8_layout.scales_after_values:
        return {**static, "kv_format": kernels.KV_FORMAT_FP8}
    if fp8_layout.scale_format != "ue8m0" or fp8_layout.rope_offset != fp8_layout.d_nope:
        raise ValueError(
            f"sparse_mla_decode: the paged FP8 kernel reads UE8M0 scales after the NoPE values, got {fp8_layout}"
        )
    return {
        **static, "kv_format": kernels.KV_FORMAT_FP8_PAGED, "page_size": int(page_size),
        "page_bytes": int(fp8_layout.page_bytes(page_size) if page_bytes is None else page_bytes),
        "value_bytes": fp8_layout.value_bytes, "scale_group_bytes": fp8_layout.scale_group_bytes,
    }  # fmt: skip


def split_count(
    *, batch: int, s_q: int, heads: int, topk: int, config: kernels.Config, sms: int, blocks_per_sm: int
) -> int:
    """Splits per query, chosen in whole waves (flash-decoding).

    A grid of ``blocks = batch * s_q * ceil(heads / block_h) * Z`` blocks runs in ``ceil(blocks / (sms *
    blocks_per_sm))`` waves, each as long as one split: its ``ceil(steps / Z)`` steps of ``block_k`` rows plus
    ``SPLIT_OVERHEAD_STEPS``. The rule takes the ``Z`` that minimises waves times wave length, the smallest among
    equals, never a split shorter than ``MIN_STEPS_PER_SPLIT`` steps. At B = 32, s_q = 1, 128 heads, topk 2048, one
    block per SM on 132 SMs: 2 (one wave of 32-step splits), not 5 (2.4 waves, run as 3 of 13 steps)."""
    blocks = batch * s_q * math.ceil(heads / config.block_h)
    slots = max(1, sms * blocks_per_sm)
    steps = math.ceil(topk / config.block_k)
    most = max(1, steps // MIN_STEPS_PER_SPLIT)

    def cost(z: int) -> int:
        return math.ceil(blocks * z / slots) * (math.ceil(steps / z) + SPLIT_OVERHEAD_STEPS)

    return min(range(1, most + 1), key=lambda z: (cost(z), z))


def num_splits(
    *, batch: int, s_q: int, heads: int, topk: int, config: kernels.Config, device: torch.device,
    kv_format_name: str = kernels.KV_FORMAT_FP8,
) -> int:  # fmt: skip
    """:func:`split_count` on ``device``: its SM count, and the blocks per SM of ``config`` from the build tier's
    registers and shared memory (``tl_kernels.sparse_mla_decode.resources``); one on CPU (the C target runs blocks
    one after another)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    registers, smem = kernels.resources(kv_format_name, config)
    per_sm = sku.blocks_per_sm(registers=registers, threads=config.threads, smem_bytes=smem)
    return split_count(batch=batch, s_q=s_q, heads=heads, topk=topk, config=config, sms=sms, blocks_per_sm=per_sm)


def page_stride(kv_cache: torch.Tensor, layout: kv_format.FP8Layout) -> int | None:
    """The bytes from one page of a split-layout (MODEL1) cache ``[num_pages, page_size, row]`` to the next when the
    kernel can read its pages in place: each page's rows back to back (FlashMLA's view), the stride a whole number of
    value rows and scale groups (FlashMLA's pages are padded to a multiple of 576 bytes), the start aligned and the
    storage holding every page's full stride; ``None`` otherwise (the pages are then copied, :func:`_page_bytes`)."""
    num_pages, page_size, row = kv_cache.shape  # FP8 caches hold bytes: strides are in bytes
    stride = kv_cache.stride(0) if num_pages > 1 else layout.page_bytes(page_size)
    if (page_size > 1 and kv_cache.stride(1) != row) or kv_cache.stride(2) != 1 or stride < page_size * row:
        return None
    if stride % layout.value_bytes or stride % layout.scale_group_bytes:
        return None
    if kv_cache.data_ptr() % validation.KERNEL_ALIGNMENT_BYTES:
        return None
    available = kv_cache.untyped_storage().nbytes() - kv_cache.storage_offset()
    return stride if available >= num_pages * stride else None


def _page_bytes(kv_cache: torch.Tensor, layout: kv_format.FP8Layout) -> torch.Tensor:
    """A split-layout cache as ``[num_pages, page_stride]`` uint8: its pages in place where :func:`page_stride`
    allows, else copied into the layout's padded pages (``layout.page_bytes(page_size)`` apart)."""
    num_pages, page_size, row = kv_cache.shape
    stride = page_stride(kv_cache, layout)
    if stride is None:
        stride = layout.page_bytes(page_size)
        pages = torch.zeros((num_pages, stride), dtype=torch.uint8, device=kv_cache.device)
        pages[:, : page_size * row] = kv_cache.reshape(num_pages, page_size * row).view(torch.uint8)
        return pages
    return torch.as_strided(kv_cache.view(torch.uint8), (num_pages, stride), (stride, 1))


def _cache_args(kv_cache: torch.Tensor, layout: kv_format.FP8Layout | None, target: Any) -> tuple[torch.Tensor, ...]:
    """The kernel's cache arguments: the bf16 rows as ``[num_slots, d_qk]``, or three views of the FP8 bytes (e4m3
    values, float32 scales, bf16 RoPE values; ``tl_kernels.sparse_mla_decode.fp8_views``); for a split layout
    (MODEL1) the pages cut into value rows (e4m3 values, bf16 RoPE values) and scale groups (UE8M0 codes as uint8).
    No copies but :func:`_page_bytes`'s."""
    if layout is not None and layout.scales_after_values:
        pages = _page_bytes(kv_cache, layout)
        values, scales = pages.view(-1, layout.value_bytes), pages.view(-1, layout.scale_group_bytes)
    else:
        rows = kv_cache.view(-1, kv_cache.shape[-1])
        if layout is None:
            return (tl_build.to_kernel_arg(rows, target),)
        values = rows.view(torch.uint8)
        scales = values.view(torch.float32)
    return (
        tl_build.to_kernel_arg(values.view(torch.float8_e4m3fn), target),
        scales,
        tl_build.to_kernel_arg(values.view(torch.bfloat16), target),
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a decode call of one shape runs, FlashMLA's scheduler metadata in spirit: the target, the config, per
    source (the cache, then the extra one) its FP8 layout (None: bf16 rows), attention kernel, split count and part
    slice, the combine kernel, and the per-call constants (full-width lengths, the absent sink's stand-in). With
    ``direct`` (one source, one split) the attention kernel writes ``out`` and ``lse`` itself and there is no
    combine (``combine`` None)."""

    target: Any
    config: kernels.Config
    layouts: tuple[kv_format.FP8Layout | None, ...]
    attention: tuple[Any, ...]
    parts: tuple[slice, ...]
    combine: Any
    d_v: int
    full_lengths: tuple[torch.Tensor, ...]
    no_sink: torch.Tensor
    direct: bool = False

    @property
    def splits(self) -> tuple[int, ...]:
        """The split count of each source."""
        return tuple(part.stop - part.start for part in self.parts)


_PLANS: common.PlanCache[Plan] = common.PlanCache(KERNEL_NAME)


def plan(
    q: torch.Tensor,
    caches: list[torch.Tensor],
    widths: list[int],
    *,
    d_v: int,
    d_rope: int,
    has_sink: bool,
    config: kernels.Config | None = None,
    splits: int | None = None,
    direct: bool | None = None,
) -> Plan | None:
    """The plan for ``q [B, s_q, H, d_qk]`` over ``caches`` (the cache, then the extra one; each bf16 rows or FP8
    bytes) with ``widths`` index columns each; ``None`` where the kernels cannot take these widths on ``q``'s device
    (CUDA wants ``d_qk`` and ``d_v`` in whole 64-column swizzle atoms, V3.2: 576/512; the C target takes any; the op
    then runs the reference). ``config`` overrides the default schedule and ``splits`` the split count of every
    source (tests). ``direct`` (default: whenever there is one source and it gets one split) has the attention kernel
    write the output itself, with no float32 partials and no combine; ``False`` keeps the partials and the combine
    (tests)."""
    batch, s_q, heads, d_qk = q.shape
    device = q.device
    # Per source: None (bf16 rows), the FP8 layout's row size, and a split layout's page size and page stride.
    formats = tuple(_cache_format(c, d_qk, d_rope) for c in caches)

    def make() -> Plan | None:
        target = common.target_for(device)
        layouts = tuple(None if f is None else validation.fp8_cache_layout(d_qk, d_rope, f[0]) for f in formats)
        statics = [
            static_params(heads=heads, d_qk=d_qk, d_v=d_v, fp8_layout=layout, page_size=f[1], page_bytes=f[2])
            if f is not None else static_params(heads=heads, d_qk=d_qk, d_v=d_v, fp8_layout=None)
            for layout, f in zip(layouts, formats, strict=True)
        ]
        # Each source may be bf16 or FP8 on its own: one attention kernel per cache format, one config for both (the
        # formats share every constraint but the FP8 layout's).
        try:
            if config is not None:
                for static in statics:
                    kernels.check_config({**static, "target": target}, config)
            widest = max(range(len(widths)), key=lambda i: (widths[i], -i))
            sizes = {"batch": batch, "s_q": s_q, "topk": widths[widest]}
            chosen = config or _choose_config([statics[widest], *statics[:widest], *statics[widest + 1:]], sizes,
                                              device, target)  # fmt: skip
        except ValueError:
            if config is not None:
                raise  # a caller's config that does not suit the target is an error, not a fallback
            return None
        counts = [
            splits or num_splits(batch=batch, s_q=s_q, heads=heads, topk=width, config=chosen, device=device,
                                 kv_format_name=static["kv_format"])
            for width, static in zip(widths, statics, strict=True)
        ]
        firsts = [sum(counts[:i]) for i in range(len(counts))]
        params = dataclasses.asdict(chosen)
        single = counts == [1]
        if direct and not single:
            raise ValueError(f"sparse_mla_decode: direct output needs one source and one split, got splits {counts}")
        use_direct = single if direct is None else direct
        # The direct kernel always reads a sink; -inf stands for none (it adds nothing to the denominator).
        no_sink = (torch.full((heads,), -math.inf, dtype=torch.float32, device=device) if use_direct
                   else common.placeholder(torch.float32, device))  # fmt: skip
        combine = None if use_direct else common.get_kernel(
            kernels.build_combine, target, heads=heads, d_v=d_v, has_sink=has_sink
        )  # fmt: skip
        return Plan(
            target, chosen, layouts,
            tuple(
                common.get_kernel(kernels.build, target, **static, **_source_params(params, static), direct=use_direct)
                for static in statics
            ),
            tuple(slice(first, first + count) for first, count in zip(firsts, counts, strict=True)),
            combine,
            int(d_v),
            tuple(torch.full((batch, s_q), width, dtype=torch.int32, device=device) for width in widths),
            no_sink,
            use_direct,
        )  # fmt: skip

    key = (tuple(q.shape), formats, tuple(widths), int(d_v), int(d_rope), has_sink, config, splits, direct)
    return _PLANS.get(device, key, make)


def _choose_config(
    statics: list[dict[str, Any]], sizes: dict[str, int], device: torch.device, target: Any
) -> kernels.Config:
    """The tuned config of the first source's kernel in ``statics`` (the widest) at ``sizes`` (``common.select_config``;
    the default where none is tuned, and on the C target), or the default where the tuned one does not suit another
    source's format.

    Raises:
        ValueError: not even the default config suits every source (the plan is then ``None``).
    """
    tuned = common.select_config(KERNEL_NAME, kernels, statics[0], sizes, device, target)
    try:
        for static in statics:
            kernels.check_config({**static, "target": target}, tuned)
        return tuned
    except ValueError:
        default = kernels.default_config({**statics[0], "target": target})
        if tuned == default:
            raise
    for static in statics:
        kernels.check_config({**static, "target": target}, default)
    return default


def _cache_format(kv_cache: torch.Tensor, d_qk: int, d_rope: int) -> tuple[int, int, int | None] | None:
    """What a plan needs of a cache: ``None`` for bf16 rows, else ``(row bytes, page size, page stride)``; the page
    stride is a split layout's (MODEL1's) bytes from page to page as the kernel reads them (:func:`_page_bytes`),
    None for a row-per-token layout."""
    if not validation.is_fp8_cache(kv_cache):
        return None
    row, page_size = kv_cache.shape[-1], kv_cache.shape[1]
    layout = validation.fp8_cache_layout(d_qk, d_rope, row)
    if layout is None or not layout.scales_after_values:
        return row, 1, None
    stride = page_stride(kv_cache, layout)
    return row, page_size, layout.page_bytes(page_size) if stride is None else stride


def _source_params(params: dict[str, Any], static: dict[str, Any]) -> dict[str, Any]:
    """The config's builder parameters for one source: the FP8-only fields (``kernels.FP8_ONLY_FIELDS``: the
    prefetch, the cluster) mean nothing to a bf16 cache, so a bf16 source builds without them (one kernel, whatever
    the other source's format)."""
    if static["kv_format"] in kernels.FP8_FORMATS:
        return params
    return {**params, **{name: False for name in kernels.FP8_ONLY_FIELDS}}


def _lengths(topk_length: torch.Tensor | None, full: torch.Tensor) -> torch.Tensor:
    """``[B, s_q]`` int32 row lengths: ``topk_length`` broadcast over the queries of a sequence, else ``full`` (the
    plan's full-width lengths)."""
    if topk_length is None:
        return full
    if topk_length.dim() == 1:
        return topk_length.view(-1, 1).expand(full.shape).contiguous()
    return topk_length


def run(
    p: Plan, q: Tensor, sources: list[tuple[Tensor, Tensor, OptTensor]], sm_scale: float, attn_sink: OptTensor
) -> tuple[Tensor, Tensor]:
    """``(out [B, s_q, H, d_v] bfloat16, lse [B, s_q, H] float32)`` under plan ``p``; ``sources``: ``(cache,
    indices, topk_length)`` per source, in the plan's order."""
    batch, s_q, heads, _ = q.shape
    device = q.device
    q_arg = tl_build.to_kernel_arg(q, p.target)
    sink = p.no_sink if attn_sink is None else attn_sink
    out = common.new_output((batch, s_q, heads, p.d_v), torch.bfloat16, device)
    lse = common.new_output((batch, s_q, heads), torch.float32, device)
    if p.direct:
        (source, idx, length), = sources
        p.attention[0](
            q_arg, *_cache_args(source, p.layouts[0], p.target), idx, _lengths(length, p.full_lengths[0]),
            float(sm_scale), sink, tl_build.to_kernel_arg(out, p.target), lse,
        )  # fmt: skip
        return out, lse
    total = p.parts[-1].stop
    # Every part is written by the attention kernel (an empty split writes 0 and -inf), so new_output suffices.
    out_partial = common.new_output((total, batch, s_q, heads, p.d_v), torch.float32, device)
    lse_partial = common.new_output((total, batch, s_q, heads), torch.float32, device)
    for (source, idx, length), layout, attention, part, full in zip(
        sources, p.layouts, p.attention, p.parts, p.full_lengths, strict=True
    ):
        attention(
            q_arg, *_cache_args(source, layout, p.target), idx, _lengths(length, full), float(sm_scale),
            out_partial[part], lse_partial[part],
        )  # fmt: skip
    p.combine(out_partial, lse_partial, sink, tl_build.to_kernel_arg(out, p.target), lse)
    return out, lse


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
    direct: bool | None = None,
    planned: Plan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_mla_decode`` (contract: ``dsa.reference.sparse_mla_decode``) on the kernels: :func:`run` of
    :func:`plan`.

    Args:
        q, kv_cache, indices, sm_scale, d_v, topk_length, attn_sink, extra_*, d_rope: as the contract says, laid out
            by the op (row-major); a cache is bf16 rows or FP8-layout bytes (uint8/int8/float8_e4m3fn).
        config (Config | None): overrides the default schedule (tests).
        splits (int | None): overrides the split count of every source (tests; default :func:`num_splits`).
        direct (bool | None): overrides whether one split writes the output itself (tests; default :func:`plan`'s).
        planned (Plan | None): the caller's plan (``dsa.library`` planned to learn whether the kernels take the
            widths); default :func:`plan` (``ValueError`` where they do not).

    Returns:
        out ``[B, s_q, H, d_v]`` bfloat16 and lse ``[B, s_q, H]`` float32.
    """
    sources = [(kv_cache, indices, topk_length)]
    if extra_kv_cache is not None:
        sources.append((extra_kv_cache, extra_indices, extra_topk_length))
    p = planned
    if p is None:
        p = plan(
            q, [c for c, _, _ in sources], [i.shape[-1] for _, i, _ in sources], d_v=d_v, d_rope=d_rope,
            has_sink=attn_sink is not None, config=config, splits=splits, direct=direct,
        )  # fmt: skip
        if p is None:
            raise ValueError(f"sparse_mla_decode: no kernel for d_qk={q.shape[-1]}, d_v={d_v} on {q.device}")
    return run(p, q, sources, sm_scale, attn_sink)
