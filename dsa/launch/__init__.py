"""Launchers, one per kernel: ``plan(...)`` once per shape (target, config, compiled kernels; ``None`` where the kernel
cannot take the problem) and ``run(plan, ...)`` per call on validated tensors (``common`` holds the plan cache)."""
