"""FlashMLA's MODEL1 (DeepSeek-V4) sparse decoding and sparse prefill tests, ported to ``dsa.compat`` on the CPU.

Read from deepseek-ai/FlashMLA at ``9241ae3ef9bac614dd25e45e507e089f888280e0`` (``tests/test_flash_mla_sparse_decoding
.py``, ``tests/test_flash_mla_sparse_prefill.py``, ``tests/lib.py``, ``tests/ref.py``, ``tests/quant.py``) and restated
from those facts:

- **Decode** (``flash_mla_with_kvcache``): q ``[b, s_q, h_q, 512]`` (normal, clamped to [-1, 1]), softmax scale
  ``512 ** -0.55``, ``head_dim_v`` 512 (K = V). Two sources in one softmax, the window cache (``k_cache``/``indices``)
  and the extra (compressed) cache (``extra_k_cache``/``extra_indices_in_kvcache``), each with its own page size,
  top-k and optional ``[b]`` top-k length. Per source: sequence lengths around ``s_k`` (varying, some zero in the
  corner cases), a shuffled block table, distinct positions per query below its sequence's length (``-1`` where the
  sequence is shorter than top-k, or everywhere for "all indices invalid"), every slot that no counted entry names set
  to NaN before quantisation (a kernel that reads one fails), MODEL1 FP8 pages (``quantize_kv_pages_fp8``, byte for
  byte FlashMLA's ``quantize_k_cache``: tests/test_kv_format_model1.py). A sink per head with some ``+inf`` and
  ``-inf``. The oracle dequantises the pages with FlashMLA's own dequantiser (restated in
  tests/test_kv_format_model1.py) and runs dense masked attention in float64 (tests/test_compat_decode.py).
  Tolerances are FlashMLA's: out abs 1e-3 or rel 2.01/128 and a scale-sensitive difference (FlashMLA's ``cos_diff``,
  the same measure) of 5e-6; lse abs 1e-6 or rel 8.01/65536.
- **Prefill** (``flash_mla_sparse_fwd``): d_qk = d_v = 512 with h_q 64 / top-k 512 and h_q 128 / top-k 1024 (MODEL1's
  configs) and FlashMLA's irregular, out-of-bounds (``s_kv < topk``) and corner shapes; q and kv ``randn / 10`` plus
  one offset each, scale 0.5, invalid entries drawn from FlashMLA's list of bad values (``-2**31``, ``-1``, ``s_kv``,
  ``2**31 - 1``, ...), ``topk_length [s_q]``, a sink with infinities, whole rows invalid, every tensor a slice of a
  padded buffer. Tolerances: out abs 8e-4 or rel 3.01/128 and 7e-6; max_logits and lse abs 1e-6 or rel 2.01/65536.

Sizes are cut for the CPU (FlashMLA's production decode shapes have 16384-token caches; here the caches are a few
pages past the top-k), keeping its head counts, top-k, page sizes (2, 53, 61, 64, 69, 256, 576) and feature mixes.
Values: MODEL1 quantises each 64-value tile with its own power-of-two scale, so the cache rows here spread their
tiles over several octaves and some rows are zero.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa import cache, compat, kv_format, ops, reference
from dsa.reference.decode import range_slots as range_slots_of
from dsa.testing import assert_close
from tests import layouts, strategies
from tests.test_compat_decode import _call, _oracle
from tests.test_ops import _flashmla_oracle
from tests.test_sparse_mla_decode_kernel import poison_model1_pages

MODEL1 = kv_format.MODEL1_FP8_LAYOUT
D_QK = D_V = 512
DECODE_SCALE = D_QK**-0.55
PREFILL_SCALE = 0.5
DECODE_OUT_TOL = {"atol": 1e-3, "rtol": 2.01 / 128, "max_diff": 5e-6}
DECODE_LSE_TOL = {"atol": 1e-6, "rtol": 8.01 / 65536, "max_diff": 1e-7}
PREFILL_OUT_TOL = {"atol": 8e-4, "rtol": 3.01 / 128, "max_diff": 7e-6}
PREFILL_LSE_TOL = {"atol": 1e-6, "rtol": 2.01 / 65536, "max_diff": 1e-7}
# FlashMLA's invalid prefill indices: negative, at or past s_kv (added per case), up to int32's extremes.
BAD_INDICES = (-(2**31), -123456, -1, 114514, 1919810, 2147480000, 2**31 - 1)


@dataclasses.dataclass(frozen=True)
class Source:
    """One cache of a decode case: FlashMLA's ``(s_k, topk, block_size)``, ``have_topk_length`` and
    ``is_all_indices_invalid`` (here per source)."""

    s_k: int
    topk: int
    block_size: int
    with_length: bool = False
    all_invalid: bool = False


def _octave_rows(g: torch.Generator, rows: int) -> torch.Tensor:
    """``[rows, 512]`` float32: normal values whose 64-value tiles are scaled by 2**-6 .. 2**2, a tenth of the rows
    zero."""
    scale = torch.pow(2.0, torch.randint(-6, 3, (rows, D_QK // 64), generator=g)).repeat_interleave(64, -1)
    values = torch.randn(rows, D_QK, generator=g) * scale
    return values.masked_fill(torch.rand(rows, 1, generator=g) < 0.1, 0.0)


def _positions(g: torch.Generator, seq_lens: torch.Tensor, s_q: int, topk: int) -> torch.Tensor:
    """``[b, s_q, topk]`` int64: per query, distinct random positions below its sequence's length, ``-1`` once the
    sequence has none left (FlashMLA's ``_randperm_batch`` with the ``-1`` filler)."""
    batch = seq_lens.shape[0]
    width = max(int(seq_lens.max()), topk)
    keys = torch.rand(batch, s_q, width, generator=g)
    keys = keys.masked_fill(torch.arange(width).view(1, 1, -1) >= seq_lens.view(-1, 1, 1), -1.0)
    picked = keys.topk(topk, dim=-1)
    return picked.indices.masked_fill(picked.values < 0, -1)


def _model1_source(
    g: torch.Generator, source: Source, batch: int, s_q: int, zero_lengths: bool, byte_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One source of a decode case: ``(k_cache [num_blocks, block_size, 1, 584] MODEL1 pages as byte_dtype,
    indices [b, s_q, topk] int32 slots, topk_length [b] int32 or None)``."""
    seq_lens = (source.s_k + source.s_k / 2 * torch.randn(batch, generator=g)).round().long().clamp_min(s_q)
    if zero_lengths:
        seq_lens = seq_lens.masked_fill(torch.rand(batch, generator=g) < 0.5, 0)
    pages_per_seq = math.ceil(max(int(seq_lens.max()), 1) / source.block_size) + 1  # pages no one uses, too
    num_pages = batch * pages_per_seq
    block_table = torch.randperm(num_pages, generator=g).view(batch, pages_per_seq).int()
    positions = _positions(g, seq_lens, s_q, source.topk)
    if source.all_invalid:
        positions.fill_(-1)
    slots = kv_format.positions_to_slots(block_table, source.block_size, positions.view(batch, -1))
    slots = slots.view(batch, s_q, source.topk)
    length = None
    counted = slots >= 0
    if source.with_length:
        length = torch.randint(0, source.topk + 1, (batch,), generator=g, dtype=torch.int32)
        counted &= torch.arange(source.topk).view(1, 1, -1) < length.view(-1, 1, 1)
    tokens = _octave_rows(g, num_pages * source.block_size)
    unused = torch.ones(tokens.shape[0], dtype=torch.bool)
    unused[slots[counted].long()] = False
    tokens[unused] = float("nan")  # never read: FlashMLA poisons every slot no counted entry names
    pages = kv_format.quantize_kv_pages_fp8(tokens.view(num_pages, source.block_size, D_QK).bfloat16(), MODEL1)
    return kv_format.flash_mla_kv_view(pages, MODEL1, source.block_size).view(byte_dtype), slots, length


def _sink(g: torch.Generator, heads: int) -> torch.Tensor:
    """``[heads]`` float32: normal, with ``+inf`` and ``-inf`` for some heads (FlashMLA's sink)."""
    sink = torch.randn(heads, generator=g)
    which = torch.randn(heads, generator=g)
    return sink.masked_fill(which > 0.5, float("inf")).masked_fill(which < -0.5, float("-inf"))


def _check_decode(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor) -> None:
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert tuple(lse.shape) == tuple(ref_lse.shape)
    assert_close(out, ref_out, **DECODE_OUT_TOL, name="out")
    assert_close(lse, ref_lse, **DECODE_LSE_TOL, name="lse")


def _run_decode(
    seed: int,
    batch: int,
    heads: int,
    s_q: int,
    window: Source,
    extra: Source | None,
    *,
    sink: bool = True,
    zero_lengths: bool = False,
    byte_dtype: torch.dtype = torch.uint8,
) -> None:
    """Build one FlashMLA decode case, run ``compat.flash_mla_with_kvcache`` on it (q as a slice of a padded buffer,
    the caches as ``byte_dtype``) and check it against the oracle."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, s_q, heads, D_QK, generator=g).clamp(-1, 1).bfloat16()
    attn_sink = _sink(g, heads) if sink else None
    sources = [_model1_source(g, window, batch, s_q, zero_lengths, byte_dtype)]
    kwargs: dict[str, Any] = {"topk_length": sources[0][2], "attn_sink": attn_sink}
    if extra is not None:
        sources.append(_model1_source(g, extra, batch, s_q, zero_lengths, byte_dtype))
        kwargs.update(
            extra_k_cache=sources[1][0], extra_indices_in_kvcache=sources[1][1], extra_topk_length=sources[1][2]
        )
    out, lse = _call(layouts.relaid(q, "padded"), sources[0][0], D_V, sources[0][1], softmax_scale=DECODE_SCALE,
                     **kwargs)  # fmt: skip
    _check_decode(out, lse, *_oracle(q, sources, DECODE_SCALE, D_V, attn_sink))


# FlashMLA's "MODEL1 CONFIG1, 2 and 4" (its production decode shapes: a 128-entry window in pages of 256 plus 512 or
# 1024 compressed entries in pages of 64 or 2, with and without the extra top-k length; its CONFIG3 is CONFIG4 with
# 64 heads), caches cut to a few pages; the cache bytes as each dtype FlashMLA takes (its own tests: float8_e4m3fn).
PRODUCTION = {
    "config1 h64 512": (64, Source(200, 128, 256), Source(640, 512, 64), torch.float8_e4m3fn),
    "config2 h128 1024": (128, Source(200, 128, 256), Source(1280, 1024, 64), torch.int8),
    "config4 h128 1024 pages of 2": (128, Source(200, 128, 256), Source(1280, 1024, 2, with_length=True), torch.uint8),
}


@pytest.mark.parametrize("case", list(PRODUCTION), ids=list(PRODUCTION))
def test_flashmla_model1_production_configs(case: str) -> None:
    heads, window, extra, byte_dtype = PRODUCTION[case]
    _run_decode(len(case), 2, heads, 2, window, extra, byte_dtype=byte_dtype)


# FlashMLA's corner cases (its page sizes 53/61/576 and top-k 64/576, three queries a sequence; 69 and both lengths
# are among the small random cases below): every index invalid in one source, sequences with nothing cached, no
# sink; and a window-only case with a top-k length.
CORNERS = {
    "all invalid window": dict(heads=64, window=Source(512, 64, 61, with_length=True, all_invalid=True),
                               extra=Source(650, 576, 53)),
    "zero lengths, no sink": dict(heads=128, window=Source(650, 576, 53), extra=Source(512, 64, 61, with_length=True),
                                  sink=False, zero_lengths=True),
    "window only": dict(heads=64, window=Source(1024, 576, 576, with_length=True), extra=None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CORNERS), ids=list(CORNERS))
def test_flashmla_model1_corner_cases(case: str) -> None:
    _run_decode(len(case), 2, s_q=3, **CORNERS[case])


@st.composite
def _sources(draw: st.DrawFn) -> Source:
    topk = draw(st.integers(1, 24))
    return Source(
        s_k=draw(st.integers(1, 40)),
        topk=topk,
        block_size=draw(st.sampled_from([1, 2, 3, 5, 16, 61, 69])),
        with_length=draw(st.booleans()),
        all_invalid=draw(st.integers(0, 5)) == 0,
    )


@strategies.examples(0.2)
@given(
    seed=strategies.SEEDS,
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    s_q=st.integers(1, 3),
    window=_sources(),
    extra=st.none() | _sources(),
    sink=st.booleans(),
    zero_lengths=st.booleans(),
)
def test_model1_decode_matches_dense_oracle(
    seed: int, batch: int, heads: int, s_q: int, window: Source, extra: Source | None, sink: bool, zero_lengths: bool
) -> None:
    """Small random MODEL1 decode problems of every feature mix (page sizes from 1 to 69, invalid and NaN-poisoned
    slots, lengths, sinks with infinities, an extra source with its own page size and length, empty sequences)."""
    _run_decode(seed, batch, heads, s_q, window, extra, sink=sink, zero_lengths=zero_lengths)


def _paged_model1(seed: int, batch: int, tokens: int, page_size: int) -> tuple[cache.PagedKVCache, torch.Tensor]:
    """A ``PagedKVCache`` with MODEL1 pages holding ``tokens`` octave-spread rows per sequence, and ``[batch, 3, 9]``
    slots of random positions (some ``-1``)."""
    g = torch.Generator().manual_seed(seed)
    paged = cache.PagedKVCache(batch, tokens, D_QK, page_size=page_size, dtype="fp8", layout=MODEL1)
    paged.append(_octave_rows(g, batch * tokens).view(batch, tokens, D_QK).bfloat16())
    positions = torch.randint(-1, tokens, (batch, 27), generator=g)
    return paged, paged.slots(positions).view(batch, 3, 9)


def test_model1_pages_decode_exactly_as_their_dequantised_rows() -> None:
    """dsa.ops.sparse_mla_decode over MODEL1 pages (PagedKVCache's, in FlashMLA's ``k_cache`` view, any strides) equals
    the same call over the bf16 rows they dequantise to, bit for bit (dequantisation is exact), for the window and
    the extra source, through the op and the validated reference; a row-per-token 604-byte cache of the same width
    still reads as that layout."""
    window, window_slots = _paged_model1(11, 2, 21, 4)
    extra, extra_slots = _paged_model1(12, 2, 10, 3)
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 3, 5, D_QK, generator=g).bfloat16()
    args = {"sm_scale": DECODE_SCALE, "d_v": D_V, "attn_sink": torch.randn(5, generator=g)}
    length = torch.tensor([[9, 4, 0], [7, 9, 2]], dtype=torch.int32)

    def view(paged: cache.PagedKVCache) -> torch.Tensor:
        return kv_format.flash_mla_kv_view(paged.pages, MODEL1, paged.page_size).squeeze(2)

    def rows(paged: cache.PagedKVCache) -> torch.Tensor:
        return kv_format.dequantize_kv_pages_fp8(paged.pages, MODEL1, paged.page_size)

    want = ops.sparse_mla_decode(q, rows(window), window_slots, topk_length=length, extra_kv_cache=rows(extra),
                                 extra_indices=extra_slots, **args)  # fmt: skip
    assert torch.isfinite(want[0]).all()
    for layout in ("row_major", "padded", "column_major"):
        pages = layouts.relaid(view(window), layout)
        for op in (ops.sparse_mla_decode, reference.sparse_mla_decode):
            got = op(q, pages, window_slots, topk_length=length, extra_kv_cache=view(extra), extra_indices=extra_slots,
                     **args)  # fmt: skip
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (layout, op)
    row_layout = kv_format.FP8Layout.for_width(D_QK, 64)
    assert row_layout.bytes_per_token == 604
    bf16 = torch.randn(3, 4, D_QK, generator=g).bfloat16()
    rows604 = kv_format.quantize_kv_fp8(bf16, row_layout)
    slots = window_slots.clamp_max(11)
    got = ops.sparse_mla_decode(q, rows604, slots, **args)
    exact = ops.sparse_mla_decode(q, kv_format.dequantize_kv_fp8(rows604, row_layout), slots, **args)
    assert torch.equal(got[0], exact[0]) and torch.equal(got[1], exact[1])


def _poisoned_model1(seed: int, page_size: int, slots: torch.Tensor, length: torch.Tensor) -> tuple[Any, Any]:
    """``(MODEL1 pages in FlashMLA's view, the bf16 rows they dequantise to)`` of 2 sequences of 21 tokens, every byte
    that no valid entry of ``slots [B, s_q, k]`` (first ``length [B, s_q]``) names 0xFF (``poison_model1_pages``)."""
    paged, _ = _paged_model1(seed, 2, 21, page_size)
    blob = paged.pages.clone()
    used = torch.zeros(paged.num_slots, dtype=torch.bool)
    valid = (torch.arange(slots.shape[-1]) < length.unsqueeze(-1)) & (slots >= 0) & (slots < paged.num_slots)
    used[slots[valid].long()] = True
    poison_model1_pages(blob, page_size, used)
    rows = kv_format.dequantize_kv_pages_fp8(blob, MODEL1, page_size)
    assert rows.view(-1, D_QK)[~used].isnan().all() and not rows.view(-1, D_QK)[used].isnan().any()
    return kv_format.flash_mla_kv_view(blob, MODEL1, page_size).squeeze(2), rows


@pytest.mark.cpu_kernel
def test_model1_pages_run_the_decode_kernel_as_their_dequantised_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """DSA_BACKEND=tilelang: MODEL1 pages (window and extra source, a sink with infinities; every byte no valid entry
    names 0xFF) run the C-target decode kernel (a spy counts launches; 3 heads, d_qk = d_v = 512, pages of 4: two
    paged-FP8 builds beside the bf16 test's), FlashMLA's padded view read in place. It dequantises as the reference:
    out and lse equal the bf16 kernel's over the dequantised rows bit for bit, at one split and three; one source in
    one split (the direct kernel with the prefetch, a column-major copy of the pages) equals the split kernel through
    the combine; all within the reference's tolerances. A NaN scale (UE8M0 255) gives NaN where the reference does."""
    from dsa.launch import sparse_mla_decode as launch
    from tl_kernels.sparse_mla_decode import Config

    g = torch.Generator().manual_seed(23)
    heads, page_size = 3, 4
    q = torch.randn(2, 2, heads, D_QK, generator=g).clamp(-1, 1).bfloat16()
    num_slots = 2 * math.ceil(21 / page_size) * page_size
    indices = torch.randint(-1, num_slots + 2, (2, 2, 9), generator=g, dtype=torch.int32)
    indices[0, 0, 0] = 5  # a valid entry of query (0, 0), whose scale is poisoned below
    extra_indices = torch.randint(-1, num_slots, (2, 2, 6), generator=g, dtype=torch.int32)
    length = torch.tensor([[9, 4], [0, 7]], dtype=torch.int32)
    window, window_rows = _poisoned_model1(24, page_size, indices, length)
    extra, extra_rows = _poisoned_model1(25, page_size, extra_indices, torch.full((2, 2), 6, dtype=torch.int32))
    assert launch.page_stride(window, MODEL1) == MODEL1.page_bytes(page_size)  # FlashMLA's view: read in place
    args: dict[str, Any] = {"topk_length": length, "attn_sink": _sink(g, heads), "sm_scale": DECODE_SCALE, "d_v": D_V}
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    launches: list[int] = []
    real = launch.sparse_mla_decode
    monkeypatch.setattr(launch, "sparse_mla_decode", lambda *a, **k: launches.append(1) or real(*a, **k))

    def both(kv: torch.Tensor, extra_kv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        more = {} if extra_kv is None else {"extra_kv_cache": extra_kv, "extra_indices": extra_indices}
        return ops.sparse_mla_decode(q, kv, indices, **args, **more)

    out, lse = both(window, extra)
    assert launches == [1]
    want = reference.sparse_mla_decode(q, window, indices, extra_kv_cache=extra, extra_indices=extra_indices, **args)
    assert_close(out, want[0], atol=1e-2, rtol=1e-2, max_diff=2e-5, name="out")
    assert_close(lse, want[1], atol=1e-4, rtol=1e-4, name="lse")
    call = {**args, "extra_kv_cache": extra, "extra_indices": extra_indices, "d_rope": 64, "splits": 3}
    single = {**args, "d_rope": 64, "splits": 1}
    for got, exact in (
        ((out, lse), both(window_rows, extra_rows)),
        (real(q, window, indices, **call), real(q, window_rows, indices, **{**call, "extra_kv_cache": extra_rows})),
        # The direct kernel with sm_90a's FP8 prefetch (the second build) against one split through the combine.
        (real(q, layouts.relaid(window, "column_major"), indices, **single, config=Config(prefetch=True)),
         real(q, window, indices, **single, direct=False)),
    ):
        assert torch.equal(got[0], exact[0]) and torch.equal(got[1], exact[1])
    assert_close(got[0], reference.sparse_mla_decode(q, window, indices, **args)[0], atol=1e-2, rtol=1e-2,
                 max_diff=2e-5, name="direct out")  # fmt: skip
    # UE8M0 255 (NaN) as the first scale of slot 5, which query (0, 0) names: its first tile dequantises to NaN.
    blob = torch.as_strided(window, (window.shape[0], MODEL1.page_bytes(page_size)), (window.stride(0), 1)).clone()
    blob[5 // page_size, page_size * MODEL1.value_bytes + 5 % page_size * MODEL1.scale_group_bytes] = 0xFF
    poisoned = kv_format.flash_mla_kv_view(blob, MODEL1, page_size).squeeze(2)
    got = both(poisoned, extra)
    want = reference.sparse_mla_decode(q, poisoned, indices, extra_kv_cache=extra, extra_indices=extra_indices, **args)
    assert torch.isnan(got[1][0, 0]).all() and torch.equal(got[1].isnan(), want[1].isnan())
    assert torch.equal(got[0].isnan(), want[0].isnan())


@pytest.mark.cpu_kernel
def test_bf16_512_wide_caches_run_the_decode_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """V4's bf16 caches (512-wide rows, K = V, a window and an extra source, a sink) run the C-target decode kernel
    (a spy counts the launches; one build: 3 heads, d_qk = d_v = 512) and match the reference, with the window as
    slots and as ranges."""
    from dsa.launch import sparse_mla_decode as launch

    g = torch.Generator().manual_seed(31)
    q = torch.randn(2, 2, 3, D_QK, generator=g).bfloat16()
    window = _octave_rows(g, 5 * 4).view(5, 4, D_QK).bfloat16()
    extra = _octave_rows(g, 3 * 3).view(3, 3, D_QK).bfloat16()
    args: dict[str, Any] = {
        "indices": torch.randint(-1, 21, (2, 2, 7), generator=g, dtype=torch.int32),
        "extra_kv_cache": extra,
        "extra_indices": torch.randint(-1, 10, (2, 2, 5), generator=g, dtype=torch.int32),
        "topk_length": torch.tensor([7, 3], dtype=torch.int32),
        "attn_sink": _sink(g, 3),
        "sm_scale": DECODE_SCALE,
        "d_v": D_V,
    }
    want = reference.sparse_mla_decode(q, window, **args)
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    launches: list[int] = []
    real = launch.sparse_mla_decode
    monkeypatch.setattr(launch, "sparse_mla_decode", lambda *a, **k: launches.append(1) or real(*a, **k))
    out, lse = ops.sparse_mla_decode(q, window, **args)
    assert launches == [1]
    assert_close(out, want[0], atol=1e-2, rtol=1e-2, max_diff=2e-5, name="out")
    assert_close(lse, want[1], atol=1e-4, rtol=1e-4, name="lse")
    # The window as ranges through a block table (the same kernel: the op lists the ranges' slots).
    ranges = torch.tensor([[[-2, 3], [4, 8]], [[0, 0], [1, 6]]], dtype=torch.int32)
    ranged = {**args, "indices": None, "topk_length": None, "ranges": ranges,
              "block_table": torch.tensor([[3, 0], [4, 1]], dtype=torch.int32)}  # fmt: skip
    want = reference.sparse_mla_decode(q, window, **ranged)
    out, lse = ops.sparse_mla_decode(q, window, **ranged)
    assert launches == [1, 1]
    assert_close(out, want[0], atol=1e-2, rtol=1e-2, max_diff=2e-5, name="ranged out")
    assert_close(lse, want[1], atol=1e-4, rtol=1e-4, name="ranged lse")


# ------------------------------------------------------------------------------------------------ range form


def _v4_caches(fmt: str, batch: int, tokens: int, entries: int) -> tuple[cache.PagedKVCache, cache.PagedKVCache]:
    """A raw-token cache (pages of 3) and a compressed-entry cache (pages of 2) of DeepSeek-V4's 512-wide rows, bf16
    or MODEL1 FP8, holding octave-spread rows."""
    g = torch.Generator().manual_seed(41)
    kind: dict[str, Any] = {"dtype": torch.bfloat16} if fmt == "bf16" else {"dtype": "fp8", "layout": MODEL1}
    caches = []
    for length, page_size in ((tokens, 3), (entries, 2)):
        paged = cache.PagedKVCache(batch, length, D_QK, page_size=page_size, **kind)
        paged.append(_octave_rows(g, batch * length).view(batch, length, D_QK).bfloat16())
        caches.append(paged)
    return caches[0], caches[1]


def _cache_arg(paged: cache.PagedKVCache) -> torch.Tensor:
    """What sparse_mla_decode takes: bf16 pages as they are, MODEL1 pages in FlashMLA's view."""
    if paged.layout is None:
        return paged.pages
    return kv_format.flash_mla_kv_view(paged.pages, MODEL1, paged.page_size).squeeze(2)


def _listed(paged: cache.PagedKVCache, ranges: torch.Tensor) -> torch.Tensor:
    """The obvious slot lists of ``ranges [B, s_q, 2]``: per query, each position of ``[start, end)`` in order
    through ``paged.slots``, ``-1`` padding."""
    batch, s_q = ranges.shape[:2]
    rows = [[list(range(int(ranges[b, t, 0]), int(ranges[b, t, 1]))) for t in range(s_q)] for b in range(batch)]
    width = max(1, max(len(r) for row in rows for r in row))
    positions = torch.full((batch, s_q, width), -1, dtype=torch.int64)
    for b in range(batch):
        for t in range(s_q):
            positions[b, t, : len(rows[b][t])] = torch.tensor(rows[b][t], dtype=torch.int64)
    return paged.slots(positions.view(batch, -1)).view(batch, s_q, width)


@pytest.mark.parametrize("fmt", ["bf16", "model1"])
def test_decode_range_form_window_and_compressed_entries(fmt: str) -> None:
    """DeepSeek-V4's decode step with both sources as ranges through their block tables: the sliding window
    ``[t - W + 1, t + 1)`` over raw tokens (negative starts early on; one query's window cut to nothing) and HCA's
    compressed entries ``[0, (t + 1) // rate)`` (empty before the first full window); then the window as a range and
    CSA's selection as extra slots. Equal to the dense oracle over the slot lists the ranges name, written out."""
    batch, s_q, heads, window, rate, tokens = 2, 3, 4, 5, 4, 11
    raw, compressed = _v4_caches(fmt, batch, tokens, tokens // rate)
    t = torch.tensor([[2, 7, 10], [0, 1, 10]]).view(batch, s_q, 1)  # each query's own position
    ranges = torch.cat([t - window + 1, t + 1], dim=-1).int()
    ranges[1, 1] = torch.tensor([4, 4])  # an empty window
    extra_ranges = torch.cat([torch.zeros_like(t), (t + 1) // rate], dim=-1).int()
    g = torch.Generator().manual_seed(42)
    q = torch.randn(batch, s_q, heads, D_QK, generator=g).clamp(-1, 1).bfloat16()
    sink = _sink(g, heads)
    args = {"sm_scale": DECODE_SCALE, "d_v": D_V, "attn_sink": sink}
    out, lse = ops.sparse_mla_decode(
        q, _cache_arg(raw), ranges=ranges, block_table=raw.block_table, extra_kv_cache=_cache_arg(compressed),
        extra_ranges=extra_ranges, extra_block_table=compressed.block_table, **args,
    )  # fmt: skip
    listed = [(_cache_arg(raw).unsqueeze(2), _listed(raw, ranges), None),
              (_cache_arg(compressed).unsqueeze(2), _listed(compressed, extra_ranges), None)]  # fmt: skip
    _check_decode(out, _as_flashmla_lse(lse), *_oracle(q, listed, DECODE_SCALE, D_V, sink))
    selected = torch.randint(-1, compressed.num_slots, (batch, s_q, 3), generator=g, dtype=torch.int32)
    mixed = reference.sparse_mla_decode(
        q, _cache_arg(raw), ranges=ranges, block_table=raw.block_table, extra_kv_cache=_cache_arg(compressed),
        extra_indices=selected, **args,
    )  # fmt: skip
    listed[1] = (_cache_arg(compressed).unsqueeze(2), selected, None)
    _check_decode(mixed[0], _as_flashmla_lse(mixed[1]), *_oracle(q, listed, DECODE_SCALE, D_V, sink))


def _as_flashmla_lse(lse: torch.Tensor) -> torch.Tensor:
    """``sparse_mla_decode``'s ``lse [B, s_q, H]`` in FlashMLA's form (the oracle's): ``[B, H, s_q]``, ``+inf`` for
    an empty row."""
    return lse.transpose(1, 2).masked_fill(torch.isneginf(lse.transpose(1, 2)), float("inf"))


def test_range_slots_clip_to_the_table() -> None:
    """Ranges past the block table, below 0, reversed or huge map to the slots of their positions on the table
    only (never an S-wide list), ``-1`` elsewhere, and pages marked ``-1`` in the table are invalid."""
    kv_cache = torch.zeros(6, 4, 8)
    table = torch.tensor([[2, 0, -1], [5, 4, 3]], dtype=torch.int32)
    ranges = torch.tensor([[[-3, 2], [7, 5]], [[10, 2**31 - 1], [-(2**31), 1]]], dtype=torch.int32)
    got = range_slots_of(ranges, table, kv_cache)
    assert got.shape == (2, 2, 2)  # the longest clipped range: 0..2 of -3..2, 10..12 of 10..2**31-1
    assert got[0, 0].tolist() == [8, 9] and got[0, 1].tolist() == [-1, -1]
    assert got[1, 0].tolist() == [14, 15] and got[1, 1].tolist() == [20, -1]
    window = torch.tensor([[[4, 6], [5, 9]], [[0, 1], [3, 3]]], dtype=torch.int32)
    assert range_slots_of(window, table, kv_cache)[0, 1].tolist() == [1, 2, 3, -1]  # positions 5..7; 8 is page -1


@strategies.examples(0.2)
@given(seed=strategies.SEEDS, **strategies.sizes(batch=3, s_q=3, page_size=5, pages=4))
def test_range_form_equals_the_listed_positions(seed: int, batch: int, s_q: int, page_size: int, pages: int) -> None:
    """Random ranges (empty, reversed, negative, past the table) through block tables with unallocated (-1) pages:
    the same result as the slot list written out position by position with a loop (float32, a sink)."""
    g = torch.Generator().manual_seed(seed)
    num_pages = batch * pages + 1
    kv = torch.randn(num_pages, page_size, 16, generator=g)
    table = torch.randperm(num_pages, generator=g)[: batch * pages].view(batch, pages).int()
    table[torch.rand(batch, pages, generator=g) < 0.2] = -1
    capacity = pages * page_size
    ranges = torch.randint(-4, capacity + 5, (batch, s_q, 2), generator=g, dtype=torch.int32)
    listed = torch.full((batch, s_q, max(1, capacity + 9)), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(s_q):
            j = 0
            for p in range(int(ranges[b, t, 0]), int(ranges[b, t, 1])):
                page = int(table[b, p // page_size]) if 0 <= p < capacity else -1
                listed[b, t, j] = page * page_size + p % page_size if page >= 0 else -1
                j += 1
    q = torch.randn(batch, s_q, 2, 16, generator=g)
    args = {"sm_scale": 0.3, "d_v": 8, "attn_sink": torch.randn(2, generator=g)}
    got = ops.sparse_mla_decode(q, kv, ranges=ranges, block_table=table, **args)
    want = ops.sparse_mla_decode(q, kv, listed, **args)
    assert_close(got[0], want[0], atol=1e-6, rtol=1e-6, name="out")
    assert_close(got[1], want[1], atol=1e-6, rtol=1e-6, name="lse")


def _bad_ranged() -> list[tuple[str, dict[str, Any], str]]:
    table = torch.zeros(1, 2, dtype=torch.int32)
    ranges = torch.zeros(1, 1, 2, dtype=torch.int32)
    slots = torch.zeros(1, 1, 3, dtype=torch.int32)
    return [
        ("both", {"indices": slots, "ranges": ranges, "block_table": table}, "exactly one of indices and ranges"),
        ("neither", {}, "exactly one of indices and ranges must be given, got neither"),
        ("no table", {"ranges": ranges}, r"ranges need block_table \[B, pages_per_sequence\]"),
        ("table with slots", {"indices": slots, "block_table": table}, "block_table maps ranges to slots"),
        ("length", {"ranges": ranges, "block_table": table, "topk_length": torch.ones(1, dtype=torch.int32)},
         "topk_length applies to indices only"),
        ("table dtype", {"ranges": ranges, "block_table": table.long()}, "block_table must have dtype int32"),
        ("table batch", {"ranges": ranges, "block_table": table.expand(2, 2)}, r"block_table must have shape .*B = 1"),
        ("ranges shape", {"ranges": torch.zeros(1, 1, 3, dtype=torch.int32), "block_table": table}, "ranges must"),
        ("extra alone", {"indices": slots, "extra_ranges": ranges, "extra_block_table": table},
         "extra_ranges and extra_block_table need extra_kv_cache"),
    ]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "message"), _bad_ranged(), ids=[c[0] for c in _bad_ranged()])
def test_range_form_bad_input_names_the_argument(case: str, change: dict[str, Any], message: str) -> None:
    q = torch.zeros(1, 1, 2, 16)
    with pytest.raises((TypeError, ValueError), match=f"^sparse_mla_decode: .*{message}"):
        ops.sparse_mla_decode(q, torch.zeros(2, 4, 16), sm_scale=0.1, d_v=16, **change)
    if case not in ("extra alone", "table with slots"):  # the reference's entry point checks ranged sources too
        with pytest.raises((TypeError, ValueError), match="^sparse_mla_decode: "):
            reference.sparse_mla_decode(q, torch.zeros(2, 4, 16), sm_scale=0.1, d_v=16, **change)


# ------------------------------------------------------------------------------------------------ prefill


@dataclasses.dataclass(frozen=True)
class Prefill:
    """One ``flash_mla_sparse_fwd`` case of FlashMLA's prefill test (``TestParam``), d_qk = d_v = 512."""

    s_q: int
    s_kv: int
    topk: int
    heads: int
    sink: bool = False
    with_length: bool = False
    invalid_rows: bool = False


PREFILL = {
    "regular": Prefill(1, 128, 128, 64),
    "topk past s_kv": Prefill(5, 95, 128, 128, sink=True, with_length=True),
    "MODEL1 config1 h64 topk512": Prefill(4, 592, 512, 64, sink=True),
    "MODEL1 config2 h128 topk1024": Prefill(3, 1521, 1024, 128, sink=True, with_length=True),
    "rows all invalid": Prefill(6, 256, 256, 128, sink=True, with_length=True, invalid_rows=True),
    "topk 2048 over 32 keys": Prefill(2, 32, 2048, 64, sink=True, with_length=True),
}


def _prefill_inputs(seed: int, p: Prefill) -> dict[str, Any]:
    """FlashMLA's ``generate_testcase``: q, kv ``[s, 1, 512]`` bf16 ``randn / 10`` plus an offset, distinct valid
    indices per row filled up with bad values, optional whole invalid rows, sink and ``topk_length [s_q]``."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        offset = (float(torch.rand((), generator=g)) - 0.5) / 10
        return (torch.randn(*shape, generator=g) / 10 + offset).clamp(-10, 10).bfloat16()

    q, kv = normal(p.s_q, p.heads, D_QK), normal(p.s_kv, 1, D_QK)
    keys = torch.rand(p.s_q, max(p.s_kv, p.topk), generator=g)
    keys[:, p.s_kv :] = -1.0
    picked = keys.topk(p.topk, dim=-1)
    bad = torch.tensor((*BAD_INDICES, p.s_kv), dtype=torch.int64)
    fill = bad[torch.randint(0, bad.numel(), (p.s_q, p.topk), generator=g)]
    indices = torch.where(picked.values < 0, fill, picked.indices)
    if p.invalid_rows:
        indices[torch.rand(p.s_q, generator=g) < 0.5] = bad[int(torch.randint(0, bad.numel(), (), generator=g))]
    sink = _sink(g, p.heads) if p.sink else None
    length = None
    if p.with_length:
        length = torch.randint(0, max(p.topk + 1, 64), (p.s_q,), generator=g).clamp_max(p.topk).int()
    return {"q": q, "kv": kv, "indices": indices.int().view(p.s_q, 1, p.topk), "attn_sink": sink, "topk_length": length}


@pytest.mark.parametrize("case", list(PREFILL), ids=list(PREFILL))
def test_flashmla_model1_prefill(case: str) -> None:
    """flash_mla_sparse_fwd with d_qk = d_v = 512 (K = V) on FlashMLA's shapes, inputs slices of padded buffers."""
    inputs = _prefill_inputs(len(case), PREFILL[case])
    strided = {name: None if t is None else layouts.relaid(t, "padded") for name, t in inputs.items()}
    out, max_logits, lse = compat.flash_mla_sparse_fwd(
        strided["q"], strided["kv"], strided["indices"], PREFILL_SCALE, D_V, strided["attn_sink"],
        strided["topk_length"],
    )  # fmt: skip
    ref_out, ref_max, ref_lse = _flashmla_oracle(
        inputs["q"], inputs["kv"], inputs["indices"], PREFILL_SCALE, D_V, inputs["attn_sink"], inputs["topk_length"]
    )
    assert out.shape == (PREFILL[case].s_q, PREFILL[case].heads, D_V) and out.dtype == torch.bfloat16
    assert_close(out, ref_out, **PREFILL_OUT_TOL, name="out")
    assert_close(max_logits, ref_max, **PREFILL_LSE_TOL, name="max_logits")
    assert_close(lse, ref_lse, **PREFILL_LSE_TOL, name="lse")
