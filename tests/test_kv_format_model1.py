"""FlashMLA's MODEL1 FP8 cache (DeepSeek-V4, ``dsa.kv_format.MODEL1_FP8_LAYOUT``) and the page-level quantisers
(``quantize_kv_pages_fp8``/``dequantize_kv_pages_fp8``) for both of FlashMLA's layouts; ``PagedKVCache`` with MODEL1.

The oracle below restates FlashMLA's ``quantize_k_cache`` for MODEL1 (``tests/quant.py`` of deepseek-ai/FlashMLA at
``9241ae3ef9bac614dd25e45e507e089f888280e0``) in its own float math, with FlashMLA's numbers written out rather than
read from the layout object: per tile of 64 values the scale is ``2 ** ceil(log2(max(amax / 448, 1e-4)))`` stored
through ``float8_e8m0fnu``, the values are ``(x / scale)`` cast to e4m3; a page is every token's 448 e4m3 bytes and
64 raw bf16 RoPE values (576 bytes a token), then every token's 7 scale bytes and 1 pad byte (8 a token). FlashMLA
leaves the pad byte and the page's tail padding unwritten, so they are excluded from the comparison (and must be 0
here). ``dsa.kv_format`` computes the scale's exponent byte differently (from ``frexp`` and the float32 exponent
field), so these tests compare two formulations.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa import cache
from tests import strategies

MODEL1 = cache.MODEL1_FP8_LAYOUT
V32 = cache.V32_FP8_LAYOUT

# FlashMLA's MODEL1 numbers, written out for the oracle (tests/quant.py, csrc/api/sparse_decode.h).
_NOPE, _ROPE, _TILE, _TILES, _VALUE_BYTES, _SCALE_GROUP, _TOKEN_BYTES, _ALIGN = 448, 64, 64, 7, 576, 8, 584, 576
PAGE_SIZES = (3, 16, 64)


def _flashmla_model1_pages(kv: torch.Tensor) -> torch.Tensor:
    """FlashMLA's MODEL1 ``quantize_k_cache`` of ``kv [num_pages, page_size, 512]`` bf16, restated: ``[num_pages,
    page_size * 584]`` uint8 (the bytes FlashMLA's returned view covers; its pad bytes, unwritten there, are 0)."""
    num_pages, page_size, _ = kv.shape
    out = torch.zeros(num_pages, page_size * _TOKEN_BYTES, dtype=torch.uint8)
    values = out[:, : page_size * _VALUE_BYTES].view(num_pages, page_size, _VALUE_BYTES)
    scales = out[:, page_size * _VALUE_BYTES :].view(num_pages, page_size, _SCALE_GROUP)
    values[..., _NOPE:] = kv[..., _NOPE:].contiguous().view(torch.uint8)
    for t in range(_TILES):
        part = kv[..., t * _TILE : (t + 1) * _TILE]
        amax = part.abs().max(dim=-1).values.float()
        scale = torch.pow(2, torch.clamp_min(amax / 448.0, 1e-4).log2().ceil())
        scales[..., t] = scale.to(torch.float8_e8m0fnu).view(torch.uint8)
        quantized = (part.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
        values[..., t * _TILE : (t + 1) * _TILE] = quantized.view(torch.uint8)
    return out


def _flashmla_model1_dequantize(pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """FlashMLA's MODEL1 ``dequantize_k_cache``, restated: bf16 e4m3 values times bf16 scales (e8m0 -> bf16)."""
    num_pages = pages.shape[0]
    values = pages[:, : page_size * _VALUE_BYTES].reshape(num_pages, page_size, _VALUE_BYTES)
    scales = pages[:, page_size * _VALUE_BYTES : page_size * _TOKEN_BYTES].reshape(num_pages, page_size, _SCALE_GROUP)
    nope = values[..., :_NOPE].contiguous().view(torch.float8_e4m3fn).to(torch.bfloat16)
    scale = scales[..., :_TILES].contiguous().view(torch.float8_e8m0fnu).to(torch.bfloat16)
    nope = nope.view(num_pages, page_size, _TILES, _TILE) * scale.unsqueeze(-1)
    rope = values[..., _NOPE:].contiguous().view(torch.bfloat16)
    return torch.cat([nope.view(num_pages, page_size, _NOPE), rope], dim=-1)


def _pad_mask(page_size: int) -> torch.Tensor:
    """``[page_size * 584]`` bool: the pad byte of every token's scale group (FlashMLA leaves it unwritten)."""
    mask = torch.zeros(page_size * _TOKEN_BYTES, dtype=torch.bool)
    mask[page_size * _VALUE_BYTES + _SCALE_GROUP - 1 :: _SCALE_GROUP] = True
    return mask


def _spread_tokens(seed: int, num_pages: int, page_size: int, width: int = 512) -> torch.Tensor:
    """bf16 tokens over many octaves: each 64-value tile gets its own exponent (from near bf16's smallest to near its
    largest), each value a further spread of 2**-8 .. 2**8 inside its tile (some fall into e4m3's subnormals); some
    tiles and some whole tokens are zero."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_pages, page_size)
    values = torch.randn(*shape, width, generator=g).double()
    tile_exp = torch.randint(-120, 118, (*shape, width // _TILE + 1), generator=g).repeat_interleave(_TILE, -1)
    values = values * torch.pow(2.0, tile_exp[..., :width] + torch.randint(-8, 9, (*shape, width), generator=g))
    values = values.clamp(-(2.0**126), 2.0**126).float()
    zero_tile = (torch.rand(*shape, width // _TILE + 1, generator=g) < 0.1).repeat_interleave(_TILE, -1)[..., :width]
    values = torch.where(zero_tile, 0.0, values)
    values = torch.where(torch.rand(*shape, 1, generator=g) < 0.15, 0.0, values)  # whole zero tokens
    return values.to(torch.bfloat16)


def test_model1_layout_numbers() -> None:
    """MODEL1: 448 + 128 value bytes then 7 UE8M0 scales + 1 pad (584 bytes a token, RoPE at byte 448, scales at
    576); pages padded to a multiple of 576 (3 -> 2304, 16 -> 9792, 64 -> 37440 bytes). V3.2 pages are
    ``page_size * 656`` bytes. Inconsistent layouts are refused."""
    got = (MODEL1.width, MODEL1.tiles, MODEL1.bytes_per_token, MODEL1.value_bytes, MODEL1.scale_group_bytes)
    assert got == (512, _TILES, _TOKEN_BYTES, _VALUE_BYTES, _SCALE_GROUP)
    assert (MODEL1.rope_offset, MODEL1.scale_offset, MODEL1.scale_bytes) == (_NOPE, _VALUE_BYTES, 1)
    assert [MODEL1.page_bytes(p) for p in PAGE_SIZES] == [2304, 9792, 37440]
    for page_size in (1, *PAGE_SIZES, 100):
        size = MODEL1.page_bytes(page_size)
        assert size % _ALIGN == 0 and page_size * _TOKEN_BYTES <= size < page_size * _TOKEN_BYTES + _ALIGN
        assert V32.page_bytes(page_size) == page_size * 656
    assert cache.FP8Layout.for_width(512, 64) != MODEL1  # the row-per-token recipe at width 512: 604 bytes
    with pytest.raises(ValueError, match="^FP8Layout: scale_format must be one of"):
        cache.FP8Layout(448, 64, 64, scale_format="e5m2")
    with pytest.raises(ValueError, match="^FP8Layout: page_align 576 needs scales_after_values=True"):
        cache.FP8Layout(448, 64, 64, page_align=576)
    with pytest.raises(ValueError, match="^FP8Layout.page_bytes: page_size must be >= 1"):
        MODEL1.page_bytes(0)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@given(seed=strategies.SEEDS, num_pages=st.integers(1, 3))
def test_model1_pages_equal_flashmla_bytes(page_size: int, seed: int, num_pages: int) -> None:
    """Tokens spread over many octaves, zero tiles and zero tokens: every byte FlashMLA writes equals ours (its pad
    byte excepted, which is 0 here, as is the page's tail padding); FlashMLA's ``k_cache`` view of our pages has its
    shape and strides."""
    kv = _spread_tokens(seed, num_pages, page_size)
    blob = cache.quantize_kv_pages_fp8(kv, MODEL1)
    assert blob.shape == (num_pages, MODEL1.page_bytes(page_size)) and blob.dtype == torch.uint8
    used = page_size * _TOKEN_BYTES
    pad = _pad_mask(page_size)
    want = _flashmla_model1_pages(kv)
    assert torch.equal(blob[:, :used][:, ~pad], want[:, ~pad])
    assert bool((blob[:, :used][:, pad] == 0).all()) and bool((blob[:, used:] == 0).all())
    view = cache.flash_mla_kv_view(blob, MODEL1, page_size)
    assert view.shape == (num_pages, page_size, 1, _TOKEN_BYTES)
    assert view.stride(1) == _TOKEN_BYTES and (num_pages == 1 or view.stride(0) == MODEL1.page_bytes(page_size))
    assert torch.equal(view.reshape(num_pages, -1), blob[:, :used])


def test_model1_hand_checked_bytes() -> None:
    """One token: a tile of ones (amax 1 -> scale 2**-8, UE8M0 byte 127 - 8 = 119, values e4m3 256 = 0x78), six
    zero tiles (the floor scale 2**-13: byte 114, values 0), RoPE values stored raw after the NoPE bytes."""
    kv = torch.zeros(1, 1, 512, dtype=torch.bfloat16)
    kv[0, 0, :64] = 1.0
    kv[0, 0, _NOPE:] = torch.arange(1, 65).to(torch.bfloat16)
    blob = cache.quantize_kv_pages_fp8(kv, MODEL1)
    assert blob.shape == (1, 1152)
    assert blob[0, :64].eq(0x78).all() and blob[0, 64:_NOPE].eq(0).all()
    assert torch.equal(blob[0, _NOPE:_VALUE_BYTES].view(torch.bfloat16), kv[0, 0, _NOPE:])
    assert blob[0, _VALUE_BYTES : _VALUE_BYTES + 8].tolist() == [119, 114, 114, 114, 114, 114, 114, 0]
    assert blob[0, _TOKEN_BYTES:].eq(0).all()
    assert torch.equal(cache.dequantize_kv_pages_fp8(blob, MODEL1, 1), kv)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@given(seed=strategies.SEEDS)
def test_model1_round_trip_within_fp8_rounding(page_size: int, seed: int) -> None:
    """``dequantize_kv_pages_fp8(quantize_kv_pages_fp8(x))``: RoPE values exact, NoPE values within e4m3's rounding
    (1/16 of the value, plus half the smallest e4m3 step, ``2**-10``, times the tile's scale for values in e4m3's
    subnormals); and equal to FlashMLA's own dequantisation (bf16 products) of the same bytes."""
    kv = _spread_tokens(seed, 2, page_size)
    blob = cache.quantize_kv_pages_fp8(kv, MODEL1)
    back = cache.dequantize_kv_pages_fp8(blob, MODEL1, page_size)
    assert back.shape == kv.shape and back.dtype == torch.bfloat16
    assert torch.equal(back, _flashmla_model1_dequantize(blob, page_size))
    assert torch.equal(back[..., _NOPE:], kv[..., _NOPE:])
    _, scale_groups = cache.kv_page_sections(blob, MODEL1, page_size)
    scale = torch.pow(2.0, scale_groups[..., :_TILES].double() - 127).repeat_interleave(_TILE, -1)
    nope, got = kv[..., :_NOPE].double(), back[..., :_NOPE].double()
    assert bool(((got - nope).abs() <= nope.abs() / 16 + scale * 2.0**-10).all())


@given(
    seed=strategies.SEEDS,
    value=st.sampled_from([float("inf"), float("-inf"), float("nan")]),
    count=st.integers(1, 4),
)
def test_model1_non_finite_values_quantise_as_flashmla_does(seed: int, value: float, count: int) -> None:
    """``+-inf`` or NaN at random places (NoPE and RoPE): the bytes equal the oracle's (an infinite or NaN amax gives
    the scale byte 255, UE8M0's NaN, as ``float8_e8m0fnu`` stores it), every NoPE tile holding one dequantises to NaN
    throughout, the other tiles as the finite tokens do, RoPE values as stored."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(1, 4, 512, generator=g).to(torch.bfloat16)
    bad = kv.clone().view(4, 512)
    bad.scatter_(1, torch.randint(0, 512, (4, count), generator=g), value)
    bad = bad.view(1, 4, 512)
    blob = cache.quantize_kv_pages_fp8(bad, MODEL1)
    pad = _pad_mask(4)
    assert torch.equal(blob[:, : 4 * _TOKEN_BYTES][:, ~pad], _flashmla_model1_pages(bad)[:, ~pad])
    back = cache.dequantize_kv_pages_fp8(blob, MODEL1, 4)[0]
    clean = cache.dequantize_kv_pages_fp8(cache.quantize_kv_pages_fp8(kv, MODEL1), MODEL1, 4)[0]
    hit = bad[0, :, :_NOPE].reshape(4, _TILES, _TILE).isfinite().logical_not().any(-1)
    nope = back[:, :_NOPE].reshape(4, _TILES, _TILE)
    assert bool(nope[hit].isnan().all()), "a tile holding a non-finite value must dequantise to NaN"
    assert torch.equal(nope[~hit], clean[:, :_NOPE].reshape(4, _TILES, _TILE)[~hit])
    torch.testing.assert_close(back[:, _NOPE:], bad[0, :, _NOPE:], rtol=0, atol=0, equal_nan=True)


@given(seed=strategies.SEEDS, page_size=st.sampled_from(PAGE_SIZES), num_pages=st.integers(1, 3))
def test_v32_pages_are_the_token_rows_side_by_side(seed: int, page_size: int, num_pages: int) -> None:
    """V3.2's pages are ``page_size`` 656-byte token rows (``quantize_kv_fp8``, FlashMLA's bytes, tested in
    test_kv_cache) one after another, and read back as ``dequantize_kv_fp8`` reads the rows."""
    kv = _spread_tokens(seed, num_pages, page_size, width=576)
    blob = cache.quantize_kv_pages_fp8(kv, V32)
    rows = cache.quantize_kv_fp8(kv, V32)
    assert blob.shape == (num_pages, page_size * 656)
    assert torch.equal(blob, rows.reshape(num_pages, -1))
    assert torch.equal(cache.page_rows(blob, V32, page_size), rows)
    assert torch.equal(cache.dequantize_kv_pages_fp8(blob, V32, page_size), cache.dequantize_kv_fp8(rows, V32))
    assert torch.equal(cache.flash_mla_kv_view(blob, V32, page_size), rows.unsqueeze(2))


def test_model1_token_rows_are_each_tokens_values_then_scales() -> None:
    """``quantize_kv_fp8`` with MODEL1 returns one 584-byte row per token (its 576 value bytes, then its 8 scale
    bytes): ``page_rows`` of the pages gives exactly those rows back, and ``dequantize_kv_fp8`` reads them."""
    kv = _spread_tokens(11, 2, 5)
    rows = cache.quantize_kv_fp8(kv, MODEL1)
    blob = cache.quantize_kv_pages_fp8(kv, MODEL1)
    assert rows.shape == (2, 5, _TOKEN_BYTES)
    assert torch.equal(cache.page_rows(blob, MODEL1, 5), rows)
    assert torch.equal(cache.dequantize_kv_fp8(rows, MODEL1), cache.dequantize_kv_pages_fp8(blob, MODEL1, 5))


def test_page_functions_name_their_errors() -> None:
    with pytest.raises(ValueError, match="^quantize_kv_pages_fp8: kv must be \\[num_pages, page_size, width\\]"):
        cache.quantize_kv_pages_fp8(torch.zeros(4, 512, dtype=torch.bfloat16), MODEL1)
    with pytest.raises(ValueError, match="^quantize_kv_pages_fp8: kv's last dim must be 512"):
        cache.quantize_kv_pages_fp8(torch.zeros(1, 4, 576, dtype=torch.bfloat16), MODEL1)
    with pytest.raises(TypeError, match="^quantize_kv_pages_fp8: kv must be bfloat16"):
        cache.quantize_kv_pages_fp8(torch.zeros(1, 4, 512), MODEL1)
    with pytest.raises(ValueError, match="^dequantize_kv_pages_fp8: blob must be \\[num_pages, 2304\\] uint8"):
        cache.dequantize_kv_pages_fp8(torch.zeros(2, 3 * 584, dtype=torch.uint8), MODEL1, 3)
    with pytest.raises(ValueError, match="^kv_page_sections: .* keeps one row per token"):
        cache.kv_page_sections(torch.zeros(2, 656, dtype=torch.uint8), V32, 1)


# ------------------------------------------------------------------------------------------ PagedKVCache with MODEL1


def test_paged_cache_with_model1_appends_and_gathers_ragged_chunks() -> None:
    """Three sequences, pages shuffled in the block table, ragged chunks over several calls: the pages are
    ``[num_pages, page_bytes]``, every written token gathers as ``dequantize(quantize(token))``, its stored row is
    its MODEL1 token row, invalid slots gather zeros; once every page is full the pages equal
    ``quantize_kv_pages_fp8`` of the tokens in page order (so FlashMLA's bytes); ``append_rows`` writes stored rows
    back unchanged."""
    g = torch.Generator().manual_seed(3)
    page_size, capacity = 3, 12
    kv_cache = cache.PagedKVCache(3, capacity, 512, page_size=page_size, dtype="fp8", layout=MODEL1)
    assert kv_cache.pages.shape == (12, MODEL1.page_bytes(page_size)) and kv_cache.row_bytes == _TOKEN_BYTES
    kv_cache.block_table = torch.randperm(12, generator=g).to(torch.int32).view(3, 4)
    written: list[list[torch.Tensor]] = [[], [], []]
    for call, (n, lengths) in enumerate(((5, [5, 4, 2]), (1, [1, 0, 1]), (7, [6, 7, 7]), (2, [0, 1, 2]))):
        chunk = _spread_tokens(call, 3, n)
        slots = kv_cache.append(chunk, torch.tensor(lengths))
        assert bool((slots[torch.arange(n).view(1, -1) >= torch.tensor(lengths).view(-1, 1)] == -1).all())
        for b in range(3):
            written[b].append(chunk[b, : lengths[b]])
    tokens = [torch.cat(parts) for parts in written]
    assert kv_cache.seq_lens.tolist() == [len(t) for t in tokens] == [12, 12, 12]
    every = torch.arange(capacity).view(1, -1).expand(3, -1)
    for b, expected in enumerate(tokens):
        slots = kv_cache.slots(every)[b]
        page = kv_cache.block_table[b, torch.arange(capacity) // page_size].to(torch.int64)
        assert torch.equal(slots.to(torch.int64), page * page_size + torch.arange(capacity) % page_size)
        rows = cache.quantize_kv_fp8(expected, MODEL1)
        assert torch.equal(kv_cache.stored_rows(slots), rows)
        assert torch.equal(kv_cache.gather(slots), cache.dequantize_kv_fp8(rows, MODEL1))
    in_page_order = torch.empty(12, page_size, 512, dtype=torch.bfloat16)
    for b, expected in enumerate(tokens):
        in_page_order[kv_cache.block_table[b].to(torch.int64)] = expected.view(4, page_size, 512)
    assert torch.equal(kv_cache.pages, cache.quantize_kv_pages_fp8(in_page_order, MODEL1))
    invalid = torch.tensor([-1, kv_cache.num_slots, -7])
    assert kv_cache.gather(invalid).abs().sum() == 0 and kv_cache.stored_rows(invalid).sum() == 0
    # append_rows: the stored rows go back byte for byte into a fresh cache whose pages are in another order.
    copy = cache.PagedKVCache(3, capacity, 512, page_size=page_size, dtype="fp8", layout=MODEL1)
    copy.block_table = torch.randperm(12, generator=g).to(torch.int32).view(3, 4)
    stored = kv_cache.stored_rows(kv_cache.slots(every))
    copy.append_rows(stored[:, :5])
    copy.append_rows(stored[:, 5:], torch.tensor([7, 7, 7]))
    assert torch.equal(copy.stored_rows(copy.slots(every)), stored)


def test_paged_cache_layout_errors_name_the_call() -> None:
    with pytest.raises(ValueError, match="^PagedKVCache: layout .* holds 512-wide rows, got width 576"):
        cache.PagedKVCache(1, 8, 576, dtype="fp8", layout=MODEL1)
    with pytest.raises(ValueError, match="^PagedKVCache: layout is for dtype='fp8' caches"):
        cache.PagedKVCache(1, 8, 512, dtype=torch.bfloat16, layout=MODEL1)
    kv_cache = cache.PagedKVCache(1, 8, 512, page_size=4, dtype="fp8", layout=MODEL1)
    with pytest.raises(ValueError, match="^PagedKVCache.append_rows: rows must be \\[1, n, 584\\] torch.uint8"):
        kv_cache.append_rows(torch.zeros(1, 2, 604, dtype=torch.uint8))
