"""Per-SKU tuning of the DSA kernels: the config lookup the launchers read, and the tuner that fills it.

Two rooms, told apart by their folders (``tests/test_layers.py`` derives every module's layer from its folder):

* :mod:`autotune.lookup`, *below* the library: :mod:`~autotune.lookup.sku` (device -> SKU id),
  :mod:`~autotune.lookup.space` (search spaces and presets), :mod:`~autotune.lookup.cache` (the JSON config cache)
  and :mod:`~autotune.lookup.select` (``config_for``, what ``dsa.launch`` calls). It imports nothing of ours but
  ``tl_kernels``; it is the one room of this package that ``dsa`` (and ``benchmarks``) may import.
* this folder, *on top*: :mod:`autotune.tuner` (compile, prune, time, store), :mod:`autotune.gpu_phase` and
  :mod:`autotune.gpu_worker` (check and time the candidates on a GPU, in a worker process) and :mod:`autotune.cli`
  (``dsa-autotune``). Tuning uses the measurement package below it: CUDA-event timing and L2 rotation
  (:mod:`benchmarks.measure`), the useful work of a call (:mod:`benchmarks.flops`) and each kernel's inputs, launch,
  reference and comparison (:mod:`benchmarks.runners`, the same gate the benchmark's check uses). Imports point one
  way: ``benchmarks`` never imports the tuner, so measuring is one house and choosing configs from measurements is
  the floor above it.

The shipped tuned configs are package data in ``autotune/configs/<sku>/`` (read by the lookup).

Nothing is imported eagerly: ``import autotune`` (which any ``import autotune.lookup...`` runs first) stays cheap and
imports nothing, so the launchers' lookup never drags the tuner in.
"""
