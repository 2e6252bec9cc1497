#!/usr/bin/env python3
"""Benchmark the DSA kernels on a CUDA GPU: the same as the ``dsa-bench`` console script; see ``--help``."""

import os
import sys

# scripts/autotune.py would shadow the `autotune` package (which the harness imports) for a script run from this
# folder: run the module with -m.
os.execv(sys.executable, [sys.executable, "-m", "benchmarks.bench", *sys.argv[1:]])
