"""The serving room: what decoding needs around the ops.

- ``cache``: ``PagedKVCache``, paged caches of latent rows or FP8 bytes behind a block table (byte layouts and slots:
  ``dsa.kv_format``);
- ``model_cache``: the model's per-layer caches (``LayerCache``, ``ModelCache``), selection over cached indexer keys,
  packed and padded batches;
- ``flashmla`` / ``flashmla_decode``: FlashMLA-compatible entry points (``flash_mla_sparse_fwd``,
  ``get_mla_metadata``, ``flash_mla_with_kvcache``).

Nothing is imported here: import the module you need (``from dsa.serving import model_cache``).
"""
