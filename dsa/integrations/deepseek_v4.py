"""The forward of a DeepSeek-V4 attention layer (sliding, CSA and HCA) through the public ops.

``dsa.integrations.transformers.apply_dsa`` installs :func:`v4_attention_forward` as the ``forward`` of every
``DeepseekV4Attention``. It reads the layer's own parameters by transformers' attribute names (``q_a_proj``,
``q_a_norm``, ``q_b_proj``, ``q_b_norm``, ``kv_proj``, ``kv_norm``, ``o_a_proj``, ``o_b_proj``, ``sinks``,
``compressor.{kv_proj, gate_proj, position_bias, kv_norm, rotary_emb}``, ``compressor.indexer.{kv_proj, gate_proj,
position_bias, kv_norm, rotary_emb, q_b_proj, scorer.weights_proj}``) and creates none, so parameters and
``state_dict()`` stay as they were. Nothing here imports transformers: the layer is used through those attributes,
the cache through its V4 layers' methods (``update``, ``store_compression_weights``, ``update_compressor_states``,
``overlap_kv``/``overlap_gate``).

Per layer and forward (``B`` batch, ``S`` new tokens, ``W`` the sliding window, ``D`` head_dim, ``m`` the rate):

1. **Query and window rows**: ``q = rope(q_b_norm(q_b_proj(q_a_norm(q_a_proj(h)))))`` ``[B, S, H, D]`` and the
   K = V rows ``rope(kv_norm(kv_proj(h)))``, appended to transformers' sliding-window cache (its ``update`` returns
   the last ``W - 1`` cached rows plus the new ones). RoPE is V4's interleaved one on the last ``r`` dims.
2. **Compressed entries** (CSA and HCA layers): ``dsa.ops.compress_kv`` pools the whole windows the cache's buffer
   releases (``store_compression_weights``), CSA with the previous window's ``Ca`` rows carried in the cache layer's
   ``overlap_kv``/``overlap_gate`` (raw gates: the op adds ``position_bias``), then ``kv_norm`` and RoPE at the
   window's first position; the running entries come from ``update_compressor_states``.
3. **Selection** (CSA): the indexer's own entries (the same pooling at ``index_head_dim``) and
   ``dsa.ops.index_topk`` with ``starts = 0``, ``ends = (position_id + 1) // m``: query ``t`` sees entry ``w`` iff
   ``w < (t + 1) // m``. The scorer's ``index_head_dim**-0.5 * index_n_heads**-0.5`` is folded into the weights.
4. **Attention** (:func:`attend`, ``dsa.ops.sparse_mla`` with two sources): the window rows (a row range per query)
   and the compressed entries (CSA's selection, or HCA's range of visible entries) in one softmax with the per-head
   sink, K = V (``d_v = D``), ``sm_scale = module.scaling``; then inverse RoPE on the output's RoPE dims and the
   grouped output projection. Steps of at most ``latent_attention.DECODE_MAX_QUERIES`` tokens without gradients run
   ``dsa.ops.sparse_mla_decode`` over the same rows instead (as the V3.2/GLM-5 layers do).

Visibility follows transformers' eager model exactly: the window is ``[p - W + 1, p]`` in cache positions
intersected with the padding mask's range (``KeyRanges``); compressed entries use the layer's ``position_ids``
(``w < (position_id + 1) // m``), except that an HCA layer's single-token step sees every entry (transformers' HCA
builds no mask for one query). Entries pool raw rows, pad tokens included, as transformers' do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsa import ops
from dsa.integrations.latent_attention import decode_step, page_slots
from dsa.integrations.visibility import from_layer_mask

__all__ = ["CSA", "HCA", "SLIDING", "attend", "rope_v4", "v4_attention_forward"]

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
"""transformers' three V4 layer types: the window only, window + selected entries, window + every entry."""


def rope_v4(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """V4's interleaved RoPE on the last ``2 * cos.shape[-1]`` dims of ``x``, in float32, rounded to x's dtype
    (transformers' arithmetic, so rows equal the eager model's bit for bit).

    Args:
        x (torch.Tensor): ``[..., D]``.
        cos, sin (torch.Tensor): broadcastable to ``[..., r / 2]``: one angle per adjacent pair.

    Returns:
        ``[..., D]`` in x's dtype; the first ``D - r`` dims unchanged.
    """
    cos = cos.repeat_interleave(2, dim=-1)
    sin = sin.repeat_interleave(2, dim=-1)
    width = cos.shape[-1]
    nope, rope = x[..., :-width], x[..., -width:]
    # The pair (a, b) rotates to (a cos - b sin, b cos + a sin): swap within pairs, negating the first.
    swapped = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    rotated = (rope.float() * cos + swapped.float() * sin).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)


def _cache_layer(cache: Any, layer_idx: int) -> Any:
    return cache.layers[layer_idx] if cache is not None else None


def _compressed_entries(
    part: nn.Module, hidden: torch.Tensor, cache_layer: Any, name: str, rate: int, overlap: bool, dim: int
) -> torch.Tensor:
    """Every compressed entry so far ``[B, N, dim]`` of ``part`` (a compressor or the indexer: ``kv_proj``,
    ``gate_proj``, ``position_bias``, ``kv_norm``, ``rotary_emb``): the whole windows this forward completes pooled
    with ``dsa.ops.compress_kv``, normed and roped at their first positions, appended to the cache's ``name`` state
    (without a cache: this forward's whole windows only, the rest dropped, as transformers does)."""
    batch = hidden.shape[0]
    kv, gate = part.kv_proj(hidden), part.gate_proj(hidden)
    prev_kv = prev_gate = None
    if cache_layer is None:
        usable = kv.shape[1] // rate * rate
        kv, gate, first = kv[:, :usable], gate[:, :usable], 0
    else:
        kv, gate, first = cache_layer.store_compression_weights(name, kv, gate)
        if overlap:
            prev_kv, prev_gate = cache_layer.overlap_kv[name], cache_layer.overlap_gate[name]
    windows = kv.shape[1] // rate
    if windows == 0:
        entries = kv.new_zeros((batch, 0, dim))
    else:
        bias = part.position_bias.float()
        entries = ops.compress_kv(kv, gate, bias, rate=rate, overlap=overlap, prev_kv=prev_kv, prev_gate=prev_gate)
        if overlap and cache_layer is not None:
            # The next forward's window 0 pools this forward's last window's Ca rows (raw gates: the op adds the bias).
            cache_layer.overlap_kv[name] = kv[:, -rate:, :dim].clone()
            cache_layer.overlap_gate[name] = gate[:, -rate:, :dim].clone()
        entries = part.kv_norm(entries)
        positions = (torch.arange(windows, device=hidden.device) * rate + first).unsqueeze(0).expand(batch, -1)
        cos, sin = part.rotary_emb(entries, position_ids=positions, layer_type="compress")
        entries = rope_v4(entries, cos, sin)
    if cache_layer is not None:
        entries = cache_layer.update_compressor_states(name, entries)
    return entries


def _select(
    indexer: nn.Module, hidden: torch.Tensor, q_residual: torch.Tensor, position_ids: torch.Tensor, cache_layer: Any,
    entry_ends: torch.Tensor,
) -> torch.Tensor | None:  # fmt: skip
    """CSA's selection ``[B, S, k]`` int32 entry numbers (``-1`` padding) with ``dsa.ops.index_topk`` over the
    indexer's own compressed keys; None when there is no entry yet."""
    batch, seq, _ = hidden.shape
    rate, heads, dim = indexer.compress_rate, indexer.num_heads, indexer.head_dim
    keys = _compressed_entries(indexer, hidden, cache_layer, "indexer", rate, True, dim)
    if keys.shape[1] == 0:
        return None
    cos, sin = indexer.rotary_emb(hidden, position_ids=position_ids, layer_type="compress")
    q = rope_v4(indexer.q_b_proj(q_residual).view(batch, seq, heads, dim), cos.unsqueeze(2), sin.unsqueeze(2))
    scorer = indexer.scorer
    # transformers scales relu(q . k) by softmax_scale and the weights by weights_scaling; both fold into the weights.
    weights = scorer.weights_proj(hidden).float() * (scorer.weights_scaling * scorer.softmax_scale)
    # Always index_topk wide (-1 padding while fewer entries are visible), not min(index_topk, N) as transformers:
    # the kernels compile per top-k width, and N grows by one every m tokens while decoding.
    starts = torch.zeros_like(entry_ends)
    return ops.index_topk(q, keys.to(q.dtype), weights, int(indexer.index_topk), starts=starts, ends=entry_ends)


def attend(
    q: torch.Tensor, window: torch.Tensor, window_starts: torch.Tensor, window_ends: torch.Tensor,
    entries: torch.Tensor | None, selected: torch.Tensor | None, entry_ends: torch.Tensor | None, sinks: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:  # fmt: skip
    """V4's attention: the window rows and the compressed entries in one softmax with the sink, K = V, through
    ``dsa.ops.sparse_mla``'s two sources: the window as one row range per query, the entries as CSA's selection
    (an index list) or HCA's range ``[0, entry_ends)``, so nothing of size ``S x W`` or ``S x N`` is built.

    Args:
        q (torch.Tensor): ``[B, S, H, D]``, the model's dtype.
        window (torch.Tensor): ``[B, L, D]``: the sliding-window rows (cache rows plus this forward's).
        window_starts, window_ends (torch.Tensor): ``[B, S]`` int32, each query's visible rows of ``window``
            (an empty or inverted range sees nothing).
        entries (torch.Tensor | None): ``[B, N, D]`` compressed entries (None or ``N = 0``: the window only).
        selected (torch.Tensor | None): ``[B, S, k]`` int32 entry numbers, ``-1`` padding (CSA), or None: every
            entry below ``entry_ends`` (HCA).
        entry_ends (torch.Tensor | None): ``[B, S]`` int32, HCA's visible entries ``[0, entry_ends)``.
        sinks (torch.Tensor): ``[H]`` float32, a logit per head in the softmax denominator.
        sm_scale (float): the logit scale.

    Returns:
        ``[B, S, H, D]`` in q's dtype (0 where a query sees nothing).
    """
    ranges = torch.stack([window_starts, window_ends], dim=-1).to(torch.int32)
    has_entries = entries is not None and entries.shape[1] > 0
    entry_ranges = None
    if has_entries and selected is None:
        entry_ranges = torch.stack([torch.zeros_like(entry_ends), entry_ends], dim=-1).to(torch.int32)
    # The sinks are trainable: a step that wants their gradient runs sparse_mla (the decode op is forward only).
    tensors = (q, window, sinks, entries) if has_entries else (q, window, sinks)
    if decode_step(q.shape[1], *tensors):
        return _attend_decode(q, window, ranges, entries if has_entries else None, selected, entry_ranges, sinks,
                              sm_scale)  # fmt: skip
    extra: dict[str, torch.Tensor] = {}
    if has_entries:
        extra["extra_kv"] = entries.to(window.dtype)
        if selected is not None:
            extra["extra_indices"] = selected.to(torch.int32)
        else:
            extra["extra_ranges"] = entry_ranges
    out, _ = ops.sparse_mla(q, window, sm_scale=sm_scale, d_v=q.shape[-1], attn_sink=sinks, ranges=ranges, **extra)
    return out


def _attend_decode(
    q: torch.Tensor, window: torch.Tensor, ranges: torch.Tensor, entries: torch.Tensor | None,
    selected: torch.Tensor | None, entry_ranges: torch.Tensor | None, sinks: torch.Tensor, sm_scale: float,
) -> torch.Tensor:  # fmt: skip
    """:func:`attend` for a step of a few tokens without gradients: ``dsa.ops.sparse_mla_decode`` over the window rows
    and the entries, each viewed as ``B`` pages of one sequence (its kernel splits each query's keys over thread
    blocks, where ``sparse_mla``'s has ``B * ceil(H / 64)`` blocks for one token): the ranges through a one-page
    block table per sequence (the op lists their slots: ``O(B * s_q * (W + N))``, what the kernel reads), CSA's
    selected entries as slots ``b * N + entry``."""
    pages = torch.arange(q.shape[0], device=q.device, dtype=torch.int32).view(-1, 1)
    extra: dict[str, torch.Tensor] = {}
    if entries is not None:
        extra["extra_kv_cache"] = entries.to(window.dtype).contiguous()
        if selected is None:
            extra["extra_ranges"], extra["extra_block_table"] = entry_ranges, pages
        else:
            extra["extra_indices"] = page_slots(selected, entries.shape[1])
    # d_rope only describes FP8 rows; these caches hold the model's dtype, so any width <= d_qk serves.
    out, _ = ops.sparse_mla_decode(q, window.contiguous(), ranges=ranges, block_table=pages, sm_scale=sm_scale,
                                   d_v=q.shape[-1], attn_sink=sinks, d_rope=min(64, q.shape[-1]), **extra)  # fmt: skip
    return out


def v4_attention_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]],
    position_ids: torch.Tensor,
    attention_mask: object = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One DeepSeek-V4 attention layer on the ops (the module docstring's steps).

    Args:
        module (nn.Module): transformers' ``DeepseekV4Attention``.
        hidden_states (torch.Tensor): ``[B, S, hidden_size]``, the model's dtype.
        position_embeddings (dict): ``{"main": (cos, sin), "compress": (cos, sin)}``, each ``[B or 1, S, r / 2]``.
        position_ids (torch.Tensor): ``[B or 1, S]`` integer positions (the compressed entries' visibility).
        attention_mask (object): ``KeyRanges`` ``[B, S]`` in cache positions (``apply_dsa``'s model wrapper), a
            dense ``[B, 1, S, L]`` mask over the window rows, or None (causal).
        cache (Any): transformers' ``DynamicCache`` with V4's cache layers, or None; ``past_key_values`` in
            ``kwargs`` is taken as its old name.

    Returns:
        ``(out [B, S, hidden_size], None)``.
    """
    if cache is None:
        cache = kwargs.get("past_key_values")
    batch, seq, _ = hidden_states.shape
    heads, dim, window_size = module.num_heads, module.head_dim, int(module.sliding_window)
    cos, sin = position_embeddings[module.rope_layer_type]
    cache_layer = _cache_layer(cache, module.layer_idx)

    q_residual = module.q_a_norm(module.q_a_proj(hidden_states))
    q = module.q_b_norm(module.q_b_proj(q_residual).view(batch, seq, heads, dim))
    q = rope_v4(q, cos.unsqueeze(2), sin.unsqueeze(2))
    kv = rope_v4(module.kv_norm(module.kv_proj(hidden_states)), cos, sin)
    window = kv
    if cache is not None:
        window = cache.update(kv.unsqueeze(1), kv.unsqueeze(1), module.layer_idx)[0][:, 0]
    # The window rows' first cache position: the cache returns its last W - 1 rows before this forward's.
    offset = (int(cache.get_seq_length(module.layer_idx)) if cache is not None else seq) - window.shape[1]
    total = offset + window.shape[1]
    ranges = from_layer_mask(attention_mask, batch=batch, seq=seq, past=total - seq, offset=offset,
                             device=hidden_states.device, op="v4_attention_forward")  # fmt: skip
    query_positions = torch.arange(seq, device=q.device, dtype=torch.int32) + (total - seq)
    window_starts = torch.maximum(ranges.starts, query_positions - window_size + 1) - offset
    window_ends = ranges.ends - offset

    entries = selected = entry_ends = None
    compressor = module.compressor
    if compressor is not None:
        rate, overlap = int(compressor.compress_rate), module.layer_type == CSA
        entries = _compressed_entries(compressor, hidden_states, cache_layer, "compressor", rate, overlap, dim)
        count = entries.shape[1]
        visible = (position_ids.to(torch.int64).expand(batch, seq) + 1) // rate
        if module.layer_type == HCA and seq == 1:
            visible = torch.full_like(visible, count)
        entry_ends = visible.clamp(0, count).to(torch.int32)
        if overlap:
            selected = _select(compressor.indexer, hidden_states, q_residual, position_ids, cache_layer, entry_ends)
            if selected is None:
                entries = None

    out = attend(q, window, window_starts, window_ends, entries, selected, entry_ends, module.sinks.float(),
                 float(module.scaling))  # fmt: skip
    out = rope_v4(out, cos.unsqueeze(2), -sin.unsqueeze(2))
    grouped = module.o_a_proj(out.reshape(batch, seq, module.config.o_groups, -1)).flatten(2)
    return module.o_b_proj(grouped), None
