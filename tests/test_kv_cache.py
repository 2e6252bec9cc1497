"""Paged KV caches (``dsa.cache``): FlashMLA's FP8 layout bit for bit, slots, ragged appends, gathers; and the decode
reference (``dsa.reference.sparse_mla_decode``) against dense masked attention over the gathered rows.

The FP8 oracle below is FlashMLA's recipe as its reference states it (float32 ``amax / 448``, clamped at ``1e-4``,
``2 ** ceil(log2(.))``, a plain cast to float8_e4m3fn, RoPE values stored as raw bf16); ``dsa.cache`` computes the
power of two differently (exactly, from ``frexp``), so the exhaustive scale test compares two formulations.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dsa import cache, kv_format, reference, testing
from tests import strategies

V32 = cache.V32_FP8_LAYOUT
TINY = cache.FP8Layout.for_width(40, 8)  # the tiny config's 32 + 8 latent row


def _flashmla_scale(amax_bf16: torch.Tensor) -> torch.Tensor:
    return torch.pow(2, torch.clamp_min(amax_bf16.float() / 448.0, 1e-4).log2().ceil()).float()


def _flashmla_quantize(kv: torch.Tensor, layout: cache.FP8Layout) -> torch.Tensor:
    """FlashMLA's quantisation, written from its reference's description, tile by tile."""
    parts, scales = [], []
    for t in range(layout.tiles):
        tile = kv[..., t * layout.tile : (t + 1) * layout.tile]
        scale = _flashmla_scale(tile.abs().max(dim=-1).values)
        parts.append((tile.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8))
        scales.append(scale.unsqueeze(-1))
    scale_bytes = torch.cat(scales, dim=-1).contiguous().view(torch.uint8)
    rope = kv[..., layout.d_nope :].contiguous().view(torch.uint8)
    return torch.cat([*parts, scale_bytes, rope], dim=-1)


def _rows(seed: int, shape: tuple[int, ...], width: int) -> torch.Tensor:
    """bf16 rows over many magnitudes: each tile-sized run gets its own exponent, some runs are all zero, some hold
    subnormals or values near the bf16 maximum."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(*shape, width, generator=g)
    exponents = torch.randint(-130, 127, (*shape, width // 8 + 1), generator=g).repeat_interleave(8, -1)[..., :width]
    values = values * torch.pow(2.0, exponents.double()).float().clamp(max=2.0**126)
    values = torch.where(torch.rand(values.shape, generator=g) < 0.1, 0.0, values)
    return values.to(torch.bfloat16)


def test_layouts() -> None:
    """V3.2: 512 FP8 bytes, 4 scales at byte 512 (16-byte aligned), 64 bf16 at byte 528: 656 bytes. The tiny row:
    32 + 4 + 16 = 52 bytes. A tile that does not divide the NoPE width, or unaligned scales, are refused."""
    assert (V32.bytes_per_token, V32.scale_offset, V32.rope_offset, V32.tiles) == (656, 512, 528, 4)
    assert cache.FP8Layout.for_width(576, 64) == V32
    assert (TINY.tile, TINY.bytes_per_token) == (32, 52)
    with pytest.raises(ValueError, match="tile 48 must divide d_nope 128"):
        cache.FP8Layout(128, 0, 48)
    with pytest.raises(ValueError, match="must be a multiple of 16"):
        cache.FP8Layout(24, 8, 8)


def test_scale_rounding_equals_flashmla_for_every_bf16_amax() -> None:
    """Every positive finite bf16 value as a tile's amax, and zero: the exact power-of-two ceiling equals FlashMLA's
    ``2 ** ceil(log2(max(amax / 448, 1e-4)))`` bit for bit."""
    bits = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # +0 .. largest finite
    ours = kv_format._pow2_ceil(torch.clamp_min(bits.float() / cache.FP8_MAX, cache.SCALE_FLOOR))
    assert torch.equal(ours.view(torch.int32), _flashmla_scale(bits).view(torch.int32))


def test_hand_checked_bytes() -> None:
    """A tile of ones: amax 1, 1/448 rounds up to 2**-8, every value stores 256 (e4m3 0x78), the scale 2**-8
    (float32 0x3B800000, little-endian); an all-zero tile stores zeros with the floor scale 2**-13."""
    kv = torch.zeros(1, 576, dtype=torch.bfloat16)
    kv[0, :128] = 1.0
    kv[0, 512:] = torch.arange(64).to(torch.bfloat16)
    blob = cache.quantize_kv_fp8(kv)
    assert blob.shape == (1, 656) and blob.dtype == torch.uint8
    assert blob[0, :128].eq(0x78).all() and blob[0, 128:512].eq(0).all()
    assert blob[0, 512:516].tolist() == [0x00, 0x00, 0x80, 0x3B]
    assert blob[0, 516:528].view(torch.float32).tolist() == [2.0**-13] * 3
    assert torch.equal(blob[0, 528:].view(torch.bfloat16), kv[0, 512:])
    assert torch.equal(cache.dequantize_kv_fp8(blob), kv)


@given(seed=strategies.SEEDS, rows=st.integers(1, 5), tiny=st.booleans())
def test_quantize_matches_flashmla_bit_for_bit(seed: int, rows: int, tiny: bool) -> None:
    """Rows over the whole bf16 range (zeros, subnormals, values near the maximum): the bytes equal the oracle's,
    and dequantisation is within e4m3's rounding (1/16 of the value, plus the smallest e4m3 step times the tile's
    scale for values that fall into e4m3's subnormals) with the RoPE values returned exactly."""
    layout = TINY if tiny else V32
    kv = _rows(seed, (2, rows), layout.width)
    blob = cache.quantize_kv_fp8(kv, layout)
    assert torch.equal(blob, _flashmla_quantize(kv, layout))
    back = cache.dequantize_kv_fp8(blob, layout)
    assert torch.equal(back[..., layout.d_nope :], kv[..., layout.d_nope :])
    nope, got = kv[..., : layout.d_nope].float(), back[..., : layout.d_nope].float()
    scale = blob[..., layout.scale_offset : layout.rope_offset].contiguous().view(torch.float32)
    step = scale.repeat_interleave(layout.tile, -1) * 2.0**-6  # the smallest e4m3 subnormal times the scale
    assert bool(((got - nope).abs() <= nope.abs() / 16 + step).all())


@given(
    seed=strategies.SEEDS,
    value=st.sampled_from([float("inf"), float("-inf"), float("nan")]),
    tiny=st.booleans(),
    count=st.integers(1, 4),
)
def test_non_finite_values_quantise_as_flashmla_does(seed: int, value: float, tiny: bool, count: int) -> None:
    """``+-inf`` or NaN at random places of a row (NoPE and RoPE parts): the bytes equal FlashMLA's recipe's bit for
    bit (an ``inf`` amax gives the scale ``+inf``, ``inf / inf`` NaN values; a NaN amax a NaN scale), every NoPE tile
    holding one dequantises to NaN throughout, and every other tile and value is what the finite row gives. Before
    the fix the scale of such a tile was 1.0 (``frexp(inf)``), so ``inf`` stored 448 and the tile stayed finite."""
    layout = TINY if tiny else V32
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(3, layout.width, generator=g).to(torch.bfloat16)
    where = torch.randint(0, layout.width, (3, count), generator=g)
    bad = kv.clone()
    bad.scatter_(1, where, value)
    blob = cache.quantize_kv_fp8(bad, layout)
    assert torch.equal(blob, _flashmla_quantize(bad, layout))
    back = cache.dequantize_kv_fp8(blob, layout)
    clean = cache.dequantize_kv_fp8(cache.quantize_kv_fp8(kv, layout), layout)
    hit = bad[..., : layout.d_nope].reshape(3, layout.tiles, layout.tile).isfinite().logical_not().any(-1)
    nope = back[..., : layout.d_nope].reshape(3, layout.tiles, layout.tile)
    assert bool(nope[hit].isnan().all()), "a tile holding a non-finite value must dequantise to NaN"
    assert torch.equal(nope[~hit], clean[..., : layout.d_nope].reshape(3, layout.tiles, layout.tile)[~hit])
    rope, rope_in = back[..., layout.d_nope :], bad[..., layout.d_nope :]
    assert torch.equal(rope.isnan(), rope_in.isnan()) and torch.equal(rope.nan_to_num(), rope_in.nan_to_num())


def test_quantize_and_dequantize_name_their_errors() -> None:
    with pytest.raises(TypeError, match="^quantize_kv_fp8: kv must be bfloat16"):
        cache.quantize_kv_fp8(torch.zeros(2, 576))
    with pytest.raises(ValueError, match="^quantize_kv_fp8: kv's last dim must be 576"):
        cache.quantize_kv_fp8(torch.zeros(2, 512, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="^dequantize_kv_fp8: blob's last dim must be 656"):
        cache.dequantize_kv_fp8(torch.zeros(2, 600, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, "fp8"], ids=["bf16", "fp32", "fp8"])
def test_ragged_appends_land_in_their_slots(dtype: torch.dtype | str) -> None:
    """Three sequences, pages shuffled in the block table, chunks of ragged lengths over several calls: every
    position's slot is ``page * page_size + offset`` of its page, and gathering the slots returns the appended rows
    (dequantised for FP8); invalid slots gather zeros."""
    g = torch.Generator().manual_seed(0)
    kv_cache = cache.PagedKVCache(3, 40, 40, page_size=8, dtype=dtype, d_rope=8)
    kv_cache.block_table = torch.randperm(kv_cache.pages.shape[0], generator=g).to(torch.int32).view(3, -1)
    written: list[list[torch.Tensor]] = [[], [], []]
    for call, n in enumerate((5, 1, 13, 1)):
        chunk = _rows(call, (3, n), 40)
        lengths = torch.tensor([n, max(0, n - 1), n // 2])
        slots = kv_cache.append(chunk, lengths)
        assert bool((slots[torch.arange(n).view(1, -1) >= lengths.view(-1, 1)] == cache.INVALID_SLOT).all())
        for b in range(3):
            written[b].append(chunk[b, : lengths[b]])
    rows = [torch.cat(parts) for parts in written]
    assert kv_cache.seq_lens.tolist() == [len(r) for r in rows]
    for b, expected in enumerate(rows):
        positions = torch.arange(len(expected)).view(1, -1)
        slots = kv_cache.slots(positions.expand(3, -1))[b]
        page = kv_cache.block_table[b, positions[0] // 8].to(torch.int64)
        assert torch.equal(slots.to(torch.int64), page * 8 + positions[0] % 8)
        if dtype == "fp8":
            expected = cache.dequantize_kv_fp8(cache.quantize_kv_fp8(expected, kv_cache.layout), kv_cache.layout)
        assert torch.equal(kv_cache.gather(slots), expected.to(kv_cache.gather(slots).dtype))
    invalid = torch.tensor([cache.INVALID_SLOT, kv_cache.num_slots, -7])
    assert kv_cache.gather(invalid).abs().sum() == 0
    assert kv_cache.slots(torch.tensor([[-1, kv_cache.capacity, 0]] * 3))[:, :2].eq(cache.INVALID_SLOT).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, "fp8"], ids=["bf16", "fp8"])
def test_capacity_is_max_seq_len_rounded_up_to_whole_pages(dtype: torch.dtype | str) -> None:
    """A cache asked for 10 tokens in pages of 4 says so and holds 12 (``capacity``): 12 rows append, the 13th is
    refused with both numbers in the message; 8 tokens in pages of 4 hold exactly 8."""
    kv_cache = cache.PagedKVCache(2, 10, 40, page_size=4, dtype=dtype, d_rope=8)
    assert (kv_cache.max_seq_len, kv_cache.capacity, tuple(kv_cache.block_table.shape)) == (10, 12, (2, 3))
    kv_cache.append(_rows(1, (2, 12), 40))
    assert kv_cache.seq_lens.tolist() == [12, 12]
    with pytest.raises(ValueError, match="over the capacity 12 \\(max_seq_len 10 rounded up to pages of 4\\)"):
        kv_cache.append(_rows(2, (2, 1), 40))
    exact = cache.PagedKVCache(1, 8, 40, page_size=4, dtype=dtype, d_rope=8)
    assert (exact.max_seq_len, exact.capacity) == (8, 8)


def test_cache_errors_name_the_call() -> None:
    kv_cache = cache.PagedKVCache(2, 10, 40, page_size=4, d_rope=8)
    with pytest.raises(ValueError, match="^PagedKVCache.append: kv must be \\[2, n, 40\\]"):
        kv_cache.append(torch.zeros(2, 3, 41))
    with pytest.raises(ValueError, match="^PagedKVCache.append: sequences would hold"):
        kv_cache.append(torch.zeros(2, 13, 40))
    with pytest.raises(ValueError, match="^PagedKVCache.append: lengths must lie in"):
        kv_cache.append(torch.zeros(2, 3, 40), torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="^PagedKVCache: dtype must be"):
        cache.PagedKVCache(2, 10, 40, dtype=torch.float16)
    assert kv_cache.seq_lens.tolist() == [0, 0], "a refused append must not advance the sequences"


# ------------------------------------------------------------------------------------------ the decode reference


def _oracle_decode(
    q: torch.Tensor,
    rows_by_source: list[torch.Tensor],
    kept: list[torch.Tensor],
    sm_scale: float,
    d_v: int,
    attn_sink: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention per query over the rows it keeps (gathered from the caches by ``dsa.cache``)."""
    batch, s_q, heads, width = q.shape
    kv = torch.cat(rows_by_source, dim=2).reshape(batch * s_q, -1, width)
    mask = torch.cat(kept, dim=2).reshape(batch * s_q, 1, -1)
    out, lse = reference.dense_masked_attention(
        q.reshape(batch * s_q, 1, heads, width).double(), kv.double(), mask, sm_scale=sm_scale, d_v=d_v,
        attn_sink=attn_sink,
    )  # fmt: skip
    return out.view(batch, s_q, heads, d_v), lse.view(batch, s_q, heads)


def _source(seed: int, kind: str, batch: int, s_q: int, topk: int, with_length: str) -> tuple:
    """A filled cache of ``kind``, random slots (some ``-1``, some past the cache), an optional ``topk_length``, and
    what the oracle needs: the gathered rows and which entries count."""
    g = torch.Generator().manual_seed(seed)
    kv_cache = cache.PagedKVCache(batch, 24, 40, page_size=4, dtype=kind, d_rope=8)
    rows = torch.randn(batch, 24, 40, generator=g).to(torch.bfloat16)  # attention-sized values (not _rows' range)
    kv_cache.append(rows, torch.randint(1, 25, (batch,), generator=g))
    slots = torch.randint(-1, kv_cache.num_slots + 3, (batch, s_q, topk), generator=g, dtype=torch.int32)
    length = None
    if with_length == "per_batch":
        length = torch.randint(0, topk + 1, (batch,), generator=g, dtype=torch.int32)
    elif with_length == "per_query":
        length = torch.randint(0, topk + 1, (batch, s_q), generator=g, dtype=torch.int32)
    kept = (slots >= 0) & (slots < kv_cache.num_slots)
    if length is not None:
        limit = length.view(-1, 1) if length.dim() == 1 else length
        kept &= torch.arange(topk).view(1, 1, -1) < limit.unsqueeze(-1)
    return kv_cache, slots, length, kv_cache.gather(slots).float(), kept


def _gapped(pages: torch.Tensor) -> torch.Tensor:
    """The same pages as a non-contiguous view: every page is followed by a poison row (NaN, or 0xFF bytes, which an
    FP8 row decodes as NaN values and a NaN scale) that any read of memory outside the named rows would leak."""
    num_pages, page_size, row = pages.shape
    poison = 0xFF if pages.dtype == torch.uint8 else float("nan")
    spaced = torch.full((num_pages, page_size + 1, row), poison, dtype=pages.dtype)
    spaced[:, :page_size] = pages
    return spaced[:, :page_size]


@given(
    seed=strategies.SEEDS,
    kind=st.sampled_from([torch.bfloat16, torch.float32, "fp8"]),
    **strategies.sizes(batch=3, s_q=4, topk=20),
    with_length=st.sampled_from(["none", "per_batch", "per_query"]),
    extra=st.booleans(),
    sink=st.booleans(),
    gapped=st.booleans(),
)
def test_decode_reference_equals_dense_attention_over_the_gathered_rows(
    seed: int,
    kind: torch.dtype | str,
    batch: int,
    s_q: int,
    topk: int,
    with_length: str,
    extra: bool,
    sink: bool,
    gapped: bool,
) -> None:
    """``reference.sparse_mla_decode`` over a bf16, float32 or FP8 paged cache (dequantised), with ``-1`` and
    out-of-range slots, duplicates, ``topk_length`` per sequence or per query, an extra source in the same softmax
    and a sink, equals dense masked attention over the rows ``PagedKVCache.gather`` returns; a query with nothing
    valid gets ``out = 0`` and ``lse = -inf``. With ``gapped`` the caches are non-contiguous views whose gaps hold
    NaN: read as they are (no copy), and nothing outside the named rows leaks."""
    g = torch.Generator().manual_seed(seed + 1)
    heads, d_v, sm_scale = 3, 16, 40**-0.5
    q = torch.randn(batch, s_q, heads, 40, generator=g)
    main = _source(seed, kind, batch, s_q, topk, with_length)
    sources = [main] + ([_source(seed + 7, kind, batch, s_q, 5, "per_query")] if extra else [])
    pages = [_gapped(s[0].pages) if gapped else s[0].pages for s in sources]
    attn_sink = torch.randn(heads, generator=g) if sink else None
    kwargs = {}
    if extra:
        kwargs = {"extra_kv_cache": pages[1], "extra_indices": sources[1][1], "extra_topk_length": sources[1][2]}
    out, lse = reference.sparse_mla_decode(
        q, pages[0], main[1], sm_scale=sm_scale, d_v=d_v, topk_length=main[2], attn_sink=attn_sink, d_rope=8,
        **kwargs,
    )  # fmt: skip
    want_out, want_lse = _oracle_decode(q, [s[3] for s in sources], [s[4] for s in sources], sm_scale, d_v, attn_sink)
    assert out.shape == (batch, s_q, heads, d_v) and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    assert torch.allclose(out.double(), want_out, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse.double()[finite], want_lse[finite], atol=1e-5, rtol=1e-5)
    assert out[~finite].abs().sum() == 0


def test_decode_reference_names_its_errors() -> None:
    kv_cache = cache.PagedKVCache(1, 8, 40, page_size=4, dtype="fp8", d_rope=8)
    q = torch.zeros(1, 1, 2, 40)
    slots = torch.zeros(1, 1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="^sparse_mla_decode: d_rope must lie in \\[0, 40\\)"):
        reference.sparse_mla_decode(q, kv_cache.pages, slots, sm_scale=1.0, d_v=16)  # V3.2's d_rope of 64
    with pytest.raises(ValueError, match="^sparse_mla_decode: kv_cache holds 52-byte FP8 rows; a 48-wide row with 16"):
        reference.sparse_mla_decode(torch.zeros(1, 1, 2, 48), kv_cache.pages, slots, sm_scale=1.0, d_v=16, d_rope=16)
    with pytest.raises(ValueError, match="^sparse_mla_decode: q must be"):
        reference.sparse_mla_decode(q[0], kv_cache.pages, slots, sm_scale=1.0, d_v=16, d_rope=8)
    with pytest.raises(ValueError, match="^sparse_mla_decode: extra_kv_cache and extra_indices go together"):
        reference.sparse_mla_decode(q, kv_cache.pages, slots, sm_scale=1.0, d_v=16, d_rope=8, extra_indices=slots)


class _Allocations(TorchDispatchMode):
    """Counts the elements of every tensor the ops inside it create (views and in-place results, which share an
    input's storage, are not new memory and are not counted): a timing-free measure of the work a call does."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        leaves = pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.elements += t.numel()
        return out


CONTEXT = 34  # tokens each sequence holds, whatever the cache's size


def _decode_on_cache_of(num_pages: int, kind: torch.dtype | str, page_size: int = 16) -> tuple[torch.Tensor, ...]:
    """Pages ``[num_pages, page_size, row]`` whose first two pages per sequence hold a fixed 34-token context of two
    sequences (the same rows whatever ``num_pages``) and whose every other row is poison (NaN / 0xFF bytes), plus
    the decode call's q and slots (valid, ``-1``, duplicates, out of range): the problem is the same, only the
    cache's size differs."""
    g = torch.Generator().manual_seed(5)
    layout = TINY if kind == "fp8" else None
    context = torch.randn(2, CONTEXT, 40, generator=g).to(torch.bfloat16)
    rows = cache.quantize_kv_fp8(context, layout) if layout else context.to(kind)
    poison = 0xFF if layout else float("nan")
    pages = torch.full((num_pages, page_size, rows.shape[-1]), poison, dtype=rows.dtype)
    flat = pages.view(-1, rows.shape[-1])
    # Sequence b's token p sits in slot b * 64 + p (pages 4b .. 4b + 2): inside the smallest cache (8 pages).
    flat[0:CONTEXT], flat[64 : 64 + CONTEXT] = rows[0], rows[1]
    positions = torch.randint(-1, CONTEXT, (2, 2, 24), generator=g)
    slots = torch.where(positions >= 0, positions + torch.tensor([0, 64]).view(2, 1, 1), -1).to(torch.int32)
    slots[0, 0, :3] = slots[0, 0, 3]  # duplicates
    slots[1, 1, -1] = 8 * page_size + 3  # past the smallest cache: invalid there, poison in the larger ones
    q = torch.randn(2, 2, 3, 40, generator=g).to(torch.bfloat16)
    return q, pages, slots


@pytest.mark.parametrize("kind", [torch.bfloat16, "fp8"], ids=["bf16", "fp8"])
def test_decode_reference_work_follows_the_context_not_the_cache(monkeypatch: pytest.MonkeyPatch, kind: object) -> None:
    """The same 34-token decode problem (and an extra source in the same cache) in a cache of 8 pages and of 4096
    pages (every other row poison): equal outputs, the same number of rows dequantised (exactly one per valid entry)
    and the same number of elements allocated. Before the fix the reference dequantised (FP8) or copied the whole
    cache on every call: one FP8 step went from about 1 ms to 2 s between 64 and 262K cached tokens."""
    dequantised: list[int] = []
    original = kv_format.dequantize_kv_fp8

    def counting(blob: torch.Tensor, layout: cache.FP8Layout = V32) -> torch.Tensor:
        dequantised.append(blob.shape[:-1].numel())
        return original(blob, layout)

    monkeypatch.setattr(kv_format, "dequantize_kv_fp8", counting)
    results, allocated, rows_read = [], [], []
    for num_pages in (8, 4096):
        q, pages, slots = _decode_on_cache_of(num_pages, kind)
        # The out-of-range slot of the small cache names a poison row of the large one: drop it there too, so that
        # both calls pose the same problem.
        slots[1, 1, -1] = -1
        # The extra source (a sliding window, say) is the same cache: the newest 4 tokens of each sequence.
        window = (torch.arange(CONTEXT - 4, CONTEXT) + torch.tensor([0, 64]).view(2, 1)).view(2, 1, 4).expand(2, 2, 4)
        extra = {"extra_kv_cache": pages, "extra_indices": window.to(torch.int32).contiguous()}
        dequantised.clear()
        with _Allocations() as counter:
            results.append(reference.sparse_mla_decode(q, pages, slots, sm_scale=40**-0.5, d_v=16, d_rope=8, **extra))
        allocated.append(counter.elements)
        rows_read.append(sum(dequantised))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert bool(torch.isfinite(results[1][0]).all()), "a poison row outside the named slots leaked"
    assert allocated[0] == allocated[1], f"elements allocated grew with the cache: {allocated}"
    if kind == "fp8":
        valid = int((slots >= 0).sum()) + window.numel()
        assert rows_read == [valid, valid], f"rows dequantised {rows_read}, valid entries {valid}"


def test_decode_reference_never_reads_out_of_range_slots_of_a_small_cache() -> None:
    """A slot past the cache is invalid (never read), like ``-1``: the call equals the one with ``-1`` there."""
    q, pages, slots = _decode_on_cache_of(8, "fp8")
    cleared = slots.clone()
    cleared[1, 1, -1] = -1
    got = reference.sparse_mla_decode(q, pages, slots, sm_scale=40**-0.5, d_v=16, d_rope=8)
    want = reference.sparse_mla_decode(q, pages, cleared, sm_scale=40**-0.5, d_v=16, d_rope=8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_index_topk_decode_reference_work_follows_the_context_not_the_block_table() -> None:
    """The reference selection over a block table of 3 pages and of 2048 pages per sequence (the same keys in the
    first pages, poison after): the same positions, and the same number of elements allocated (it scores positions
    up to the largest ``ends``, not the table's capacity)."""
    g = torch.Generator().manual_seed(9)
    page_size, batch, s_q, heads, dim = 16, 2, 2, 4, 32
    keys = torch.randn(batch, 3 * page_size, dim, generator=g)
    q = torch.randn(batch, s_q, heads, dim, generator=g)
    weights = torch.randn(batch, s_q, heads, generator=g)
    ends = torch.tensor([[CONTEXT - 1, CONTEXT], [20, 21]], dtype=torch.int32)
    results, allocated = [], []
    for pages_per_sequence in (3, 2048):
        k_cache = torch.full((batch * pages_per_sequence, page_size, dim), float("nan"))
        table = torch.arange(batch * pages_per_sequence, dtype=torch.int32).view(batch, -1)
        for b in range(batch):
            k_cache[table[b, :3].long()] = keys[b].view(3, page_size, dim)
        with _Allocations() as counter:
            results.append(reference.index_topk_decode(q, k_cache, weights, 8, block_table=table, ends=ends))
        allocated.append(counter.elements)
    assert torch.equal(results[0], results[1])
    assert allocated[0] == allocated[1], f"elements allocated grew with the block table: {allocated}"


# ------------------------------------------------------------------------------- FP8 index keys: per-page layout


def _random_index_keys(g: torch.Generator, pages: int, page_size: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP8 keys ``[pages, page_size, dim]`` (any byte but NaN's) and float32 scales ``[pages, page_size]``."""
    k = torch.randint(0, 0x7F, (pages, page_size, dim), generator=g, dtype=torch.uint8)
    k = (k | (torch.randint(0, 2, k.shape, generator=g, dtype=torch.uint8) << 7)).view(torch.float8_e4m3fn)
    return k, torch.randn(pages, page_size, generator=g) * 2.0 ** torch.randint(-8, 8, (pages, page_size), generator=g)


@given(pages=st.integers(1, 3), page_size=st.integers(1, 9), dim=st.sampled_from([16, 32, 128]), seed=strategies.SEEDS)
def test_index_key_pages_put_each_key_at_deepgemm_offsets(pages: int, page_size: int, dim: int, seed: int) -> None:
    """``pack_index_key_pages_fp8``: key ``o`` of page ``p`` has its FP8 bytes at ``p * page_size * (D + 4) + o * D``
    and its float32 scale at ``p * page_size * (D + 4) + page_size * D + 4 * o`` (read back byte by byte); unpacking
    and converting to rows and back are exact round trips; a ``PagedKVCache`` with the paged layout stores the
    packed rows (``append_rows``) as the same bytes."""
    k, k_scale = _random_index_keys(testing.generator(seed), pages, page_size, dim)
    blob = kv_format.pack_index_key_pages_fp8(k, k_scale)
    assert blob.shape == (pages, page_size, dim + 4) and blob.dtype == torch.uint8
    flat = blob.reshape(-1)
    page_bytes = page_size * (dim + 4)
    for p in range(pages):
        for o in range(page_size):
            start = p * page_bytes + o * dim
            assert torch.equal(flat[start : start + dim], k[p, o].view(torch.uint8))
            scale_at = p * page_bytes + page_size * dim + 4 * o
            assert torch.equal(flat[scale_at : scale_at + 4].view(torch.float32), k_scale[p, o].view(1))
    k2, scale2 = kv_format.unpack_index_key_pages_fp8(blob.unsqueeze(2), dim)  # vLLM's [.., 1, D + 4] view
    assert torch.equal(k2.view(torch.uint8), k.view(torch.uint8)) and torch.equal(scale2, k_scale)
    rows = kv_format.relayout_index_keys(blob, dim, src="paged", dst="rows")
    assert torch.equal(rows, kv_format.pack_index_keys_fp8(k, k_scale))
    assert torch.equal(kv_format.relayout_index_keys(rows, dim, src="rows", dst="paged"), blob)
    # One sequence over every page in order: the cache's pages are the packed blob, byte for byte.
    keys = cache.PagedKVCache(1, pages * page_size, dim, page_size=page_size, dtype="fp8", d_rope=0,
                              layout=kv_format.index_key_layout(dim, "paged"))  # fmt: skip
    keys.append_rows(rows.reshape(1, pages * page_size, dim + 4))
    assert torch.equal(keys.pages.view(pages, page_size, dim + 4), blob)


def test_index_key_layouts_name_their_errors() -> None:
    """An unknown layout, and a cache of the wrong row size, raise ValueError naming the function."""
    with pytest.raises(ValueError, match=r"^index_key_layout: key_layout must be one of \('rows', 'paged'\)"):
        kv_format.index_key_layout(128, "deepgemm")
    with pytest.raises(ValueError, match=r"^index_key_sections: k_cache must be \[num_pages, page_size, 36\] bytes"):
        kv_format.index_key_sections(torch.zeros(2, 4, 35, dtype=torch.uint8), 32, "paged")
