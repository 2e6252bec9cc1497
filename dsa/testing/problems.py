"""One input maker per op: the arguments of an ``indexer``, ``sparse_mla`` forward or backward call, drawn
from the patterns of :mod:`dsa.testing.inputs`. The problem descriptions that the tests, the tuner and the benchmark
share (``benchmarks.problems``: inputs, reference, comparison, FLOPs and bytes per op family) draw through these; they
live above ``dsa`` because their counts are the measurement package's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dsa import reference
from dsa.testing.inputs import _randn, causal_indices, generator, make_indices, make_ranges, make_topk_length


def _moved(inputs: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


# Value ranges of integer-valued indexer inputs (exact in bfloat16 and float8_e4m3fn; sums far below 2**24).
INT_QK = 3
INT_WEIGHT = 2


def indexer_inputs(
    *,
    batch: int,
    seq: int,
    seq_kv: int,
    heads: int,
    dim: int,
    dtype: str,
    seed: int,
    device: torch.device | str = "cpu",
    mode: str = "causal",
    range_kind: str = "random",
    spread: float = 1.0,
    weight_scale: float = 1.0,
    integer_valued: bool = False,
) -> dict[str, Any]:
    """The arguments of ``index_scores`` as a dict (``q``, ``k``, ``weights``, ``k_scale``, ``starts``, ``ends``).

    ``q``/``k`` normal times ``spread`` in ``dtype`` (``"bfloat16"`` or ``"float8_e4m3fn"``: with a small spread
    FP8 gets many subnormals, with a large one many exponents), weights of both signs times ``weight_scale``, positive
    per-key scales for FP8 (``None`` for bf16), and in ``mode="range"`` ``starts``/``ends`` of pattern
    ``range_kind`` (``None`` for causal). Drawn on the CPU and moved to ``device``.

    ``integer_valued``: ``q``/``k`` integers in ``[-INT_QK, INT_QK]``, weights integers in ``[-INT_WEIGHT,
    INT_WEIGHT]`` and FP8 key scales powers of two (``spread`` and ``weight_scale`` ignored): every score is computed
    exactly in float32 by every implementation, and ReLU zeros and small values make many exact ties, so selections
    can be compared exactly, ties included.
    """
    g = generator(seed)
    torch_dtype = getattr(torch, dtype)
    if integer_valued:
        q = torch.randint(-INT_QK, INT_QK + 1, (batch, seq, heads, dim), generator=g).to(torch_dtype)
        k = torch.randint(-INT_QK, INT_QK + 1, (batch, seq_kv, dim), generator=g).to(torch_dtype)
        weights = torch.randint(-INT_WEIGHT, INT_WEIGHT + 1, (batch, seq, heads), generator=g).float()
    else:
        q = _randn((batch, seq, heads, dim), g, dtype=torch_dtype, scale=spread)
        k = _randn((batch, seq_kv, dim), g, dtype=torch_dtype, scale=spread)
        weights = _randn((batch, seq, heads), g, scale=weight_scale)
    inputs: dict[str, Any] = {"q": q, "k": k, "weights": weights, "k_scale": None, "starts": None, "ends": None}
    if torch_dtype == torch.float8_e4m3fn and integer_valued:
        inputs["k_scale"] = torch.exp2(torch.randint(-1, 2, (batch, seq_kv), generator=g).float())
    elif torch_dtype == torch.float8_e4m3fn:
        inputs["k_scale"] = torch.rand((batch, seq_kv), generator=g) * 2.0 + 0.01
    if mode == "range":
        inputs["starts"], inputs["ends"] = make_ranges(range_kind, seed + 1, batch, seq, seq_kv)
    return _moved(inputs, device)


def sparse_mla_inputs(
    *,
    batch: int,
    seq: int,
    seq_kv: int,
    heads: int,
    d_qk: int,
    d_v: int,
    topk: int,
    seed: int,
    sm_scale: float,
    device: torch.device | str = "cpu",
    kind: str = "causal",
    has_topk_length: bool = False,
    has_sink: bool = False,
    value_scale: float = 1.0,
    sink_scale: float = 2.0,
) -> dict[str, Any]:
    """The arguments of ``sparse_mla`` as a dict (``q``, ``kv``, ``indices``, ``sm_scale``, ``d_v``,
    ``topk_length``, ``attn_sink``).

    bf16 ``q``/``kv`` normal times ``value_scale``; indices of pattern ``kind`` (:data:`INDEX_PATTERNS`; ``causal``
    is drawn on ``device`` in bounded chunks, the others on the CPU); with ``has_topk_length`` a random
    ``topk_length``; with ``has_sink`` float32 sinks normal times ``sink_scale``.
    """
    g = generator(seed)
    inputs: dict[str, Any] = {
        "q": _randn((batch, seq, heads, d_qk), g, dtype=torch.bfloat16, scale=value_scale),
        "kv": _randn((batch, seq_kv, d_qk), g, dtype=torch.bfloat16, scale=value_scale),
        "sm_scale": sm_scale,
        "d_v": d_v,
        "topk_length": make_topk_length(seed + 2, batch, seq, topk) if has_topk_length else None,
        "attn_sink": _randn((heads,), g, scale=sink_scale) if has_sink else None,
    }
    inputs = _moved(inputs, device)
    if kind == "causal":
        inputs["indices"] = causal_indices(batch, seq, seq_kv, topk, seed=seed + 1, device=device)
    else:
        inputs["indices"] = make_indices(kind, seed + 1, batch, seq, seq_kv, topk).to(device)
    return inputs


def sparse_mla_bwd_inputs(**kwargs: Any) -> dict[str, Any]:
    """:func:`sparse_mla_inputs` plus what the backward takes: the forward's ``out`` (bf16) and ``lse`` from the
    reference, and a random bf16 ``d_out``."""
    inputs = sparse_mla_inputs(**kwargs)
    q = inputs["q"]
    with torch.no_grad():
        out, lse = reference.sparse_mla(
            q, inputs["kv"], inputs["indices"], sm_scale=inputs["sm_scale"], d_v=inputs["d_v"],
            topk_length=inputs["topk_length"], attn_sink=inputs["attn_sink"],
        )  # fmt: skip
    g = generator(kwargs["seed"] + 3)
    d_out = _randn((*q.shape[:3], inputs["d_v"]), g, dtype=torch.bfloat16).to(q.device)
    return {**inputs, "out": out.to(torch.bfloat16).contiguous(), "lse": lse.float().contiguous(), "d_out": d_out}
