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

**MODEL1 layout** (:data:`MODEL1_FP8_LAYOUT`, FlashMLA's DeepSeek-V4 cache for 512-wide rows, 584 bytes per token):
448 e4m3 NoPE values in 7 tiles of 64, the same scale recipe stored as one **UE8M0** byte per tile (the power of
two's biased exponent, which is the float32 scale's exponent byte: ``2**e`` stores ``e + 127``; a non-finite scale
stores 255, which reads back as NaN), then 64 raw bf16 RoPE values, 7 scale bytes and 1 pad byte (stored as 0). A page
does not hold a token's bytes in one row: it holds every token's 576 value bytes (NoPE, then RoPE) first, then every
token's 8 scale bytes, and is padded to a multiple of 576 bytes (:meth:`FP8Layout.page_bytes`; 65 * 576 for 64
tokens). :func:`quantize_kv_fp8` still returns one 584-byte row per token (its value bytes, then its scale bytes:
what a slot names); :func:`quantize_kv_pages_fp8` lays whole pages out, :func:`kv_page_sections` views a page's two
parts. Read from deepseek-ai/FlashMLA at ``9241ae3ef9bac614dd25e45e507e089f888280e0``: ``tests/quant.py``
(``quantize_k_cache``), ``csrc/api/sparse_decode.h`` (584 bytes per token, ``stride(1) == 584``) and
``csrc/sm90/decode/sparse_fp8/splitkv_mla.cuh`` (a token's scales at ``page + page_size * 576 + offset * 8``).

**The model's activation quantiser** (:func:`quantize_fp8_blockwise`, V3.2's ``act_quant`` for the indexer's queries
and keys) is a different recipe with the same ``FP8_MAX``: it floors the block's *amax* at ``FP8_AMAX_FLOOR`` (not the
scale), rounds the scale up to a power of two only on request (``ue8m0``) and clamps before the cast. Its keys are
stored as they are (:func:`pack_index_keys_fp8`), never re-quantised with the cache recipe.

**Index-key layouts** (:data:`INDEX_KEY_LAYOUTS`, :func:`index_key_layout`): ``"rows"``, one ``D + 4``-byte row per
key (its ``D`` FP8 bytes, then its float32 scale: 132 bytes for V3.2, 4-byte aligned); ``"paged"``, DeepGEMM's and
vLLM's paged indexer cache: a page of ``page_size`` keys holds their ``page_size * D`` FP8 bytes, then their
``page_size`` float32 scales, so key ``o`` of page ``p`` has its values at byte ``p * page_size * (D + 4) + o * D``
and its scale at ``p * page_size * (D + 4) + page_size * D + 4 * o`` (16-byte aligned values). Both are ``page_size
* (D + 4)`` bytes per page and vLLM passes its cache as ``[num_blocks, block_size, 1, D + 4]`` uint8, so the layout
cannot be read from a shape: the ops take it as a keyword. Read from vLLM's tests of DeepGEMM's
``fp8_paged_mqa_logits`` (``kv_cache_cast_to_fp8``: a block's ``block_size * D`` FP8 bytes, then its ``block_size``
float32 scales, viewed as ``[num_blocks, block_size, 1, D + 4]``).

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
    "INDEX_KEY_LAYOUTS",
    "INVALID_SLOT",
    "MODEL1_FP8_LAYOUT",
    "SCALE_FLOOR",
    "V32_FP8_LAYOUT",
    "FP8Layout",
    "dequantize_kv_fp8",
    "dequantize_kv_pages_fp8",
    "flash_mla_kv_view",
    "index_key_layout",
    "index_key_sections",
    "kv_page_sections",
    "pack_index_key_pages_fp8",
    "pack_index_keys_fp8",
    "page_rows",
    "positions_to_slots",
    "quantize_fp8_blockwise",
    "quantize_kv_fp8",
    "quantize_kv_pages_fp8",
    "relayout_index_keys",
    "unpack_index_key_pages_fp8",
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
_ROPE_BYTES = 2
_SCALE_FORMAT_BYTES = {"float32": 4, "ue8m0": 1}
"""Bytes of one tile scale per scale format: a float32 multiplier, or a UE8M0 exponent byte (``2 ** (byte - 127)``)."""
_UE8M0_BIAS = 127
_UE8M0_NAN = 0xFF
_FLOAT32_MANTISSA_BITS = 23
_MODEL1_PAGE_ALIGN = 576  # FlashMLA pads each MODEL1 page to a multiple of 576 bytes (tests/quant.py)


@dataclass(frozen=True)
class FP8Layout:
    """The byte layout of one FP8 cache token: ``d_nope`` e4m3 values in tiles of ``tile``, one scale per tile in
    ``scale_format``, ``d_rope`` raw bf16 values, ``scale_pad`` zero bytes after the scales.

    Two arrangements. Row per token (``scales_after_values=False``, V3.2): a token's bytes are one row, NoPE values,
    scales, RoPE values, and a page is ``page_size`` such rows. Split (``scales_after_values=True``, MODEL1): a page
    holds every token's value bytes (NoPE, then RoPE) first, then every token's scale group (scales, then the pad),
    and its size is rounded up to a multiple of ``page_align`` bytes. In both, a token's *row* (what
    :func:`quantize_kv_fp8` returns and a slot names) is its ``bytes_per_token`` bytes in the order above: for the
    split arrangement its value bytes followed by its scale group.

    Attributes:
        d_nope (int): quantised values per token. d_rope (int): raw bf16 values per token (last in the row).
        tile (int): values per scale. scale_format (str): ``"float32"`` or ``"ue8m0"``.
        scale_pad (int): bytes after a token's scales (MODEL1: 1, so a token's scale group is 8 bytes).
        scales_after_values (bool): the split page arrangement. page_align (int): a page's size is rounded up to a
            multiple of this (1 unless split).
    """

    d_nope: int
    d_rope: int
    tile: int
    scale_format: str = "float32"
    scale_pad: int = 0
    scales_after_values: bool = False
    page_align: int = 1

    def __post_init__(self) -> None:
        if self.d_nope < 1 or self.d_rope < 0 or self.tile < 1 or self.d_nope % self.tile:
            raise ValueError(f"FP8Layout: tile {self.tile} must divide d_nope {self.d_nope} (d_rope >= 0)")
        if self.d_nope % _SCALE_ALIGN:
            raise ValueError(f"FP8Layout: d_nope {self.d_nope} must be a multiple of {_SCALE_ALIGN} (scale alignment)")
        if self.scale_format not in _SCALE_FORMAT_BYTES:
            raise ValueError(
                f"FP8Layout: scale_format must be one of {sorted(_SCALE_FORMAT_BYTES)}, got {self.scale_format!r}"
            )
        if self.scale_pad < 0 or self.page_align < 1:
            raise ValueError(
                f"FP8Layout: scale_pad must be >= 0 and page_align >= 1, got {self.scale_pad}, {self.page_align}"
            )
        if self.page_align != 1 and not self.scales_after_values:
            # A row-per-token page is exactly page_size rows (a cache's pages are [num_pages, page_size, row]).
            raise ValueError(f"FP8Layout: page_align {self.page_align} needs scales_after_values=True")

    @classmethod
    def for_width(cls, width: int, d_rope: int) -> FP8Layout:
        """The row-per-token layout of a ``width``-wide latent row whose last ``d_rope`` values are RoPE: V3.2's for
        512 + 64, ``tile = gcd(d_nope, 128)`` otherwise, float32 scales (MODEL1's 448 + 64 gives a 604-byte
        row-per-token layout here, not :data:`MODEL1_FP8_LAYOUT`)."""
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
    def scale_bytes(self) -> int:
        """Bytes of one tile scale (4 for float32, 1 for UE8M0)."""
        return _SCALE_FORMAT_BYTES[self.scale_format]

    @property
    def scale_group_bytes(self) -> int:
        """Bytes of one token's scales and pad (16 for V3.2, 8 for MODEL1)."""
        return self.tiles * self.scale_bytes + self.scale_pad

    @property
    def value_bytes(self) -> int:
        """Bytes of one token's NoPE and RoPE values (640 for V3.2, 576 for MODEL1)."""
        return self.d_nope + self.d_rope * _ROPE_BYTES

    @property
    def scale_offset(self) -> int:
        """Where a token's scales start in its row."""
        return self.value_bytes if self.scales_after_values else self.d_nope

    @property
    def rope_offset(self) -> int:
        """Where a token's RoPE values start in its row."""
        return self.d_nope if self.scales_after_values else self.d_nope + self.scale_group_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.value_bytes + self.scale_group_bytes

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of ``page_size`` tokens: ``page_size * bytes_per_token`` rounded up to a multiple of
        ``page_align`` (V3.2: ``page_size * 656``; MODEL1: 37440 for 64 tokens, 2304 for 3)."""
        if page_size < 1:
            raise ValueError(f"FP8Layout.page_bytes: page_size must be >= 1, got {page_size}")
        return -(-page_size * self.bytes_per_token // self.page_align) * self.page_align


V32_FP8_LAYOUT = FP8Layout(d_nope=512, d_rope=64, tile=_V32_TILE)
"""FlashMLA's DeepSeek-V3.2 layout: 656 bytes per token, one row per token."""

MODEL1_FP8_LAYOUT = FP8Layout(
    d_nope=448, d_rope=64, tile=64, scale_format="ue8m0", scale_pad=1, scales_after_values=True,
    page_align=_MODEL1_PAGE_ALIGN,
)  # fmt: skip
"""FlashMLA's MODEL1 (DeepSeek-V4) layout: 584 bytes per token (448 e4m3 values in 7 tiles of 64 with UE8M0 scales,
64 bf16 RoPE values, 7 scale bytes + 1 pad byte), split pages padded to a multiple of 576 bytes."""


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``>= x`` for positive finite float32 ``x``, exactly (``frexp``: ``x = m * 2**e``
    with ``m`` in ``[0.5, 1)``; ``m == 0.5`` means ``x`` is ``2**(e - 1)`` itself). A non-finite ``x`` (the amax of
    a tile holding an infinity or a NaN) gets FlashMLA's own ``2 ** ceil(log2(x))``: ``+inf`` stays ``+inf``, NaN
    stays NaN (``frexp`` alone would give 1.0 there)."""
    mantissa, exponent = torch.frexp(x)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    exact = torch.ldexp(torch.ones_like(x), exponent)
    return torch.where(torch.isfinite(x), exact, torch.pow(2, torch.log2(x).ceil()))


def _encode_scales(scale: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """``scale [..., tiles]`` float32 (powers of two, ``+inf`` or NaN) as ``[..., tiles * scale_bytes]`` uint8.

    UE8M0 is the float32's exponent field: a power of two ``2**e`` (normal: the recipe's floor keeps ``e >= -13``)
    has exactly the biased exponent ``e + 127`` there, and ``+inf``/NaN have 255, UE8M0's NaN (what FlashMLA's
    ``.to(torch.float8_e8m0fnu)`` stores for both)."""
    scale = scale.contiguous()
    if layout.scale_format == "float32":
        return scale.view(torch.uint8).reshape(*scale.shape[:-1], -1)
    return ((scale.view(torch.int32) >> _FLOAT32_MANTISSA_BITS) & 0xFF).to(torch.uint8)


def _decode_scales(raw: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """The inverse of :func:`_encode_scales`: ``[..., tiles * scale_bytes]`` uint8 -> ``[..., tiles]`` float32
    (UE8M0 byte 255 is NaN, any other byte ``b`` is ``2 ** (b - 127)``)."""
    if layout.scale_format == "float32":
        return raw.contiguous().view(torch.float32)
    exponent = raw.to(torch.int32) - _UE8M0_BIAS
    power = torch.ldexp(torch.ones(exponent.shape, dtype=torch.float32, device=raw.device), exponent)
    return torch.where(raw == _UE8M0_NAN, torch.full_like(power, float("nan")), power)


def _quantize_rows(kv: torch.Tensor, layout: FP8Layout, op: str) -> torch.Tensor:
    """:func:`quantize_kv_fp8` with errors naming ``op``."""
    if kv.dtype != torch.bfloat16:
        raise TypeError(f"{op}: kv must be bfloat16, got {kv.dtype}")
    if kv.shape[-1] != layout.width:
        raise ValueError(f"{op}: kv's last dim must be {layout.width} ({layout}), got {kv.shape[-1]}")
    lead = kv.shape[:-1]
    nope = kv[..., : layout.d_nope].reshape(*lead, layout.tiles, layout.tile)
    # amax of the bf16 values, then float32 (FlashMLA's order: the division happens in float32). max(), not amax():
    # amax returns a canonical NaN, max keeps the NaN's bits as FlashMLA's recipe does.
    amax = nope.abs().max(dim=-1).values.float()
    scale = _pow2_ceil(torch.clamp_min(amax / FP8_MAX, SCALE_FLOOR))
    quantized = (nope.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    out = torch.empty((*lead, layout.bytes_per_token), dtype=torch.uint8, device=kv.device)
    scale_end = layout.scale_offset + layout.tiles * layout.scale_bytes
    out[..., : layout.d_nope] = quantized.reshape(*lead, layout.d_nope).view(torch.uint8)
    out[..., layout.scale_offset : scale_end] = _encode_scales(scale, layout)
    out[..., scale_end : scale_end + layout.scale_pad] = 0  # FlashMLA leaves the pad unwritten; here it is defined
    out[..., layout.rope_offset : layout.rope_offset + layout.d_rope * _ROPE_BYTES] = (
        kv[..., layout.d_nope :].contiguous().view(torch.uint8)
    )
    return out


def quantize_kv_fp8(kv: torch.Tensor, layout: FP8Layout = V32_FP8_LAYOUT) -> torch.Tensor:
    """FlashMLA's FP8 cache rows of ``kv``, bit for bit (one row per token; :func:`quantize_kv_pages_fp8` lays out
    whole pages, which for a split layout such as MODEL1's is not the rows side by side).

    Args:
        kv (torch.Tensor): ``[..., layout.width]`` bfloat16 latent rows (NoPE values, then RoPE values).
        layout (FP8Layout): the row layout (default V3.2's 512 + 64).

    Returns:
        torch.Tensor: ``[..., layout.bytes_per_token]`` uint8 (MODEL1: the token's 576 value bytes, then its 7 UE8M0
        scales and a zero pad byte).

    Non-finite values follow FlashMLA's recipe too (bit for bit is the promise; nothing is rejected or clamped): a
    tile holding ``+-inf`` has amax ``inf``, so its scale is ``+inf`` (UE8M0: 255, NaN), its finite values store
    ``+-0`` and its infinite ones ``inf / inf`` = NaN; a tile holding NaN gets a NaN scale and NaN everywhere. Either
    way the whole tile dequantises to NaN (``0 * inf`` and ``x * NaN``), in :func:`dequantize_kv_fp8` and in the
    decode kernels, while the row's other tiles and its RoPE values (stored raw, ``+-inf`` included) are unaffected.
    """
    return _quantize_rows(kv, layout, "quantize_kv_fp8")


def _dequantize_rows(raw: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """``raw [..., bytes_per_token]`` uint8 rows -> ``[..., width]`` bfloat16 (``fp8 * scale`` in float32: exact for
    power-of-two scales, so equal to FlashMLA's bf16 product)."""
    lead = raw.shape[:-1]
    values = raw[..., : layout.d_nope].contiguous().view(torch.float8_e4m3fn).float()
    scale_end = layout.scale_offset + layout.tiles * layout.scale_bytes
    scale = _decode_scales(raw[..., layout.scale_offset : scale_end], layout)
    nope = values.reshape(*lead, layout.tiles, layout.tile) * scale.unsqueeze(-1)
    rope_end = layout.rope_offset + layout.d_rope * _ROPE_BYTES
    rope = raw[..., layout.rope_offset : rope_end].contiguous().view(torch.bfloat16)
    return torch.cat([nope.reshape(*lead, layout.d_nope).to(torch.bfloat16), rope], dim=-1)


def dequantize_kv_fp8(blob: torch.Tensor, layout: FP8Layout = V32_FP8_LAYOUT) -> torch.Tensor:
    """The bfloat16 rows of FP8 cache rows (``fp8 * scale``, exact for power-of-two scales; RoPE values as stored).

    Args:
        blob (torch.Tensor): ``[..., layout.bytes_per_token]`` uint8 (or int8 / float8_e4m3fn bytes): token rows as
            :func:`quantize_kv_fp8` returns them.
        layout (FP8Layout): the row layout.

    Returns:
        torch.Tensor: ``[..., layout.width]`` bfloat16.
    """
    if blob.shape[-1] != layout.bytes_per_token:
        raise ValueError(
            f"dequantize_kv_fp8: blob's last dim must be {layout.bytes_per_token} ({layout}), got {blob.shape[-1]}"
        )
    return _dequantize_rows(blob.contiguous().view(torch.uint8), layout)


_BYTE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)


def _check_page_blob(op: str, blob: torch.Tensor, layout: FP8Layout, page_size: int) -> torch.Tensor:
    """``blob`` as uint8 (a view) after checking that it is ``[num_pages, layout.page_bytes(page_size)]`` bytes."""
    expected = layout.page_bytes(page_size)
    if blob.dim() != 2 or blob.shape[1] != expected or blob.dtype not in _BYTE_DTYPES:
        raise ValueError(
            f"{op}: blob must be [num_pages, {expected}] uint8 (pages of {page_size} tokens in {layout}), got "
            f"{tuple(blob.shape)} {blob.dtype}"
        )
    return blob.view(torch.uint8)


def kv_page_sections(blob: torch.Tensor, layout: FP8Layout, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of split-layout pages, as views of ``blob`` (writing them writes the pages).

    Args:
        blob (torch.Tensor): ``[num_pages, layout.page_bytes(page_size)]`` uint8 (or int8 / float8_e4m3fn bytes; any
            page stride, each page's bytes contiguous).
        layout (FP8Layout): a split layout (``scales_after_values``, e.g. :data:`MODEL1_FP8_LAYOUT`).
        page_size (int): tokens per page.

    Returns:
        values ``[num_pages, page_size, layout.value_bytes]`` and scales ``[num_pages, page_size,
        layout.scale_group_bytes]`` uint8 views: token ``o`` of page ``p`` has its values at ``values[p, o]`` and its
        scale group at ``scales[p, o]``.
    """
    if not layout.scales_after_values:
        raise ValueError(f"kv_page_sections: {layout} keeps one row per token (no sections); view it as rows")
    blob = _check_page_blob("kv_page_sections", blob, layout, page_size)
    num_pages = blob.shape[0]
    values_end = page_size * layout.value_bytes
    values = blob[:, :values_end].view(num_pages, page_size, layout.value_bytes)
    scales = blob[:, values_end : page_size * layout.bytes_per_token].view(num_pages, page_size, -1)
    return values, scales


def quantize_kv_pages_fp8(kv: torch.Tensor, layout: FP8Layout = V32_FP8_LAYOUT) -> torch.Tensor:
    """Whole FP8 cache pages, byte for byte FlashMLA's ``quantize_k_cache`` (its MODEL1 pad bytes, which it leaves
    unwritten, are 0 here, as is the padding at a page's end).

    Args:
        kv (torch.Tensor): ``[num_pages, page_size, layout.width]`` bfloat16.
        layout (FP8Layout): V3.2's row-per-token layout (a page is its tokens' rows side by side: ``page_size *
            656`` bytes) or a split one such as :data:`MODEL1_FP8_LAYOUT` (values, then scale groups, padded).

    Returns:
        torch.Tensor: ``[num_pages, layout.page_bytes(page_size)]`` uint8.
    """
    if kv.dim() != 3 or min(kv.shape) < 1:
        raise ValueError(f"quantize_kv_pages_fp8: kv must be [num_pages, page_size, width], got {tuple(kv.shape)}")
    num_pages, page_size, _ = kv.shape
    rows = _quantize_rows(kv, layout, "quantize_kv_pages_fp8")
    if not layout.scales_after_values:
        return rows.reshape(num_pages, layout.page_bytes(page_size))
    blob = torch.zeros((num_pages, layout.page_bytes(page_size)), dtype=torch.uint8, device=kv.device)
    values, scales = kv_page_sections(blob, layout, page_size)
    values.copy_(rows[..., : layout.value_bytes])
    scales.copy_(rows[..., layout.value_bytes :])
    return blob


def page_rows(blob: torch.Tensor, layout: FP8Layout, page_size: int) -> torch.Tensor:
    """Every token's row of FP8 pages: ``[num_pages, page_size, layout.bytes_per_token]`` uint8 (a view for
    row-per-token pages, a copy for split ones)."""
    blob = _check_page_blob("page_rows", blob, layout, page_size)
    if not layout.scales_after_values:
        return blob.view(blob.shape[0], page_size, layout.bytes_per_token)
    return torch.cat(kv_page_sections(blob, layout, page_size), dim=-1)


def dequantize_kv_pages_fp8(blob: torch.Tensor, layout: FP8Layout, page_size: int) -> torch.Tensor:
    """The bfloat16 tokens of FP8 pages (the inverse of :func:`quantize_kv_pages_fp8` up to e4m3 rounding).

    Args:
        blob (torch.Tensor): ``[num_pages, layout.page_bytes(page_size)]`` uint8 (or int8 / float8_e4m3fn bytes).
        layout (FP8Layout): the pages' layout. page_size (int): tokens per page.

    Returns:
        torch.Tensor: ``[num_pages, page_size, layout.width]`` bfloat16.
    """
    blob = _check_page_blob("dequantize_kv_pages_fp8", blob, layout, page_size)
    return _dequantize_rows(page_rows(blob, layout, page_size), layout)


def flash_mla_kv_view(blob: torch.Tensor, layout: FP8Layout, page_size: int) -> torch.Tensor:
    """FP8 pages as FlashMLA's ``k_cache`` argument: ``[num_pages, page_size, 1, layout.bytes_per_token]`` uint8, a
    view (``stride(1) == bytes_per_token``, ``stride(0)`` the page size), the shape and strides FlashMLA's
    ``quantize_k_cache`` returns. For a split layout element ``[p, o]`` is the ``o``-th run of ``bytes_per_token``
    bytes of page ``p``, not token ``o``'s row (FlashMLA's kernels address the sections themselves)."""
    blob = _check_page_blob("flash_mla_kv_view", blob, layout, page_size)
    return blob[:, : page_size * layout.bytes_per_token].view(blob.shape[0], page_size, 1, layout.bytes_per_token)


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


INDEX_KEY_LAYOUTS = ("rows", "paged")
"""The byte layouts of a paged FP8 index-key cache (module docstring): ``"rows"`` (ours, one row per key) and
``"paged"`` (DeepGEMM's and vLLM's: per page the values, then the scales)."""


def index_key_layout(dim: int, key_layout: str = "rows") -> FP8Layout:
    """The byte layout of one FP8 indexer key of ``dim`` values: ``dim`` FP8 bytes then one float32 scale, no RoPE
    part (``FP8Layout(dim, 0, dim)``; 132 bytes for V3.2's 128-wide keys); ``key_layout="paged"`` keeps a page's
    values first and its scales after them (``scales_after_values``; the same 132 bytes per key, no page padding)."""
    if key_layout not in INDEX_KEY_LAYOUTS:
        raise ValueError(f"index_key_layout: key_layout must be one of {INDEX_KEY_LAYOUTS}, got {key_layout!r}")
    return FP8Layout(d_nope=dim, d_rope=0, tile=dim, scales_after_values=key_layout == "paged")


def index_key_sections(k_cache: torch.Tensor, dim: int, key_layout: str = "rows") -> tuple[torch.Tensor, torch.Tensor]:
    """The values and scales of an FP8 index-key cache in either layout, as views where the pages are contiguous.

    Args:
        k_cache (torch.Tensor): ``[num_pages, page_size, dim + 4]`` (or vLLM's ``[num_pages, page_size, 1, dim +
            4]``) uint8 / int8 / float8_e4m3fn bytes in ``key_layout`` (a ``"paged"`` cache with pages that are not
            contiguous is copied).
        dim (int): values per key. key_layout (str): one of :data:`INDEX_KEY_LAYOUTS`.

    Returns:
        values ``[num_pages, page_size, dim]`` and scales ``[num_pages, page_size, 4]`` uint8: key ``o`` of page
        ``p`` has its FP8 bytes at ``values[p, o]`` and its float32 scale's bytes at ``scales[p, o]``.
    """
    layout = index_key_layout(dim, key_layout)
    if k_cache.dim() == 4 and k_cache.shape[2] == 1:
        k_cache = k_cache.squeeze(2)
    if k_cache.dim() != 3 or k_cache.shape[-1] != layout.bytes_per_token or k_cache.dtype not in _BYTE_DTYPES:
        raise ValueError(
            f"index_key_sections: k_cache must be [num_pages, page_size, {layout.bytes_per_token}] bytes, got "
            f"{tuple(k_cache.shape)} {k_cache.dtype}"
        )
    raw = k_cache.view(torch.uint8)
    if key_layout == "rows":
        return raw[..., :dim], raw[..., dim:]
    return kv_page_sections(raw.reshape(raw.shape[0], -1), layout, raw.shape[1])


def relayout_index_keys(k_cache: torch.Tensor, dim: int, *, src: str, dst: str) -> torch.Tensor:
    """An FP8 index-key cache ``[num_pages, page_size, dim + 4]`` (bytes, :func:`index_key_sections`) converted from
    layout ``src`` to ``dst``: a new ``[num_pages, page_size, dim + 4]`` uint8 tensor, the same keys and scales."""
    values, scales = index_key_sections(k_cache, dim, src)
    out = torch.empty(values.shape[:2] + (dim + _SCALE_FORMAT_BYTES["float32"],), dtype=torch.uint8,
                      device=values.device)  # fmt: skip
    out_values, out_scales = index_key_sections(out, dim, dst)
    out_values.copy_(values)
    out_scales.copy_(scales)
    return out


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


def pack_index_key_pages_fp8(k: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """Pages of indexer keys already quantised by the model in the ``"paged"`` layout (DeepGEMM's and vLLM's: a page's
    values, then its scales; bytes copied, nothing re-quantised).

    Args:
        k (torch.Tensor): ``[num_pages, page_size, D]`` float8_e4m3fn.
        k_scale (torch.Tensor): ``[num_pages, page_size]`` float32 (``key ~= k * k_scale``).

    Returns:
        torch.Tensor: ``[num_pages, page_size, D + 4]`` uint8, whose page ``p`` is the ``page_size * (D + 4)`` bytes
        of :func:`index_key_sections` ``(..., "paged")`` (vLLM's cache is its ``unsqueeze(2)``).
    """
    if k.dim() != 3:
        raise ValueError(f"pack_index_key_pages_fp8: k must be [num_pages, page_size, D], got {tuple(k.shape)}")
    return relayout_index_keys(pack_index_keys_fp8(k, k_scale), k.shape[-1], src="rows", dst="paged")


def unpack_index_key_pages_fp8(k_cache: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_index_key_pages_fp8`: ``k_cache [num_pages, page_size, dim + 4]`` (or with vLLM's
    unit dim 2) in the ``"paged"`` layout -> ``k [num_pages, page_size, dim]`` float8_e4m3fn and ``k_scale
    [num_pages, page_size]`` float32."""
    return unpack_index_keys_fp8(relayout_index_keys(k_cache, dim, src="paged", dst="rows"), dim)


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
