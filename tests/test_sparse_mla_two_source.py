"""``sparse_mla`` over ranges and two sources (DeepSeek-V4: the sliding window and the compressed entries in one
softmax with the sink, K = V), forward and backward.

Tiers:
- reference: ``dsa.reference.sparse_mla`` against dense masked attention written the obvious way (the full score
  matrix over ``concat(kv, extra_kv)``, a boolean mask from the indices and ranges), against one index list over the
  concatenated rows (duplicates and gradients), gradcheck in float64, empty sources, invalid entries over poisoned
  rows, chunking (a range is never expanded beyond a chunk of query rows), ``torch.compile(fullgraph=True)`` and
  bad input;
- ``cpu_kernel``: the C-target kernels (``DSA_BACKEND=tilelang``: a sink-less forward launch per source, combined;
  the backward kernel per source against the combined out/lse) against the reference on the same bf16 values,
  non-finite inputs included. The widths are the forward kernel tests' (3 heads, 80/64) and every index list and
  range stays within 64 entries, so the runs share two backward kernels (with and without a sink) and one forward.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa import ops, reference, testing
from dsa.launch import sparse_mla_bwd as bwd_launch
from dsa.launch import sparse_mla_fwd as fwd_launch
from dsa.launch import two_source
from dsa.testing import assert_close, index_mask
from tests import strategies as sts

SOURCE_KINDS = ("indices", "ranges", "window", "hca")
"""How a drawn source lists its entries: an index list (any pattern of ``dsa.testing.INDEX_PATTERNS``, with or
without ``topk_length``), ranges of ``dsa.testing.RANGE_PATTERNS`` (int32 extremes included), V4's sliding window
``[p - w + 1, p + 1)`` and HCA's ``[0, (p + 1) // rate)`` at each query's bottom-right-aligned position ``p``."""

Source = dict[str, Any]


def make_source(kind: str, seed: int, batch: int, seq: int, seq_kv: int, topk: int, *, unique: bool) -> Source:
    """``{"indices", "topk_length", "ranges"}`` of one source (the unused ones None); ``unique`` keeps index lists free
    of duplicates (the dense oracle's boolean mask cannot count them)."""
    g = testing.generator(seed)
    source: Source = {"indices": None, "topk_length": None, "ranges": None}
    if kind == "indices":
        patterns = testing.UNIQUE_ROW_PATTERNS if unique else testing.INDEX_PATTERNS
        pattern = patterns[int(torch.randint(len(patterns), (1,), generator=g))]
        source["indices"] = testing.make_indices(pattern, seed, batch, seq, seq_kv, topk)
        if bool(torch.randint(2, (1,), generator=g)):
            source["topk_length"] = testing.make_topk_length(seed + 1, batch, seq, topk)
        return source
    position = torch.arange(seq).view(1, seq) + (seq_kv - seq)
    if kind == "ranges":
        pattern = testing.RANGE_PATTERNS[int(torch.randint(len(testing.RANGE_PATTERNS), (1,), generator=g))]
        starts, ends = testing.make_ranges(pattern, seed, batch, seq, seq_kv)
    elif kind == "window":
        window = int(torch.randint(1, 9, (1,), generator=g))
        starts, ends = position - window + 1, position + 1
    else:
        rate = int(torch.randint(1, 5, (1,), generator=g))
        starts, ends = torch.zeros_like(position), (position + 1) // rate
    source["ranges"] = torch.stack(torch.broadcast_tensors(starts, ends), -1).expand(batch, seq, 2).to(torch.int32)
    return source


def range_mask(ranges: torch.Tensor, seq_kv: int) -> torch.Tensor:
    """``[B, S, S_kv]`` bool: row ``s`` is in ``[start, end)``."""
    position = torch.arange(seq_kv).view(1, 1, -1)
    return (position >= ranges[..., :1].long()) & (position < ranges[..., 1:].long())


def source_mask(source: Source, seq_kv: int) -> torch.Tensor:
    if source["ranges"] is not None:
        return range_mask(source["ranges"], seq_kv)
    return index_mask(source["indices"], seq_kv, source["topk_length"])


def call_kwargs(first: Source, second: Source | None, extra_kv: torch.Tensor | None) -> dict[str, Any]:
    """``sparse_mla``'s source arguments for ``first`` (over ``kv``) and ``second`` (over ``extra_kv``)."""
    kwargs = {"topk_length": first["topk_length"], "ranges": first["ranges"]}
    if second is not None:
        kwargs.update(extra_kv=extra_kv, extra_indices=second["indices"], extra_topk_length=second["topk_length"],
                      extra_ranges=second["ranges"])  # fmt: skip
    return kwargs


def as_index_list(source: Source, seq_kv: int, offset: int) -> torch.Tensor:
    """``source``'s valid entries as an explicit index list into rows shifted by ``offset`` (``-1`` padding), built
    with plain loops: every range lists ``max(start, 0) .. min(end, S_kv) - 1``."""
    if source["ranges"] is None:
        valid = reference.valid_index_mask(source["indices"], seq_kv, source["topk_length"])
        return torch.where(valid, source["indices"] + offset, -1).to(torch.int32)
    batch, seq, _ = source["ranges"].shape
    rows = [[list(range(max(int(s), 0), min(int(e), seq_kv))) for s, e in row.tolist()] for row in source["ranges"]]
    width = max(1, max(len(r) for b in rows for r in b))
    out = torch.full((batch, seq, width), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(seq):
            out[b, t, : len(rows[b][t])] = torch.tensor(rows[b][t], dtype=torch.int32) + offset
    return out


@st.composite
def problems(draw: st.DrawFn, *, unique: bool, dtype: torch.dtype, small: bool = False) -> dict[str, Any]:
    """A random two-source problem: q, kv, extra_kv (random, never zero), the two sources (the second may be
    absent), d_v (K = V one time in three), a sink or none, ``sm_scale``; ``small`` for gradcheck."""
    limits = dict(max_batch=1, max_seq=2, max_seq_kv=5, max_heads=2, d_qk_choices=(4,), max_topk=5) if small else {}
    shape = draw(sts.attention_shapes(**{"max_seq_kv": 24, "max_topk": 12, **limits}))
    seq_extra = draw(st.integers(1, 5 if small else 16))
    seed = draw(sts.SEEDS)
    g = testing.generator(seed)
    first = make_source(draw(st.sampled_from(SOURCE_KINDS)), seed + 1, shape.batch, shape.seq, shape.seq_kv,
                        shape.topk, unique=unique)  # fmt: skip
    second_kind = draw(st.sampled_from((None, *SOURCE_KINDS)))
    second = None
    if second_kind is not None:
        top = draw(st.integers(1, 12))
        second = make_source(second_kind, seed + 2, shape.batch, shape.seq, seq_extra, top, unique=unique)
    if first["ranges"] is None and second is None:
        second = make_source("window", seed + 3, shape.batch, shape.seq, seq_extra, 1, unique=unique)
    d_v = shape.d_qk if draw(st.integers(0, 2)) == 0 else shape.d_v
    return {
        "q": torch.randn((shape.batch, shape.seq, shape.heads, shape.d_qk), generator=g).to(dtype),
        "kv": torch.randn((shape.batch, shape.seq_kv, shape.d_qk), generator=g).to(dtype),
        "extra_kv": torch.randn((shape.batch, seq_extra, shape.d_qk), generator=g).to(dtype),
        "first": first, "second": second, "d_v": d_v, "sm_scale": shape.d_qk**-0.5,
        "sink": torch.randn(shape.heads, generator=g) * 2 if draw(st.booleans()) else None,
    }  # fmt: skip


def run(p: dict[str, Any], op: Any = reference.sparse_mla, **tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``op`` on problem ``p``; ``tensors`` replace its q/kv/extra_kv/sink (e.g. leaves that need gradients)."""
    t = {"q": p["q"], "kv": p["kv"], "extra_kv": p["extra_kv"], "sink": p["sink"], **tensors}
    extra_kv = t["extra_kv"] if p["second"] is not None else None
    return op(t["q"], t["kv"], p["first"]["indices"], sm_scale=p["sm_scale"], d_v=p["d_v"], attn_sink=t["sink"],
              **call_kwargs(p["first"], p["second"], extra_kv))  # fmt: skip


def dense_oracle(p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention over ``concat(kv, extra_kv)`` with the mask of both sources side by side."""
    seq_kv, seq_extra = p["kv"].shape[1], p["extra_kv"].shape[1]
    masks = [source_mask(p["first"], seq_kv)]
    if p["second"] is not None:
        masks.append(source_mask(p["second"], seq_extra))
    else:
        masks.append(torch.zeros((*masks[0].shape[:2], seq_extra), dtype=torch.bool))
    keys = torch.cat([p["kv"], p["extra_kv"]], dim=1)
    return reference.dense_masked_attention(p["q"], keys, torch.cat(masks, -1), sm_scale=p["sm_scale"], d_v=p["d_v"],
                                            attn_sink=p["sink"])  # fmt: skip


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with an empty row's ``-inf`` as 0 (it has no finite difference or useful gradient)."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


# ------------------------------------------------------------------------------------------------- reference tier


@given(p=problems(unique=True, dtype=torch.float64))
def test_two_sources_match_dense_masked_attention_over_the_concatenated_rows(p: dict[str, Any]) -> None:
    """One softmax over the valid entries of both sources plus the sink: out and lse equal dense attention over
    ``concat(kv, extra_kv)`` masked to the indices and ranges of both (invalid entries, empty and int32-extreme
    ranges, K = V included)."""
    out, lse = run(p)
    want_out, want_lse = dense_oracle(p)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_close(out, want_out, atol=1e-10, rtol=1e-10, name="out")
    assert_close(lse, want_lse, atol=1e-10, rtol=1e-10, max_diff=None, name="lse")


@sts.examples(0.2)
@given(p=problems(unique=False, dtype=torch.float64))
def test_two_sources_equal_one_index_list_over_the_concatenated_rows_with_gradients(p: dict[str, Any]) -> None:
    """Duplicates count per occurrence: out, lse and the gradients of q, kv, extra_kv and the sink equal those of
    one index list (ranges written out by loops, the second source's rows shifted past ``kv``) over
    ``concat(kv, extra_kv)``."""
    seq_kv = p["kv"].shape[1]
    g = testing.generator(7)
    d_out = torch.randn((*p["q"].shape[:3], p["d_v"]), generator=g, dtype=torch.float64)
    d_lse = torch.randn(p["q"].shape[:3], generator=g, dtype=torch.float64)

    def leaves() -> dict[str, torch.Tensor]:
        t = {"q": p["q"], "kv": p["kv"], "extra_kv": p["extra_kv"]}
        if p["sink"] is not None:
            t["sink"] = p["sink"].double()
        return {name: value.clone().requires_grad_(True) for name, value in t.items()}

    def grads(out: torch.Tensor, lse: torch.Tensor, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        loss = (out * d_out).sum() + (finite_lse(lse) * d_lse).sum()
        return (out, lse, *torch.autograd.grad(loss, list(t.values()), allow_unused=True))

    mine = leaves()
    got = grads(*run(p, **mine), mine)
    theirs = leaves()
    indices = [as_index_list(p["first"], seq_kv, 0)]
    if p["second"] is not None:
        indices.append(as_index_list(p["second"], p["extra_kv"].shape[1], seq_kv))
    keys = torch.cat([theirs["kv"], theirs["extra_kv"]], dim=1)
    want = grads(*reference.sparse_mla(theirs["q"], keys, torch.cat(indices, -1), sm_scale=p["sm_scale"], d_v=p["d_v"],
                                       attn_sink=theirs.get("sink")), theirs)  # fmt: skip
    names = ("out", "lse", *(f"d{name}" for name in mine))
    for name, a, b in zip(names, got, want):
        b = torch.zeros_like(a) if b is None else b
        a = torch.zeros_like(b) if a is None else a
        assert_close(a, b, atol=1e-10, rtol=1e-8, max_diff=None, name=name)


@sts.examples(0.2)
@given(p=problems(unique=False, dtype=torch.float64, small=True))
def test_two_sources_gradcheck_float64(p: dict[str, Any]) -> None:
    """``torch.autograd.gradcheck`` of out and lse with respect to q, kv, extra_kv (and the sink)."""
    names = ["q", "kv", "extra_kv"] + (["sink"] if p["sink"] is not None else [])
    inputs = tuple(p[name].double().clone().requires_grad_(True) for name in names)

    def fn(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = run(p, **dict(zip(names, tensors)))
        return out, finite_lse(lse)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("empty", ["first", "second", "both"])
def test_an_empty_source_adds_nothing_and_two_give_zero_and_neg_inf(empty: str) -> None:
    """An empty source (all-invalid indices, empty or negative ranges) changes nothing; with both empty out = 0,
    lse = -inf and every gradient is 0 (no NaN), with and without a sink."""
    g = testing.generator(3)
    q = torch.randn(2, 4, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    sink = torch.randn(3, generator=g, dtype=torch.float64)
    no_entries = torch.full((2, 4, 6), -1, dtype=torch.int32)
    empty_ranges = torch.tensor([[3, 3], [4, 1], [-5, -2], [9, 20]], dtype=torch.int32).expand(2, 4, 2)
    some = torch.randint(0, 9, (2, 4, 6), generator=g, dtype=torch.int32)
    window = torch.tensor([[0, 2], [1, 3], [2, 4], [3, 5]], dtype=torch.int32).expand(2, 4, 2)
    first = no_entries if empty in ("first", "both") else some
    second = empty_ranges if empty in ("second", "both") else window
    for attn_sink in (None, sink):
        out, lse = reference.sparse_mla(q, kv, first, sm_scale=0.3, d_v=16, attn_sink=attn_sink, extra_kv=extra,
                                        extra_ranges=second)  # fmt: skip
        if empty == "both":
            assert (out == 0).all() and torch.isneginf(lse).all()
            out.sum().backward()
            assert all((t.grad == 0).all() for t in (q, kv, extra))
            q.grad = kv.grad = extra.grad = None
            continue
        alone = reference.sparse_mla(q, extra, None, sm_scale=0.3, d_v=16, attn_sink=attn_sink, ranges=second) if (
            empty == "first") else reference.sparse_mla(q, kv, first, sm_scale=0.3, d_v=16, attn_sink=attn_sink)
        assert_close(out, alone[0], atol=1e-12, rtol=1e-12, name="out")
        assert_close(lse, alone[1], atol=1e-12, rtol=1e-12, max_diff=None, name="lse")


@sts.examples(0.2)
@given(p=problems(unique=False, dtype=torch.float32))
def test_rows_no_valid_entry_reaches_may_hold_nan_and_inf(p: dict[str, Any]) -> None:
    """Rows of kv and extra_kv outside every range and behind only invalid entries may hold NaN/±inf (unwritten
    cache slots): out, lse and the gradients are unchanged, and those rows get a zero gradient."""
    poisoned = dict(p)
    unreferenced = {}
    for key, name in (("first", "kv"), ("second", "extra_kv")):
        seq_rows = p[name].shape[1]
        source = p[key]
        if source is None:
            used = torch.zeros(p[name].shape[:2], dtype=torch.bool)
        else:
            used = source_mask(source, seq_rows).any(1)
        unreferenced[name] = ~used
        values = torch.tensor([math.nan, math.inf, -math.inf]).repeat(seq_rows)[:seq_rows]
        poisoned[name] = torch.where(used.unsqueeze(-1), p[name], values.view(1, -1, 1))
    results = []
    for problem in (p, poisoned):
        leaves = {name: problem[name].clone().requires_grad_(True) for name in ("q", "kv", "extra_kv")}
        out, lse = run(problem, **leaves)
        grads = torch.autograd.grad((out * out).sum() + finite_lse(lse).sum(), list(leaves.values()), allow_unused=True)
        results.append((out, lse, *(torch.zeros_like(leaves[n]) if gr is None else gr for n, gr in zip(leaves, grads))))
    for name, clean, dirty in zip(("out", "lse", "dq", "dkv", "dextra_kv"), *results):
        assert torch.equal(clean, dirty), name
    assert (results[1][3][unreferenced["kv"]] == 0).all() and (results[1][4][unreferenced["extra_kv"]] == 0).all()


def test_ranges_are_expanded_one_chunk_of_query_rows_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """HCA's ``[0, (t + 1) // 4)`` and a 16-token window over 512 queries with a small chunk budget: every entry
    tensor the reference builds covers one chunk of query rows and that chunk's longest range (never S x S/4), and
    the result equals the unchunked one."""
    from dsa.reference import mla, sources

    seq, heads, dim = 512, 2, 8
    g = testing.generator(5)
    q = torch.randn(1, seq, heads, dim, generator=g)
    kv, extra = torch.randn(1, seq // 4, dim, generator=g), torch.randn(1, seq, dim, generator=g)
    t = torch.arange(seq)
    hca = torch.stack([torch.zeros_like(t), (t + 1) // 4], -1).view(1, seq, 2).to(torch.int32)
    window = torch.stack([t - 15, t + 1], -1).view(1, seq, 2).to(torch.int32)
    kwargs = dict(sm_scale=0.3, d_v=dim, ranges=hca, extra_kv=extra, extra_ranges=window)
    want = reference.sparse_mla(q, kv, **kwargs)
    shapes = []

    range_entries = sources.range_entries

    def spy(ranges: torch.Tensor, seq_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
        entries = range_entries(ranges, seq_kv)
        shapes.append((ranges.shape[1], entries[0].shape[-1], int(ranges[..., 1].max())))
        return entries

    monkeypatch.setattr(mla, "_chunk_rows", lambda per_row, rows: 64)
    monkeypatch.setattr(sources, "range_entries", spy)
    got = reference.sparse_mla(q, kv, **kwargs)
    assert len(shapes) == 2 * seq // 64
    assert all(rows == 64 and width <= max(1, last) for rows, width, last in shapes), shapes
    assert_close(got[0], want[0], atol=1e-6, rtol=1e-6, name="out")
    assert_close(got[1], want[1], atol=1e-6, rtol=1e-6, max_diff=None, name="lse")


def test_compiled_fullgraph_matches_eager_with_two_sources() -> None:
    """``torch.compile(fullgraph=True)`` traces the two-source form (the ``dsa::sparse_mla_sources`` ops and their
    fakes), forward and backward, and matches eager."""
    g = testing.generator(1)
    q = torch.randn(1, 6, 2, 8, generator=g, requires_grad=True)
    kv, extra = torch.randn(1, 5, 8, generator=g), torch.randn(1, 6, 8, generator=g)
    kv.requires_grad_(True)
    indices = torch.randint(-1, 5, (1, 6, 3), generator=g, dtype=torch.int32)
    t = torch.arange(6)
    window = torch.stack([t - 2, t + 1], -1).view(1, 6, 2).to(torch.int32)
    sink = torch.randn(2, generator=g, requires_grad=True)

    def f(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        out, lse = ops.sparse_mla(q, kv, indices, sm_scale=0.3, d_v=8, attn_sink=sink, extra_kv=extra,
                                  extra_ranges=window)  # fmt: skip
        return out.square().sum() + finite_lse(lse).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        value = fn(q, kv, sink)
        results.append((value, *torch.autograd.grad(value, (q, kv, sink))))
    for name, a, b in zip(("loss", "dq", "dkv", "dsink"), *results):
        assert_close(a, b, atol=1e-5, rtol=1e-5, max_diff=None, name=name)


_Q, _KV = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 8)
_INDICES, _RANGES = torch.zeros(1, 3, 4, dtype=torch.int32), torch.zeros(1, 3, 2, dtype=torch.int32)
_LENGTH = torch.ones(1, 3, dtype=torch.int32)
BAD_INPUTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    (dict(indices=None), ValueError, "exactly one of indices and ranges must be given, got neither"),
    (dict(ranges=_RANGES), ValueError, "exactly one of indices and ranges must be given, got both"),
    (dict(indices=None, ranges=_RANGES.long()), TypeError, "ranges must have dtype int32"),
    (dict(indices=None, ranges=torch.zeros(1, 3, 3, dtype=torch.int32)), ValueError,
     "ranges must have shape [B, S, 2]"),
    (dict(indices=None, ranges=_RANGES, topk_length=_LENGTH), ValueError, "topk_length applies to indices only"),
    (dict(extra_ranges=_RANGES), ValueError, "extra_ranges is given without extra_kv"),
    (dict(extra_topk_length=_LENGTH), ValueError, "extra_topk_length is given without extra_kv"),
    (dict(extra_kv=_KV), ValueError, "exactly one of extra_indices and extra_ranges must be given, got neither"),
    (dict(extra_kv=_KV, extra_indices=_INDICES, extra_ranges=_RANGES), ValueError, "got both"),
    (dict(extra_kv=_KV.double(), extra_ranges=_RANGES), TypeError, "extra_kv must have the same dtype as kv"),
    (dict(extra_kv=torch.randn(1, 5, 4), extra_ranges=_RANGES), ValueError,
     "extra_kv must have shape [B, S_extra, d_qk]"),
    (dict(extra_kv=torch.randn(2, 5, 8), extra_ranges=_RANGES), ValueError, "with B = 1, d_qk = 8 like q"),
    (dict(extra_kv=torch.randn(5, 8), extra_ranges=_RANGES), ValueError, "extra_kv must be a 3-D tensor"),
    (dict(extra_kv=torch.randn(1, 0, 8), extra_ranges=_RANGES), ValueError, "extra_kv must not be empty"),
    (dict(extra_kv=_KV, extra_indices=torch.zeros(1, 2, 4, dtype=torch.int32)), ValueError,
     "extra_indices must have shape [B, S, k] with B = 1, S = 3"),
    (dict(extra_kv=_KV, extra_indices=_INDICES.long()), TypeError, "extra_indices must have dtype int32"),
    (dict(extra_kv=_KV, extra_indices=_INDICES, extra_topk_length=_LENGTH.long()), TypeError,
     "extra_topk_length must have dtype int32"),
    (dict(extra_kv=_KV, extra_ranges=_RANGES, extra_topk_length=_LENGTH), ValueError,
     "extra_topk_length applies to extra_indices only"),
    (dict(extra_kv=_KV, extra_ranges=[[0, 1]]), TypeError, "extra_ranges must be a torch.Tensor"),
    (dict(extra_kv=_KV, extra_ranges=torch.zeros(1, 3, 1, dtype=torch.int32)), ValueError,
     "extra_ranges must have shape [B, S, 2] = [1, 3, 2]"),
]


@pytest.mark.parametrize("op", [ops.sparse_mla, reference.sparse_mla], ids=["ops", "reference"])
@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_sources_raise_naming_op_and_argument(op: Any, kwargs: dict[str, Any], error: type, message: str) -> None:
    arguments = {"indices": _INDICES, **kwargs}
    with pytest.raises(error, match=r"^sparse_mla: .*" + re.escape(message)):
        op(_Q, _KV, arguments.pop("indices"), sm_scale=0.5, d_v=8, **arguments)


# ------------------------------------------------------------------------------------------------ C-target kernels

KERNEL_HEADS, KERNEL_D_QK, KERNEL_D_V = 3, 80, 64
"""The forward kernel tests' first static set (no topk_length, no sink), also the ranged forward's: the forward runs
sink-less per source, so every run here reuses those two; the backward always gets a sink (``-inf`` on some or all
heads stands for none), so it compiles the index-list kernel (top-k padded to 64) and the ranged one with a sink."""
KERNEL_MAX_ENTRIES = 64
OUT_TOL = {"atol": 1e-2, "rtol": 1e-2, "max_diff": 4e-5}
LSE_TOL = {"atol": 1e-4, "rtol": 1e-4}
GRAD_TOL = {"atol": 2e-2, "rtol": 2e-2}


@st.composite
def kernel_problems(draw: st.DrawFn) -> dict[str, Any]:
    """bf16 two-source problems at the kernel widths, without ``topk_length`` (another static set), every index
    list and range within :data:`KERNEL_MAX_ENTRIES` entries."""
    sizes = {name: draw(strategy) for name, strategy in sts.sizes(batch=2, seq=4, seq_kv=KERNEL_MAX_ENTRIES,
                                                                  seq_extra=40, topk=KERNEL_MAX_ENTRIES).items()}
    seed = draw(sts.SEEDS)
    batch, seq = sizes["batch"], sizes["seq"]

    def source(kind: str, seed: int, rows: int) -> Source:
        made = make_source(kind, seed, batch, seq, rows, sizes["topk"], unique=False)
        return {**made, "topk_length": None}

    first = source(draw(st.sampled_from(SOURCE_KINDS)), seed + 1, sizes["seq_kv"])
    second_kind = draw(st.sampled_from((None, *SOURCE_KINDS)))
    second = None if second_kind is None else source(second_kind, seed + 2, sizes["seq_extra"])
    if first["ranges"] is None and second is None:
        second = source("hca", seed + 3, sizes["seq_extra"])
    g = testing.generator(seed)
    return {
        "q": torch.randn((batch, seq, KERNEL_HEADS, KERNEL_D_QK), generator=g).bfloat16(),
        "kv": torch.randn((batch, sizes["seq_kv"], KERNEL_D_QK), generator=g).bfloat16(),
        "extra_kv": torch.randn((batch, sizes["seq_extra"], KERNEL_D_QK), generator=g).bfloat16(),
        "first": first, "second": second, "d_v": KERNEL_D_V, "sm_scale": 0.1,
        "sink": _kernel_sink(g, draw(st.sampled_from(("finite", "some_none", "none")))),
    }  # fmt: skip


def _kernel_sink(g: torch.Generator, kind: str) -> torch.Tensor:
    """A sink for every kernel problem (so that the backward kernels compiled are the sink ones only): finite, or
    ``-inf`` (no sink) on some or all heads."""
    sink = torch.randn(KERNEL_HEADS, generator=g) * 2
    if kind != "finite":
        sink[torch.rand(KERNEL_HEADS, generator=g) < (0.5 if kind == "some_none" else 2.0)] = -math.inf
    return sink


def kernels_and_reference(monkeypatch: pytest.MonkeyPatch, p: dict[str, Any], *, backward: bool) -> tuple[tuple, tuple]:
    """``(kernel results, reference results)``: out, lse and (with ``backward``) dq, dkv, d extra_kv, d sink of
    ``sum(out * d_out) + sum(finite lse * d_lse)``; the reference runs in float32 on the same bf16 values. The
    kernel path's combines walk the query rows a few at a time (a tiny chunk budget), as a long prefill does."""
    monkeypatch.setattr(two_source, "_COMBINE_ELEMENTS", 500)
    g = testing.generator(11)
    d_out = torch.randn((*p["q"].shape[:3], p["d_v"]), generator=g)
    d_lse = torch.randn(p["q"].shape[:3], generator=g)
    results = []
    for backend, dtype in (("tilelang", torch.bfloat16), ("reference", torch.float32)):
        monkeypatch.setenv("DSA_BACKEND", backend)
        leaves = {name: p[name].to(dtype).clone().requires_grad_(backward) for name in ("q", "kv", "extra_kv")}
        if p["sink"] is not None:
            leaves["sink"] = p["sink"].clone().requires_grad_(backward)
        out, lse = run(p, ops.sparse_mla, **leaves)
        result = (out.float(), lse)
        if backward:
            loss = (out.float() * d_out).sum() + (finite_lse(lse) * d_lse).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            result += tuple(torch.zeros_like(leaves[n]).float() if gr is None else gr.float()
                            for n, gr in zip(leaves, grads))  # fmt: skip
        results.append(result)
    return results[0], results[1]


def check_against_reference(got: tuple, want: tuple) -> None:
    for name, a, b in zip(("out", "lse", "dq", "dkv", "dextra_kv", "dsink"), got, want):
        tolerance = OUT_TOL if name == "out" else LSE_TOL if name == "lse" else GRAD_TOL
        assert_close(a, b, name=name, **{"max_diff": None, **tolerance})


@pytest.mark.cpu_kernel
@sts.examples(0.2)
@given(p=kernel_problems())
def test_c_kernels_match_the_reference_over_ranges_and_two_sources(
    monkeypatch: pytest.MonkeyPatch, p: dict[str, Any]
) -> None:
    """bf16 through the C-target kernels (a sink-less forward launch per source, the exact combine with the sink,
    the backward kernel per source against the combined out/lse): out, lse and the gradients of q, kv, extra_kv and
    the sink equal the float32 reference on the same values."""
    check_against_reference(*kernels_and_reference(monkeypatch, p, backward=True))


@pytest.mark.cpu_kernel
@sts.examples(0.2)
@given(p=kernel_problems(), poison=st.fixed_dictionaries(
    {name: st.lists(st.sampled_from(sts.NON_FINITE), max_size=2) for name in ("q", "kv", "extra_kv", "sink")}))
def test_c_kernels_give_the_references_nan_and_inf(
    monkeypatch: pytest.MonkeyPatch, p: dict[str, Any], poison: dict[str, list[float]]
) -> None:
    """NaN/±inf in q, in the rows of either source (referenced or not) and in the sink: out and lse hold NaN and
    infinities exactly where the reference does (one softmax over both sources: a NaN or +inf score anywhere
    spoils the whole row, a +inf sink zeroes it), the finite rest within tolerance."""
    g = testing.generator(int(p["q"].float().abs().sum() * 1000) % 2**31)
    p = dict(p)
    for name, values in poison.items():
        if p[name] is None:
            continue
        t = p[name].clone()
        flat = t.view(-1)
        for value in values:
            flat[int(torch.randint(flat.numel(), (1,), generator=g))] = value
        p[name] = t
    check_against_reference(*kernels_and_reference(monkeypatch, p, backward=False))


# ------------------------------------------------------------------------------------------------------ GPU tier

V4_HEADS, V4_DIM, V4_WINDOW, V4_CSA_TOPK = 64, 512, 128, 512
"""DeepSeek-V4-Flash: 64 heads, K = V at 512, a 128-token window over the raw tokens, CSA's top 512 compressed
entries (rate 4); HCA attends to every visible entry of rate 128."""
_V4 = {"heads": V4_HEADS, "d_qk": V4_DIM, "d_v": V4_DIM, "has_topk_length": False}
GPU_KERNELS: dict[str, tuple[dict[str, Any], ...]] = {
    fwd_launch.KERNEL_NAME: (
        fwd_launch.static_params(**_V4, has_sink=False),
        fwd_launch.static_params(**_V4, has_sink=False, ranged=True),
    ),
    bwd_launch.KERNEL_NAME: (
        bwd_launch.static_params(**_V4, k=V4_CSA_TOPK, has_sink=True),
        bwd_launch.static_params(**_V4, k=V4_CSA_TOPK, has_sink=True, ranged=True),
    ),
}
"""What the GPU test compiles (sink-less forwards, sink backwards; index list and ranged), for the GPU check's
prebuild (``pytest --collect-only --dsa-gpu-kernels FILE``)."""


@pytest.mark.gpu
@sts.examples(0.1)
@given(**sts.sizes(batch=2, seq=300), compressed=st.sampled_from(["csa", "hca"]), seed=sts.SEEDS)
def test_gpu_v4_window_and_compressed_entries_match_the_reference(
    cuda_device: torch.device, batch: int, seq: int, compressed: str, seed: int
) -> None:
    """V4-Flash prefill on the sm_90a kernels: the window ``[t - 127, t + 1)`` over the raw tokens plus CSA's
    selected entries or HCA's ``[0, (t + 1) // 128)``, with the sink, in one softmax: out, lse and the gradients
    of q, kv, the compressed kv and the sink equal the float32 reference (on the GPU) on the same bf16 values."""
    t = torch.arange(seq)
    window = torch.stack([t - V4_WINDOW + 1, t + 1], -1).view(1, seq, 2).expand(batch, seq, 2).to(torch.int32)
    rate = 4 if compressed == "csa" else 128
    entries = max(1, seq // rate)
    second: Source = {"indices": None, "topk_length": None, "ranges": None}
    if compressed == "csa":
        second["indices"] = testing.make_indices("irregular", seed, batch, seq, entries, V4_CSA_TOPK)
    else:
        second["ranges"] = torch.stack([torch.zeros_like(t), (t + 1) // rate], -1).view(1, seq, 2).expand(
            batch, seq, 2).to(torch.int32)  # fmt: skip
    g = testing.generator(seed)
    p = {
        "q": torch.randn((batch, seq, V4_HEADS, V4_DIM), generator=g).bfloat16(),
        "kv": torch.randn((batch, seq, V4_DIM), generator=g).bfloat16(),
        "extra_kv": torch.randn((batch, entries, V4_DIM), generator=g).bfloat16(),
        "first": {"indices": None, "topk_length": None, "ranges": window}, "second": second,
        "d_v": V4_DIM, "sm_scale": V4_DIM**-0.5, "sink": torch.randn(V4_HEADS, generator=g),
    }  # fmt: skip
    on_device = {
        **{name: p[name].to(cuda_device) for name in ("q", "kv", "extra_kv", "sink")},
        **{key: {name: None if v is None else v.to(cuda_device) for name, v in p[key].items()}
           for key in ("first", "second")},
    }  # fmt: skip
    got, want = _gpu_kernels_and_reference({**p, **on_device})
    # A kv row's gradient sums 128 window queries x 64 heads: its error (bf16 out, P and dS in the MMAs) is judged
    # against the gradient's scale, elementwise and scale-sensitively. The bf16 reference itself stays within 0.5 %
    # of the scale (scale-sensitive difference 3e-6) of the float32 one.
    for name, a, b in zip(("out", "lse", "dq", "dkv", "dextra_kv", "dsink"), got, want):
        a, b = a.cpu(), b.cpu()
        if name == "lse":
            assert_close(a, b, name=name, atol=2e-3, rtol=1e-3, max_diff=None)
        else:
            scale = 1.0 if name == "out" else float(b[torch.isfinite(b)].abs().max())
            assert_close(a, b, name=name, atol=2e-2 * scale, rtol=2e-2, max_diff=2e-4)


def _gpu_kernels_and_reference(p: dict[str, Any]) -> tuple[tuple, tuple]:
    """:func:`kernels_and_reference` on the problem's device (the public op picks the kernels for bf16 CUDA
    tensors; the reference runs in float32 there too)."""
    g = torch.Generator(device=p["q"].device).manual_seed(11)
    d_out = torch.randn((*p["q"].shape[:3], p["d_v"]), generator=g, device=p["q"].device)
    d_lse = torch.randn(p["q"].shape[:3], generator=g, device=p["q"].device)
    results = []
    for op, dtype in ((ops.sparse_mla, torch.bfloat16), (reference.sparse_mla, torch.float32)):
        leaves = {name: p[name].to(dtype).clone().requires_grad_(True) for name in ("q", "kv", "extra_kv")}
        leaves["sink"] = p["sink"].clone().requires_grad_(True)
        out, lse = run(p, op, **leaves)
        loss = (out.float() * d_out).sum() + (finite_lse(lse) * d_lse).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        results.append((out.float(), lse, *(gr.float() for gr in grads)))
    return results[0], results[1]
