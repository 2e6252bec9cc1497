"""The model's configuration: ``DSAConfig`` (DeepSeek-V3.2's shapes, or ``DSAConfig.tiny()`` for tests) and the
attention and indexer-score modes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

AttentionMode = Literal["sparse", "dense"]
SPARSE: AttentionMode = "sparse"
DENSE: AttentionMode = "dense"
# Which index scores the indexer returns besides its selection: none, the selected positions' (``[B, S, k]``, the
# sparse-stage loss; O(S k) memory), or every position's (``[B, S, S]``, the dense warm-up loss; O(S^2) memory).
IndexerScores = Literal["selected", "dense"] | None
SELECTED_SCORES: IndexerScores = "selected"
DENSE_SCORES: IndexerScores = "dense"


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
