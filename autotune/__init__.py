"""Per-SKU tuning of the DSA kernels and the persistent config cache.

Modules: :mod:`autotune.sku` (device -> SKU id), :mod:`autotune.space` (search spaces and presets),
:mod:`autotune.cache` (the JSON config cache), :mod:`autotune.select` (``config_for``, used by the launchers),
:mod:`autotune.tuner` and :mod:`autotune.gpu` (compile, prune, check, time), :mod:`autotune.cli` (``dsa-autotune``).
Nothing is imported eagerly: ``import autotune`` stays cheap.
"""
