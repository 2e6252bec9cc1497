"""Per-SKU tuning of the DSA kernels, the persistent config cache, and GPU measurement.

Two halves (``tests/test_layers.py`` checks the import graph):

* below the launchers, importing nothing from ``dsa``: :mod:`autotune.sku` (device -> SKU id), :mod:`autotune.space`
  (search spaces and presets), :mod:`autotune.flops` (useful work of a call), :mod:`autotune.cache` (the JSON config
  cache), :mod:`autotune.select` (``config_for``, used by the launchers);
* above them: :mod:`autotune.tuner` (compile and prune), :mod:`autotune.runners` (inputs, launch, reference and
  comparison of each kernel), :mod:`autotune.gpu_phase` and :mod:`autotune.gpu_worker` (check and time on a GPU, in a
  worker process), :mod:`autotune.measure` (CUDA-event timing, L2 rotation, ceilings), :mod:`autotune.cli`
  (``dsa-autotune``), :mod:`autotune.bench` with :mod:`autotune.bench_providers` (``dsa-bench``), and
  :mod:`autotune.gpu_check` with :mod:`autotune.gpu_record` (the one-shot GPU check).

Nothing is imported eagerly: ``import autotune`` stays cheap.
"""
