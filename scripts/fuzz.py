#!/usr/bin/env python3
"""Fuzz the ops with the property suite for N minutes (``dsa.fuzz``); see ``--help``."""

import os
import sys

os.execv(sys.executable, [sys.executable, "-m", "dsa.fuzz", *sys.argv[1:]])
