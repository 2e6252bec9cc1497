"""DeepSeek Sparse Attention: PyTorch ops over TileLang kernels, their normative reference, paged caches and models.

The front door: the public ops and the main classes are attributes of the package, imported on first use (module
``__getattr__``), so ``import dsa`` costs almost nothing and runs nothing (no torch import, no device query):

- ops (``dsa.ops``): ``index_scores``, ``topk_indices``, ``index_topk``, ``sparse_mla``, ``sparse_mla_decode``,
  ``index_topk_decode``, ``compress_kv``;
- byte layouts (``dsa.kv_format``): ``FP8Layout``, ``V32_FP8_LAYOUT``, ``MODEL1_FP8_LAYOUT``;
- serving (``dsa.serving``): ``PagedKVCache``, ``ModelCache``;
- models (``dsa.models``): ``DSAConfig``, ``DSAttention``, ``LightningIndexer``, ``TinyDSAModel``.

The rooms (one folder or module per concern; imports point down): ``reference/`` (the contract), ``validation``,
``launch/`` (one launcher per kernel), ``library`` (torch.library primitives) and ``autograd`` (Functions), ``ops``,
``kv_format``, ``serving/``, ``models/``, ``testing/``, ``integrations/``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "index_scores": "dsa.ops",
    "topk_indices": "dsa.ops",
    "index_topk": "dsa.ops",
    "sparse_mla": "dsa.ops",
    "sparse_mla_decode": "dsa.ops",
    "index_topk_decode": "dsa.ops",
    "compress_kv": "dsa.ops",
    "FP8Layout": "dsa.kv_format",
    "V32_FP8_LAYOUT": "dsa.kv_format",
    "MODEL1_FP8_LAYOUT": "dsa.kv_format",
    "PagedKVCache": "dsa.serving.cache",
    "ModelCache": "dsa.serving.model_cache",
    "DSAConfig": "dsa.models.config",
    "DSAttention": "dsa.models.attention",
    "LightningIndexer": "dsa.models.indexer",
    "TinyDSAModel": "dsa.models.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    """The exported ``name``, imported from its module on first access and cached on the package."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dsa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
