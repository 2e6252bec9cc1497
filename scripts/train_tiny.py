"""Train the tiny DSA model's lightning indexer on synthetic data with the two-stage recipe of DeepSeek-V3.2.

Stage 1 (dense warm-up): the main model is frozen and attends densely; the indexer learns KL(p || softmax(I)).
Stage 2 (sparse): the main model attends to the indexer's top-k and trains on the LM loss; the indexer trains on the
KL restricted to its selection. Every ``--log-every`` steps it prints, on a held-out batch: the dense KL summed over
layers (falling) and the share of the main attention mass that the top-k selection covers (rising).

Runs on a CPU in well under two minutes with the defaults::

    python scripts/train_tiny.py
"""

from __future__ import annotations

import argparse
import time

import torch

from dsa.models import DSAConfig, TinyDSAModel
from dsa.models.training import markov_batches, train_two_stage


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--sparse-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--topk", type=int, default=16)
    # Random weights this large give the frozen main model content-dependent, peaked attention worth imitating.
    parser.add_argument("--init-std", type=float, default=0.2)
    parser.add_argument("--indexer-lr", type=float, default=1e-2)
    parser.add_argument("--model-lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: the tensors are tiny, and more threads only contend on a shared machine.
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = DSAConfig.tiny(index_topk=args.topk, init_std=args.init_std, max_seq_len=max(256, args.seq))
    model = TinyDSAModel(config)
    sample = markov_batches(config.vocab_size, args.batch, args.seq, seed=args.seed)
    print(
        f"tiny DSA model: {config.n_layers} layers, {config.n_heads} heads, latent {config.latent_dim}, "
        f"indexer {config.index_n_heads}x{config.index_head_dim}, top-k {config.index_topk} of {args.seq} tokens; "
        f"{sum(p.numel() for p in model.indexer_parameters())} indexer parameters"
    )
    print(f"{'stage':<8}{'step':>6}{'dense KL':>12}{'top-k recall':>14}{'LM loss':>10}{'time s':>9}")
    start = time.perf_counter()
    records = []
    for record in train_two_stage(
        model,
        sample,
        warmup_steps=args.warmup_steps,
        sparse_steps=args.sparse_steps,
        indexer_lr=args.indexer_lr,
        model_lr=args.model_lr,
        log_every=args.log_every,
        seed=args.seed,
    ):
        records.append(record)
        lm = f"{record.lm_loss:10.3f}" if record.lm_loss is not None else f"{'-':>10}"
        elapsed = time.perf_counter() - start
        print(f"{record.stage:<8}{record.step:>6}{record.kl:>12.4f}{record.recall:>14.3f}{lm}{elapsed:>9.1f}")
    first, last = records[0], records[-1]
    print(
        f"KL {first.kl:.4f} -> {last.kl:.4f} ({100 * (1 - last.kl / first.kl):.0f}% lower); "
        f"top-k recall {first.recall:.3f} -> {last.recall:.3f}"
    )


if __name__ == "__main__":
    main()
