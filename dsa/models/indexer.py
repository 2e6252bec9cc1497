"""The lightning indexer: projections, RoPE, a Hadamard rotation, optional FP8 and per-head weights, then the
top-k selection through ``dsa.ops`` (``LightningIndexer``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsa import ops
from dsa.kv_format import quantize_fp8_blockwise
from dsa.models.config import DENSE_SCORES, SELECTED_SCORES, DSAConfig, IndexerScores
from dsa.models.rope import apply_rope
from dsa.reference import compute_dtype


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the last dimension: ``x @ H_n * n**-0.5`` (Sylvester order).

    A fast transform (``log2 n`` butterfly stages, ``O(n log n)``), computed in float32 (float64 for float64
    input); returns x's dtype.
    ``n = x.shape[-1]`` must be a power of two.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two last dimension, got {n}")
    y = x.to(compute_dtype(x.dtype)).reshape(-1, n)
    half = 1
    while half < n:
        # Stage s pairs elements `half` apart inside blocks of 2*half: (a, b) -> (a + b, a - b).
        pairs = y.view(-1, n // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        half *= 2
    return (y * n**-0.5).view(x.shape).to(x.dtype)


def _linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


@dataclass
class IndexerProjection:
    """The indexer's queries, keys and weights for ``dsa.ops.index_topk`` (``LightningIndexer.project``).

    Attributes:
        q (torch.Tensor): ``[B, S, H_i, D_i]``: float8_e4m3fn with ``index_fp8``, else the input's dtype.
        k (torch.Tensor): ``[B, S, D_i]``, q's dtype.
        weights (torch.Tensor): ``[B, S, H_i]`` float32 (the FP8 query scale folded in).
        k_scale (torch.Tensor | None): ``[B, S]`` float32 with ``index_fp8``.
    """

    q: torch.Tensor
    k: torch.Tensor
    weights: torch.Tensor
    k_scale: torch.Tensor | None


@dataclass
class IndexerOutput:
    """What ``LightningIndexer`` returns.

    Attributes:
        indices (torch.Tensor): ``[B, S, index_topk]`` int32, ``-1`` where a query sees fewer positions.
        scores (torch.Tensor | None): when asked, float32 index scores differentiable in the indexer's parameters
            (bfloat16/float32 path): ``[B, S, index_topk]`` at ``indices`` (``-inf`` at ``-1``) for ``"selected"``,
            ``[B, S, S]`` (``-inf`` where not causal) for ``"dense"``.
    """

    indices: torch.Tensor
    scores: torch.Tensor | None = None


class LightningIndexer(nn.Module):
    """The DSA lightning indexer: scores every earlier token for every query and keeps the top-k.

    Parameters: ``wq_b [H_i * D_i, q_lora_rank]``, ``wk [D_i, dim]``, ``k_norm`` (LayerNorm over ``D_i``),
    ``weights_proj [H_i, dim]``.
    """

    def __init__(self, config: DSAConfig) -> None:
        super().__init__()
        self.config = config
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = _linear(config.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = _linear(config.dim, self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.norm_eps)
        self.weights_proj = _linear(config.dim, self.n_heads)

    def _rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE (non-interleaved) on the first ``rope_dim`` dims, then the Hadamard rotation."""
        t = torch.cat((apply_rope(t[..., : self.rope_dim], cos, sin, interleaved=False), t[..., self.rope_dim :]), -1)
        return hadamard_transform(t)

    def project(self, x: torch.Tensor, q_lora: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> IndexerProjection:
        """Queries, keys (rotated, quantised with ``index_fp8``) and weights of ``x [B, S, dim]`` and ``q_lora [B, S,
        q_lora_rank]``; ``cos``/``sin`` as in ``apply_rope``. A cache stores ``k``/``k_scale`` exactly as returned."""
        config = self.config
        batch, seq, _ = x.shape
        if config.detach_indexer_input:
            x, q_lora = x.detach(), q_lora.detach()
        q = self._rotate(self.wq_b(q_lora).view(batch, seq, self.n_heads, self.head_dim), cos, sin)
        k = self._rotate(self.k_norm(self.wk(x)), cos, sin)
        weights = self.weights_proj(x).to(compute_dtype(x.dtype)) * (self.n_heads**-0.5 * self.head_dim**-0.5)
        k_scale = None
        if config.index_fp8:
            q, q_scale = quantize_fp8_blockwise(q, block=config.quant_block, pow2_scale=config.index_scale_pow2)
            k, k_scale = quantize_fp8_blockwise(k, block=config.quant_block, pow2_scale=config.index_scale_pow2)
            weights = weights * q_scale.squeeze(-1)  # the query scale folds into the per-head weight
            k_scale = k_scale.squeeze(-1).contiguous()
        return IndexerProjection(q.contiguous(), k.contiguous(), weights, k_scale)

    def forward(
        self,
        x: torch.Tensor,
        q_lora: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        scores: IndexerScores = None,
        starts: torch.Tensor | None = None,
        ends: torch.Tensor | None = None,
    ) -> IndexerOutput:
        """Select the top-k key positions of every query.

        Without ``scores="dense"`` the selection runs through ``dsa.ops.index_topk``: memory O(S k), never the
        ``[B, S, S]`` scores.

        Args:
            x (torch.Tensor): ``[B, S, dim]``: the layer input.
            q_lora (torch.Tensor): ``[B, S, q_lora_rank]``: MLA's normalised query low-rank activation.
            cos, sin (torch.Tensor): ``[S, qk_rope_head_dim / 2]`` or ``[B, S, qk_rope_head_dim / 2]`` float32
                (``rope_cos_sin`` / ``rope_cos_sin_at``).
            scores (str | None): also return index scores: ``"selected"`` (at the selection, for the sparse-stage
                loss) or ``"dense"`` (every position, for the dense warm-up loss).
            starts, ends (torch.Tensor | None): ``[B, S]`` int32, together: query ``t`` sees key positions ``[starts,
                ends)`` (packed or padded batches); default causal.
        """
        config = self.config
        p = self.project(x, q_lora, cos, sin)
        q, k, weights, k_scale = p.q, p.k, p.weights, p.k_scale
        ranges = {"starts": starts, "ends": ends}
        if scores == DENSE_SCORES:
            every = ops.index_scores(q, k, weights, k_scale=k_scale, **ranges)
            return IndexerOutput(indices=ops.topk_indices(every.detach(), config.index_topk), scores=every)
        if scores == SELECTED_SCORES:
            indices, selected = ops.index_topk(
                q, k, weights, config.index_topk, k_scale=k_scale, return_scores=True, **ranges
            )
            return IndexerOutput(indices=indices, scores=selected)
        return IndexerOutput(indices=ops.index_topk(q, k, weights, config.index_topk, k_scale=k_scale, **ranges))
