"""The config lookup the launchers read (``dsa.launch.common`` calls :func:`autotune.lookup.select.config_for`).

Which config for which GPU SKU and shape: :mod:`~autotune.lookup.sku` (device -> SKU id),
:mod:`~autotune.lookup.space` (each kernel's builder module, search spaces, presets, shape buckets),
:mod:`~autotune.lookup.cache` (the per-SKU JSON config cache and the shipped configs of ``autotune/configs/``) and
:mod:`~autotune.lookup.select` (a checked ``Config`` from the cache, or ``None``: the launcher's default).

This room sits below ``dsa``: it imports nothing of ours but ``tl_kernels`` (and reads no ``DSA_*`` variable: the
launchers pass what they read). It stays here rather than in ``dsa`` because the tuner writes what it reads: the cache
format, the buckets and the spaces are the tuner's, and the launchers are their one reader. Nothing is imported
eagerly.
"""
