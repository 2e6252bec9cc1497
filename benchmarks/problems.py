"""One problem description per op: its inputs, its reference, its comparison, and its FLOP and byte counts.

A problem is a small frozen dataclass of the op's shape and static parameters (FlashMLA's ``tests/lib.py`` ``TestParam``
is the model) with five methods:

* ``inputs(device, seed)``: the op's arguments as a dict, random and never zero (drawn by ``dsa.testing``'s makers, so
  one seed gives the same values in the tests, the tuner and the benchmark);
* ``reference(inputs)``: what ``compare`` takes as expected (the ``dsa.reference`` outputs, or for a selection the
  scores the top-k contract is stated on);
* ``compare(out, expected)``: ``None``, or the reason the outputs are wrong (``dsa.testing.compare``: NaN/inf
  positions, per-output tolerances and the scale-sensitive difference; selections as sets);
* ``flops()`` (``None`` where FLOP/s mean nothing) and ``bytes()``: useful work and minimal traffic of one call
  (``benchmarks.flops``).

The families: :class:`IndexerProblem`, :class:`TopkProblem`, :class:`IndexTopkProblem` (prefill) and
:class:`PagedSelectionProblem` (the decode selection over paged keys), :class:`SparseMlaProblem` (forward),
:class:`SparseMlaBwdProblem` and :class:`SparseMlaDecodeProblem`. :func:`problem_for` builds one from a tuner kernel's
``(static, sizes)``; the tuner's runners (``benchmarks.runners``), the benchmark's cases and check
(``benchmarks.cases``, ``benchmarks.inputs``) and the kernel tests use them. Launching a kernel is not a problem's
business: the runners and the tests each launch their own way.

The comparisons here are the tuner's gate (bf16 outputs carry about 3 significant digits; P and dS enter the MMAs as
bf16 on CUDA); the test suite holds each kernel to its own stricter tolerances. Nothing runs at import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from autotune.lookup import decode
from benchmarks import flops
from dsa import cache, reference, testing
from dsa.testing import same_selection

__all__ = [
    "BF16_TOL",
    "FP8",
    "LSE_TOL",
    "IndexTopkProblem",
    "IndexerProblem",
    "PagedSelectionProblem",
    "Problem",
    "SparseMlaBwdProblem",
    "SparseMlaDecodeProblem",
    "SparseMlaProblem",
    "TopkProblem",
    "compare_attention",
    "family_for",
    "fill_cache",
    "newest_ends",
    "problem_for",
]

Inputs = dict[str, Any]
Outputs = tuple[Any, ...]
# The tuner's tolerances (the test suite holds the kernels to stricter ones): bf16 outputs carry about 3 significant
# digits; P and dS enter the MMAs as bf16 on CUDA. The scale-sensitive difference (testing.DEFAULT_MAX_DIFF) is what
# rejects a kernel that is off by a constant factor these elementwise bounds would forgive.
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}
LSE_TOL = {"atol": 1e-2, "rtol": 1e-3}
SCORE_RTOL = 2e-2
SCORE_ATOL_SHARE = 1e-3
"""Indexer scores: absolute tolerance as a share of the largest |score| (a score may cancel to far below its
terms, and float32 accumulation error scales with the terms)."""
FILL_ELEMENTS = 1 << 26
"""A paged cache is written in chunks of at most this many values (bounds the FP8 quantisation's temporaries)."""
FP8 = "float8_e4m3fn"


def _first_problem(compared: list[str | None]) -> str | None:
    return next((problem for problem in compared if problem is not None), None)


def _element_bytes(dtype: str) -> int:
    return flops.FP8_BYTES if dtype == FP8 else flops.BF16_BYTES


# ----------------------------------------------------------------------------------------------------------------------
# indexer, index_topk (prefill)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexerProblem:
    """``index_scores`` over ``batch x seq`` queries of ``heads x dim`` and ``seq_kv`` keys in ``dtype``
    (``"bfloat16"`` or ``"float8_e4m3fn"``); ``mode="range"`` adds ``starts``/``ends`` of pattern ``range_kind``;
    ``q``/``k`` normal times ``spread``. ``weight_scale`` ``None``: ``(heads * dim) ** -0.5`` (scores of order one).
    ``integer_valued``: see ``dsa.testing.indexer_inputs`` (exact scores, many ties)."""

    batch: int
    seq: int
    seq_kv: int
    heads: int
    dim: int
    dtype: str
    mode: str = "causal"
    range_kind: str = "packed"
    weight_scale: float | None = None
    integer_valued: bool = False
    spread: float = 1.0

    def inputs(self, device: torch.device | str, seed: int) -> Inputs:
        """``q [B, S, H, D]``, ``k [B, S_kv, D]`` (``dtype``), ``weights [B, S, H]`` float32, ``k_scale [B, S_kv]``
        float32 (FP8) or ``None``, ``starts``/``ends [B, S]`` int32 (range mode) or ``None``."""
        scale = (self.heads * self.dim) ** -0.5 if self.weight_scale is None else self.weight_scale
        return testing.indexer_inputs(
            batch=self.batch, seq=self.seq, seq_kv=self.seq_kv, heads=self.heads, dim=self.dim, dtype=self.dtype,
            mode=self.mode, range_kind=self.range_kind, seed=seed, device=device, weight_scale=scale,
            integer_valued=self.integer_valued, spread=self.spread,
        )  # fmt: skip

    @staticmethod
    def args(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(q, k, weights)`` and ``k_scale``/``starts``/``ends`` as keywords: the call of every indexer-like op."""
        return (inputs["q"], inputs["k"], inputs["weights"]), {k: inputs[k] for k in ("k_scale", "starts", "ends")}

    @staticmethod
    def reference(inputs: Inputs) -> Any:
        """``(scores,)``: ``[B, S, S_kv]`` float32 from ``dsa.reference.index_scores``."""
        args, kwargs = IndexerProblem.args(inputs)
        return (reference.index_scores(*args, **kwargs),)

    @staticmethod
    def compare(out: Outputs, expected: Any) -> str | None:
        """Scores within ``SCORE_RTOL`` and an absolute tolerance of ``SCORE_ATOL_SHARE`` of the largest |score|."""
        finite = torch.isfinite(expected[0])
        scale = float(expected[0][finite].abs().max()) if finite.any() else 1.0
        return testing.compare(
            out[0], expected[0], atol=SCORE_ATOL_SHARE * max(scale, 1e-6), rtol=SCORE_RTOL, name="scores"
        )

    def flops(self) -> float | None:
        """``2 H D`` per visible (query, key) pair under bottom-right causality."""
        return flops.indexer_flops(self.batch, self.seq, self.seq_kv, self.heads, self.dim)

    def bytes(self) -> float:
        """``q``, ``k``, ``weights`` (and ``k_scale``) read, the float32 scores written."""
        return flops.indexer_bytes(self.batch, self.seq, self.seq_kv, self.heads, self.dim, _element_bytes(self.dtype))


@dataclass(frozen=True)
class IndexTopkProblem(IndexerProblem):
    """The fused selection ``index_topk``: the indexer's problem, integer-valued (every implementation computes the
    scores exactly, so the selection is compared exactly, ties included), and ``topk`` entries per query."""

    topk: int = 0
    integer_valued: bool = True

    def inputs(self, device: torch.device | str, seed: int) -> Inputs:
        """The indexer's inputs and ``topk``."""
        return {**super().inputs(device, seed), "topk": self.topk}

    @staticmethod
    def reference(inputs: Inputs) -> Any:
        """``(scores, topk)``: every score of the checked rows (the contract is stated on them), not a selection."""
        args, kwargs = IndexerProblem.args(inputs)
        return reference.index_scores(*args, **kwargs), inputs["topk"]

    @staticmethod
    def compare(out: Outputs, expected: Any) -> str | None:
        """The top-k contract on the indices (``[B, S, topk]`` int32) as sets, and the returned scores exactly the
        index scores at the selected positions."""
        scores, topk = expected
        problem = testing.topk_error(scores, out[0], topk)
        if problem is not None:
            return problem
        if not torch.equal(out[1].cpu(), reference.gather_scores(scores, out[0]).cpu().to(out[1].dtype)):
            return "scores: not the exact index scores at the selected positions"
        return None

    def bytes(self) -> float:
        """The indexer's reads (no scores written) and the ``[B, S, topk]`` int32 indices and float32 scores."""
        return flops.index_topk_bytes(self.batch, self.seq, self.seq_kv, self.heads, self.dim,
                                      _element_bytes(self.dtype), self.topk)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# topk
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopkProblem:
    """``topk_indices`` over ``[batch, seq, seq_kv]`` float32 scores: causal (``-inf`` where a query may not see), or
    one of ``dsa.testing.SCORE_PATTERNS`` (ties, shared high bits, non-finite values, ...)."""

    batch: int
    seq: int
    seq_kv: int
    k: int
    pattern: str = "causal"

    def inputs(self, device: torch.device | str, seed: int) -> Inputs:
        """``scores [B, S, S_kv]`` float32 (``dsa.testing.causal_scores`` or ``make_scores``) and ``k``."""
        if self.pattern == "causal":
            scores = testing.causal_scores(self.batch, self.seq, self.seq_kv, seed=seed, device=device)
        else:
            scores = testing.make_scores(self.pattern, seed, self.batch, self.seq, self.seq_kv, self.k).to(device)
        return {"scores": scores, "k": self.k}

    @staticmethod
    def reference(inputs: Inputs) -> Any:
        """``(scores, k)``: the contract itself is the reference."""
        return inputs["scores"], inputs["k"]

    @staticmethod
    def compare(out: Outputs, expected: Any) -> str | None:
        """The top-k contract on ``out[0]`` as sets (``dsa.testing.topk_error``)."""
        scores, k = expected
        return testing.topk_error(scores, out[0], k)

    def flops(self) -> float | None:
        """``None``: a selection does no floating-point work worth a rate."""
        return None

    def bytes(self) -> float:
        """One read of the scores and the int32 indices written."""
        return flops.topk_bytes(self.batch * self.seq, self.seq_kv, self.k)


# ----------------------------------------------------------------------------------------------------------------------
# sparse_mla forward and backward
# ----------------------------------------------------------------------------------------------------------------------
def compare_attention(out: Outputs, expected: Any) -> str | None:
    """An attention's ``(out, lse)`` against the reference's: ``out`` within :data:`BF16_TOL` and the scale-sensitive
    difference, ``lse`` within :data:`LSE_TOL`."""
    return _first_problem([
        testing.compare(out[0], expected[0], **BF16_TOL, name="out"),
        testing.compare(out[1], expected[1], **LSE_TOL, max_diff=None, name="lse"),
    ])  # fmt: skip


@dataclass(frozen=True)
class SparseMlaProblem:
    """``sparse_mla`` forward: ``batch x seq`` queries of ``heads x d_qk`` over ``seq_kv`` latent rows, ``topk``
    indices per query of pattern ``kind`` (``dsa.testing.INDEX_PATTERNS``); optional ``topk_length`` and sinks
    (normal times ``sink_scale``); ``q``/``kv`` normal times ``value_scale``; ``sm_scale`` ``None``:
    ``d_qk ** -0.5``."""

    batch: int
    seq: int
    seq_kv: int
    heads: int
    d_qk: int
    d_v: int
    topk: int
    has_topk_length: bool = False
    has_sink: bool = False
    kind: str = "causal"
    sm_scale: float | None = None
    value_scale: float = 1.0
    sink_scale: float = 2.0

    def _maker_args(self, seed: int, device: torch.device | str) -> dict[str, Any]:
        return dict(
            batch=self.batch, seq=self.seq, seq_kv=self.seq_kv, heads=self.heads, d_qk=self.d_qk, d_v=self.d_v,
            topk=self.topk, seed=seed, sm_scale=self.d_qk**-0.5 if self.sm_scale is None else self.sm_scale,
            device=device, kind=self.kind, has_topk_length=self.has_topk_length, has_sink=self.has_sink,
            value_scale=self.value_scale, sink_scale=self.sink_scale,
        )  # fmt: skip

    def inputs(self, device: torch.device | str, seed: int) -> Inputs:
        """``dsa.testing.sparse_mla_inputs``: ``q``, ``kv``, ``indices``, ``sm_scale``, ``d_v``, ``topk_length``,
        ``attn_sink``."""
        return testing.sparse_mla_inputs(**self._maker_args(seed, device))

    @staticmethod
    def kwargs(inputs: Inputs) -> dict[str, Any]:
        """The keyword arguments of a ``sparse_mla`` call."""
        return {k: inputs[k] for k in ("sm_scale", "d_v", "topk_length", "attn_sink")}

    @staticmethod
    def reference(inputs: Inputs) -> Any:
        """``(out [B, S, H, d_v], lse [B, S, H])`` from ``dsa.reference.sparse_mla``."""
        return reference.sparse_mla(inputs["q"], inputs["kv"], inputs["indices"], **SparseMlaProblem.kwargs(inputs))

    compare = staticmethod(compare_attention)

    def flops(self) -> float | None:
        """``Q K^T`` over ``d_qk`` and ``P V`` over ``d_v`` for every selected entry of every head."""
        return flops.sparse_mla_fwd_flops(self.batch, self.seq, self.heads, self.topk, self.d_qk, self.d_v)

    def bytes(self) -> float:
        """``q``, the gathered rows, indices, ``out`` and ``lse``."""
        return flops.sparse_mla_fwd_bytes(self.batch, self.seq, self.heads, self.topk, self.d_qk, self.d_v)


@dataclass(frozen=True)
class SparseMlaBwdProblem(SparseMlaProblem):
    """``sparse_mla`` backward at the forward's problem: the forward's ``out``/``lse`` and a random ``d_out``."""

    def inputs(self, device: torch.device | str, seed: int) -> Inputs:
        """``dsa.testing.sparse_mla_bwd_inputs``: the forward's inputs, ``out`` (bf16), ``lse``, ``d_out`` (bf16)."""
        return testing.sparse_mla_bwd_inputs(**self._maker_args(seed, device))

    @staticmethod
    def reference(inputs: Inputs) -> Any:
        """``(dq [B, S, H, d_qk], dkv [B, S_kv, d_qk])`` float32 through the reference forward in float32."""
        with torch.enable_grad():  # callers may check under no_grad (the benchmark does)
            q = inputs["q"].float().requires_grad_(True)
            kv = inputs["kv"].float().requires_grad_(True)
            out, _ = reference.sparse_mla(q, kv, inputs["indices"], **SparseMlaProblem.kwargs(inputs))
            out.backward(inputs["d_out"].float())
        return q.grad, kv.grad

    @staticmethod
    def compare(out: Outputs, expected: Any) -> str | None:
        """``dq`` and ``dkv`` within :data:`BF16_TOL`, the absolute part relative to each gradient's largest value."""

        def tolerance(t: torch.Tensor) -> dict[str, float]:
            return {"atol": BF16_TOL["atol"] * max(float(t.abs().max()), 1e-6), "rtol": BF16_TOL["rtol"]}

        return _first_problem([
            testing.compare(out[0], expected[0], **tolerance(expected[0]), name="dq"),
            testing.compare(out[1], expected[1], **tolerance(expected[1]), name="dkv"),
        ])  # fmt: skip

    def flops(self) -> float | None:
        """Recomputed ``Q K^T``, ``dP``, ``dV``, ``dQ`` and ``dK``."""
        return flops.sparse_mla_bwd_flops(self.batch, self.seq, self.heads, self.topk, self.d_qk, self.d_v)

    def bytes(self) -> float:
        """``q``, ``out``, ``d_out``, ``lse``, gathered rows and indices read; ``dq`` and ``dkv`` written."""
        return flops.sparse_mla_bwd_bytes(self.batch, self.seq, self.seq_kv, self.heads, self.topk, self.d_qk,
                                          self.d_v)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Paged caches: the decode selection and sparse_mla_decode
# ----------------------------------------------------------------------------------------------------------------------
def fill_cache(
    kv: cache.PagedKVCache, batch: int, length: int, width: int, rows: Callable[[int], torch.Tensor]
) -> None:
    """Append ``length`` tokens to every sequence of ``kv``, ``rows(n)`` giving the next ``[batch, n, *]`` rows (written
    as stored when they are bytes, else through ``append``), in chunks of at most ``FILL_ELEMENTS`` values."""
    step = max(1, FILL_ELEMENTS // (batch * width))
    for start in range(0, length, step):
        chunk = rows(min(step, length - start))
        (kv.append_rows if chunk.dtype == torch.uint8 else kv.append)(chunk)


def newest_ends(batch: int, s_q: int, context: int, device: torch.device | str) -> torch.Tensor:
    """``[B, s_q]`` int32 ends of the newest ``s_q`` tokens of sequences of ``context`` tokens (each sees itself)."""
    ends = torch.arange(s_q, dtype=torch.int32, device=device) + (context - s_q + 1)
    return ends.view(1, s_q).expand(batch, s_q).contiguous()


@dataclass(frozen=True)
class PagedSelectionProblem:
    """The decode selection (``index_topk_decode``): ``context`` integer-valued keys a sequence (FP8 key rows with
    power-of-two scales in ``key_layout``, or bf16) in pages of ``page_size`` behind a shuffled block table (pages in
    any order, as an allocator leaves them), and the newest ``s_q`` queries of each of ``batch`` sequences."""

    batch: int
    s_q: int
    context: int
    heads: int
    dim: int
    dtype: str
    topk: int
    page_size: int
    key_layout: str = "rows"

    def inputs(self, device: torch.device | str, seed: int) -> Inputs:
        """``q [B, s_q, H, D]``, ``k_cache`` pages, ``weights [B, s_q, H]`` float32, ``topk``, ``block_table``,
        ``ends [B, s_q]`` int32, ``starts`` ``None`` and ``key_layout``."""
        batch, dim, fp8 = self.batch, self.dim, self.dtype == FP8
        g = testing.generator(seed, device)
        layout = cache.index_key_layout(dim, self.key_layout) if fp8 else None
        kind = {"dtype": "fp8" if fp8 else torch.bfloat16, "d_rope": 0, "layout": layout}
        keys = cache.PagedKVCache(batch, self.context, dim, page_size=self.page_size, device=device, **kind)
        order = torch.randperm(keys.block_table.numel(), generator=g, device=device)
        keys.block_table = order.to(torch.int32).view_as(keys.block_table)

        def ints(shape: tuple[int, ...], bound: int) -> torch.Tensor:
            return torch.randint(-bound, bound + 1, shape, generator=g, device=device).float()

        def rows(n: int) -> torch.Tensor:
            values = ints((batch, n, dim), 3)
            if not fp8:
                return values.to(torch.bfloat16)
            return cache.pack_index_keys_fp8(values.to(torch.float8_e4m3fn), torch.exp2(ints((batch, n), 2)))

        fill_cache(keys, batch, self.context, dim, rows)
        return {
            "q": ints((batch, self.s_q, self.heads, dim), 3).to(torch.float8_e4m3fn if fp8 else torch.bfloat16),
            "k_cache": keys.pages.view(keys.pages.shape[0], self.page_size, -1),
            "weights": ints((batch, self.s_q, self.heads), 2), "topk": self.topk, "block_table": keys.block_table,
            "ends": newest_ends(batch, self.s_q, self.context, device), "starts": None, "key_layout": self.key_layout,
        }  # fmt: skip

    @staticmethod
    def args(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(q, k_cache, weights, topk)`` and ``block_table``/``ends``/``starts``/``key_layout`` as keywords."""
        args = (inputs["q"], inputs["k_cache"], inputs["weights"], inputs["topk"])
        return args, {k: inputs[k] for k in ("block_table", "ends", "starts", "key_layout")}

    @staticmethod
    def reference(inputs: Inputs) -> Any:
        """``(indices [B, s_q, topk] int32, scores [B, s_q, topk] float32)``: the reference's selection."""
        args, kwargs = PagedSelectionProblem.args(inputs)
        return reference.index_topk_decode(*args, **kwargs, return_scores=True)

    @staticmethod
    def compare(out: Outputs, expected: Any) -> str | None:
        """The same positions per row (any order) with the same scores (:func:`same_selection`)."""
        return same_selection(out, expected)

    def flops(self) -> float | None:
        """One ``D``-dot per head per visible (query, cached key) pair: ``2 B s_q H L D`` at ``s_q = 1``."""
        return flops.indexer_flops(self.batch, self.s_q, self.context, self.heads, self.dim)

    def bytes(self) -> float:
        """Every cached key row read once (FP8 keys and their float32 scale, or bf16 keys)."""
        row_bytes = self.dim + flops.F32_BYTES if self.dtype == FP8 else self.dim * flops.BF16_BYTES
        return flops.index_topk_decode_bytes(self.batch, self.context, row_bytes)


@dataclass(frozen=True)
class SparseMlaDecodeProblem:
    """``sparse_mla_decode`` over a paged cache of ``context`` random tokens a sequence in ``kv_format`` (``"bf16"``
    rows, V3.2's ``"fp8"`` rows, or ``"fp8_paged"``: MODEL1 pages in FlashMLA's view, with a sink per head), bf16
    queries (the newest ``s_q`` of each of ``batch`` sequences), and per query ``topk`` distinct random positions among
    those it sees, as slots."""

    batch: int
    s_q: int
    context: int
    heads: int
    d_qk: int
    d_v: int
    d_rope: int
    topk: int
    kv_format: str
    page_size: int

    def inputs(self, device: torch.device | str, seed: int) -> Inputs:
        """``q [B, s_q, H, d_qk]`` bf16, ``kv_cache`` pages, ``indices [B, s_q, topk]`` int32 slots, ``block_table``,
        ``cache_seqlens [B]``, ``sm_scale``, ``d_v``, ``d_rope`` and ``attn_sink`` (``[H]`` float32 or ``None``)."""
        batch, s_q, context, d_qk = self.batch, self.s_q, self.context, self.d_qk
        g = testing.generator(seed, device)
        if self.kv_format == "fp8_paged":
            kind: dict[str, Any] = {"dtype": "fp8", "layout": cache.MODEL1_FP8_LAYOUT}
        else:
            kind = {"dtype": torch.bfloat16 if self.kv_format == "bf16" else "fp8", "d_rope": self.d_rope}
        kv = cache.PagedKVCache(batch, context, d_qk, page_size=self.page_size, device=device, **kind)
        fill_cache(kv, batch, context, d_qk,
              lambda n: torch.randn((batch, n, d_qk), generator=g, device=device).to(torch.bfloat16))  # fmt: skip
        ends = newest_ends(batch, s_q, context, device)
        keys = torch.rand((batch, s_q, context), generator=g, device=device)
        keys.masked_fill_(torch.arange(context, device=device).view(1, 1, -1) >= ends.unsqueeze(-1), -1.0)
        positions = keys.topk(self.topk, dim=-1).indices  # distinct; all visible while topk <= context - s_q + 1
        del keys
        kv_cache = kv.pages
        if kv.layout is not None and kv.layout.scales_after_values:
            kv_cache = cache.flash_mla_kv_view(kv.pages, kv.layout, self.page_size).squeeze(2)
        sink = torch.randn(self.heads, generator=g, device=device) if self.kv_format == "fp8_paged" else None
        return {
            "q": torch.randn((batch, s_q, self.heads, d_qk), generator=g, device=device).to(torch.bfloat16),
            "kv_cache": kv_cache,
            "indices": kv.slots(positions.view(batch, s_q * self.topk)).view(batch, s_q, self.topk),
            "block_table": kv.block_table, "cache_seqlens": kv.seq_lens, "sm_scale": d_qk**-0.5, "d_v": self.d_v,
            "d_rope": self.d_rope, "attn_sink": sink,
        }  # fmt: skip

    @staticmethod
    def kwargs(inputs: Inputs) -> dict[str, Any]:
        """The keyword arguments of a ``sparse_mla_decode`` call."""
        return {k: inputs[k] for k in ("sm_scale", "d_v", "d_rope", "attn_sink")}

    @staticmethod
    def reference(inputs: Inputs) -> Any:
        """``(out [B, s_q, H, d_v], lse [B, s_q, H])`` from ``dsa.reference.sparse_mla_decode``."""
        return reference.sparse_mla_decode(inputs["q"], inputs["kv_cache"], inputs["indices"],
                                           **SparseMlaDecodeProblem.kwargs(inputs))

    compare = staticmethod(compare_attention)

    def flops(self) -> float | None:
        """The forward's count with ``S = s_q``: each query attends to its ``topk`` gathered rows."""
        return flops.sparse_mla_fwd_flops(self.batch, self.s_q, self.heads, self.topk, self.d_qk, self.d_v)

    def bytes(self) -> float:
        """The gathered rows as stored (V3.2's 656-byte FP8 rows, MODEL1's bytes per token, ``2 d_qk`` for bf16),
        ``q`` read and ``out`` written."""
        if self.kv_format == "fp8":
            row_bytes = flops.fp8_kv_row_bytes(self.d_qk, self.d_rope)
        elif self.kv_format == "fp8_paged":
            row_bytes = cache.MODEL1_FP8_LAYOUT.bytes_per_token
        else:
            row_bytes = self.d_qk * flops.BF16_BYTES
        dims = (self.batch, self.s_q, self.heads, self.topk, self.d_qk, self.d_v)
        return flops.sparse_mla_decode_bytes(*dims, row_bytes)


# ----------------------------------------------------------------------------------------------------------------------
# A tuner kernel's call, as the tuner and the benchmark cases describe it: (static parameters, runtime sizes)
# ----------------------------------------------------------------------------------------------------------------------
DECODE_PAGE = 64
"""Tokens per page of a row-per-token decode cache when the static parameters name none (FlashMLA's and vLLM's)."""
DEFAULT_D_ROPE = 64
"""The op's ``d_rope`` where the static parameters name none (V3.2's rope width; ``dsa.ops.sparse_mla_decode``'s)."""

Problem = IndexerProblem | TopkProblem | SparseMlaProblem | PagedSelectionProblem | SparseMlaDecodeProblem
"""Any problem description (the subclasses ``IndexTopkProblem`` and ``SparseMlaBwdProblem`` included)."""
_FAMILIES: dict[str, type[Problem]] = {
    "indexer": IndexerProblem,
    "index_topk": IndexTopkProblem,
    "topk": TopkProblem,
    "sparse_mla_fwd": SparseMlaProblem,
    "sparse_mla_bwd": SparseMlaBwdProblem,
    "sparse_mla_decode": SparseMlaDecodeProblem,
}


def family_for(kernel: str, static: Mapping[str, Any]) -> type[Problem]:
    """The problem class of ``kernel`` (a tuner kernel name, or a benchmark case's ``index_topk_decode``) at
    ``static``: an ``index_topk`` with a ``page_size`` is the decode selection. ``KeyError`` for another kernel."""
    if kernel in ("index_topk", "index_topk_decode") and static.get("page_size"):
        return PagedSelectionProblem
    try:
        return _FAMILIES[kernel]
    except KeyError:
        raise KeyError(f"no problem description for kernel {kernel!r}; known: {', '.join(_FAMILIES)}") from None


def problem_for(kernel: str, static: Mapping[str, Any], sizes: Mapping[str, int]) -> Problem:
    """The problem of one call of ``kernel`` (see :func:`family_for`) at its static parameters and runtime sizes
    (``batch``, ``seq_len``, ``seq_len_kv``, ``topk`` where it is one; a tuner decode call's ``s_q`` and ``topk``, its
    context ``autotune.lookup.decode.CONTEXT_PER_TOPK x topk``)."""
    family = family_for(kernel, static)
    batch = sizes["batch"]
    if family is PagedSelectionProblem:
        return PagedSelectionProblem(batch, sizes["seq_len"], sizes["seq_len_kv"], static["heads"], static["dim"],
                                     static["dtype"], static["topk"], static["page_size"],
                                     static.get("key_layout", "rows"))  # fmt: skip
    if family is SparseMlaDecodeProblem:
        s_q = sizes["s_q"] if "s_q" in sizes else sizes["seq_len"]
        context = sizes.get("seq_len_kv", decode.CONTEXT_PER_TOPK * sizes["topk"])
        return SparseMlaDecodeProblem(batch, s_q, context, static["heads"], static["d_qk"], static["d_v"],
                                      static.get("d_rope", DEFAULT_D_ROPE), sizes["topk"], static["kv_format"],
                                      static.get("page_size", DECODE_PAGE))  # fmt: skip
    dims = (batch, sizes["seq_len"], sizes["seq_len_kv"])
    if family is TopkProblem:
        return TopkProblem(*dims, static["k"])
    if issubclass(family, SparseMlaProblem):
        # sparse_mla_fwd takes k at run time (a size); sparse_mla_bwd compiles it in (a static parameter).
        topk = int(static["topk"] if "topk" in static else sizes["topk"])
        return family(*dims, static["heads"], static["d_qk"], static["d_v"], topk,
                      static.get("has_topk_length", False), static.get("has_sink", False))  # fmt: skip
    indexer = (*dims, static["heads"], static["dim"], static["dtype"], static.get("mode", "causal"))
    return IndexTopkProblem(*indexer, topk=static["topk"]) if family is IndexTopkProblem else IndexerProblem(*indexer)
