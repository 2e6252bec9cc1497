"""MLA with DeepSeek Sparse Attention (``DSAttention``), absorbed form: prefill through ``dsa.ops.sparse_mla``, dense
warm-up in PyTorch, and the cached decode step (``forward_cached``) through ``dsa.serving.model_cache``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsa import ops
from dsa.models import training
from dsa.models.config import DENSE, DENSE_SCORES, SELECTED_SCORES, SPARSE, AttentionMode, DSAConfig
from dsa.models.indexer import LightningIndexer, _linear
from dsa.models.rope import apply_rope, rope_cos_sin, rope_cos_sin_at, rope_inv_freq
from dsa.reference import compute_dtype
from dsa.serving import model_cache


@dataclass
class AttentionAux:
    """Per-layer quantities the indexer losses need (``DSAttention.forward(..., return_aux=True)``).

    Attributes:
        index_scores (torch.Tensor): float32 index scores, differentiable in the indexer: ``[B, S, S]`` over every
            position in dense mode, ``[B, S, k]`` at ``indices`` (``-inf`` at ``-1``) in sparse mode.
        indices (torch.Tensor): ``[B, S, k]`` int32, the indexer's selection.
        attn_target (torch.Tensor): detached main-attention mass summed over heads: ``[B, S, S]`` over every causal
            position in dense mode, ``[B, S, k]`` over ``indices`` in sparse mode (0 at invalid entries).
        mode (str): ``"dense"`` or ``"sparse"``.
    """

    index_scores: torch.Tensor
    indices: torch.Tensor
    attn_target: torch.Tensor
    mode: str


class DSAttention(nn.Module):
    """MLA with DeepSeek Sparse Attention (absorbed form; see the ``dsa.models`` docstring).

    ``mode = "sparse"`` (default): each query attends to the indexer's top-k through ``dsa.ops.sparse_mla``.
    ``mode = "dense"``: full causal attention (the warm-up stage); the indexer runs only when ``return_aux``. It
    materialises the ``[B, S, H, S]`` probabilities in PyTorch (their head sum is the warm-up target), so it suits
    warm-up lengths, not long contexts.
    """

    def __init__(self, config: DSAConfig) -> None:
        super().__init__()
        self.config = config
        self.mode: AttentionMode = SPARSE
        h = config.n_heads
        self.wq_a = _linear(config.dim, config.q_lora_rank)
        self.q_norm = nn.RMSNorm(config.q_lora_rank, eps=config.norm_eps)
        self.wq_b = _linear(config.q_lora_rank, h * config.qk_head_dim)
        self.wkv_a = _linear(config.dim, config.kv_lora_rank + config.qk_rope_head_dim)
        self.kv_norm = nn.RMSNorm(config.kv_lora_rank, eps=config.norm_eps)
        self.wkv_b = _linear(config.kv_lora_rank, h * (config.qk_nope_head_dim + config.v_head_dim))
        self.wo = _linear(h * config.v_head_dim, config.dim)
        self.indexer = LightningIndexer(config)
        # A plain float32 attribute, not a buffer: module.to(bfloat16) must not round the RoPE frequencies.
        self.inv_freq = rope_inv_freq(config)

    def latent_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The absorbed query, the latent KV and the query low-rank activation.

        Returns:
            q ``[B, S, H, kv_lora_rank + qk_rope]``, kv ``[B, S, kv_lora_rank + qk_rope]`` (x's dtype, contiguous)
            and q_lora ``[B, S, q_lora_rank]``.
        """
        config = self.config
        batch, seq, _ = x.shape
        q_lora = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lora).view(batch, seq, config.n_heads, config.qk_head_dim)
        q_nope, q_pe = q.split([config.qk_nope_head_dim, config.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, interleaved=True)
        kv_c, k_pe = self.wkv_a(x).split([config.kv_lora_rank, config.qk_rope_head_dim], dim=-1)
        kv_c = self.kv_norm(kv_c)
        k_pe = apply_rope(k_pe, cos, sin, interleaved=True)
        w_uk = self._wkv_b_heads()[:, : config.qk_nope_head_dim]  # [H, qk_nope, kv_lora]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        return torch.cat((q_latent, q_pe), dim=-1), torch.cat((kv_c, k_pe), dim=-1), q_lora

    def _wkv_b_heads(self) -> torch.Tensor:
        config = self.config
        return self.wkv_b.weight.view(config.n_heads, config.qk_nope_head_dim + config.v_head_dim, config.kv_lora_rank)

    def forward(
        self,
        x: torch.Tensor,
        *,
        return_aux: bool = False,
        positions: torch.Tensor | None = None,
        starts: torch.Tensor | None = None,
        ends: torch.Tensor | None = None,
        cache: model_cache.LayerCache | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, AttentionAux]:
        """Attention over ``x [B, S, dim]``; returns ``[B, S, dim]`` in x's dtype (and the aux).

        Without a cache: positions ``0 .. S-1`` and causal visibility, or ``positions [B, S]`` int64 with ``starts``/
        ``ends [B, S]`` int32 (the indexer's visible ranges; packed or padded batches, sparse mode only).

        With ``cache`` (sparse mode only, no aux): see :meth:`forward_cached`.
        """
        if cache is not None:
            if return_aux or positions is not None or starts is not None:
                raise NotImplementedError("DSAttention.forward: cache excludes return_aux, positions and starts/ends")
            return self.forward_cached(x, cache, lengths=lengths)
        if lengths is not None:
            raise ValueError("DSAttention.forward: lengths only applies with a cache")
        ranged = positions is not None or starts is not None
        if ranged and (return_aux or self.mode == DENSE):
            raise NotImplementedError(
                "DSAttention.forward: positions/starts/ends (packed or padded batches) run in sparse mode without "
                "return_aux only"
            )
        if (starts is None) != (ends is None):
            raise ValueError("DSAttention.forward: starts and ends go together ([B, S] int32 each)")
        config = self.config
        seq = x.shape[1]
        if positions is None:
            cos, sin = rope_cos_sin(self.inv_freq, seq, x.device)
        else:
            cos, sin = rope_cos_sin_at(self.inv_freq, positions)
        q, kv, q_lora = self.latent_qkv(x, cos, sin)
        selection = None
        if self.mode == SPARSE or return_aux:
            wanted = None if not return_aux else DENSE_SCORES if self.mode == DENSE else SELECTED_SCORES
            selection = self.indexer(x, q_lora, cos, sin, scores=wanted, starts=starts, ends=ends)
        if self.mode == DENSE:
            compute = compute_dtype(q.dtype)
            scores = torch.einsum("bshc,btc->bsht", q.to(compute), kv.to(compute)) * config.sm_scale
            causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
            probs = scores.masked_fill(~causal.view(1, seq, 1, seq), float("-inf")).softmax(dim=-1)
            latent_out = torch.einsum("bsht,btc->bshc", probs.to(kv.dtype), kv[..., : config.kv_lora_rank])
            target = probs.detach().sum(dim=2) if return_aux else None
        else:
            indices = selection.indices
            latent_out, lse = ops.sparse_mla(q, kv, indices, sm_scale=config.sm_scale, d_v=config.kv_lora_rank)
            target = None
            if return_aux:
                target = training.attention_mass_on_indices(q.detach(), kv.detach(), indices, lse, config.sm_scale)
        out = self._output(latent_out)
        if not return_aux:
            return out
        return out, AttentionAux(selection.scores, selection.indices, target, self.mode)

    def _output(self, latent_out: torch.Tensor) -> torch.Tensor:
        """``latent_out [B, S, H, kv_lora_rank]`` -> ``[B, S, dim]`` through ``wkv_b``'s value block and ``wo``."""
        w_uv = self._wkv_b_heads()[:, self.config.qk_nope_head_dim :]  # [H, v_head_dim, kv_lora]
        return self.wo(torch.einsum("bshc,hdc->bshd", latent_out, w_uv).flatten(2))

    def forward_cached(
        self, x: torch.Tensor, cache: model_cache.LayerCache, *, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of new tokens over a paged cache: prefill (``n`` = prompt length), chunked prefill and decode
        (``n = 1``) alike.

        Token ``i`` of sequence ``b`` sits at position ``cache.seq_lens[b] + i``; its latent row and indexer key are
        appended first, then the indexer selects top-k over the sequence's cached keys ``[0, position]``
        (``model_cache.select_from_cache``) and ``dsa.ops.sparse_mla_decode`` attends to those positions' slots.

        Args:
            x (torch.Tensor): ``[B, n, dim]``.
            cache (model_cache.LayerCache): this layer's caches (advanced by ``lengths``).
            lengths (torch.Tensor | None): ``[B]`` integers: only the first ``lengths[b]`` tokens of row ``b`` are
                real (a right-padded chunk); the rest are not cached and their outputs are unspecified (finite).

        Returns:
            torch.Tensor: ``[B, n, dim]`` in x's dtype. With a bfloat16 cache the attention inputs are rounded to
            bfloat16 (a float32 model's outputs then differ by bf16 rounding; FP8 adds the FP8 rounding of the cached
            latent rows).
        """
        if self.mode != SPARSE:
            raise NotImplementedError("DSAttention.forward_cached: decoding runs in sparse mode only")
        config = self.config
        batch, n, _ = x.shape
        if cache.kv.block_table.shape[0] != batch:
            raise ValueError(
                f"DSAttention.forward_cached: the cache holds {cache.kv.block_table.shape[0]} sequences, x has {batch}"
            )
        # Positions, lengths and visible ranges are the same for every layer of a step: computed once, by the first
        # layer (or ModelCache.begin_step), and read by the rest.
        step = cache.step(n, lengths, x.device)
        cos, sin = rope_cos_sin_at(self.inv_freq, step.positions)
        q, kv, q_lora = self.latent_qkv(x, cos, sin)
        proj = self.indexer.project(x, q_lora, cos, sin)
        cache.append(kv.detach(), proj.k, proj.k_scale, step.lengths)
        # A padding query sees nothing (ends = starts = 0): no top-k, output 0.
        selected = cache.select(proj.q, proj.weights, config.index_topk, step.starts, step.ends)
        latent_out = cache.attend(q, selected, sm_scale=config.sm_scale, d_v=config.kv_lora_rank)
        return self._output(latent_out)
