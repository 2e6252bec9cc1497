"""The measurement package: how fast, how much work and how much memory a DSA call takes, and the one-shot GPU check.

* the harness: :mod:`benchmarks.bench` (``dsa-bench``, the command line), :mod:`benchmarks.harness` (time every
  provider of a case, check ``dsa`` once, long-format rows), :mod:`benchmarks.inputs` (a case's inputs and the
  ``dsa`` check), :mod:`benchmarks.providers` (``dsa`` beside the reference, dense attention, ``torch.topk``,
  FlashMLA, DeepGEMM), :mod:`benchmarks.cases` (the cases, as data), :mod:`benchmarks.v4` (DeepSeek-V4's prefill and
  decode cases: inputs, providers, check);
* :mod:`benchmarks.cost`: the cost model printed beside every case (DRAM bytes, FLOPs, dequantised rows, waves);
* the primitives the tuner measures with too: :mod:`benchmarks.measure` (CUDA-event timing, L2 rotation, the host's
  ceilings), :mod:`benchmarks.flops` (useful FLOPs and bytes of a call) and :mod:`benchmarks.runners` (each tuner
  kernel's inputs, launch, reference and comparison: the tuner's correctness gate and the benchmark's check);
* the GPU check: :mod:`benchmarks.gpu_check` (every stage on a CUDA host), :mod:`benchmarks.gpu_record` (the record
  read back: summary, plot, first errors) and :mod:`benchmarks.gpu_collect` (what comes back from the device tool);
  ``results/`` holds the records;
* :mod:`benchmarks.hf`: transformers layers' memory and generate throughput (the README's tables);
  :mod:`benchmarks.memory_v4`: peak memory of one DeepSeek-V4 layer's prefill against the sequence length.

Imports point one way: this package reads ``dsa``, ``tl_kernels`` and the launchers' config lookup
(:mod:`autotune.lookup`, the SKU id of a record); the tuner (``autotune``) sits on top of it and imports its timing,
FLOP counts and runners, never the reverse. The GPU check runs the tuner as a stage in a subprocess
(``python -m autotune.cli``), not by importing it. Nothing is imported eagerly.
"""
