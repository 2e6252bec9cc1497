"""DeepSeek Sparse Attention as ``nn.Module``s: the lightning indexer, DSA (MLA + indexer + sparse attention), a
tiny LM.

The formulation follows DeepSeek-V3.2-Exp's ``inference/model.py`` (prefill, no KV cache):

- MLA in its absorbed ("MQA") form: the shared latent ``kv = [RMSNorm(c_kv) (kv_lora_rank), RoPE(k_pe)
  (qk_rope_head_dim)]`` (576 = 512 + 64 in V3.2) is the single KV head; each query head's no-RoPE part is absorbed
  through ``wkv_b``'s key block (``q_nope @ W_uk``, width kv_lora_rank) and concatenated with its RoPE part, so
  ``q . kv`` equals the per-head ``q_nope . k_nope + q_pe . k_pe`` of the unabsorbed form. Attention returns latent
  values (``d_v = kv_lora_rank``) that ``wkv_b``'s value block maps to ``v_head_dim`` per head. The softmax scale is
  that of the unabsorbed head, ``(qk_nope + qk_rope)**-0.5``, times ``mscale**2`` when YaRN is on.
- The main MLA uses interleaved RoPE (pairs ``(2i, 2i+1)``); the indexer uses the **non-interleaved** layout (pairs
  ``(i, i + r/2)``): early public V3.2 code applied the interleaved one to the indexer, which was a bug.
- Lightning indexer: ``q = wq_b(q_lora)``, ``k = LayerNorm(wk(x))``, RoPE on the first ``qk_rope_head_dim`` dims,
  a Hadamard rotation (orthonormal, ``D_i**-0.5``), optional FP8 (e4m3) quantisation with one scale per 128-element
  block (optionally a power of two, V3.2's ``ue8m0``), and per-head weights ``weights_proj(x) * H_i**-0.5 *
  D_i**-0.5 * q_scale``: the ``dsa.ops.index_scores`` op does not scale.

The modules compute in their parameters' dtype; the ops pick the kernels for bfloat16 on Hopper and the reference
for float32/float64 (see ``dsa.ops``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsa import ops, training
from dsa.kv_format import quantize_fp8_blockwise  # noqa: F401 - public here too (the model's quantiser)
from dsa.serving import model_cache as generation
from dsa.reference import compute_dtype

logger = logging.getLogger(__name__)

AttentionMode = Literal["sparse", "dense"]
SPARSE: AttentionMode = "sparse"
DENSE: AttentionMode = "dense"
# Which index scores the indexer returns besides its selection: none, the selected positions' (``[B, S, k]``, the
# sparse-stage loss; O(S k) memory), or every position's (``[B, S, S]``, the dense warm-up loss; O(S^2) memory).
IndexerScores = Literal["selected", "dense"] | None
SELECTED_SCORES: IndexerScores = "selected"
DENSE_SCORES: IndexerScores = "dense"

# TinyDSAModel.save's file: {"format": this, "config": asdict(DSAConfig), "state_dict": ...}.
CHECKPOINT_FORMAT = "dsa-tiny-model/1"

@dataclass(frozen=True)
class DSAConfig:
    """Hyperparameters; the defaults are DeepSeek-V3.2-Exp's (671B config plus ``ModelArgs`` defaults).

    ``n_layers``, ``inter_dim`` and ``vocab_size`` only matter to ``TinyDSAModel`` (a dense SwiGLU MLP stands in for
    V3.2's MoE). RoPE/YaRN: ``rope_theta``, ``rope_factor``, ``beta_fast``, ``beta_slow`` and ``original_seq_len``
    shape the frequencies once ``max_seq_len > original_seq_len``, which also multiplies the attention softmax scale
    by ``mscale_factor**2`` with ``mscale_factor = 0.1 * mscale * ln(rope_factor) + 1``.
    """

    vocab_size: int = 129280
    dim: int = 7168
    n_layers: int = 61
    inter_dim: int = 18432
    n_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_seq_len: int = 163840
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    norm_eps: float = 1e-6
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    index_fp8: bool = True
    index_scale_pow2: bool = True
    quant_block: int = 128
    # The indexer reads x and q_lora detached: its loss trains only the indexer (the V3.2 recipe).
    detach_indexer_input: bool = True
    init_std: float = 0.006

    def __post_init__(self) -> None:
        if self.index_head_dim & (self.index_head_dim - 1) or self.index_head_dim < 1:
            raise ValueError(f"index_head_dim must be a power of two (Hadamard rotation), got {self.index_head_dim}")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.index_head_dim:
            raise ValueError(f"qk_rope_head_dim must be even and <= index_head_dim, got {self.qk_rope_head_dim}")
        if self.index_fp8 and self.index_head_dim > self.quant_block:
            raise ValueError(
                f"index_fp8 needs index_head_dim <= quant_block ({self.quant_block}): the index_scores op takes one "
                f"k scale per key, got index_head_dim={self.index_head_dim}"
            )

    @classmethod
    def tiny(cls, **overrides: object) -> DSAConfig:
        """A configuration small enough for CPU tests and training (YaRN on, so ``mscale`` is exercised)."""
        values: dict[str, object] = dict(
            vocab_size=256,
            dim=64,
            n_layers=2,
            inter_dim=128,
            n_heads=4,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            max_seq_len=256,
            original_seq_len=64,
            index_n_heads=4,
            index_head_dim=32,
            index_topk=16,
            index_fp8=False,
            index_scale_pow2=False,
            init_std=0.02,
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> DSAConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width of the unabsorbed form (192 in V3.2)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """``d_qk`` of the absorbed form: the latent KV row width (576 in V3.2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def yarn(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    @property
    def mscale_factor(self) -> float:
        return 0.1 * self.mscale * math.log(self.rope_factor) + 1.0 if self.yarn else 1.0

    @property
    def sm_scale(self) -> float:
        """``(qk_nope + qk_rope)**-0.5 * mscale**2`` (not ``latent_dim**-0.5``: absorption keeps the head's scale)."""
        return self.qk_head_dim**-0.5 * self.mscale_factor**2


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


def rope_inv_freq(config: DSAConfig) -> torch.Tensor:
    """``[qk_rope_head_dim / 2]`` float32 inverse frequencies, YaRN-corrected when ``max_seq_len > original``."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if config.yarn:

        def correction_dim(rotations: float) -> float:
            return dim * math.log(config.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(config.beta_fast)), 0)
        high = min(math.ceil(correction_dim(config.beta_slow)), dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / config.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_cos_sin(inv_freq: torch.Tensor, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [seq, r/2]`` float32 for positions ``0 .. seq-1``."""
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq.to(device))
    return torch.cos(angles), torch.sin(angles)


def rope_cos_sin_at(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [B, S, r/2]`` float32 at arbitrary integer ``positions [B, S]`` (per-row positions: packed
    sequences, padded rows, tokens after a cache). Position ``p`` gets exactly ``rope_cos_sin``'s row ``p``."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Rotate ``x [B, S, ..., r]`` by position (``cos``/``sin [S, r/2]`` shared by the batch, or ``[B, S, r/2]`` per
    row from ``rope_cos_sin_at``), in float32 (float64 for float64 input); returns x's dtype.

    ``interleaved``: pairs are ``(x[2i], x[2i+1])`` (the main MLA's layout); otherwise ``(x[i], x[i + r/2])`` (the
    indexer's layout).
    """
    compute = compute_dtype(x.dtype)
    rows = cos.shape[0] if cos.dim() == 3 else 1
    shape = (rows, x.shape[1]) + (1,) * (x.dim() - 3) + (cos.shape[-1],)
    c, s = cos.view(shape).to(compute), sin.view(shape).to(compute)
    xf = x.to(compute)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)


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
    """MLA with DeepSeek Sparse Attention (absorbed form; see the module docstring).

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
        cache: generation.LayerCache | None = None,
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
        self, x: torch.Tensor, cache: generation.LayerCache, *, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of new tokens over a paged cache: prefill (``n`` = prompt length), chunked prefill and decode
        (``n = 1``) alike.

        Token ``i`` of sequence ``b`` sits at position ``cache.seq_lens[b] + i``; its latent row and indexer key are
        appended first, then the indexer selects top-k over the sequence's cached keys ``[0, position]``
        (``generation.select_from_cache``) and ``dsa.ops.sparse_mla_decode`` attends to those positions' slots.

        Args:
            x (torch.Tensor): ``[B, n, dim]``.
            cache (generation.LayerCache): this layer's caches (advanced by ``lengths``).
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
        device = x.device
        if lengths is None:
            lengths = torch.full((batch,), n, dtype=torch.int64, device=device)
        lengths = lengths.to(device=device, dtype=torch.int64)
        offsets = torch.arange(n, device=device).view(1, n)
        positions = cache.seq_lens.to(device=device, dtype=torch.int64).view(batch, 1) + offsets
        cos, sin = rope_cos_sin_at(self.inv_freq, positions)
        q, kv, q_lora = self.latent_qkv(x, cos, sin)
        proj = self.indexer.project(x, q_lora, cos, sin)
        cache.append(kv.detach(), proj.k, proj.k_scale, lengths)
        real = offsets < lengths.view(batch, 1)
        # A padding query sees nothing (ends = starts = 0): no top-k, output 0.
        ends = torch.where(real, positions + 1, 0).to(torch.int32)
        selected = cache.select(proj.q, proj.weights, config.index_topk, torch.zeros_like(ends), ends)
        latent_out = cache.attend(q, selected, sm_scale=config.sm_scale, d_v=config.kv_lora_rank)
        return self._output(latent_out)


class _MLP(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = _linear(dim, inter_dim)
        self.w2 = _linear(inter_dim, dim)
        self.w3 = _linear(dim, inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, config: DSAConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = DSAttention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = _MLP(config.dim, config.inter_dim)

    def forward(
        self, x: torch.Tensor, *, return_aux: bool, **attention: object
    ) -> tuple[torch.Tensor, AttentionAux | None]:
        aux = None
        if return_aux:
            h, aux = self.attn(self.attn_norm(x), return_aux=True)
        else:
            h = self.attn(self.attn_norm(x), **attention)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), aux


def _check_cache_room(cache: generation.ModelCache, new: int | torch.Tensor) -> None:
    """Raise (naming ``TinyDSAModel.forward``) when appending ``new`` tokens (an int, or ``[B]`` per sequence) would
    grow a sequence of ``cache`` past its capacity: checked once per call, before any layer appends."""
    held = cache.seq_lens.to(torch.int64)
    total = held + (new.to(held.device) if isinstance(new, torch.Tensor) else new)
    if bool((total > cache.capacity).any()):
        raise ValueError(
            f"TinyDSAModel.forward: the cache's sequences hold {held.tolist()} tokens; {total.sub(held).tolist()} "
            f"more would make {total.tolist()}, over its capacity {cache.capacity} (new_cache's max_seq_len "
            f"{cache.max_seq_len} rounded up to whole pages)"
        )


class TinyDSAModel(nn.Module):
    """A small causal LM of DSA blocks (pre-norm attention + SwiGLU MLP), for tests and indexer training."""

    def __init__(self, config: DSAConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = _linear(config.dim, config.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every projection and the embedding; norms start at identity."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                module.reset_parameters()

    def set_attention_mode(self, mode: AttentionMode) -> None:
        """``"dense"`` (warm-up) or ``"sparse"`` for every layer."""
        if mode not in (SPARSE, DENSE):
            raise ValueError(f"mode must be 'sparse' or 'dense', got {mode!r}")
        for layer in self.layers:
            layer.attn.mode = mode

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.attn.indexer.parameters()]

    def main_parameters(self) -> list[nn.Parameter]:
        indexer = {id(p) for p in self.indexer_parameters()}
        return [p for p in self.parameters() if id(p) not in indexer]

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        return_aux: bool = False,
        cache: generation.ModelCache | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[AttentionAux]]:
        """``input_ids [B, S]`` int64 -> ``logits [B, S, vocab_size]`` in the parameters' dtype (and one
        ``AttentionAux`` per layer with ``return_aux``).

        Args:
            cache (generation.ModelCache | None): from :meth:`new_cache`: the tokens continue each sequence from
                ``cache.seq_lens`` (prefill, chunked prefill and decode alike) and are appended to it.
            attention_mask (torch.Tensor | None): ``[B, S]``, 1 = real token, 0 = padding; each row's real tokens one
                contiguous run (left or right padding). Positions count real tokens only; padding keys are invisible;
                the logits at padding columns are unspecified (finite). With a cache only the real tokens are cached.
            cu_seqlens (torch.Tensor | None): ``[N + 1]`` int32/int64 offsets of ``N`` sequences packed into
                ``input_ids [1, total]``: positions restart at 0 per sequence, each sees only itself. No cache.

        ``return_aux`` and dense mode work only without ``cache``, ``attention_mask`` and ``cu_seqlens``
        (``NotImplementedError`` otherwise). Positions past ``config.max_seq_len`` are computed (RoPE takes any
        position); :meth:`generate` refuses to go past it.

        Raises:
            TypeError / ValueError naming ``TinyDSAModel.forward``: ``input_ids`` not a non-empty ``[B, S]`` int64
            tensor of ids in ``[0, vocab_size)``; a cache whose sequences cannot take the new tokens (checked before
            anything is appended).
        """
        self._check_input_ids(input_ids, "TinyDSAModel.forward")
        batch, seq = input_ids.shape
        if cache is None and attention_mask is None and cu_seqlens is None:
            x = self.embed(input_ids)
            auxes = []
            for layer in self.layers:
                x, aux = layer(x, return_aux=return_aux)
                auxes.append(aux)
            logits = self.head(self.norm(x))
            return (logits, auxes) if return_aux else logits
        if return_aux:
            raise NotImplementedError("TinyDSAModel.forward: return_aux needs no cache, attention_mask or cu_seqlens")
        if any(layer.attn.mode != SPARSE for layer in self.layers):
            raise NotImplementedError("TinyDSAModel.forward: cache, attention_mask and cu_seqlens need sparse mode")
        if cu_seqlens is not None:
            if cache is not None or attention_mask is not None:
                raise NotImplementedError("TinyDSAModel.forward: cu_seqlens excludes cache and attention_mask")
            if batch != 1:
                raise ValueError(
                    f"TinyDSAModel.forward: with cu_seqlens, input_ids must be [1, total], got {batch} rows"
                )
            positions, starts, ends = generation.packed_ranges(cu_seqlens.to(input_ids.device), seq)
            return self._run(input_ids, positions=positions, starts=starts, ends=ends)
        offsets = lengths = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, seq):
                raise ValueError(
                    f"TinyDSAModel.forward: attention_mask must be [B, S] = {(batch, seq)} like input_ids, got "
                    f"{tuple(attention_mask.shape)}"
                )
            offsets, lengths = generation.mask_runs(attention_mask.to(input_ids.device))
            # Rotate each row's real run to column 0: the layers then see right-padded rows only.
            input_ids = generation.compact_rows(input_ids, offsets)
        if cache is not None:
            if len(cache.layers) != len(self.layers) or cache.batch_size != batch:
                raise ValueError(
                    f"TinyDSAModel.forward: cache holds {len(cache.layers)} layers x {cache.batch_size} sequences, "
                    f"the model has {len(self.layers)} layers and input_ids {batch} rows"
                )
            _check_cache_room(cache, seq if lengths is None else lengths)
            logits = self._run(input_ids, cache=cache, lengths=lengths)
        else:
            positions, starts, ends = generation.padded_ranges(lengths, seq)
            logits = self._run(input_ids, positions=positions, starts=starts, ends=ends)
        return logits if offsets is None else generation.restore_rows(logits, offsets)

    def _check_input_ids(self, input_ids: object, caller: str) -> None:
        """``input_ids`` must be a non-empty ``[B, S]`` int64 tensor of ids in ``[0, vocab_size)``; the errors name
        ``caller``. One host sync (the id range), before any layer runs."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"{caller}: input_ids must be a torch.Tensor [B, S] int64, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(
                f"{caller}: input_ids must be [B, S] int64, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if input_ids.numel() == 0:
            raise ValueError(f"{caller}: input_ids must not be empty, got shape {tuple(input_ids.shape)}")
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()
        vocab = self.config.vocab_size
        if low < 0 or high >= vocab:
            raise ValueError(
                f"{caller}: input_ids must lie in [0, vocab_size = {vocab}), got values from {low} to {high}"
            )

    def _run(
        self, input_ids: torch.Tensor, *, cache: generation.ModelCache | None = None, **attention: object
    ) -> torch.Tensor:
        """Embedding, layers (``attention``: ``DSAttention.forward``'s keywords) and head; the layer caches go to
        their layers."""
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            if cache is not None:
                attention["cache"] = cache.layers[i]
            x, _ = layer(x, return_aux=False, **attention)
        return self.head(self.norm(x))

    def new_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | str = torch.bfloat16,
        page_size: int = 64,
    ) -> generation.ModelCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens on the model's device.

        ``dtype``: the latent rows' (``torch.bfloat16``, ``torch.float32`` or ``"fp8"``, FlashMLA's layout); the
        indexer keys are the model's FP8 keys with ``index_fp8``, else float32 for a float32 cache and bfloat16
        otherwise.
        """
        config = self.config
        return generation.ModelCache(
            n_layers=config.n_layers,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            latent_dim=config.latent_dim,
            d_rope=config.qk_rope_head_dim,
            index_dim=config.index_head_dim,
            index_fp8=config.index_fp8,
            dtype=dtype,
            page_size=page_size,
            device=self.embed.weight.device,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        cache_dtype: torch.dtype | str = torch.bfloat16,
        attention_mask: torch.Tensor | None = None,
        page_size: int = 64,
    ) -> torch.Tensor:
        """Greedy (argmax) continuation: one prefill call over the prompts, then one-token decode steps.

        Args:
            input_ids (torch.Tensor): ``[B, S]`` int64 prompts.
            max_new_tokens (int): ``>= 0`` tokens to add to every row.
            cache_dtype: the latent cache dtype (see :meth:`new_cache`).
            attention_mask (torch.Tensor | None): ``[B, S]`` for padded prompts (see :meth:`forward`); every row needs
                at least one real token. The new tokens follow column ``S - 1`` whatever the padding.

        Returns:
            torch.Tensor: ``[B, S + max_new_tokens]`` int64: the prompts, then the generated tokens.

        Raises:
            TypeError / ValueError naming ``TinyDSAModel.generate``, before anything runs: ``input_ids`` as in
            :meth:`forward`, a bad ``max_new_tokens`` or ``attention_mask``, or sequences that would grow past
            ``config.max_seq_len`` (the longest prompt's real tokens plus ``max_new_tokens``).
        """
        caller = "TinyDSAModel.generate"
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"{caller}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        self._check_input_ids(input_ids, caller)
        batch, seq = input_ids.shape
        last = torch.full((batch,), seq - 1, dtype=torch.int64, device=input_ids.device)
        prompt = seq
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, seq):
                raise ValueError(
                    f"{caller}: attention_mask must be [B, S] = {(batch, seq)} like input_ids, got "
                    f"{tuple(attention_mask.shape)}"
                )
            offsets, lengths = generation.mask_runs(attention_mask.to(input_ids.device), caller=caller)
            if bool((lengths == 0).any()):
                raise ValueError(f"{caller}: every row of attention_mask needs at least one real token")
            last = offsets + lengths - 1
            prompt = int(lengths.max())
        limit = self.config.max_seq_len
        if prompt + max_new_tokens > limit:
            raise ValueError(
                f"{caller}: a {prompt}-token prompt plus max_new_tokens = {max_new_tokens} makes "
                f"{prompt + max_new_tokens} tokens, past config.max_seq_len = {limit}"
            )
        if max_new_tokens == 0:
            return input_ids.clone()
        cache = self.new_cache(batch, seq + max_new_tokens, dtype=cache_dtype, page_size=page_size)
        logits = self(input_ids, cache=cache, attention_mask=attention_mask)
        token = logits[torch.arange(batch, device=logits.device), last].argmax(dim=-1)
        generated = [token]
        for _ in range(max_new_tokens - 1):
            token = self(token.view(batch, 1), cache=cache)[:, -1].argmax(dim=-1)
            generated.append(token)
        logger.debug("TinyDSAModel.generate: %d rows, %d prompt columns, %d new tokens", batch, seq, max_new_tokens)
        return torch.cat((input_ids, torch.stack(generated, dim=1)), dim=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config (``dataclasses.asdict``) and the state dict to ``path`` (``torch.save`` of a plain dict,
        readable with ``weights_only=True``). The attention mode is training state and is not saved."""
        torch.save(
            {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.config), "state_dict": self.state_dict()},
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, map_location: torch.device | str = "cpu") -> TinyDSAModel:
        """A model rebuilt from :meth:`save`'s file: its config, then its weights (in their saved dtype)."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"TinyDSAModel.load: {path} is not a {CHECKPOINT_FORMAT!r} checkpoint")
        model = cls(DSAConfig(**blob["config"]))
        # assign=True keeps the saved tensors (dtype and device) instead of copying into the fresh float32 ones.
        model.load_state_dict(blob["state_dict"], assign=True)
        return model
