"""One behaviour on every backend for the DeepSeek-V4 forms of the ops (issues 18 and 21): the TileLang kernels (C
target) give the reference's answer, as tests/test_backend_agreement.py checks for the V3.2 forms, with its helpers.

- ``sparse_mla`` over two sources (an index list or ranges each: V4's window plus CSA's selected or HCA's ranged
  compressed entries) with a sink: NaN/``+-inf`` in q, in either source's rows (referenced or not) and in the sink;
  out and lse agree, and where nothing referenced is poisoned the gradients of q, kv, extra_kv and the sink too;
- ``sparse_mla_decode`` with a source in range form (``ranges`` through a ``block_table``, e.g. the sliding window)
  beside an index-list source or another range, and over MODEL1's FP8 pages (FlashMLA's view, a window range or an
  index list, a compressed-entry source);
- ``index_topk_decode`` is covered in tests/test_backend_agreement.py (its ``key_layout="paged"`` format included).

Every call on the kernel backend is checked to have run the kernel (a spy counts the launcher's calls), so a path
that would fall back to the reference on both sides fails. The widths, page sizes and sink/source mixes are those of
tests/test_sparse_mla_two_source.py, tests/test_sparse_mla_decode_kernel.py and tests/test_compat_model1.py, so the
process's kernels (or TileLang's disk cache) serve every launch: no compile of its own.

``compress_kv`` runs one implementation on every backend (``dsa.ops.compress_kv``): nothing to compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa import cache, ops, testing
from dsa.launch import sparse_mla_decode as decode_launch
from dsa.launch import sparse_mla_fwd as fwd_launch
from dsa.testing import assert_close
from tests import layouts, strategies
from tests.test_backend_agreement import (
    LSE_TOL,
    NON_FINITE,
    OUT_TOL,
    SHARE,
    _poison_referenced_rows,
    _poison_referenced_slots,
    _sprinkle,
    count_calls,
    layout_plan,
    non_finite,
)
from tests.test_sparse_mla_decode_kernel import (
    CPU_D_QK,
    CPU_D_ROPE,
    CPU_D_V,
    _filled_cache,
    _poison_unreferenced,
    cache_arg,
)
from tests.test_sparse_mla_two_source import GRAD_TOL, finite_lse, kernel_problems, run, source_mask

pytestmark = pytest.mark.cpu_kernel

Inputs = dict[str, Any]


def on_both_kernel_ran(monkeypatch: pytest.MonkeyPatch, call: Any, module: Any, name: str) -> tuple[Any, Any]:
    """:func:`tests.test_backend_agreement._on_both`, asserting that the reference side never called the kernel
    launcher ``module.name`` and the kernel side did."""
    calls = count_calls(monkeypatch, module, name)
    monkeypatch.setenv("DSA_BACKEND", "reference")
    want = call()
    assert not calls, "the reference backend launched a kernel"
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    got = call()
    assert calls, f"the kernel backend did not launch {module.__name__}.{name}"
    return want, got


# ---------------------------------------------------------------------------------------------- two-source sparse_mla

TWO_SOURCE_TENSORS = ("q", "kv", "extra_kv", "sink", "first", "second")


def _poison_rows(kv: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """``kv [B, rows, D]`` with NaN, ``+inf``, ``-inf`` in turn in every row that ``used [B, rows]`` leaves out."""
    values = torch.tensor(NON_FINITE).repeat(kv.shape[1])[: kv.shape[1]].to(kv.dtype)
    return torch.where(used.unsqueeze(-1), kv, values.view(1, -1, 1))


def _relaid_source(source: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """A source's index tensors in layout ``kind`` (a broadcast changes which rows it references)."""
    if source is None:
        return None
    return {name: layouts.relaid(value, kind) for name, value in source.items()}


@strategies.examples(SHARE * 0.6)  # ~0.4 s per example: 30 in CI (cold CI budget)
@given(
    p=kernel_problems(),
    poison=non_finite(("q", "kv", "extra_kv", "sink")),
    backward=st.booleans(),
    plan=layout_plan(TWO_SOURCE_TENSORS, keep_values=("kv", "extra_kv")),
)
def test_sparse_mla_two_sources_agree(
    monkeypatch: pytest.MonkeyPatch, p: Inputs, poison: dict[str, tuple[float, ...]], backward: bool,
    plan: dict[str, str],
) -> None:  # fmt: skip
    """Two sources (index list or ranges each) and a sink, every tensor in a random layout, every row no source
    references poisoned: out and lse agree. With ``backward`` nothing referenced is poisoned, and the gradients of
    q, kv, extra_kv and the sink of ``sum(out * d_out) + sum(finite lse * d_lse)`` agree too (within the kernel
    tests' gradient tolerances); without, NaN/``+-inf`` go into q, referenced rows of either source and the sink."""
    p = {**p, "first": _relaid_source(p["first"], plan["first"]), "second": _relaid_source(p["second"], plan["second"])}
    g = testing.generator(int(p["q"].float().abs().sum() * 1000) % 2**31)
    for key, name in (("first", "kv"), ("second", "extra_kv")):
        used = (torch.zeros(p[name].shape[:2], dtype=torch.bool) if p[key] is None
                else source_mask(p[key], p[name].shape[1]).any(1))  # fmt: skip
        dirty = _poison_rows(p[name], used)
        if not backward and p[key] is not None:
            dirty = _poison_referenced_rows(dirty, used, g, poison[name])
        p[name] = dirty
    if not backward:
        p["q"], p["sink"] = _sprinkle(p["q"], g, poison["q"]), _sprinkle(p["sink"], g, poison["sink"])
    p.update({name: layouts.relaid(p[name], plan[name]) for name in ("q", "kv", "extra_kv", "sink")})
    monkeypatch.setattr("dsa.launch.two_source._COMBINE_ELEMENTS", 500)  # the combines walk the rows in chunks
    d_out = torch.randn((*p["q"].shape[:3], p["d_v"]), generator=testing.generator(11))
    d_lse = torch.randn(p["q"].shape[:3], generator=testing.generator(12))

    def call() -> tuple[torch.Tensor, ...]:
        leaves = {name: p[name].detach().requires_grad_(backward) for name in ("q", "kv", "extra_kv", "sink")}
        out, lse = run(p, ops.sparse_mla, **leaves)
        if not backward:
            return out.float(), lse
        loss = (out.float() * d_out).sum() + (finite_lse(lse) * d_lse).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return (out.float(), lse, *(torch.zeros_like(leaves[n]).float() if gr is None else gr.float()
                                    for n, gr in zip(leaves, grads)))  # fmt: skip

    want, got = on_both_kernel_ran(monkeypatch, call, fwd_launch, "sparse_mla_fwd")
    assert_close(got[1], want[1], name="lse", **LSE_TOL)
    assert_close(got[0], want[0], name="out", **OUT_TOL)
    for name, a, b in zip(("dq", "dkv", "dextra_kv", "dsink"), got[2:], want[2:]):
        assert_close(a, b, name=name, max_diff=None, **GRAD_TOL)



# ------------------------------------------------------------------------------------------ sparse_mla_decode, V4 forms

RANGE_KINDS = ("window", "random")
"""How a drawn range source lists its positions: V4's sliding window ending at each query's position (``w`` from 1
to 12), or random ``[start, end)`` (negative, empty and past the table included)."""


def _draw_ranges(kind: str, g: torch.Generator, lengths: Sequence[int], s_q: int, capacity: int) -> torch.Tensor:
    """``[B, s_q, 2]`` int32 ranges of ``kind`` (:data:`RANGE_KINDS`) for sequences of ``lengths``."""
    batch = len(lengths)
    if kind == "window":
        ends = torch.tensor(lengths).view(-1, 1) - s_q + 1 + torch.arange(s_q).view(1, -1)
        starts = ends - torch.randint(1, 13, (batch, s_q), generator=g)
    else:
        starts = torch.randint(-3, capacity + 2, (batch, s_q), generator=g)
        ends = starts + torch.randint(-2, capacity + 1, (batch, s_q), generator=g)
    return torch.stack([starts, ends], -1).to(torch.int32)


def _range_slots_by_loop(ranges: torch.Tensor, block_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """The slots each query of ``ranges [B, s_q, 2]`` reads, by plain loops: every position ``p`` of ``[start,
    end)`` on the table whose page is allocated gives ``page * page_size + p % page_size``; ``[B, s_q, L]`` int32,
    ``-1`` padding."""
    batch, s_q = ranges.shape[:2]
    capacity = block_table.shape[1] * page_size
    rows = [[[int(block_table[b, p // page_size]) * page_size + p % page_size
              for p in range(max(int(ranges[b, t, 0]), 0), min(int(ranges[b, t, 1]), capacity))
              if int(block_table[b, p // page_size]) >= 0] for t in range(s_q)] for b in range(batch)]  # fmt: skip
    width = max(1, max(len(row) for per_b in rows for row in per_b))
    slots = torch.full((batch, s_q, width), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(s_q):
            slots[b, t, : len(rows[b][t])] = torch.tensor(rows[b][t], dtype=torch.int32)
    return slots


def decode_source(fmt: str, form: str, seed: int, lengths: list[int], s_q: int, page_size: int, *, d_qk: int,
                  d_rope: int, unallocated: bool, topk: int = 16) -> tuple[Inputs, torch.Tensor, Any]:  # fmt: skip
    """One ``sparse_mla_decode`` source: a cache of ``fmt`` (``"bf16"``, ``"fp8"``, ``"model1"``) holding
    ``lengths[b]`` random tokens behind a shuffled block table, read through ``form``: an index list of ``topk``
    slots (``"irregular"``) or ranges of a :data:`RANGE_KINDS` kind (``"window"``/``"random"``) through the table
    (with ``unallocated``, pages past a sequence's last token are ``-1`` in it). Every slot the source does not
    reference is poisoned (NaN/+-inf rows, 0xFF FP8 bytes). Returns ``(arguments without the prefix "extra_",
    referenced [num_slots] bool, the cache.PagedKVCache)``; the cache argument (its pages, or their FlashMLA view)
    is under ``kv_cache``."""
    kv = _filled_cache(fmt, seed, len(lengths), lengths, d_qk, d_rope, page_size)
    g = testing.generator(seed + 1)
    if form == "irregular":
        slots = testing.make_indices("irregular", seed + 2, len(lengths), s_q, kv.num_slots, topk)
        args: Inputs = {"indices": slots}
    else:
        table = kv.block_table
        if unallocated:
            used = torch.tensor([-(-max(n, 1) // page_size) for n in lengths]).view(-1, 1)
            table = torch.where(torch.arange(table.shape[1]).view(1, -1) < used, table, -1).to(torch.int32)
        ranges = _draw_ranges(form, g, lengths, s_q, table.shape[1] * page_size)
        slots = _range_slots_by_loop(ranges, table, page_size)
        args = {"ranges": ranges, "block_table": table}
    batch = len(lengths)
    full = torch.full((batch,), slots.shape[-1], dtype=torch.int32)
    referenced = testing.index_mask(slots.reshape(1, batch * s_q, -1), kv.num_slots).any(dim=1)[0]
    _poison_unreferenced(kv, slots, full)
    return {**args, "kv_cache": cache_arg(kv)}, referenced, kv


def _sources(main: tuple[Inputs, torch.Tensor, Any], extra: tuple[Inputs, torch.Tensor, Any] | None
             ) -> tuple[Inputs, dict[str, torch.Tensor]]:  # fmt: skip
    """The call's source arguments (the extra source's under ``extra_``) and ``{prefix: referenced slots}``."""
    args = dict(main[0])
    referenced = {"": main[1]}
    if extra is not None:
        args.update({f"extra_{name}": value for name, value in extra[0].items()})
        referenced["extra_"] = extra[1]
    return args, referenced


def assert_decode_agrees(monkeypatch: pytest.MonkeyPatch, args: Inputs, *, sm_scale: float, d_v: int,
                         d_rope: int) -> None:  # fmt: skip
    """``sparse_mla_decode(**args)`` on both backends (the kernel launched on the kernel side): out and lse agree."""
    want, got = on_both_kernel_ran(monkeypatch, lambda: ops.sparse_mla_decode(
        sm_scale=sm_scale, d_v=d_v, d_rope=d_rope, **args), decode_launch, "sparse_mla_decode")  # fmt: skip
    assert_close(got[1], want[1], name="lse", **LSE_TOL)
    assert_close(got[0].float(), want[0].float(), name="out", **OUT_TOL)


DECODE_RANGE_TENSORS = ("q", "attn_sink", "kv_cache", "indices", "ranges", "block_table", "extra_kv_cache",
                        "extra_indices", "extra_ranges", "extra_block_table")  # fmt: skip


@strategies.examples(SHARE)
@given(
    fmt=st.sampled_from(["bf16", "fp8"]),
    extra_fmt=st.sampled_from([None, "bf16", "fp8"]),
    forms=st.tuples(st.sampled_from(("irregular", *RANGE_KINDS)), st.sampled_from(("irregular", *RANGE_KINDS))),
    **strategies.sizes(batch=2, s_q=3, context=60),
    page_size=st.sampled_from([1, 16]),
    unallocated=st.booleans(),
    sink=st.sampled_from([None, "random", "extremes"]),
    poison=non_finite(("q", "kv_cache", "extra_kv_cache", "attn_sink")),
    plan=layout_plan(DECODE_RANGE_TENSORS, keep_values=DECODE_RANGE_TENSORS[2:]),
    seed=strategies.SEEDS,
)
def test_sparse_mla_decode_range_form_agrees(
    monkeypatch: pytest.MonkeyPatch, fmt: str, extra_fmt: str | None, forms: tuple[str, str], batch: int, s_q: int,
    context: int, page_size: int, unallocated: bool, sink: str | None, poison: dict[str, tuple[float, ...]],
    plan: dict[str, str], seed: int,
) -> None:  # fmt: skip
    """A source in range form (its ``ranges`` and ``block_table``; window or random ranges, unallocated pages)
    beside an index list or another range (or alone), bf16 or FP8 rows at the decode kernel tests' widths, with
    NaN/``+-inf`` in q, the sink and referenced slots, every unreferenced slot poisoned: out and lse agree."""
    if forms[0] == "irregular" and (extra_fmt is None or forms[1] == "irregular"):
        forms = ("window", forms[1])  # at least one source in range form
    g = testing.generator(seed)
    lengths = torch.randint(1, context + 1, (batch,), generator=g).tolist()
    common = {"s_q": s_q, "d_qk": CPU_D_QK, "d_rope": CPU_D_ROPE, "unallocated": unallocated}
    main = decode_source(fmt, forms[0], seed + 1, lengths, page_size=page_size, **common)
    extra = None if extra_fmt is None else decode_source(extra_fmt, forms[1], seed + 2, lengths,
                                                         page_size=max(1, page_size // 2), **common)  # fmt: skip
    args, referenced = _sources(main, extra)
    fp8 = cache.FP8Layout.for_width(CPU_D_QK, CPU_D_ROPE)
    for prefix, used in referenced.items():
        pages = args[f"{prefix}kv_cache"]
        layout = None if pages.dtype == torch.bfloat16 else fp8
        args[f"{prefix}kv_cache"] = _poison_referenced_slots(pages, used, g, poison[f"{prefix}kv_cache"], layout)
    args["q"] = _sprinkle((torch.randn(batch, s_q, 5, CPU_D_QK, generator=g) * 0.5).bfloat16(), g, poison["q"])
    if sink is not None:
        values = torch.randn(5, generator=g)
        if sink == "extremes":
            values[0::3], values[1::3] = math.inf, -math.inf
        args["attn_sink"] = _sprinkle(values, g, poison["attn_sink"])
    args = {name: layouts.relaid(value, plan[name]) for name, value in args.items()}
    assert_decode_agrees(monkeypatch, args, sm_scale=CPU_D_QK**-0.5, d_v=CPU_D_V, d_rope=CPU_D_ROPE)


MODEL1_HEADS, MODEL1_WIDTH, MODEL1_ROPE, MODEL1_PAGE = 3, 512, 64, 4
"""tests/test_compat_model1.py's C-target decode kernel: 3 heads, d_qk = d_v = 512, pages of 4, two sources and a
sink (its combine has one)."""
MODEL1_TENSORS = ("q", "attn_sink", "indices", "ranges", "block_table", "extra_indices", "extra_ranges",
                  "extra_block_table")  # fmt: skip
"""What gets a random layout: not the pages, which stay in FlashMLA's view (the kernel reads it in place; another
page stride would be another kernel)."""


def _poison_model1_tokens(kv: cache.PagedKVCache, referenced: torch.Tensor, g: torch.Generator,
                          values: Sequence[float]) -> None:  # fmt: skip
    """In place, in MODEL1 pages, each of ``values`` in one random token that ``referenced [num_slots]`` marks: NaN
    as an e4m3 NaN value byte, ``+inf`` as a NaN UE8M0 scale (the format has no infinity), ``-inf`` as a RoPE
    value."""
    layout = cache.MODEL1_FP8_LAYOUT
    sections, scales = cache.kv_page_sections(kv.pages, layout, kv.page_size)
    where = referenced.nonzero().flatten()
    for value in values if len(where) else ():
        page, offset = divmod(int(where[int(torch.randint(0, len(where), (1,), generator=g))]), kv.page_size)
        if math.isnan(value):
            sections[page, offset, int(torch.randint(0, layout.d_nope, (1,), generator=g))] = 0x7F
        elif value > 0:
            scales[page, offset, int(torch.randint(0, layout.tiles, (1,), generator=g))] = 0xFF
        else:
            rope = sections[page, offset, layout.d_nope :].view(torch.bfloat16)
            rope[int(torch.randint(0, rope.numel(), (1,), generator=g))] = value


@strategies.examples(SHARE / 2)
@given(
    forms=st.tuples(st.sampled_from(("irregular", *RANGE_KINDS)), st.sampled_from(("irregular", *RANGE_KINDS))),
    **strategies.sizes(batch=2, s_q=2, context=21),
    unallocated=st.booleans(),
    poison=non_finite(("q", "kv_cache", "extra_kv_cache", "attn_sink")),
    plan=layout_plan(MODEL1_TENSORS, keep_values=MODEL1_TENSORS[2:]),
    seed=strategies.SEEDS,
)
def test_sparse_mla_decode_model1_agrees(
    monkeypatch: pytest.MonkeyPatch, forms: tuple[str, str], batch: int, s_q: int, context: int,
    unallocated: bool, poison: dict[str, tuple[float, ...]], plan: dict[str, str], seed: int,
) -> None:  # fmt: skip
    """MODEL1 FP8 pages (DeepSeek-V4's caches, FlashMLA's view), a window or random ranges or an index list in each
    of two MODEL1 sources (one source alone would run the direct kernel without the prefetch, which no other C-target
    test builds: tests/test_compat_model1.py builds its direct kernel with sm_90a's prefetch), a sink with
    infinities; NaN/``+-inf`` in q, the sink and referenced tokens, every
    byte no source references 0xFF: out and lse agree (the kernel reads the pages in place)."""
    g = testing.generator(seed)
    lengths = torch.randint(1, context + 1, (batch,), generator=g).tolist()
    common = {"s_q": s_q, "page_size": MODEL1_PAGE, "d_qk": MODEL1_WIDTH, "d_rope": MODEL1_ROPE,
              "unallocated": unallocated, "topk": 9}  # fmt: skip
    main = decode_source("model1", forms[0], seed + 1, lengths, **common)
    extra = decode_source("model1", forms[1], seed + 2, lengths, **common)
    args, _ = _sources(main, extra)
    for prefix, source in (("", main), ("extra_", extra)):
        _poison_model1_tokens(source[2], source[1], g, poison[f"{prefix}kv_cache"])
    q = torch.randn(batch, s_q, MODEL1_HEADS, MODEL1_WIDTH, generator=g).clamp(-1, 1).bfloat16()
    sink = torch.randn(MODEL1_HEADS, generator=g)
    sink[int(torch.randint(0, MODEL1_HEADS, (1,), generator=g))] = math.inf if seed % 2 else -math.inf
    args.update(q=_sprinkle(q, g, poison["q"]), attn_sink=_sprinkle(sink, g, poison["attn_sink"]))
    args = {name: layouts.relaid(value, plan[name]) if name in plan else value for name, value in args.items()}
    assert_decode_agrees(monkeypatch, args, sm_scale=MODEL1_WIDTH**-0.55, d_v=MODEL1_WIDTH, d_rope=MODEL1_ROPE)
