#!/usr/bin/env python3
"""Tune the DSA kernels for this GPU (same as the ``dsa-autotune`` console script); see ``--help``."""

from __future__ import annotations

import os
import sys

# Run as a file, this script's folder comes first on sys.path, where this very file would shadow the `autotune`
# package; drop that entry before importing it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from autotune.cli import main  # noqa: E402 - after the sys.path fix above

if __name__ == "__main__":
    sys.exit(main())
