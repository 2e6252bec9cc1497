"""The implementations the benchmark times side by side with ``dsa``: on Hopper the same kernels on the portable
schedule (``dsa-portable``: mma.sync, what every other GPU runs), the reference, ``torch.topk``, dense attention (SDPA
and chunked matmuls) and, where importable, FlashMLA's sparse prefill and decode and DeepGEMM's FP8 indexer.

Every provider takes one input set as :mod:`benchmarks.runners` makes it for the case's kernel (``q``, ``k``,
``weights``, ``k_scale`` for the indexer; ``scores``, ``k`` for top-k; ``q``, ``kv``, ``indices``, ``sm_scale``,
``d_v``, ... for sparse MLA); the decode cases' sets come from ``benchmarks.inputs.make_inputs`` (the paged caches'
``kv_cache``/``k_cache`` pages, slots or block tables, ...).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import flops, v4
from dsa import autograd, hardware, ops, reference

__all__ = ["Provider", "dense_matmul", "dense_sdpa", "flashmla_decode", "providers_for"]

REFERENCE_INDEXER_MAX_PAIRS = 16384 * 16384
"""The chunked float32 reference indexer over more (query, key) pairs than this takes minutes: skipped."""
REFERENCE_DECODE_MAX_SLOTS = 1 << 20
"""The decode attention's reference dequantises the whole cache it is given: skipped over more cache rows (B * S_kv)
than this (B = 32 at 32K keys; B = 1 at every context)."""
DENSE_CHUNK_BYTES = 2 << 30
"""Dense matmul attention materialises float32 scores of at most this many bytes per query chunk."""
MEMORY_HEADROOM = 0.9
"""A provider is skipped when it would need more than this share of the free device memory."""
F32_BYTES = 4


@dataclass
class Provider:
    """One implementation timed on a case.

    Attributes:
        name: ``dsa``, ``reference``, ``torch.topk``, ``dense-sdpa``, ``dense-matmul``, ``flashmla``, ``deepgemm``.
        fn: the call, given one input set.
        flops: the provider's own useful FLOPs when they differ from the case's (dense attention computes every
            visible pair, not only the top-k); ``None`` uses the case's count.
        skip: a reason not to run it (recorded as a row), or empty.
    """

    name: str
    fn: Callable[[dict[str, Any]], Any]
    flops: float | None = None
    skip: str = ""


def dense_sdpa(q: torch.Tensor, kv: torch.Tensor, d_v: int, sm_scale: float) -> torch.Tensor:
    """Dense causal (bottom-right) attention over the whole context through ``torch.nn.functional.sdpa``.

    Args: q ``[B, S, H, d_qk]`` bf16, kv ``[B, S_kv, d_qk]`` bf16. Returns ``[B, H, S, d_v]`` bf16.
    """
    from torch.nn.attention.bias import causal_lower_right

    b, s, h, _ = q.shape
    skv = kv.shape[1]
    k = kv.unsqueeze(1).expand(b, h, skv, kv.shape[-1])
    v = kv[..., :d_v].unsqueeze(1).expand(b, h, skv, d_v)
    mask = causal_lower_right(s, skv)
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=sm_scale)


def dense_matmul(q: torch.Tensor, kv: torch.Tensor, d_v: int, sm_scale: float) -> torch.Tensor:
    """Dense causal (bottom-right) attention as bf16 matmuls over query chunks (float32 softmax).

    Args: q ``[B, S, H, d_qk]`` bf16, kv ``[B, S_kv, d_qk]`` bf16. Returns ``[B, S, H, d_v]`` bf16.
    """
    b, s, h, _ = q.shape
    skv = kv.shape[1]
    out = torch.empty((b, s, h, d_v), dtype=q.dtype, device=q.device)
    rows = max(1, DENSE_CHUNK_BYTES // (h * skv * F32_BYTES))
    keys = torch.arange(skv, device=q.device)
    for t0 in range(0, s, rows):
        t1 = min(s, t0 + rows)
        scores = torch.einsum("bshd,btd->bsht", q[:, t0:t1], kv).float() * sm_scale
        limit = torch.arange(t0, t1, device=q.device) + (skv - s)
        scores.masked_fill_((keys.view(1, -1) > limit.view(-1, 1)).view(1, t1 - t0, 1, skv), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[:, t0:t1] = torch.einsum("bsht,btd->bshd", probs, kv[..., :d_v])
    return out


def _flashmla_fwd(inputs: dict[str, Any]) -> Any:
    import flash_mla  # type: ignore[import-not-found]

    q, kv, idx = inputs["q"], inputs["kv"], inputs["indices"]
    b, s, h, d = q.shape
    skv = kv.shape[1]
    # FlashMLA's sparse prefill takes one sequence: flatten the batch, offsetting each row's indices into it.
    offsets = (torch.arange(b, device=q.device, dtype=torch.int32) * skv).view(b, 1, 1)
    flat_idx = torch.where(idx >= 0, idx + offsets, idx).view(b * s, 1, -1)
    return flash_mla.flash_mla_sparse_fwd(
        q.view(b * s, h, d), kv.view(b * skv, 1, d), flat_idx, inputs["sm_scale"], inputs["d_v"]
    )


def flashmla_decode(inputs: dict[str, Any], module: Any = None) -> Any:
    """FlashMLA's sparse decode, ``flash_mla_with_kvcache`` over the paged FP8 cache (``[num_blocks, page, 1, 656]``)
    with the slots as ``indices``; ``module`` (default ``flash_mla``) may be ``dsa.compat``, which has the same
    entry points. The scheduling metadata is made once per input set and module (a serving stack makes it once per
    step for all layers): ``get_mla_metadata`` with the pre-2026 arguments, which the current one ignores."""
    if module is None:
        import flash_mla as module  # type: ignore[import-not-found,no-redef]

    q, pages, idx = inputs["q"], inputs["kv_cache"], inputs["indices"]
    _, s_q, heads, _ = q.shape
    fp8 = pages.dtype == torch.uint8
    plans = inputs.setdefault("flashmla_metadata", {})
    if module.__name__ not in plans:
        seqlens = inputs["cache_seqlens"]
        plans[module.__name__] = module.get_mla_metadata(seqlens, s_q * heads, 1, heads, fp8, idx.shape[-1])
    metadata, splits = plans[module.__name__]
    return module.flash_mla_with_kvcache(
        q, pages.unsqueeze(2), inputs["block_table"], inputs["cache_seqlens"], inputs["d_v"], metadata, splits,
        softmax_scale=inputs["sm_scale"], causal=False, is_fp8_kvcache=fp8, indices=idx,
    )  # fmt: skip


def _deepgemm_indexer(inputs: dict[str, Any]) -> Any:
    import deep_gemm  # type: ignore[import-not-found]

    q, k, w, ks = inputs["q"], inputs["k"], inputs["weights"], inputs["k_scale"]
    s, skv = q.shape[1], k.shape[1]
    starts = torch.zeros(s, dtype=torch.int32, device=q.device)
    ends = torch.arange(s, dtype=torch.int32, device=q.device) + (skv - s + 1)
    return deep_gemm.fp8_mqa_logits(q[0], (k[0], ks[0]), w[0], starts, ends)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _fits(need_bytes: float) -> bool:
    if not torch.cuda.is_available():
        return True
    free, _ = torch.cuda.mem_get_info()
    return need_bytes < free * MEMORY_HEADROOM


def _indexer_args(i: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (i["q"], i["k"], i["weights"]), {"k_scale": i["k_scale"], "starts": i["starts"], "ends": i["ends"]}


def _mla_kwargs(i: dict[str, Any]) -> dict[str, Any]:
    return {k: i[k] for k in ("sm_scale", "d_v", "topk_length", "attn_sink")}


def _decode_kwargs(i: dict[str, Any]) -> dict[str, Any]:
    return {k: i[k] for k in ("sm_scale", "d_v", "d_rope")}


PORTABLE = "dsa-portable"
"""The provider of the portable schedule (mma.sync, built for sm_90 with ``DSA_PORTABLE=1``) beside the Hopper one."""


def _portable(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """``fn`` run with ``DSA_PORTABLE=1`` (the launchers read it per call; restored after every call)."""

    def run(inputs: dict[str, Any]) -> Any:
        before = os.environ.get("DSA_PORTABLE")
        os.environ["DSA_PORTABLE"] = "1"
        try:
            return fn(inputs)
        finally:
            if before is None:
                del os.environ["DSA_PORTABLE"]
            else:
                os.environ["DSA_PORTABLE"] = before

    return run


def _portable_provider(fn: Callable[[dict[str, Any]], Any]) -> Provider:
    """The ``dsa`` provider on the portable schedule: timed only on Hopper (elsewhere ``dsa`` is that schedule)."""
    on_hopper = torch.cuda.is_available() and hardware.is_hopper(torch.device("cuda"))
    return Provider(PORTABLE, _portable(fn), skip="" if on_hopper else "the portable schedule is dsa itself off Hopper")


def providers_for(case: Any) -> list[Provider]:
    """The providers timed on ``case`` (``dsa`` first), each possibly marked to skip with a reason."""
    sizes, static = case.sizes, case.static
    seq, seq_kv = sizes["seq_len"], sizes["seq_len_kv"]
    if case.kernel == "indexer":
        pairs = seq * seq_kv

        def indexer(i: dict[str, Any]) -> Any:
            return ops.index_scores(*_indexer_args(i)[0], **_indexer_args(i)[1])

        out = [
            Provider("dsa", indexer),
            _portable_provider(indexer),
            Provider(
                "reference",
                lambda i: reference.index_scores(*_indexer_args(i)[0], **_indexer_args(i)[1]),
                skip="" if pairs <= REFERENCE_INDEXER_MAX_PAIRS else f"capped at S*S_kv <= {REFERENCE_INDEXER_MAX_PAIRS}",
            ),
        ]
        if static["dtype"] == "float8_e4m3fn":
            skip = "" if _importable("deep_gemm") else "deep_gemm not importable"
            out.append(Provider("deepgemm", _deepgemm_indexer, skip=skip))
        return out
    if case.kernel == "index_topk":
        pairs = seq * seq_kv

        def fused(i: dict[str, Any]) -> Any:
            args, kwargs = _indexer_args(i)
            return ops.index_topk(*args, i["topk"], **kwargs, return_scores=True)

        def chunked(i: dict[str, Any]) -> Any:
            args, kwargs = _indexer_args(i)
            return autograd.unfused_index_topk(*args, kwargs["k_scale"], kwargs["starts"], kwargs["ends"], i["topk"])

        return [
            Provider("dsa", fused),
            _portable_provider(fused),
            Provider("chunked", chunked),
            Provider(
                "reference",
                lambda i: reference.index_topk(*_indexer_args(i)[0], i["topk"], **_indexer_args(i)[1]),
                skip="" if pairs <= REFERENCE_INDEXER_MAX_PAIRS else f"capped at S*S_kv <= {REFERENCE_INDEXER_MAX_PAIRS}",
            ),
        ]
    if case.kernel == "topk":
        return [
            Provider("dsa", lambda i: ops.topk_indices(i["scores"], i["k"])),
            Provider("torch.topk", lambda i: torch.topk(i["scores"], i["k"], dim=-1).indices),
            Provider("reference", lambda i: reference.topk_indices(i["scores"], i["k"])),
        ]
    if case.kernel == "sparse_mla_fwd":
        dense_flops = flops.dense_attention_flops(
            sizes["batch"], seq, seq_kv, static["heads"], static["d_qk"], static["d_v"]
        )
        dense_bytes = sizes["batch"] * seq * static["heads"] * seq_kv * float(F32_BYTES)  # the float32 score matrix

        def fwd(i: dict[str, Any]) -> Any:
            return ops.sparse_mla(i["q"], i["kv"], i["indices"], **_mla_kwargs(i))

        return [
            Provider("dsa", fwd),
            _portable_provider(fwd),
            Provider("reference", lambda i: reference.sparse_mla(i["q"], i["kv"], i["indices"], **_mla_kwargs(i))),
            Provider("dense-sdpa", lambda i: dense_sdpa(i["q"], i["kv"], i["d_v"], i["sm_scale"]), flops=dense_flops),
            Provider(
                "dense-matmul",
                lambda i: dense_matmul(i["q"], i["kv"], i["d_v"], i["sm_scale"]),
                flops=dense_flops,
                skip="" if _fits(min(dense_bytes, DENSE_CHUNK_BYTES) * 3) else "dense matmul would not fit memory",
            ),
            Provider("flashmla", _flashmla_fwd, skip="" if _importable("flash_mla") else "flash_mla not importable"),
        ]
    if case.kernel == "sparse_mla_bwd":

        def bwd(backend: str) -> Callable[[dict[str, Any]], Any]:
            return lambda i: autograd.sparse_mla_bwd_impl(
                i["q"], i["kv"], i["out"], i["lse"], i["d_out"], i["indices"], i["sm_scale"], i["d_v"],
                i["topk_length"], i["attn_sink"], None, backend,
            )  # fmt: skip

        return [
            Provider("dsa", bwd("tilelang")),
            _portable_provider(bwd("tilelang")),
            Provider("reference", bwd("reference")),
        ]
    if case.kernel == "sparse_mla_decode":

        def decode(i: dict[str, Any]) -> Any:
            return ops.sparse_mla_decode(i["q"], i["kv_cache"], i["indices"], **_decode_kwargs(i))

        def decode_reference(i: dict[str, Any]) -> Any:
            return reference.sparse_mla_decode(i["q"], i["kv_cache"], i["indices"], **_decode_kwargs(i))

        slots = sizes["batch"] * seq_kv
        if static["kv_format"] != "fp8":
            flashmla_skip = "FlashMLA's sparse decode takes FP8 caches only"
        else:
            flashmla_skip = "" if _importable("flash_mla") else "flash_mla not importable"
        return [
            Provider("dsa", decode),
            Provider(
                "reference",
                decode_reference,
                skip="" if slots <= REFERENCE_DECODE_MAX_SLOTS else f"capped at B*S_kv <= {REFERENCE_DECODE_MAX_SLOTS}",
            ),
            Provider("flashmla", flashmla_decode, skip=flashmla_skip),
        ]
    if case.kernel == "index_topk_decode":
        pairs = sizes["batch"] * seq * seq_kv

        def paged(fn: Callable[..., Any]) -> Callable[[dict[str, Any]], Any]:
            return lambda i: fn(
                i["q"], i["k_cache"], i["weights"], i["topk"], block_table=i["block_table"], ends=i["ends"],
                starts=i["starts"], return_scores=True,
            )  # fmt: skip

        return [
            Provider("dsa", paged(ops.index_topk_decode)),
            Provider(
                "reference",
                paged(reference.index_topk_decode),
                skip="" if pairs <= REFERENCE_INDEXER_MAX_PAIRS else f"capped at B*s_q*L <= {REFERENCE_INDEXER_MAX_PAIRS}",
            ),
        ]
    if case.kernel in v4.KINDS:
        return v4.providers(case, Provider, _importable)
    raise ValueError(f"no providers for kernel {case.kernel!r}")
