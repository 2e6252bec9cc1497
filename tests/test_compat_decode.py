"""``dsa.compat.get_mla_metadata``/``flash_mla_with_kvcache`` against an independent dense computation.

The oracle below gathers the cache rows each query names, masks invalid slots and entries past ``topk_length``, and
takes the softmax in float64: FlashMLA's sparse-decode semantics (``tests/ref.py`` of deepseek-ai/FlashMLA), written
from the shapes alone, without ``dsa.reference``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa import cache, compat, ops
from dsa.testing import assert_close
from tests import layouts
from tests.test_kv_format_model1 import _flashmla_model1_dequantize as flashmla_model1_dequantize

SCALE = 0.3
FP8_BYTES = (torch.uint8, torch.int8, torch.float8_e4m3fn)


def _rows(k_cache: torch.Tensor, d_qk: int) -> torch.Tensor:
    """``[num_slots, d_qk]`` float64 rows of a ``[blocks, block_size, 1, row]`` cache (FP8 bytes dequantised: a
    512-wide cache of 584-byte rows holds MODEL1 blocks, read by the restatement of FlashMLA's own dequantiser)."""
    blocks, block_size, _, row = k_cache.shape
    if k_cache.dtype in FP8_BYTES and (d_qk, row) == (512, 584):
        pages = k_cache.reshape(blocks, block_size * row).view(torch.uint8)
        return flashmla_model1_dequantize(pages, block_size).reshape(-1, d_qk).double()
    flat = k_cache.reshape(-1, row)
    if flat.dtype in FP8_BYTES:
        flat = cache.dequantize_kv_fp8(flat, cache.FP8Layout.for_width(d_qk, 64))
    return flat.double()


def _oracle(
    q: torch.Tensor,
    sources: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    scale: float,
    d_v: int,
    sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention over ``sources`` (``(k_cache, indices [B, s_q, k], topk_length [B] | None)``).

    Returns out ``[B, s_q, H, d_v]`` float64 and lse ``[B, H, s_q]`` float64 (``+inf`` where nothing is valid).
    """
    d_qk = q.shape[-1]
    keys, masks = [], []
    for k_cache, indices, length in sources:
        rows = _rows(k_cache, d_qk)
        idx = indices.long()
        valid = (idx >= 0) & (idx < rows.shape[0])
        if length is not None:
            valid &= torch.arange(idx.shape[-1]).view(1, 1, -1) < length.long().view(-1, 1, 1)
        # Rows no valid entry names may hold anything (FlashMLA's tests fill them with NaN): zero them, never read.
        keys.append(torch.where(valid.unsqueeze(-1), rows[idx.clamp(0, rows.shape[0] - 1)], 0.0))  # [B, s_q, k, d_qk]
        masks.append(valid)
    kv, valid = torch.cat(keys, dim=2), torch.cat(masks, dim=2)
    logits = torch.einsum("bshd,bskd->bshk", q.double(), kv) * scale
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, s_q, H]
    empty = torch.isneginf(lse)
    probs = torch.exp(logits - lse.masked_fill(empty, 0.0).unsqueeze(-1))
    out = torch.einsum("bshk,bskd->bshd", probs, kv[..., :d_v])
    if sink is not None:
        out = out * torch.sigmoid(lse - sink.double().view(1, 1, -1)).unsqueeze(-1)
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse.masked_fill(empty, float("inf")).transpose(1, 2)


def _call(q: torch.Tensor, k_cache: torch.Tensor, d_v: int, indices: torch.Tensor, **kwargs: Any):
    meta, splits = compat.get_mla_metadata()
    kwargs.setdefault("softmax_scale", SCALE)
    kwargs.setdefault("is_fp8_kvcache", k_cache.dtype in FP8_BYTES)
    return compat.flash_mla_with_kvcache(q, k_cache, None, None, d_v, meta, splits, indices=indices, **kwargs)


def _check(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor) -> None:
    batch, s_q, heads, d_v = ref_out.shape
    assert out.shape == (batch, s_q, heads, d_v)
    assert lse.shape == (batch, heads, s_q) and lse.dtype == torch.float32
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse)), "empty rows must have lse = +inf"
    tol = 1e-5 if out.dtype == torch.float32 else 2e-2
    assert_close(out.double(), ref_out, atol=tol, rtol=tol, name="out")
    finite = torch.isfinite(ref_lse)
    assert_close(lse.double()[finite], ref_lse[finite], atol=tol, rtol=tol, name="lse")


def _plain_cache(g: torch.Generator, blocks: int, block_size: int, d_qk: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(blocks, block_size, 1, d_qk, generator=g).to(dtype)


def _slots(g: torch.Generator, shape: tuple[int, ...], num_slots: int) -> torch.Tensor:
    """Random slots with some ``-1`` and some past the end (both invalid)."""
    return torch.randint(-1, num_slots + 2, shape, generator=g, dtype=torch.int32)


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    s_q=st.integers(1, 3),
    heads=st.integers(1, 4),
    d_qk=st.sampled_from([8, 24]),
    block_size=st.integers(1, 5),
    blocks=st.integers(1, 4),
    topk=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_length=st.booleans(),
    with_sink=st.booleans(),
    extra_topk=st.none() | st.integers(1, 4),
)
def test_matches_dense_oracle(
    seed: int,
    batch: int,
    s_q: int,
    heads: int,
    d_qk: int,
    block_size: int,
    blocks: int,
    topk: int,
    dtype: torch.dtype,
    with_length: bool,
    with_sink: bool,
    extra_topk: int | None,
) -> None:
    g = torch.Generator().manual_seed(seed)
    d_v = d_qk // 2
    q = torch.randn(batch, s_q, heads, d_qk, generator=g).to(dtype)
    k_cache = _plain_cache(g, blocks, block_size, d_qk, dtype)
    indices = _slots(g, (batch, s_q, topk), blocks * block_size)
    indices[0, 0] = -1  # always one query with nothing to attend to (unless the extra source supplies some)
    length = torch.randint(0, topk + 1, (batch,), generator=g, dtype=torch.int32) if with_length else None
    sink = torch.randn(heads, generator=g) if with_sink else None
    sources = [(k_cache, indices, length)]
    extra: dict[str, Any] = {}
    if extra_topk is not None:
        extra_cache = _plain_cache(g, 2, 3, d_qk, dtype)
        extra_indices = _slots(g, (batch, s_q, extra_topk), 6)
        extra_length = torch.randint(0, extra_topk + 1, (batch,), generator=g, dtype=torch.int32)
        sources.append((extra_cache, extra_indices, extra_length))
        extra = {
            "extra_k_cache": extra_cache,
            "extra_indices_in_kvcache": extra_indices,
            "extra_topk_length": extra_length,
        }
    out, lse = _call(q, k_cache, d_v, indices, topk_length=length, attn_sink=sink, **extra)
    assert out.dtype == dtype
    _check(out, lse, *_oracle(q, sources, SCALE, d_v, sink))


def test_empty_rows_lse_layout_and_sink() -> None:
    """lse is [B, H, s_q] (a transposed view, as FlashMLA returns it); empty rows give out 0 and lse +inf even with a
    sink; a +inf sink zeroes out and a -inf sink changes nothing, and neither touches lse."""
    g = torch.Generator().manual_seed(1)
    batch, s_q, heads, d_qk = 2, 3, 4, 16
    q = torch.randn(batch, s_q, heads, d_qk, generator=g)
    k_cache = _plain_cache(g, 3, 4, d_qk, torch.float32)
    indices = _slots(g, (batch, s_q, 5), 12).clamp_min(0)
    indices[1, 2] = -1
    indices[0, 1] = 12  # past the end: invalid too
    sink = torch.tensor([0.5, float("inf"), float("-inf"), -1.0])
    out, lse = _call(q, k_cache, 8, indices, attn_sink=sink)
    ref_out, ref_lse = _oracle(q, [(k_cache, indices, None)], SCALE, 8, sink)
    assert lse.shape == (batch, heads, s_q) and not lse.is_contiguous()
    assert lse.transpose(1, 2).is_contiguous()
    assert torch.isposinf(lse[1, :, 2]).all() and torch.isposinf(lse[0, :, 1]).all()
    assert (out[1, 2] == 0).all() and (out[0, 1] == 0).all()
    assert (out[:, :, 1] == 0).all(), "a +inf sink zeroes the output"
    _check(out, lse, ref_out, ref_lse)
    plain_out, plain_lse = _call(q, k_cache, 8, indices)
    assert torch.equal(plain_lse, lse), "the sink does not enter lse"
    assert torch.equal(plain_out[:, :, 2], out[:, :, 2]), "a -inf sink has no effect"
    # The native op agrees, with -inf where FlashMLA says +inf.
    native_out, native_lse = ops.sparse_mla_decode(
        q, k_cache.squeeze(2), indices, sm_scale=SCALE, d_v=8, attn_sink=sink
    )
    assert torch.equal(native_out, out)
    assert torch.equal(native_lse.masked_fill(torch.isneginf(native_lse), float("inf")), lse.transpose(1, 2))


def test_topk_length_per_sequence() -> None:
    """topk_length [B] cuts every query of its sequence: entries past it are ignored even when valid."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 2, 2, 16, generator=g)
    k_cache = _plain_cache(g, 2, 8, 16, torch.float32)
    indices = torch.randint(0, 16, (3, 2, 6), generator=g, dtype=torch.int32)
    length = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, lse = _call(q, k_cache, 16, indices, topk_length=length)
    assert torch.isposinf(lse[0]).all() and (out[0] == 0).all()
    cut_out, cut_lse = _call(q[1:2], k_cache, 16, indices[1:2, :, :2])
    assert_close(out[1:2], cut_out, atol=1e-6, rtol=1e-6, name="out")
    assert_close(lse[1:2], cut_lse, atol=1e-6, rtol=1e-6, name="lse")
    _check(out, lse, *_oracle(q, [(k_cache, indices, length)], SCALE, 16))


@pytest.mark.parametrize("byte_dtype", FP8_BYTES)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_bytes(byte_dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    """An FP8 cache written by dsa.cache.PagedKVCache (FlashMLA's byte layout, 64 bf16 RoPE values), as any byte dtype,
    with an extra FP8 source: out and lse match the oracle on the dequantised rows."""
    g = torch.Generator().manual_seed(3)
    batch, s_q, heads, d_qk, d_v = 2, 2, 2, 96, 32
    paged = cache.PagedKVCache(batch, 20, d_qk, page_size=4, dtype="fp8", d_rope=64)
    paged.append(torch.randn(batch, 17, d_qk, generator=g).bfloat16())
    k_cache = paged.pages.unsqueeze(2).view(byte_dtype)
    assert k_cache.shape[-1] == cache.FP8Layout.for_width(d_qk, 64).bytes_per_token
    positions = torch.randint(-1, 17, (batch, s_q * 5), generator=g)
    indices = paged.slots(positions).view(batch, s_q, 5)
    extra_cache = cache.quantize_kv_fp8(torch.randn(3, 2, 1, d_qk, generator=g).bfloat16(), paged.layout)
    extra_indices = _slots(g, (batch, s_q, 3), 6)
    q = torch.randn(batch, s_q, heads, d_qk, generator=g).to(q_dtype)
    sink = torch.randn(heads, generator=g)
    out, lse = _call(
        q, k_cache, d_v, indices, attn_sink=sink, extra_k_cache=extra_cache, extra_indices_in_kvcache=extra_indices
    )
    sources = [(k_cache, indices, None), (extra_cache, extra_indices, None)]
    _check(out, lse, *_oracle(q, sources, SCALE, d_v, sink))


def test_fp8_v32_width_with_gapped_blocks() -> None:
    """V3.2's 576-wide rows (656 bytes), in a cache whose blocks are not adjacent in memory (a slice of a larger
    buffer, the way FlashMLA's tests lay it out)."""
    g = torch.Generator().manual_seed(4)
    blocks, block_size, d_qk = 3, 2, 576
    buffer = torch.zeros(blocks, block_size + 1, 656, dtype=torch.uint8)
    buffer[:, :block_size] = cache.quantize_kv_fp8(torch.randn(blocks, block_size, d_qk, generator=g).bfloat16())
    k_cache = buffer[:, :block_size].unsqueeze(2)
    assert not k_cache.is_contiguous()
    q = torch.randn(1, 1, 2, d_qk, generator=g).bfloat16()
    indices = torch.tensor([[[5, -1, 0, 3]]], dtype=torch.int32)
    out, lse = _call(q, k_cache, 512, indices)
    _check(out, lse, *_oracle(q, [(k_cache, indices, None)], SCALE, 512))


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("backend", ["reference", "tilelang"])
def test_any_strides_on_both_backends(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Every tensor in FlashMLA's test layout (a slice of a buffer one element larger in every dimension and 128 wider
    in the last: FP8 caches whose tokens are not packed, a sliced head dimension) or transposed gives exactly the
    result of row-major copies, on the reference and on the C-target kernels (V3.2's 656-byte rows, 2 heads, a sink,
    an extra FP8 source, lengths per sequence). Before the fix the unpacked FP8 cache was rejected on every backend."""
    monkeypatch.setenv("DSA_BACKEND", backend)
    g = torch.Generator().manual_seed(9)
    batch, s_q, heads, d_qk, d_v = 2, 2, 2, 576, 512
    paged = cache.PagedKVCache(batch, 40, d_qk, page_size=8, dtype="fp8", d_rope=64)
    paged.append(torch.randn(batch, 37, d_qk, generator=g).bfloat16())
    args: dict[str, Any] = {
        "q": torch.randn(batch, s_q, heads, d_qk, generator=g).bfloat16(),
        "k_cache": paged.pages.unsqueeze(2),
        "indices": paged.slots(torch.randint(-1, 37, (batch, s_q * 20), generator=g)).view(batch, s_q, 20),
        "topk_length": torch.randint(0, 21, (batch,), generator=g, dtype=torch.int32),
        "attn_sink": torch.randn(heads, generator=g),
        "extra_k_cache": cache.quantize_kv_fp8(torch.randn(3, 4, 1, d_qk, generator=g).bfloat16(), paged.layout),
        "extra_indices_in_kvcache": _slots(g, (batch, s_q, 6), 12),
        "extra_topk_length": torch.randint(0, 7, (batch,), generator=g, dtype=torch.int32),
    }

    def call(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rest = dict(inputs)
        return _call(rest.pop("q"), rest.pop("k_cache"), d_v, rest.pop("indices"), **rest)

    want = call(args)
    _check(*want, *_oracle(args["q"], [(args["k_cache"], args["indices"], args["topk_length"]),
                                      (args["extra_k_cache"], args["extra_indices_in_kvcache"],
                                       args["extra_topk_length"])], SCALE, d_v, args["attn_sink"]))  # fmt: skip
    for layout in ("padded", "column_major", "misaligned"):
        strided = {name: layouts.relaid(t, layout) for name, t in args.items()}
        assert not strided["k_cache"].is_contiguous() or layout == "misaligned"
        got = call(strided)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), layout


def test_softmax_scale_default_is_head_dim() -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 2, 24, generator=g)
    k_cache = _plain_cache(g, 2, 4, 24, torch.float32)
    indices = _slots(g, (1, 2, 4), 8)
    meta, _ = compat.get_mla_metadata()
    out, lse = compat.flash_mla_with_kvcache(q, k_cache, None, None, 12, meta, indices=indices)
    _check(out, lse, *_oracle(q, [(k_cache, indices, None)], 24**-0.5, 12))
    explicit = _call(q, k_cache, 12, indices, softmax_scale=1 / math.sqrt(24))
    assert torch.equal(explicit[0], out) and torch.equal(explicit[1], lse)


def test_metadata_reuse_and_ignored_paging_arguments() -> None:
    """get_mla_metadata takes any arguments (old signature included); one metadata object serves calls of the same
    configuration and rejects another; block_table and cache_seqlens are not read on the sparse path."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 1, 2, 16, generator=g)
    k_cache = _plain_cache(g, 2, 4, 16, torch.float32)
    indices = _slots(g, (2, 1, 3), 8)
    seqlens = torch.tensor([5, 8], dtype=torch.int32)
    meta, splits = compat.get_mla_metadata(seqlens, 2, 1, 2, False, 3)
    assert isinstance(meta, compat.FlashMLASchedMeta) and splits is None and not meta.have_initialized
    first = compat.flash_mla_with_kvcache(q, k_cache, None, None, 16, meta, splits, SCALE, indices=indices)
    assert meta.have_initialized and meta.config is not None and meta.config.topk == 3 and meta.config.b == 2
    table = torch.full((2, 7), 99, dtype=torch.int32)  # nonsense: never read
    again = compat.flash_mla_with_kvcache(
        q, k_cache, table, seqlens, 16, meta, None, SCALE, False, False, indices, None, None, None, None, None
    )
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    with pytest.raises(ValueError, match=r"flash_mla_with_kvcache: tile_scheduler_metadata .*topk = 3, now 2"):
        compat.flash_mla_with_kvcache(q, k_cache, None, None, 16, meta, indices=indices[..., :2])
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata .*b = 2, now 1"):
        compat.flash_mla_with_kvcache(q[:1], k_cache, None, None, 16, meta, indices=indices[:1])


def _bad_inputs() -> list[tuple[str, dict[str, Any], type[Exception], str]]:
    i32 = torch.int32
    idx = torch.zeros(2, 1, 3, dtype=i32)
    fp8_576 = torch.zeros(1, 4, 1, 656, dtype=torch.uint8)
    return [
        ("causal", {"causal": True}, ValueError, r"causal must be False"),
        ("num_splits", {"num_splits": torch.zeros(3, dtype=i32)}, ValueError, r"num_splits must be None"),
        ("metadata type", {"tile_scheduler_metadata": torch.zeros(4, dtype=i32)}, TypeError, r"FlashMLASchedMeta"),
        ("dense path", {"indices": None}, NotImplementedError, r"indices is None.*dense"),
        ("fp8 flag, plain cache", {"is_fp8_kvcache": True}, TypeError, r"k_cache must hold FP8 bytes"),
        ("bytes without flag", {"k_cache": fp8_576, "q_width": 576}, TypeError, r"k_cache holds FP8 bytes"),
        ("fp8 row bytes", {"k_cache": fp8_576[..., :600], "is_fp8_kvcache": True, "q_width": 576}, ValueError, r"656"),
        (
            "512-wide fp8 row bytes",
            {"k_cache": torch.zeros(1, 4, 1, 600, dtype=torch.uint8), "is_fp8_kvcache": True, "q_width": 512},
            ValueError,
            r"must have 584 or 604 bytes per token for 512-wide FP8 rows, got 600",
        ),
        ("cache dtype", {"k_cache": torch.zeros(2, 4, 1, 16, dtype=torch.float64)}, TypeError, r"k_cache must have"),
        ("h_k", {"k_cache": torch.zeros(2, 4, 2, 16)}, ValueError, r"k_cache must have h_k = 1"),
        ("3-D cache", {"k_cache": torch.zeros(2, 4, 16)}, ValueError, r"k_cache must be a 4-D"),
        ("cache width", {"k_cache": torch.zeros(2, 4, 1, 12)}, ValueError, r"k_cache rows must be head_dim = 16"),
        ("indices dtype", {"indices": idx.long()}, TypeError, r"indices must be int32"),
        ("indices shape", {"indices": torch.zeros(2, 2, 3, dtype=i32)}, ValueError, r"indices must have shape"),
        ("topk 0", {"indices": torch.zeros(2, 1, 0, dtype=i32)}, ValueError, r"indices must have shape"),
        ("topk_length shape", {"topk_length": torch.ones(2, 1, dtype=i32)}, ValueError, r"topk_length must be a 1-D"),
        ("topk_length batch", {"topk_length": torch.ones(3, dtype=i32)}, ValueError, r"topk_length must have shape"),
        ("topk_length dtype", {"topk_length": torch.ones(2)}, TypeError, r"topk_length must be int32"),
        ("sink dtype", {"attn_sink": torch.zeros(2, dtype=torch.float64)}, TypeError, r"attn_sink must be float32"),
        ("sink shape", {"attn_sink": torch.zeros(3)}, ValueError, r"attn_sink must have shape"),
        ("extra indices alone", {"extra_indices_in_kvcache": idx}, ValueError, r"extra_indices_in_kvcache must be"),
        ("extra length alone", {"extra_topk_length": torch.ones(2, dtype=i32)}, ValueError, r"extra_topk_length"),
        (
            "extra cache alone",
            {"extra_k_cache": torch.zeros(2, 4, 1, 16)},
            ValueError,
            r"extra_indices_in_kvcache must be given",
        ),
        (
            "extra cache width",
            {"extra_k_cache": torch.zeros(2, 4, 1, 8), "extra_indices_in_kvcache": idx},
            ValueError,
            r"extra_k_cache rows",
        ),
        ("head_dim_v", {"head_dim_v": 17}, ValueError, r"head_dim_v must be an int in \[1, 16\]"),
        ("q rank", {"q": torch.zeros(2, 2, 16)}, ValueError, r"q must be a 4-D"),
        ("q dtype", {"q": torch.zeros(2, 1, 2, 16, dtype=torch.int32)}, TypeError, r"q must be bfloat16"),
    ]


@pytest.mark.parametrize(("case", "change", "error", "pattern"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_rejects_bad_inputs(case: str, change: dict[str, Any], error: type[Exception], pattern: str) -> None:
    width = change.pop("q_width", 16)
    meta, _ = compat.get_mla_metadata()
    args: dict[str, Any] = {
        "q": torch.zeros(2, 1, 2, width),
        "k_cache": torch.zeros(2, 4, 1, width),
        "block_table": None,
        "cache_seqlens": None,
        "head_dim_v": 8,
        "tile_scheduler_metadata": meta,
        "indices": torch.zeros(2, 1, 3, dtype=torch.int32),
    }
    args.update(change)
    with pytest.raises(error, match=pattern) as caught:
        compat.flash_mla_with_kvcache(**args)
    assert "flash_mla_with_kvcache" in str(caught.value), case
    assert not meta.have_initialized, "a rejected call must not bind the metadata"
