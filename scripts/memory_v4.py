"""The peak memory of one DeepSeek-V4 attention layer's CPU prefill per length (each in a fresh process), as the
README's table (the logic is in ``benchmarks.memory_v4``).

    python scripts/memory_v4.py --seq-lens 8192,16384,32768,65536 --kinds hca,csa
"""

from __future__ import annotations

from benchmarks import memory_v4

if __name__ == "__main__":
    raise SystemExit(memory_v4.main())
