"""Indexer training under its first name (``dsa.training.*``): a re-export of ``dsa.models.training``, where the
losses, metrics and the two-stage loop live."""

from __future__ import annotations

from dsa.models.training import (
    TrainRecord,
    attention_mass_on_indices,
    dense_warmup_loss,
    evaluate_recall,
    gather_scores,
    markov_batches,
    sparse_stage_loss,
    topk_recall,
    train_two_stage,
)

__all__ = [
    "TrainRecord",
    "attention_mass_on_indices",
    "dense_warmup_loss",
    "evaluate_recall",
    "gather_scores",
    "markov_batches",
    "sparse_stage_loss",
    "topk_recall",
    "train_two_stage",
]
