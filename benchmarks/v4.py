"""DeepSeek-V4's benchmark cases (``v4_prefill``, ``v4_decode`` of ``benchmarks.cases``): their inputs, providers and
the ``dsa`` check.

- **Prefill** (one sequence, B = 1): ``q [1, S, H, d]``, the window rows ``kv [1, S, d]`` (K = V) as one row range
  ``[t - W + 1, t + 1)`` per query, the compressed entries ``extra_kv [1, S / m, d]`` as CSA's selection
  (``extra_indices [1, S, k]``: ``k`` distinct entries among the ``(t + 1) // m`` query ``t`` sees, spread over them,
  ``-1`` padding while fewer are visible) or HCA's range ``[0, (t + 1) // m)``, a sink per head. ``dsa`` is
  ``dsa.ops.sparse_mla`` with the two sources; FlashMLA's ``flash_mla_sparse_fwd`` (d_qk 512) takes one index list
  over one ``kv``: the window and the entries concatenated, the ranges written out as indices (built once per input
  set, outside the timing).
- **Decode** (CSA, ``B`` sequences of ``L`` tokens, ``s_q`` new queries each): a window cache holding each
  sequence's last ``W + s_q - 1`` rows (a serving stack's ring buffer; query ``t`` sees rows ``[t, t + W)``, a range
  through its block table) and a compressed cache of ``L / m`` entries per sequence, ``k`` of them selected per query
  as slots, both MODEL1 FP8 (``dsa.kv_format.MODEL1_FP8_LAYOUT``) or bf16. ``dsa`` is ``dsa.ops.sparse_mla_decode``
  (window range + extra source); FlashMLA's ``flash_mla_with_kvcache`` takes both as slot lists (FP8 only).

The check runs ``dsa`` on the whole problem with every launcher output poisoned and compares a slice (the last
queries of the prefill, the first sequences of a decode) with ``dsa.reference``.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import cases as case_data
from benchmarks import problems, runners
from dsa import cache, kv_format, ops, reference, testing

__all__ = ["KINDS", "check", "inputs", "providers", "spread_selection"]

KINDS = case_data.V4_KINDS
CHECK_ROWS = runners.CHECK_ROWS
"""Queries of a prefill the check compares (the last ones: every source is widest there)."""
CHECK_BATCHES = runners.CHECK_BATCHES
"""Sequences of a decode the check compares."""


def spread_selection(visible: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, k]`` int32: for each row, ``min(k, visible)`` distinct positions below ``visible`` (``[n]`` integers),
    ``-1`` after them. With more visible than ``k``, entry ``j`` is drawn from ``[j r, j r + r - 1)`` (``r = visible /
    k >= 1``): distinct, spread over the whole visible range (so the gather touches all of it), random within."""
    v = visible.to(torch.float64).view(-1, 1)
    j = torch.arange(k, device=visible.device, dtype=torch.float64).view(1, -1)
    r = (v / k).clamp_min(1.0)
    u = torch.rand((visible.numel(), k), generator=generator, device=visible.device, dtype=torch.float64)
    spread = torch.floor(j * r + u * (r - 1.0))
    picks = torch.where(v > k, spread, j)
    return torch.where(picks < v, picks, -1.0).to(torch.int32)


def _randn(g: torch.Generator, device: torch.device, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device)


def _prefill_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    s, z = case.static, case.sizes
    seq, heads, d, rate, topk = z["seq_len"], s["heads"], s["d_qk"], s["rate"], z["topk"]
    g = testing.generator(seed, device)
    t = torch.arange(seq, device=device, dtype=torch.int32)
    visible = (t + 1) // rate
    out: dict[str, Any] = {
        "q": _randn(g, device, 1, seq, heads, d).bfloat16(),
        "kv": _randn(g, device, 1, seq, d).bfloat16(),
        "extra_kv": _randn(g, device, 1, max(1, seq // rate), d).bfloat16(),
        "attn_sink": _randn(g, device, heads),
        "ranges": torch.stack([(t - (s["window"] - 1)).clamp_min(0), t + 1], dim=-1).view(1, seq, 2),
        "sm_scale": d**-0.5,
        "d_v": s["d_v"],
    }
    if s["layer"] == "csa":
        out["extra_indices"] = spread_selection(visible, topk, g).view(1, seq, topk)
    else:
        out["extra_ranges"] = torch.stack([torch.zeros_like(visible), visible], dim=-1).view(1, seq, 2)
    return out


def _decode_inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    s, z = case.static, case.sizes
    batch, s_q, context, topk, d, window = z["batch"], z["seq_len"], z["seq_len_kv"], z["topk"], s["d_qk"], s["window"]
    fp8 = s["kv_format"] == "fp8"
    g = testing.generator(seed, device)

    def new_cache(rows: int) -> cache.PagedKVCache:
        kind: Any = "fp8" if fp8 else torch.bfloat16
        layout = kv_format.MODEL1_FP8_LAYOUT if fp8 else None
        paged = cache.PagedKVCache(batch, rows, d, page_size=s["page_size"], dtype=kind, d_rope=s["d_rope"],
                                   device=device, layout=layout)  # fmt: skip
        problems.fill_cache(paged, batch, rows, paged.width,
                            lambda n: _randn(g, device, batch, n, paged.width).bfloat16())  # fmt: skip
        return paged

    def rows_of(paged: cache.PagedKVCache) -> torch.Tensor:
        """The cache as the op takes it: ``[num_pages, page_size, row]`` (MODEL1's split pages in FlashMLA's view)."""
        if not fp8:
            return paged.pages
        return kv_format.flash_mla_kv_view(paged.pages, paged.layout, paged.page_size).squeeze(2)

    windows, entries = new_cache(window + s_q - 1), new_cache(context // s["rate"])
    t = torch.arange(s_q, device=device, dtype=torch.int32).view(1, s_q)
    ranges = torch.stack([t, t + window], dim=-1).expand(batch, s_q, 2).contiguous()
    positions = torch.arange(window, device=device).view(1, 1, window) + t.unsqueeze(-1)
    visible = ((context - s_q + t + 1) // s["rate"]).expand(batch, s_q).reshape(-1)
    selected = spread_selection(visible, topk, g).view(batch, s_q * topk)
    return {
        "q": _randn(g, device, batch, s_q, s["heads"], d).bfloat16(),
        "kv_cache": rows_of(windows),
        "ranges": ranges,
        "block_table": windows.block_table,
        "window_indices": windows.slots(positions.expand(batch, s_q, window).reshape(batch, -1)).view(batch, s_q, -1),
        "extra_kv_cache": rows_of(entries),
        "extra_indices": entries.slots(selected.long()).masked_fill(selected < 0, -1).view(batch, s_q, topk),
        "cache_seqlens": windows.seq_lens,
        "attn_sink": _randn(g, device, s["heads"]),
        "sm_scale": d**-0.5,
        "d_v": s["d_v"],
        "d_rope": s["d_rope"],
    }


def inputs(case: case_data.Case, device: torch.device, seed: int) -> dict[str, Any]:
    """One input set of a V4 case (the module docstring's), on ``device``, random (never zeros)."""
    if case.kernel == case_data.V4_PREFILL:
        return _prefill_inputs(case, device, seed)
    return _decode_inputs(case, device, seed)


# ----------------------------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------------------------
_PREFILL_SOURCES = ("ranges", "extra_kv", "extra_indices", "extra_ranges")


def _prefill(fn: Any) -> Any:
    def run(i: dict[str, Any]) -> Any:
        sources = {k: i[k] for k in _PREFILL_SOURCES if k in i}
        return fn(i["q"], i["kv"], sm_scale=i["sm_scale"], d_v=i["d_v"], attn_sink=i["attn_sink"], **sources)

    return run


def _decode(fn: Any) -> Any:
    def run(i: dict[str, Any]) -> Any:
        return fn(
            i["q"], i["kv_cache"], sm_scale=i["sm_scale"], d_v=i["d_v"], attn_sink=i["attn_sink"], d_rope=i["d_rope"],
            ranges=i["ranges"], block_table=i["block_table"], extra_kv_cache=i["extra_kv_cache"],
            extra_indices=i["extra_indices"],
        )  # fmt: skip

    return run


def _one_list(i: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The window and the entries as one ``kv`` and one index list (FlashMLA's sparse prefill takes one source):
    ``([S + N, 1, d], [S, 1, W + k])``, made once per input set."""
    if "flashmla_sources" not in i:
        seq, skv = i["q"].shape[1], i["kv"].shape[1]
        kv = torch.cat([i["kv"][0], i["extra_kv"][0]]).unsqueeze(1)
        start, end = i["ranges"][0, :, 0], i["ranges"][0, :, 1]
        width = int((end - start).max())
        cols = start.view(-1, 1) + torch.arange(width, device=kv.device, dtype=torch.int32).view(1, -1)
        window_idx = torch.where(cols < end.view(-1, 1), cols, -1)
        if "extra_indices" in i:
            extra = i["extra_indices"][0]
        else:
            visible = i["extra_ranges"][0, :, 1]
            cols = torch.arange(max(1, int(visible.max())), device=kv.device, dtype=torch.int32).view(1, -1)
            extra = torch.where(cols < visible.view(-1, 1), cols, -1)
        extra = torch.where(extra >= 0, extra + skv, -1)
        i["flashmla_sources"] = (kv, torch.cat([window_idx, extra], dim=-1).view(seq, 1, -1).to(torch.int32))
    return i["flashmla_sources"]


def _flashmla_prefill(i: dict[str, Any]) -> Any:
    import flash_mla  # type: ignore[import-not-found]

    kv, idx = _one_list(i)
    return flash_mla.flash_mla_sparse_fwd(i["q"][0], kv, idx, i["sm_scale"], i["d_v"], i["attn_sink"])


def flashmla_decode(i: dict[str, Any], module: Any = None) -> Any:
    """FlashMLA's MODEL1 sparse decode (``module`` default ``flash_mla``; ``dsa.compat`` takes the same call): the
    window as ``k_cache``/``indices`` (slots), the entries as ``extra_k_cache``/``extra_indices_in_kvcache``."""
    if module is None:
        import flash_mla as module  # type: ignore[import-not-found,no-redef]

    q, indices, extra = i["q"], i["window_indices"], i["extra_indices"]
    plans = i.setdefault("flashmla_metadata", {})
    if module.__name__ not in plans:
        heads = q.shape[2]
        plans[module.__name__] = module.get_mla_metadata(i["cache_seqlens"], q.shape[1] * heads, 1, heads, True,
                                                         indices.shape[-1])  # fmt: skip
    metadata, splits = plans[module.__name__]
    return module.flash_mla_with_kvcache(
        q, i["kv_cache"].unsqueeze(2), None, None, i["d_v"], metadata, splits, softmax_scale=i["sm_scale"],
        is_fp8_kvcache=True, indices=indices, attn_sink=i["attn_sink"], extra_k_cache=i["extra_kv_cache"].unsqueeze(2),
        extra_indices_in_kvcache=extra,
    )  # fmt: skip


def providers(case: case_data.Case, provider: Any, importable: Any) -> list[Any]:
    """The providers of a V4 case: ``dsa``, ``reference``, ``flashmla`` (``provider`` is the Provider class and
    ``importable`` the module check of ``benchmarks.providers``)."""
    flashmla_skip = "" if importable("flash_mla") else "flash_mla not importable"
    if case.kernel == case_data.V4_PREFILL:
        return [
            provider("dsa", _prefill(ops.sparse_mla)),
            provider("reference", _prefill(reference.sparse_mla)),
            provider("flashmla", _flashmla_prefill, skip=flashmla_skip),
        ]
    if case.static["kv_format"] != "fp8":
        flashmla_skip = "FlashMLA's sparse decode takes FP8 caches only"
    return [
        provider("dsa", _decode(ops.sparse_mla_decode)),
        provider("reference", _decode(reference.sparse_mla_decode)),
        provider("flashmla", flashmla_decode, skip=flashmla_skip),
    ]


# ----------------------------------------------------------------------------------------------------------------------
# The dsa check
# ----------------------------------------------------------------------------------------------------------------------
def _narrow(case: case_data.Case, i: dict[str, Any], out: tuple[torch.Tensor, ...]) -> tuple[dict[str, Any], tuple]:
    """The last :data:`CHECK_ROWS` queries of a prefill, the first :data:`CHECK_BATCHES` sequences of a decode."""
    if case.kernel == case_data.V4_PREFILL:
        rows = slice(max(0, i["q"].shape[1] - CHECK_ROWS), i["q"].shape[1])
        per_query = ("q", "ranges", "extra_indices", "extra_ranges")
        narrowed = {k: (v[:, rows] if k in per_query else v) for k, v in i.items()}
        return narrowed, tuple(t[:, rows] for t in out)
    n = CHECK_BATCHES
    per_sequence = ("q", "ranges", "block_table", "extra_indices")
    return {k: (v[:n] if k in per_sequence else v) for k, v in i.items()}, tuple(t[:n] for t in out)


def check(case: case_data.Case, i: dict[str, Any]) -> str | None:
    """``None`` when ``dsa`` (on the whole input set, run by the caller under poisoned outputs) matches the
    reference on a slice of the problem; else the first problem. Tolerances are the tuner's
    (``benchmarks.problems.compare_attention``)."""
    prefill = case.kernel == case_data.V4_PREFILL
    run = _prefill(ops.sparse_mla) if prefill else _decode(ops.sparse_mla_decode)
    want = _prefill(reference.sparse_mla) if prefill else _decode(reference.sparse_mla_decode)
    narrowed, got = _narrow(case, i, run(i))
    return problems.compare_attention(got, want(narrowed))
