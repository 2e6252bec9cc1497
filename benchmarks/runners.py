"""How to exercise each kernel: its inputs, its launch with a given config, its reference, and the comparison.

One :class:`Runner` per kernel name of :data:`autotune.lookup.space.TUNED_KERNEL_NAMES`, shared by the tuner's GPU phase
(every candidate is checked against the reference before it may be timed) and the benchmark (its ``dsa`` check): the
measurement package's one description of a tuner kernel's problem, which is why it lives here, below the tuner. Inputs
come from the makers of ``dsa.testing`` (the same ones the property tests draw from), comparisons from
``dsa.testing.compare`` (NaN/inf positions, per-output tolerances, and the scale-sensitive difference, so a candidate
with a 2 % scale error is rejected), and kernels run through their launchers in ``dsa.launch`` with the launcher's
``config=`` override, i.e. exactly the call path of the ops.

The decode kernels build their paged caches with ``dsa.cache.PagedKVCache`` (``dsa.testing`` has no paged problem):
``sparse_mla_decode`` over ``autotune.lookup.decode.CONTEXT_PER_TOPK x topk`` tokens a sequence, and the paged
``index_topk`` cases (a ``page_size`` in the static parameters: the decode selection) over ``seq_len_kv`` keys a
sequence behind a shuffled block table, through ``dsa.launch.index_topk.index_topk_paged``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from autotune.lookup import decode
from dsa import cache, reference, testing
from dsa.launch import index_topk, indexer, sparse_mla_bwd, sparse_mla_decode, sparse_mla_fwd, topk

__all__ = ["SEED", "Runner", "newest_ends", "register_runner", "runner_for", "same_selection"]

Inputs = dict[str, Any]
Outputs = tuple[Any, ...]
SEED = 20251201
# Tuner-level tolerances (the test suite holds the kernels to stricter ones): bf16 outputs carry about 3 significant
# digits; P and dS enter the MMAs as bf16 on CUDA. The scale-sensitive difference (testing.DEFAULT_MAX_DIFF) is what
# rejects a kernel that is off by a constant factor these elementwise bounds would forgive.
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}
LSE_TOL = {"atol": 1e-2, "rtol": 1e-3}
SCORE_RTOL = 2e-2
SCORE_ATOL_SHARE = 1e-3
"""Indexer scores: absolute tolerance as a share of the largest |score| (a score may cancel to far below its
terms, and float32 accumulation error scales with the terms)."""
CHECK_ROWS = 64
"""Queries a narrowed check keeps (the benchmark checks a slice of its large problems)."""
CHECK_BATCHES = 4
FILL_ELEMENTS = 1 << 26
"""A decode cache is written in chunks of at most this many values (bounds the FP8 quantisation's temporaries)."""
DECODE_PAGE = 64
"""Tokens per page of a row-per-token decode cache (FlashMLA's and vLLM's block size); MODEL1 pages have their own."""


@dataclass(frozen=True)
class Runner:
    """How to exercise one kernel.

    Attributes:
        make_inputs: ``(static, sizes, device, seed) -> inputs`` with random, non-zero data.
        launch: ``(config, static, inputs) -> outputs``; ``config`` is the kernel module's checked ``Config`` (or
            ``None``: the launcher's own choice).
        reference: ``(static, inputs) -> expected``, what ``compare`` takes.
        compare: ``(outputs, expected) -> None`` or the reason the outputs are wrong.
        narrow: ``(inputs, outputs) -> (inputs, outputs or None)``: a slice of the queries small enough for the
            reference (``None`` outputs: launch again on the narrowed inputs, for outputs that sum over queries).
        get_kernel: ``(kernel name, static, config dict) -> config`` handed to ``launch``; ``None``: the module's
            checked ``Config`` (tests substitute a fake).
    """

    make_inputs: Callable[[dict[str, Any], dict[str, int], torch.device, int], Inputs]
    launch: Callable[[Any, dict[str, Any], Inputs], Outputs]
    reference: Callable[[dict[str, Any], Inputs], Any]
    compare: Callable[[Outputs, Any], str | None]
    narrow: Callable[[Inputs, Outputs], tuple[Inputs, Outputs | None]] | None = None
    get_kernel: Callable[[str, dict[str, Any], dict[str, Any]], Any] | None = None


def _first_of_each(compared: list[str | None]) -> str | None:
    return next((problem for problem in compared if problem is not None), None)


# ----------------------------------------------------------------------------------------------------------------------
# indexer
# ----------------------------------------------------------------------------------------------------------------------
def _indexer_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    return testing.indexer_inputs(
        batch=sizes["batch"], seq=sizes["seq_len"], seq_kv=sizes["seq_len_kv"], heads=static["heads"],
        dim=static["dim"], dtype=static["dtype"], mode=static["mode"], range_kind="packed", seed=seed, device=device,
        weight_scale=(static["heads"] * static["dim"]) ** -0.5,
    )  # fmt: skip


def _indexer_args(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (inputs["q"], inputs["k"], inputs["weights"]), {k: inputs[k] for k in ("k_scale", "starts", "ends")}


def _indexer_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    args, kwargs = _indexer_args(inputs)
    return (indexer.index_scores(*args, **kwargs, config=config),)


def _indexer_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    args, kwargs = _indexer_args(inputs)
    return (reference.index_scores(*args, **kwargs),)


def _indexer_compare(out: Outputs, expected: Any) -> str | None:
    finite = torch.isfinite(expected[0])
    scale = float(expected[0][finite].abs().max()) if finite.any() else 1.0
    return testing.compare(
        out[0], expected[0], atol=SCORE_ATOL_SHARE * max(scale, 1e-6), rtol=SCORE_RTOL, name="scores"
    )


def _indexer_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    # The last queries: bottom-right causality aligns them with the last keys in the narrowed problem too, so each
    # sees exactly the keys it saw in the full one.
    seq = inputs["q"].shape[1]
    rows = slice(max(0, seq - CHECK_ROWS), seq)
    narrowed = dict(inputs)
    for name in ("q", "weights", "starts", "ends"):
        if narrowed[name] is not None:
            narrowed[name] = narrowed[name][:, rows].contiguous()
    return narrowed, (out[0][:, rows],)


# ----------------------------------------------------------------------------------------------------------------------
# topk
# ----------------------------------------------------------------------------------------------------------------------
def _topk_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    scores = testing.causal_scores(sizes["batch"], sizes["seq_len"], sizes["seq_len_kv"], seed=seed, device=device)
    return {"scores": scores, "k": static["k"]}


def _topk_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    return (topk.topk_indices(inputs["scores"], inputs["k"], config=config),)


def _topk_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    # The contract itself is the reference: the check needs the scores, not another selection.
    return inputs["scores"], inputs["k"]


def _topk_compare(out: Outputs, expected: Any) -> str | None:
    scores, k = expected
    return testing.topk_error(scores, out[0], k)


def _topk_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    rows = slice(0, CHECK_ROWS)
    return {**inputs, "scores": inputs["scores"][:, rows]}, (out[0][:, rows],)


# ----------------------------------------------------------------------------------------------------------------------
# sparse_mla_fwd / sparse_mla_bwd
# ----------------------------------------------------------------------------------------------------------------------
def _mla_sizes(static: dict[str, Any], sizes: dict[str, int], seed: int) -> dict[str, Any]:
    # sparse_mla_fwd takes k at run time (a size); sparse_mla_bwd compiles it in (a static parameter).
    return dict(
        batch=sizes["batch"], seq=sizes["seq_len"], seq_kv=sizes["seq_len_kv"], heads=static["heads"],
        d_qk=static["d_qk"], d_v=static["d_v"], topk=int(sizes.get("topk", static.get("topk", 0))), seed=seed,
        sm_scale=static["d_qk"] ** -0.5, has_topk_length=static["has_topk_length"], has_sink=static["has_sink"],
    )  # fmt: skip


def _fwd_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    return testing.sparse_mla_inputs(**_mla_sizes(static, sizes, seed), device=device)


def _mla_kwargs(inputs: Inputs) -> dict[str, Any]:
    return {k: inputs[k] for k in ("sm_scale", "d_v", "topk_length", "attn_sink")}


def _fwd_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    return sparse_mla_fwd.sparse_mla_fwd(inputs["q"], inputs["kv"], inputs["indices"], **_mla_kwargs(inputs), config=config)


def _fwd_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    return reference.sparse_mla(inputs["q"], inputs["kv"], inputs["indices"], **_mla_kwargs(inputs))


def _fwd_compare(out: Outputs, expected: Any) -> str | None:
    return _first_of_each([
        testing.compare(out[0], expected[0], **BF16_TOL, name="out"),
        testing.compare(out[1], expected[1], **LSE_TOL, max_diff=None, name="lse"),
    ])  # fmt: skip


def _rows_of(inputs: Inputs, names: tuple[str, ...]) -> Inputs:
    batches, rows = slice(0, CHECK_BATCHES), slice(0, CHECK_ROWS)
    narrowed = dict(inputs)
    for name in names:
        if narrowed.get(name) is not None:
            narrowed[name] = narrowed[name][batches, rows].contiguous()
    narrowed["kv"] = inputs["kv"][batches].contiguous()
    return narrowed


def _fwd_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    batches, rows = slice(0, CHECK_BATCHES), slice(0, CHECK_ROWS)
    return _rows_of(inputs, ("q", "indices", "topk_length")), (out[0][batches, rows], out[1][batches, rows])


def _bwd_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    return testing.sparse_mla_bwd_inputs(**_mla_sizes(static, sizes, seed), device=device)


def _bwd_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    return sparse_mla_bwd.sparse_mla_bwd(
        inputs["q"], inputs["kv"], inputs["out"], inputs["lse"], inputs["d_out"], inputs["indices"],
        **_mla_kwargs(inputs), config=config,
    )  # fmt: skip


def _bwd_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    with torch.enable_grad():  # callers may check under no_grad (the benchmark does)
        q = inputs["q"].float().requires_grad_(True)
        kv = inputs["kv"].float().requires_grad_(True)
        out, _ = reference.sparse_mla(q, kv, inputs["indices"], **_mla_kwargs(inputs))
        out.backward(inputs["d_out"].float())
    return q.grad, kv.grad


def _bwd_compare(out: Outputs, expected: Any) -> str | None:
    def tolerance(t: torch.Tensor) -> dict[str, float]:
        return {"atol": BF16_TOL["atol"] * max(float(t.abs().max()), 1e-6), "rtol": BF16_TOL["rtol"]}

    return _first_of_each([
        testing.compare(out[0], expected[0], **tolerance(expected[0]), name="dq"),
        testing.compare(out[1], expected[1], **tolerance(expected[1]), name="dkv"),
    ])  # fmt: skip


def _bwd_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, None]:
    # dkv sums over every query: the kernel runs again on the narrowed problem itself.
    return _rows_of(inputs, ("q", "indices", "topk_length", "out", "lse", "d_out")), None


# ----------------------------------------------------------------------------------------------------------------------
# index_topk (the fused selection)
# ----------------------------------------------------------------------------------------------------------------------
def _index_topk_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    # Integer-valued: every implementation computes the scores exactly, so the selection is compared exactly.
    if static.get("page_size"):
        return _paged_selection_inputs(static, sizes, device, seed)
    inputs = testing.indexer_inputs(
        batch=sizes["batch"], seq=sizes["seq_len"], seq_kv=sizes["seq_len_kv"], heads=static["heads"],
        dim=static["dim"], dtype=static["dtype"], mode=static["mode"], range_kind="packed", seed=seed, device=device,
        integer_valued=True,
    )  # fmt: skip
    return {**inputs, "topk": static["topk"]}


def _index_topk_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    if "k_cache" in inputs:
        args, kwargs = _paged_selection_args(inputs)
        return index_topk.index_topk_paged(*args, **kwargs, config=config)
    args, kwargs = _indexer_args(inputs)
    return index_topk.index_topk(*args, inputs["topk"], **kwargs, config=config)


def _index_topk_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    if "k_cache" in inputs:  # the reference's selection: its positions and their scores
        args, kwargs = _paged_selection_args(inputs)
        return reference.index_topk_decode(*args, **kwargs, return_scores=True)
    # The check needs every score of the checked rows (the contract is stated on them), not another selection.
    args, kwargs = _indexer_args(inputs)
    return reference.index_scores(*args, **kwargs), inputs["topk"]


def _index_topk_compare(out: Outputs, expected: Any) -> str | None:
    if isinstance(expected[1], torch.Tensor):
        return same_selection(out, expected)
    scores, topk_ = expected
    problem = testing.topk_error(scores, out[0], topk_)
    if problem is not None:
        return problem
    if not torch.equal(out[1].cpu(), reference.gather_scores(scores, out[0]).cpu().to(out[1].dtype)):
        return "scores: not the exact index scores at the selected positions"
    return None


def _index_topk_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    if "k_cache" in inputs:  # the first sequences; the reference reads the keys through their block table rows
        n = CHECK_BATCHES
        narrowed = {k: v[:n] if k in ("q", "weights", "block_table", "ends") else v for k, v in inputs.items()}
        return narrowed, tuple(t[:n] for t in out)
    narrowed, (indices,) = _indexer_narrow(inputs, (out[0],))
    seq = inputs["q"].shape[1]
    return narrowed, (indices, out[1][:, max(0, seq - CHECK_ROWS) : seq])


# ----------------------------------------------------------------------------------------------------------------------
# Paged caches: the decode selection (index_topk with page_size) and sparse_mla_decode
# ----------------------------------------------------------------------------------------------------------------------
def _fill(kv: cache.PagedKVCache, batch: int, length: int, width: int, rows: Callable[[int], torch.Tensor]) -> None:
    """Append ``length`` tokens to every sequence of ``kv``, ``rows(n)`` giving the next ``[batch, n, *]`` rows (written
    as stored when they are bytes, else through ``append``), in chunks of at most ``FILL_ELEMENTS`` values."""
    step = max(1, FILL_ELEMENTS // (batch * width))
    for start in range(0, length, step):
        chunk = rows(min(step, length - start))
        (kv.append_rows if chunk.dtype == torch.uint8 else kv.append)(chunk)


def newest_ends(batch: int, s_q: int, context: int, device: torch.device) -> torch.Tensor:
    """``[B, s_q]`` int32 ends of the newest ``s_q`` tokens of sequences of ``context`` tokens (each sees itself)."""
    ends = torch.arange(s_q, dtype=torch.int32, device=device) + (context - s_q + 1)
    return ends.view(1, s_q).expand(batch, s_q).contiguous()


def _paged_selection_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    """``seq_len_kv`` integer-valued keys a sequence (FP8 with power-of-two scales in the static's ``key_layout``, or
    bf16) in pages of ``page_size`` behind a shuffled block table (pages in any order, as an allocator leaves them),
    and the newest ``seq_len`` queries of each sequence."""
    batch, s_q, context = sizes["batch"], sizes["seq_len"], sizes["seq_len_kv"]
    heads, dim, page_size = static["heads"], static["dim"], static["page_size"]
    fp8 = static["dtype"] == "float8_e4m3fn"
    key_layout = static.get("key_layout", "rows")
    g = testing.generator(seed, device)
    layout = cache.index_key_layout(dim, key_layout) if fp8 else None
    keys = cache.PagedKVCache(batch, context, dim, page_size=page_size, dtype="fp8" if fp8 else torch.bfloat16,
                              d_rope=0, layout=layout, device=device)  # fmt: skip
    order = torch.randperm(keys.block_table.numel(), generator=g, device=device)
    keys.block_table = order.to(torch.int32).view_as(keys.block_table)

    def ints(shape: tuple[int, ...], bound: int) -> torch.Tensor:
        return torch.randint(-bound, bound + 1, shape, generator=g, device=device).float()

    def rows(n: int) -> torch.Tensor:
        values = ints((batch, n, dim), 3)
        if not fp8:
            return values.to(torch.bfloat16)
        return cache.pack_index_keys_fp8(values.to(torch.float8_e4m3fn), torch.exp2(ints((batch, n), 2)))

    _fill(keys, batch, context, dim, rows)
    return {
        "q": ints((batch, s_q, heads, dim), 3).to(torch.float8_e4m3fn if fp8 else torch.bfloat16),
        "k_cache": keys.pages.view(keys.pages.shape[0], page_size, -1), "weights": ints((batch, s_q, heads), 2),
        "topk": static["topk"], "block_table": keys.block_table, "ends": newest_ends(batch, s_q, context, device),
        "key_layout": key_layout,
    }  # fmt: skip


def _paged_selection_args(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args = (inputs["q"], inputs["k_cache"], inputs["weights"], inputs["topk"])
    return args, {k: inputs[k] for k in ("block_table", "ends", "key_layout")}


def same_selection(out: Outputs, expected: Any) -> str | None:
    """``None`` when both selections hold the same positions per row (any order) with the same scores."""
    (indices, scores), (want, want_scores) = ((a.cpu(), b.cpu().float()) for a, b in (out, expected))
    if indices.dtype != torch.int32 or indices.shape != want.shape:
        return f"indices: {indices.dtype} {tuple(indices.shape)}, expected torch.int32 {tuple(want.shape)}"
    order, want_order = indices.argsort(-1), want.argsort(-1)
    differ = (indices.gather(-1, order) != want.gather(-1, want_order)).any(-1)
    if differ.any():
        return f"indices: another set of positions in {int(differ.sum())} of {differ.numel()} rows"
    if not torch.equal(scores.gather(-1, order), want_scores.gather(-1, want_order)):
        return "scores: not the exact index scores at the selected positions"
    return None


def _decode_inputs(static: dict[str, Any], sizes: dict[str, int], device: torch.device, seed: int) -> Inputs:
    """A paged cache in the static's format (bf16 rows, V3.2's FP8 rows, or MODEL1 pages in FlashMLA's view) of
    ``CONTEXT_PER_TOPK x topk`` random tokens a sequence, bf16 queries, and per query ``topk`` distinct random
    positions of its sequence as slots; MODEL1 (DeepSeek-V4) also a sink per head."""
    batch, s_q, topk_ = sizes["batch"], sizes["s_q"], sizes["topk"]
    heads, d_qk, fmt = static["heads"], static["d_qk"], static["kv_format"]
    context = decode.CONTEXT_PER_TOPK * topk_
    g = testing.generator(seed, device)
    if fmt == "fp8_paged":
        kind: dict[str, Any] = {"dtype": "fp8", "layout": cache.MODEL1_FP8_LAYOUT}
    else:
        kind = {"dtype": torch.bfloat16 if fmt == "bf16" else "fp8", "d_rope": static["d_rope"]}
    page_size = static.get("page_size", DECODE_PAGE)
    kv = cache.PagedKVCache(batch, context, d_qk, page_size=page_size, device=device, **kind)
    _fill(kv, batch, context, d_qk,
          lambda n: torch.randn((batch, n, d_qk), generator=g, device=device).to(torch.bfloat16))  # fmt: skip
    positions = torch.rand((batch, s_q, context), generator=g, device=device).topk(topk_, dim=-1).indices
    kv_cache = kv.pages
    if kv.layout is not None and kv.layout.scales_after_values:
        kv_cache = cache.flash_mla_kv_view(kv.pages, kv.layout, page_size).squeeze(2)
    sink = torch.randn(heads, generator=g, device=device) if fmt == "fp8_paged" else None
    return {
        "q": torch.randn((batch, s_q, heads, d_qk), generator=g, device=device).to(torch.bfloat16),
        "kv_cache": kv_cache, "indices": kv.slots(positions.view(batch, s_q * topk_)).view(batch, s_q, topk_),
        "block_table": kv.block_table, "sm_scale": d_qk**-0.5, "d_v": static["d_v"], "d_rope": static["d_rope"],
        "attn_sink": sink,
    }  # fmt: skip


def _decode_kwargs(inputs: Inputs) -> dict[str, Any]:
    return {k: inputs[k] for k in ("sm_scale", "d_v", "d_rope", "attn_sink")}


def _decode_launch(config: Any, static: dict[str, Any], inputs: Inputs) -> Outputs:
    return sparse_mla_decode.sparse_mla_decode(inputs["q"], inputs["kv_cache"], inputs["indices"],
                                               **_decode_kwargs(inputs), config=config)  # fmt: skip


def _decode_reference(static: dict[str, Any], inputs: Inputs) -> Any:
    return reference.sparse_mla_decode(inputs["q"], inputs["kv_cache"], inputs["indices"], **_decode_kwargs(inputs))


def _decode_narrow(inputs: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    """The first ``CHECK_BATCHES`` sequences, the cache cut to their pages (the reference reads the whole cache)."""
    n = CHECK_BATCHES
    narrowed = {k: v[:n] if k in ("q", "indices", "block_table") else v for k, v in inputs.items()}
    narrowed["kv_cache"] = inputs["kv_cache"][: int(inputs["block_table"][:n].max()) + 1]
    return narrowed, tuple(t[:n] for t in out)


_RUNNERS: dict[str, Runner] = {
    indexer.KERNEL_NAME: Runner(_indexer_inputs, _indexer_launch, _indexer_reference, _indexer_compare, _indexer_narrow),
    topk.KERNEL_NAME: Runner(_topk_inputs, _topk_launch, _topk_reference, _topk_compare, _topk_narrow),
    index_topk.KERNEL_NAME: Runner(
        _index_topk_inputs, _index_topk_launch, _index_topk_reference, _index_topk_compare, _index_topk_narrow
    ),
    sparse_mla_fwd.KERNEL_NAME: Runner(_fwd_inputs, _fwd_launch, _fwd_reference, _fwd_compare, _fwd_narrow),
    sparse_mla_bwd.KERNEL_NAME: Runner(_bwd_inputs, _bwd_launch, _bwd_reference, _bwd_compare, _bwd_narrow),
    sparse_mla_decode.KERNEL_NAME: Runner(
        _decode_inputs, _decode_launch, _decode_reference, _fwd_compare, _decode_narrow
    ),
}


def register_runner(kernel: str, runner: Runner) -> None:
    """Add or replace the runner of ``kernel`` (tests plug in a fake one)."""
    _RUNNERS[kernel] = runner


def runner_for(kernel: str) -> Runner:
    """The runner of ``kernel``; ``KeyError`` names the known kernels."""
    try:
        return _RUNNERS[kernel]
    except KeyError:
        raise KeyError(f"no runner for kernel {kernel!r}; known: {', '.join(_RUNNERS)}") from None
