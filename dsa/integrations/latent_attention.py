"""The forward of a DeepSeek-V3.2 / GLM-5 attention layer in the latent (absorbed) form, through the public ops.

This is what ``dsa.integrations.transformers.apply_dsa`` installs as each attention layer's ``forward``. It reads
the layer's own parameters by transformers' attribute names (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``, ``scaling``, ``indexer.{wq_b, wk, k_norm,
weights_proj}``) and creates none, so parameters and ``state_dict()`` stay as they were. Nothing here imports
transformers: the layer is used through those attributes and the cache through its ``update``/``update_indexer``.

Per layer and forward (``B`` batch, ``S`` new tokens, ``T`` cached keys after this step, ``H`` heads, ``R =
kv_lora_rank``, ``r = qk_rope_head_dim``, ``H_i x D_i`` indexer heads):

1. **Latent rows**: ``kv = [kv_a_layernorm(kv_pass), rope(k_rot)]`` ``[B, T, R + r]``: the cache rows transformers
   stores (its ``DynamicCache``/``StaticCache`` keep the two parts as the layer's keys and values), concatenated.
2. **Selection** (``dsa.ops.index_topk``, under ``no_grad`` like transformers' indexer): the indexer's query from
   ``q_resid`` and key from the hidden states, RoPE on their first ``r`` dims (V3.2 half-split, GLM-5 interleaved),
   ``H_i**-0.5 * D_i**-0.5`` folded into the weights, the keys cached through ``cache.update_indexer``; visibility
   as one key range per query (``dsa.integrations.visibility``), so no ``[S, T]`` tensor is built. GLM-5's
   ``"shared"`` layers reuse the previous full layer's selection, as transformers does.
3. **Attention** (``dsa.ops.sparse_mla``): the query absorbed through ``kv_b_proj``'s key half (``q_nope @ W_uk``
   ``[B, S, H, R]``, then the roped part), ``sm_scale = module.scaling`` (YaRN's mscale included), ``d_v = R``; the
   latent output goes through ``kv_b_proj``'s value half and ``o_proj``. Steps of at most ``DECODE_MAX_QUERIES``
   tokens without gradients run ``dsa.ops.sparse_mla_decode`` instead, over the same rows viewed as ``B`` pages of
   ``T`` slots: its kernel splits each query's key list over thread blocks (flash-decoding), where ``sparse_mla``'s
   kernel has only ``B * ceil(H / 64)`` blocks for one token. The selection stays ``index_topk`` in both: the paged
   ``index_topk_decode`` runs the same fused kernel and would only add a block table over a contiguous cache.

The absorption products run in float32 for bfloat16/float16 models (then round once to the model's dtype for the
kernels); float32 models stay float32 end to end (the reference backend).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from dsa import ops, training
from dsa.integrations.visibility import KeyRanges, from_layer_mask

__all__ = [
    "DECODE_MAX_QUERIES",
    "INDEXER_STAGES",
    "LayerSpec",
    "decode_step",
    "latent_attention_forward",
    "page_slots",
    "rope_half_split",
    "rope_interleaved",
]

DECODE_MAX_QUERIES = 4
"""Steps with at most this many new tokens (one token plus speculative ones) attend with ``sparse_mla_decode``."""


def decode_step(seq: int, *tensors: torch.Tensor) -> bool:
    """Whether a step of ``seq`` new tokens attends with ``sparse_mla_decode`` (forward only): at most
    :data:`DECODE_MAX_QUERIES` tokens and no gradient wanted for any of ``tensors``."""
    return seq <= DECODE_MAX_QUERIES and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def page_slots(rows: torch.Tensor, count: int) -> torch.Tensor:
    """Row numbers ``[B, ...]`` (``-1`` invalid) of a ``[B, count, D]`` tensor as slots of it viewed as ``B`` pages
    of ``count`` rows (``b * count + row``), int32."""
    base = torch.arange(rows.shape[0], device=rows.device, dtype=torch.int32) * count
    base = base.view(-1, *[1] * (rows.dim() - 1))
    return torch.where(rows >= 0, rows + base, -1).to(torch.int32)

INDEXER_STAGES = ("dense", "sparse")
"""Indexer training stages of the V3.2 recipe (``dsa.training``): dense warm-up, sparse training."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What differs between the model families, per attention layer.

    Attributes:
        interleaved_index_rope (bool): the indexer's RoPE pairs adjacent dims (GLM-5) instead of the two halves
            (DeepSeek-V3.2).
        returns_indices (bool): the layer returns ``(out, weights, topk_indices)`` and takes ``prev_topk_indices``
            (GLM-5's cross-layer sharing) instead of ``(out, weights)``.
        shared (bool): this layer reuses the previous full layer's selection (GLM-5 ``indexer_types == "shared"``).
    """

    interleaved_index_rope: bool
    returns_indices: bool
    shared: bool


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE over adjacent pairs ``(x0, x1), (x2, x3), ...``, written out as transformers lays it out (the rotated
    even elements, then the rotated odd ones), so cached rows equal the eager model's bit for bit.

    Args:
        x (torch.Tensor): ``[..., r]``.
        cos, sin (torch.Tensor): broadcastable to ``[..., r]``, each half holding the pair angles (``cat(f, f)``).

    Returns:
        ``[..., r]``, x's dtype.
    """
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * c - odd * s, odd * c + even * s], dim=-1)


def rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE over the pairs ``(x_i, x_{i + r/2})`` (the two halves: DeepSeek-V3.2's indexer).

    Args:
        x (torch.Tensor): ``[..., r]``.
        cos, sin (torch.Tensor): broadcastable to ``[..., r]``.

    Returns:
        ``[..., r]``, x's dtype.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the absorption products run: float32 for the 16-bit dtypes, the model's dtype otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _index_inputs(
    module: nn.Module,
    spec: LayerSpec,
    hidden_states: torch.Tensor,
    q_resid: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The indexer's ``(q [B, S, H_i, D_i], k [B, T, D_i], weights [B, S, H_i] float32)`` for ``dsa.ops.index_topk``
    (q/k in the model's dtype), the new keys appended to the cache's indexer keys."""
    indexer = module.indexer
    batch, seq, _ = hidden_states.shape
    heads, dim, rope = indexer.n_heads, indexer.head_dim, indexer.qk_rope_head_dim
    rope_fn = rope_interleaved if spec.interleaved_index_rope else rope_half_split
    q = indexer.wq_b(q_resid).view(batch, seq, heads, dim)
    q = torch.cat([rope_fn(q[..., :rope], cos.unsqueeze(2), sin.unsqueeze(2)), q[..., rope:]], dim=-1)
    k = indexer.k_norm(indexer.wk(hidden_states))
    k = torch.cat([rope_fn(k[..., :rope], cos, sin), k[..., rope:]], dim=-1)
    if cache is not None:
        k = cache.update_indexer(k, module.layer_idx)
    # transformers scales the logits by D_i**-0.5 and the weights by H_i**-0.5; relu(c x) = c relu(x) for c > 0,
    # so both fold into the weights.
    proj = indexer.weights_proj
    weights = proj(hidden_states.to(proj.weight.dtype)).float() * (heads**-0.5 * dim**-0.5)
    return q, k, weights


def _dense_indices(ranges: KeyRanges, seq_kv: int) -> torch.Tensor:
    """Every visible key of every query, ``[B, S, T]`` int32, ``-1`` where hidden (the dense warm-up's attention)."""
    keys = torch.arange(seq_kv, device=ranges.starts.device, dtype=torch.int32)
    visible = (keys >= ranges.starts.unsqueeze(-1)) & (keys < ranges.ends.unsqueeze(-1))
    return torch.where(visible, keys, -1)


def _attend(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int, d_rope: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, S, H, d_v], lse [B, S, H])`` of sparse MLA: the decode op for short steps without gradients (its
    slots are ``b * T + position`` over the rows viewed as ``B`` pages of ``T``), ``sparse_mla`` otherwise."""
    if not decode_step(q.shape[1], q, kv):
        return ops.sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=d_v)
    slots = page_slots(indices, kv.shape[1])
    return ops.sparse_mla_decode(q, kv.contiguous(), slots, sm_scale=sm_scale, d_v=d_v, d_rope=d_rope)


def latent_attention_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: object = None,
    cache: Any = None,
    position_ids: torch.Tensor | None = None,
    prev_topk_indices: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None] | tuple[torch.Tensor, None, torch.Tensor]:
    """One attention layer of DeepSeek-V3.2 or GLM-5 as DSA in the latent form (the module docstring's steps).

    Args:
        module (nn.Module): transformers' ``DeepseekV32Attention``/``GlmMoeDsaAttention``, with ``_dsa_spec``.
        hidden_states (torch.Tensor): ``[B, S, hidden_size]``, the model's dtype.
        position_embeddings (tuple): ``(cos, sin)``, each ``[B or 1, S, r]``, from the model's rotary embedding.
        attention_mask (object): ``KeyRanges`` ``[B, S]`` (from ``apply_dsa``'s model wrapper), a dense
            ``[B, 1, S, T]`` mask, or None (causal behind the cache).
        cache (Any): transformers' ``Cache`` (``DynamicCache``, ``StaticCache``) or None; ``past_key_values`` in
            ``kwargs`` is taken as its old name.
        position_ids (torch.Tensor | None): unused (RoPE comes in ``position_embeddings``), as in transformers.
        prev_topk_indices (torch.Tensor | None): ``[B, S, k]`` int32, the previous full layer's selection (GLM-5).

    Returns:
        ``(out [B, S, hidden_size], None)``, and for GLM-5 also the selection ``[B, S, k]`` int32 (``-1`` padding)
        that a following ``"shared"`` layer reuses.
    """
    spec: LayerSpec = module._dsa_spec
    if cache is None:
        cache = kwargs.get("past_key_values")
    batch, seq, _ = hidden_states.shape
    heads, nope, rope = module.num_heads, module.qk_nope_head_dim, module.qk_rope_head_dim
    rank, d_v = module.kv_lora_rank, module.v_head_dim
    cos, sin = position_embeddings
    past = int(cache.get_seq_length(module.layer_idx)) if cache is not None else 0
    ranges = from_layer_mask(attention_mask, batch=batch, seq=seq, past=past, offset=0, device=hidden_states.device,
                             op="latent_attention_forward")  # fmt: skip

    q_resid = module.q_a_layernorm(module.q_a_proj(hidden_states))
    q = module.q_b_proj(q_resid).view(batch, seq, heads, nope + rope)
    q_nope, q_rot = q[..., :nope], rope_interleaved(q[..., nope:], cos.unsqueeze(2), sin.unsqueeze(2))
    kv_pass, k_rot = torch.split(module.kv_a_proj_with_mqa(hidden_states), [rank, rope], dim=-1)
    k_pass = module.kv_a_layernorm(kv_pass)
    k_rot = rope_interleaved(k_rot, cos, sin)
    if cache is not None:
        # transformers caches the normed latent as the layer's keys and the roped part as its values, [B, 1, T, *].
        k_pass, k_rot = (t[:, 0] for t in cache.update(k_pass.unsqueeze(1), k_rot.unsqueeze(1), module.layer_idx))
    kv = torch.cat([k_pass, k_rot], dim=-1)  # [B, T, R + r]
    seq_kv = kv.shape[1]
    topk = min(module.config.index_topk, seq_kv)

    stage = getattr(module, "_dsa_indexer_stage", None)
    training_indexer = stage is not None and not spec.shared and torch.is_grad_enabled()
    selected_scores = None
    if spec.shared:
        if prev_topk_indices is None:
            raise ValueError("latent_attention_forward: a shared DSA layer needs prev_topk_indices from a full layer")
        indices = prev_topk_indices
    else:
        # transformers' indexer runs under no_grad; a user training the indexer gets a graph from detached inputs,
        # so the indexer loss reaches the indexer's weights and nothing else.
        with torch.set_grad_enabled(training_indexer):
            inputs = (hidden_states.detach(), q_resid.detach()) if training_indexer else (hidden_states, q_resid)
            q_i, k_i, w_i = _index_inputs(module, spec, *inputs, cos, sin, cache)
            if training_indexer and stage == "sparse":
                indices, selected_scores = ops.index_topk(
                    q_i, k_i, w_i, topk, starts=ranges.starts, ends=ranges.ends, return_scores=True
                )
            else:
                indices = ops.index_topk(q_i.detach(), k_i.detach(), w_i.detach(), topk, starts=ranges.starts,
                                         ends=ranges.ends)  # fmt: skip
    attend_indices = _dense_indices(ranges, seq_kv) if training_indexer and stage == "dense" else indices

    compute = _compute_dtype(hidden_states.dtype)
    w_kv = module.kv_b_proj.weight.view(heads, nope + d_v, rank)
    w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]
    q_latent = torch.einsum("bshn,hnr->bshr", q_nope.to(compute), w_uk.to(compute))
    q_full = torch.cat([q_latent.to(kv.dtype), q_rot.to(kv.dtype)], dim=-1)  # [B, S, H, R + r]
    out_latent, lse = _attend(q_full, kv, attend_indices, float(module.scaling), rank, rope)
    out = torch.einsum("bshr,hvr->bshv", out_latent.to(compute), w_uv.to(compute))
    out = module.o_proj(out.reshape(batch, seq, heads * d_v).to(hidden_states.dtype))

    if training_indexer:
        mass = training.attention_mass_on_indices(
            q_full.detach(), kv.detach(), attend_indices, lse.detach(), float(module.scaling)
        )
        if stage == "dense":
            scores = ops.index_scores(q_i, k_i, w_i, starts=ranges.starts, ends=ranges.ends)
            module.dsa_indexer_loss = training.dense_warmup_loss(mass, scores)
        else:
            module.dsa_indexer_loss = training.sparse_stage_loss(mass, selected_scores)
    if spec.returns_indices:
        return out, None, indices
    return out, None
