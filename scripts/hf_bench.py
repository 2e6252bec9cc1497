"""transformers' DeepSeek-V3.2 with and without ``apply_dsa`` on a CPU: one layer's peak memory per length (each in a
fresh process) and generate tokens/s, as the README's tables (the logic is in ``benchmarks.hf``).

    python scripts/hf_bench.py --seq-lens 2048,4096,8192
"""

from __future__ import annotations

import argparse

from benchmarks import hf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", default="2048,4096,8192", help="comma-separated lengths of the memory table")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each generate call makes")
    parser.add_argument("--skip-memory", action="store_true", help="only the generate table")
    args = parser.parse_args()
    if not args.skip_memory:
        seqs = [int(s) for s in args.seq_lens.split(",") if s]
        print(hf.memory_table([hf.isolated_memory_record(mode, seq) for seq in seqs for mode in hf.MODES]))
        print()
    records = [hf.generate_record(mode, batch=batch, prompt=prompt, new_tokens=args.new_tokens)
               for prompt, batch in ((64, 1), (64, 4), (2048, 1)) for mode in hf.MODES]  # fmt: skip
    print(hf.rate_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
