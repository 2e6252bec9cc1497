"""Indexer training: the two-stage recipe of the DeepSeek-V3.2 paper as losses, metrics and a small training loop.

1. **Dense warm-up.** The main model is frozen and attends densely; the indexer learns to match the main attention:
   ``L_I = KL(p_t || softmax(I_t))`` with ``p_t`` the main attention distribution of query ``t`` summed over heads
   and L1-normalised, ``I_t`` the indexer scores of every visible key.
2. **Sparse training.** The main model attends to the indexer's top-k and trains on the language-modelling loss; the
   indexer trains on the same KL restricted to the selected set ``S_t``: ``KL(p_{t,S_t} || softmax(I_{t,S_t}))``.
   The indexer's input is detached from the main model's graph (``DSAConfig.detach_indexer_input``), so the LM
   loss never reaches the indexer (the indices are not differentiable) and the indexer loss never reaches the model.

Losses are averaged over the queries that carry attention mass (the paper sums over tokens; a mean keeps the scale
independent of the sequence length), in float32. This module holds tensor functions only; it imports no module
classes, so ``dsa.models.attention`` may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dsa import reference
from dsa.reference import gather_scores  # public here too: the losses' callers gather their targets with it

# Bound the largest intermediate of attention_mass_on_indices ([B, rows, H, k] float32).
_CHUNK_ELEMENTS = 1 << 24


def attention_mass_on_indices(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    sm_scale: float,
    topk_length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Main-attention probability of each selected key, summed over heads (no gradient).

    Args:
        q (torch.Tensor): ``[B, S, H, d_qk]``; kv (torch.Tensor): ``[B, S_kv, d_qk]``; any floating dtype.
        indices (torch.Tensor): ``[B, S, k]`` int32 (invalid entries as in ``sparse_mla``).
        lse (torch.Tensor): ``[B, S, H]`` float32, ``sparse_mla``'s log-sum-exp (without sink).
        sm_scale (float): the attention's softmax scale.
        topk_length (torch.Tensor | None): ``[B, S]`` int32, as in ``sparse_mla``.

    Returns:
        ``[B, S, k]`` float32: ``sum_h exp(sm_scale * q[h] . kv[idx] - lse[h])``, 0 at invalid entries and for
        queries without a valid entry.
    """
    batch, seq, heads, _ = q.shape
    seq_kv, top = kv.shape[1], indices.shape[-1]
    mass = torch.zeros((batch, seq, top), dtype=torch.float32, device=q.device)
    valid = reference.valid_index_mask(indices, seq_kv, topk_length)
    batch_index = torch.arange(batch, device=q.device).view(batch, 1, 1)
    step = max(1, min(seq, _CHUNK_ELEMENTS // max(1, batch * heads * top)))
    with torch.no_grad():
        for t0 in range(0, seq, step):
            rows = slice(t0, min(seq, t0 + step))
            idx = torch.where(valid[:, rows], indices[:, rows].to(torch.int64), 0)
            keys = kv[batch_index, idx].float()  # [B, c, k, d_qk]
            logits = torch.einsum("bchd,bckd->bchk", q[:, rows].float(), keys) * sm_scale
            lse_c = lse[:, rows].float()
            safe_lse = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
            p = torch.exp(logits - safe_lse.unsqueeze(-1)).masked_fill(~valid[:, rows].unsqueeze(2), 0.0)
            p = p.masked_fill(~torch.isfinite(lse_c).unsqueeze(-1), 0.0)
            mass[:, rows] = p.sum(dim=2)
    return mass


def _kl_to_softmax(target_mass: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows with positive mass of ``KL(target / sum(target) || softmax(logits))``.

    Args:
        target_mass (torch.Tensor): ``[..., n]`` >= 0 (detached), unnormalised.
        logits (torch.Tensor): ``[..., n]`` float; ``-inf`` marks entries outside the distribution.
    """
    target = target_mass.detach().float()
    total = target.sum(-1, keepdim=True)
    rows = total.squeeze(-1) > 0
    p = target / torch.where(total > 0, total, torch.ones_like(total))
    # A row whose logits are all -inf has no distribution; keep it finite (it is excluded below anyway).
    all_masked = torch.isneginf(logits).all(dim=-1, keepdim=True)
    log_q = torch.log_softmax(logits.float().masked_fill(all_masked, 0.0), dim=-1)
    positive = p > 0
    # where() on both factors: 0 * (-inf) would be NaN in the forward and in the gradient.
    log_p = torch.log(torch.where(positive, p, 1.0))
    terms = torch.where(positive, p * (log_p - torch.where(positive, log_q, 0.0)), 0.0)
    per_row = terms.sum(-1)
    count = rows.sum()
    return torch.where(count > 0, (per_row * rows).sum() / count.clamp_min(1), per_row.sum() * 0.0)


def dense_warmup_loss(attn_mass: torch.Tensor, index_scores: torch.Tensor) -> torch.Tensor:
    """Warm-up loss ``KL(p_t || softmax(I_t))``, averaged over queries.

    Args:
        attn_mass (torch.Tensor): ``[B, S, S_kv]``: main attention probabilities summed over heads (any positive
            scale; L1-normalised here), 0 at invisible keys. Detached.
        index_scores (torch.Tensor): ``[B, S, S_kv]`` float32, ``-inf`` at invisible keys; gradients flow here.

    Returns:
        A float32 scalar.
    """
    return _kl_to_softmax(attn_mass, index_scores)


def sparse_stage_loss(attn_mass: torch.Tensor, selected_scores: torch.Tensor) -> torch.Tensor:
    """Sparse-stage loss ``KL(p_{t,S_t} || softmax(I_{t,S_t}))`` over the selected set, averaged over queries.

    Args:
        attn_mass (torch.Tensor): ``[B, S, k]``: main attention mass on each selected key summed over heads
            (``attention_mass_on_indices``), 0 at invalid entries. Detached.
        selected_scores (torch.Tensor): ``[B, S, k]`` float32 indexer scores at the selection (``-inf`` at invalid
            entries), e.g. from ``dsa.ops.index_topk(..., return_scores=True)`` or ``gather_scores``; gradients flow
            here.
    """
    return _kl_to_softmax(attn_mass, selected_scores)


def topk_recall(attn_mass: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Share of the main attention mass that the selection covers, averaged over queries that see more than k keys.

    Args:
        attn_mass (torch.Tensor): ``[B, S, S_kv]``: dense main attention summed over heads, 0 at invisible keys.
        indices (torch.Tensor): ``[B, S, k]`` int32 selection.

    Returns:
        A float32 scalar in [0, 1] (NaN when no query sees more than k keys: recall is trivially 1 there).
    """
    mass = attn_mass.detach().float()
    covered = gather_scores(mass, indices).masked_fill(indices < 0, 0.0).clamp_min(0).sum(-1)
    total = mass.sum(-1)
    visible = (mass > 0).sum(-1)
    rows = (visible > indices.shape[-1]) & (total > 0)
    return (covered / torch.where(total > 0, total, 1.0))[rows].mean()


# --------------------------------------------------------------------------------------------------------------------
# A small two-stage training loop (used by scripts/train_tiny.py and the tests).
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainRecord:
    """One logged step: the summed indexer KL over layers, the dense top-k recall (mean over layers, evaluated on a
    held-out batch) and, in the sparse stage, the LM loss."""

    stage: str
    step: int
    kl: float
    recall: float
    lm_loss: float | None = None


def markov_batches(
    vocab_size: int, batch: int, seq: int, *, seed: int = 0, concentration: int = 4
) -> Callable[[torch.Generator], torch.Tensor]:
    """A sampler of synthetic token batches ``[batch, seq]`` int64 from a fixed random sparse Markov chain.

    Each token has ``concentration`` likely successors, so the data has structure an LM can learn.
    """
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab_size, (vocab_size, concentration), generator=generator)

    def sample(rng: torch.Generator) -> torch.Tensor:
        tokens = torch.empty((batch, seq), dtype=torch.int64)
        tokens[:, 0] = torch.randint(0, vocab_size, (batch,), generator=rng)
        choice = torch.randint(0, concentration, (batch, seq), generator=rng)
        for t in range(1, seq):
            tokens[:, t] = successors[tokens[:, t - 1], choice[:, t]]
        return tokens

    return sample


def evaluate_recall(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[float, float]:
    """``(dense KL summed over layers, mean top-k recall over layers)`` of ``model`` on ``tokens`` (dense mode)."""
    mode = model.layers[0].attn.mode
    model.set_attention_mode("dense")
    with torch.no_grad():
        _, auxes = model(tokens, return_aux=True)
    model.set_attention_mode(mode)
    kl = sum(float(dense_warmup_loss(a.attn_target, a.index_scores)) for a in auxes)
    recall = sum(float(topk_recall(a.attn_target, a.indices)) for a in auxes) / len(auxes)
    return kl, recall


def train_two_stage(
    model: torch.nn.Module,
    sample: Callable[[torch.Generator], torch.Tensor],
    *,
    warmup_steps: int,
    sparse_steps: int,
    indexer_lr: float = 3e-3,
    model_lr: float = 1e-3,
    log_every: int = 25,
    seed: int = 0,
) -> Iterator[TrainRecord]:
    """Train ``model`` (a ``dsa.models.TinyDSAModel``) with the two-stage recipe, yielding a record every
    ``log_every`` steps (and at the start and end of each stage).

    Stage 1 (``warmup_steps``): dense attention, main parameters frozen, indexer trained on ``dense_warmup_loss``.
    Stage 2 (``sparse_steps``): sparse attention; the main parameters train on the LM loss, the indexer on
    ``sparse_stage_loss`` (separate optimisers; the indexer input is detached by the model).
    """
    rng = torch.Generator().manual_seed(seed)
    held_out = sample(torch.Generator().manual_seed(seed + 1))
    indexer_params = model.indexer_parameters()
    main_params = model.main_parameters()
    indexer_opt = torch.optim.AdamW(indexer_params, lr=indexer_lr, weight_decay=0.0)

    def record(stage: str, step: int, lm_loss: float | None = None) -> TrainRecord:
        kl, recall = evaluate_recall(model, held_out)
        return TrainRecord(stage, step, kl, recall, lm_loss)

    # Stage 1: dense warm-up with the main model frozen.
    for p in main_params:
        p.requires_grad_(False)
    model.set_attention_mode("dense")
    yield record("warmup", 0)
    for step in range(1, warmup_steps + 1):
        _, auxes = model(sample(rng), return_aux=True)
        loss = sum(dense_warmup_loss(a.attn_target, a.index_scores) for a in auxes)
        indexer_opt.zero_grad(set_to_none=True)
        loss.backward()
        indexer_opt.step()
        if step % log_every == 0 or step == warmup_steps:
            yield record("warmup", step)

    # Stage 2: sparse attention; LM loss for the main model, the selected-set KL for the indexer.
    for p in main_params:
        p.requires_grad_(True)
    model.set_attention_mode("sparse")
    model_opt = torch.optim.AdamW(main_params, lr=model_lr, weight_decay=0.0)
    for step in range(1, sparse_steps + 1):
        tokens = sample(rng)
        logits, auxes = model(tokens, return_aux=True)
        lm_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
        )
        index_loss = sum(sparse_stage_loss(a.attn_target, a.index_scores) for a in auxes)
        model_opt.zero_grad(set_to_none=True)
        indexer_opt.zero_grad(set_to_none=True)
        (lm_loss + index_loss).backward()
        model_opt.step()
        indexer_opt.step()
        if step % log_every == 0 or step == sparse_steps:
            yield record("sparse", step, float(lm_loss.detach()))


