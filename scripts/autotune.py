#!/usr/bin/env python3
"""Tune the DSA kernels for this GPU: the same as the ``dsa-autotune`` console script; see ``--help``."""

import os
import sys

# Run as a file, this script's folder is first on sys.path, where this very file would shadow the `autotune` package;
# running the package's module with -m imports it as the interpreter resolves it for -m (installed, or the checkout).
os.execv(sys.executable, [sys.executable, "-m", "autotune.cli", *sys.argv[1:]])
