"""The models room: DeepSeek Sparse Attention as ``nn.Module``s: the lightning indexer, DSA (MLA + indexer + sparse
attention), a tiny LM, greedy generation and the indexer's training.

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

Modules: ``config`` (``DSAConfig``, the modes), ``rope``, ``indexer`` (``LightningIndexer``, ``hadamard_transform``),
``attention`` (``DSAttention``), ``tiny`` (``TinyDSAModel``), ``generate`` (greedy generation over the model cache),
``training`` (indexer losses and the two-stage loop). The main names are re-exported here and by ``dsa.modules``.
"""

from __future__ import annotations

from dsa.models.attention import AttentionAux, DSAttention
from dsa.models.config import DSAConfig
from dsa.models.indexer import IndexerOutput, IndexerProjection, LightningIndexer
from dsa.models.tiny import TinyDSAModel

__all__ = ["AttentionAux", "DSAConfig", "DSAttention", "IndexerOutput", "IndexerProjection", "LightningIndexer",
           "TinyDSAModel"]  # fmt: skip
