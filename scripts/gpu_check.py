#!/usr/bin/env python3
"""The one-shot GPU check (``benchmarks.gpu_check``): run it from a checkout on a CUDA host; see ``--help``."""

import os
import sys

# scripts/autotune.py would shadow the `autotune` package (which the check's stages import) for a script run from
# this folder: run the module with -m.
os.execv(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *sys.argv[1:]])
