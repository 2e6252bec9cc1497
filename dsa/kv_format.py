"""Every byte layout of the caches and every FP8 quantiser: the one owner that caches, launchers, references and
byte counts read (nobody recomputes ``656`` or ``d // 4``).

**Slots** (the paged caches' addressing, ``dsa.serving.cache``): a cache holds ``num_pages`` pages of ``page_size``
token rows. Sequence ``b`` owns the pages listed in ``block_table[b]``; its token at position ``p`` lives in **slot**
``block_table[b, p // page_size] * page_size + p % page_size``: FlashMLA's ``indices_in_kvcache`` convention, so
slots index the cache viewed as ``[num_pages * page_size, width]``. Slot ``-1`` (and any slot out of range) is invalid.

**FP8 layout** (FlashMLA's V3.2 sparse-decode cache, 656 bytes per token for the 576-wide latent row): the row's first
``d_nope`` values (512) as float8_e4m3fn bytes, then one float32 scale per ``tile`` (128) of them (4 scales, 16 bytes),
then the last ``d_rope`` values (64) as raw bfloat16 (128 bytes, not quantised). A tile's scale is its absolute maximum
divided by 448 (the largest e4m3 value), at least ``1e-4``, rounded **up to a power of two**; the stored value is the
multiplier (``value = fp8 * scale``). Power-of-two scales make dequantisation exact in bf16 and survive Blackwell's
e8m0 scale conversion (which truncates). Other latent widths use the same recipe with ``tile = gcd(d_nope, 128)``
(the tiny config: 32 NoPE + 8 RoPE values, ``tile`` 32, 52 bytes per token); ``d_nope`` must be a multiple of 16 so
that the scales stay 16-byte aligned, as FlashMLA's kernels load them. The indexer's key cache uses the recipe with no
RoPE part and one tile per token (``FP8Layout(d_nope=128, d_rope=0, tile=128)``: 128 FP8 bytes and one float32 scale).

**The model's activation quantiser** (:func:`quantize_fp8_blockwise`, V3.2's ``act_quant`` for the indexer's queries
and keys) is a different recipe with the same ``FP8_MAX``: it floors the block's *amax* at ``FP8_AMAX_FLOOR`` (not the
scale), rounds the scale up to a power of two only on request (``ue8m0``) and clamps before the cast. Its keys are
stored as they are (:func:`pack_index_keys_fp8`), never re-quantised with the cache recipe.

Values (``FP8Layout``) and pure functions only; tl_kernels cannot import ``dsa``, so the kernels take
these numbers as builder parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FP8_AMAX_FLOOR",
    "FP8_DTYPE",
    "FP8_MAX",
    "INVALID_SLOT",
    "SCALE_FLOOR",
    "V32_FP8_LAYOUT",
    "FP8Layout",
    "dequantize_kv_fp8",
    "index_key_layout",
    "pack_index_keys_fp8",
    "positions_to_slots",
    "quantize_fp8_blockwise",
    "quantize_kv_fp8",
    "unpack_index_keys_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""The largest finite float8_e4m3fn value."""
SCALE_FLOOR = 1e-4
"""The smallest scale before rounding (an all-zero tile gets ``2**-13``)."""
FP8_AMAX_FLOOR = 1e-4
"""The activation quantiser's floor on a block's absolute maximum (an all-zero block gets a finite scale)."""
INVALID_SLOT = -1
_V32_TILE = 128
_SCALE_ALIGN = 16  # bytes: the scales are loaded as one 16-byte vector
_SCALE_BYTES = 4
_ROPE_BYTES = 2


@dataclass(frozen=True)
class FP8Layout:
    """The byte layout of one FP8 cache row: ``d_nope`` FP8 values, ``d_nope // tile`` float32 scales, ``d_rope``
    bf16 values."""

    d_nope: int
    d_rope: int
    tile: int

    def __post_init__(self) -> None:
        if self.d_nope < 1 or self.d_rope < 0 or self.tile < 1 or self.d_nope % self.tile:
            raise ValueError(f"FP8Layout: tile {self.tile} must divide d_nope {self.d_nope} (d_rope >= 0)")
        if self.d_nope % _SCALE_ALIGN:
            raise ValueError(f"FP8Layout: d_nope {self.d_nope} must be a multiple of {_SCALE_ALIGN} (scale alignment)")

    @classmethod
    def for_width(cls, width: int, d_rope: int) -> FP8Layout:
        """The layout of a ``width``-wide latent row whose last ``d_rope`` values are RoPE: V3.2's for 512 + 64,
        ``tile = gcd(d_nope, 128)`` otherwise."""
        d_nope = width - d_rope
        return cls(d_nope, d_rope, math.gcd(d_nope, _V32_TILE))

    @property
    def width(self) -> int:
        """Values per row (dequantised)."""
        return self.d_nope + self.d_rope

    @property
    def tiles(self) -> int:
        return self.d_nope // self.tile

    @property
    def scale_offset(self) -> int:
        return self.d_nope

    @property
    def rope_offset(self) -> int:
        return self.d_nope + self.tiles * _SCALE_BYTES

    @property
    def bytes_per_token(self) -> int:
        return self.rope_offset + self.d_rope * _ROPE_BYTES


V32_FP8_LAYOUT = FP8Layout(d_nope=512, d_rope=64, tile=_V32_TILE)
"""FlashMLA's DeepSeek-V3.2 layout: 656 bytes per token."""


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``>= x`` for positive finite float32 ``x``, exactly (``frexp``: ``x = m * 2**e``
    with ``m`` in ``[0.5, 1)``; ``m == 0.5`` means ``x`` is ``2**(e - 1)`` itself). A non-finite ``x`` (the amax of
    a tile holding an infinity or a NaN) gets FlashMLA's own ``2 ** ceil(log2(x))``: ``+inf`` stays ``+inf``, NaN
    stays NaN (``frexp`` alone would give 1.0 there)."""
    mantissa, exponent = torch.frexp(x)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    exact = torch.ldexp(torch.ones_like(x), exponent)
    return torch.where(torch.isfinite(x), exact, torch.pow(2, torch.log2(x).ceil()))


def quantize_kv_fp8(kv: torch.Tensor, layout: FP8Layout = V32_FP8_LAYOUT) -> torch.Tensor:
    """FlashMLA's FP8 cache rows of ``kv``, bit for bit.

    Args:
        kv (torch.Tensor): ``[..., layout.width]`` bfloat16 latent rows (NoPE values, then RoPE values).
        layout (FP8Layout): the row layout (default V3.2's 512 + 64).

    Returns:
        torch.Tensor: ``[..., layout.bytes_per_token]`` uint8.

    Non-finite values follow FlashMLA's recipe too (bit for bit is the promise; nothing is rejected or clamped): a
    tile holding ``+-inf`` has amax ``inf``, so its scale is ``+inf``, its finite values store ``+-0`` and its
    infinite ones ``inf / inf`` = NaN; a tile holding NaN gets a NaN scale and NaN everywhere. Either way the whole
    tile dequantises to NaN (``0 * inf`` and ``x * NaN``), in :func:`dequantize_kv_fp8` and in the decode kernels,
    while the row's other tiles and its RoPE values (stored raw, ``+-inf`` included) are unaffected.
    """
    if kv.dtype != torch.bfloat16:
        raise TypeError(f"quantize_kv_fp8: kv must be bfloat16, got {kv.dtype}")
    if kv.shape[-1] != layout.width:
        raise ValueError(f"quantize_kv_fp8: kv's last dim must be {layout.width} ({layout}), got {kv.shape[-1]}")
    lead = kv.shape[:-1]
    nope = kv[..., : layout.d_nope].reshape(*lead, layout.tiles, layout.tile)
    # amax of the bf16 values, then float32 (FlashMLA's order: the division happens in float32). max(), not amax():
    # amax returns a canonical NaN, max keeps the NaN's bits as FlashMLA's recipe does.
    amax = nope.abs().max(dim=-1).values.float()
    scale = _pow2_ceil(torch.clamp_min(amax / FP8_MAX, SCALE_FLOOR))
    quantized = (nope.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    out = torch.empty((*lead, layout.bytes_per_token), dtype=torch.uint8, device=kv.device)
    out[..., : layout.d_nope] = quantized.reshape(*lead, layout.d_nope).view(torch.uint8)
    out[..., layout.scale_offset : layout.rope_offset] = scale.contiguous().view(torch.uint8).reshape(*lead, -1)
    out[..., layout.rope_offset :] = kv[..., layout.d_nope :].contiguous().view(torch.uint8)
    return out


def dequantize_kv_fp8(blob: torch.Tensor, layout: FP8Layout = V32_FP8_LAYOUT) -> torch.Tensor:
    """The bfloat16 rows of FP8 cache rows (``fp8 * scale``, exact for power-of-two scales; RoPE values as stored).

    Args:
        blob (torch.Tensor): ``[..., layout.bytes_per_token]`` uint8 (or int8 / float8_e4m3fn bytes).
        layout (FP8Layout): the row layout.

    Returns:
        torch.Tensor: ``[..., layout.width]`` bfloat16.
    """
    if blob.shape[-1] != layout.bytes_per_token:
        raise ValueError(
            f"dequantize_kv_fp8: blob's last dim must be {layout.bytes_per_token} ({layout}), got {blob.shape[-1]}"
        )
    raw = blob.contiguous().view(torch.uint8)
    lead = raw.shape[:-1]
    values = raw[..., : layout.d_nope].contiguous().view(torch.float8_e4m3fn).float()
    scale = raw[..., layout.scale_offset : layout.rope_offset].contiguous().view(torch.float32)
    nope = values.reshape(*lead, layout.tiles, layout.tile) * scale.unsqueeze(-1)
    rope = raw[..., layout.rope_offset :].contiguous().view(torch.bfloat16)
    return torch.cat([nope.reshape(*lead, layout.d_nope).to(torch.bfloat16), rope], dim=-1)


def quantize_fp8_blockwise(
    x: torch.Tensor, *, block: int = 128, pow2_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x [..., n]`` to float8_e4m3fn with one scale per ``block`` elements of the last dimension.

    ``scale = max(amax, 1e-4) / 448`` per block (rounded up to a power of two with ``pow2_scale``, V3.2's ``ue8m0``),
    ``q = clamp(x / scale, -448, 448)``. A last dimension shorter than ``block`` is one block.

    Returns:
        ``q [..., n]`` float8_e4m3fn and ``scale [..., ceil(n / block)]`` float32, so ``x ~= q * scale``.
    """
    n = x.shape[-1]
    size = min(block, n)
    if n % size:
        raise ValueError(f"the last dimension ({n}) must be a multiple of the quantisation block ({size})")
    blocks = x.float().reshape(*x.shape[:-1], n // size, size)
    scale = blocks.abs().amax(dim=-1).clamp_min(FP8_AMAX_FLOOR) / FP8_MAX
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(x.shape), scale


def index_key_layout(dim: int) -> FP8Layout:
    """The byte layout of one FP8 indexer key of ``dim`` values: ``dim`` FP8 bytes then one float32 scale, no RoPE
    part (``FP8Layout(dim, 0, dim)``; 132 bytes for V3.2's 128-wide keys)."""
    return FP8Layout(d_nope=dim, d_rope=0, tile=dim)


def pack_index_keys_fp8(k: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """Indexer keys already quantised by the model, as FP8 cache rows (bytes copied, nothing re-quantised).

    Args:
        k (torch.Tensor): ``[..., D]`` float8_e4m3fn.
        k_scale (torch.Tensor): ``[...]`` float32: one multiplier per key (``key ~= k * k_scale``).

    Returns:
        torch.Tensor: ``[..., D + 4]`` uint8 in :func:`index_key_layout` ``(D)``.
    """
    if k.dtype != torch.float8_e4m3fn:
        raise TypeError(f"pack_index_keys_fp8: k must be float8_e4m3fn, got {k.dtype}")
    if k_scale.dtype != torch.float32 or tuple(k_scale.shape) != tuple(k.shape[:-1]):
        raise ValueError(
            f"pack_index_keys_fp8: k_scale must be {tuple(k.shape[:-1])} float32, got {tuple(k_scale.shape)} "
            f"{k_scale.dtype}"
        )
    layout = index_key_layout(k.shape[-1])
    out = torch.empty((*k.shape[:-1], layout.bytes_per_token), dtype=torch.uint8, device=k.device)
    out[..., : layout.d_nope] = k.contiguous().view(torch.uint8)
    out[..., layout.scale_offset :] = k_scale.contiguous().unsqueeze(-1).view(torch.uint8)
    return out


def unpack_index_keys_fp8(blob: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_index_keys_fp8`: ``blob [..., dim + 4]`` uint8 -> ``k [..., dim]`` float8_e4m3fn and
    ``k_scale [...]`` float32 (all-zero bytes give zero keys and a zero scale)."""
    layout = index_key_layout(dim)
    if blob.shape[-1] != layout.bytes_per_token:
        raise ValueError(
            f"unpack_index_keys_fp8: blob's last dim must be {layout.bytes_per_token} ({layout}), got {blob.shape[-1]}"
        )
    raw = blob.contiguous().view(torch.uint8)
    k = raw[..., : layout.d_nope].contiguous().view(torch.float8_e4m3fn)
    k_scale = raw[..., layout.scale_offset :].contiguous().view(torch.float32).squeeze(-1)
    return k, k_scale


def positions_to_slots(
    block_table: torch.Tensor, page_size: int, positions: torch.Tensor, *, num_slots: int | None = None
) -> torch.Tensor:
    """Token positions to cache slots through a block table (FlashMLA's ``indices_in_kvcache`` convention).

    Args:
        block_table (torch.Tensor): ``[B, pages_per_sequence]`` int32: the pages of each sequence in order.
        page_size (int): tokens per page.
        positions (torch.Tensor): ``[B, n]`` integers, one row per sequence (e.g. a selection's positions, ``-1``
            padding).
        num_slots (int | None): the cache's slot count; a slot at or past it is invalid (unchecked when None).

    Returns:
        torch.Tensor: ``[B, n]`` int32 ``block_table[b, p // page_size] * page_size + p % page_size``, and
        ``INVALID_SLOT`` where ``p`` is negative, past the table, or names a negative (unallocated) page or a slot
        past the cache.
    """
    positions = positions.to(torch.int64)
    capacity = block_table.shape[1] * page_size
    valid = (positions >= 0) & (positions < capacity)
    safe = torch.where(valid, positions, 0)
    page = block_table.to(device=positions.device, dtype=torch.int64).gather(1, safe // page_size)
    slots = page * page_size + safe % page_size
    valid &= page >= 0
    if num_slots is not None:
        valid &= slots < num_slots
    return torch.where(valid, slots, INVALID_SLOT).to(torch.int32)
