"""Greedy generation with the model cache: one prefill call over the prompts, then one-token decode steps
(``TinyDSAModel.generate`` is this function)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from dsa.serving import model_cache

if TYPE_CHECKING:
    from dsa.models.tiny import TinyDSAModel

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    model: TinyDSAModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    cache_dtype: torch.dtype | str = torch.bfloat16,
    attention_mask: torch.Tensor | None = None,
    page_size: int = 64,
) -> torch.Tensor:
    """Greedy (argmax) continuation by ``model`` (a ``TinyDSAModel``; this is also its ``generate`` method): one
    prefill call over the prompts, then one-token decode steps.

    Args:
        input_ids (torch.Tensor): ``[B, S]`` int64 prompts.
        max_new_tokens (int): ``>= 0`` tokens to add to every row.
        cache_dtype: the latent cache dtype (see ``TinyDSAModel.new_cache``).
        attention_mask (torch.Tensor | None): ``[B, S]`` for padded prompts (see ``TinyDSAModel.forward``); every row
            needs at least one real token. The new tokens follow column ``S - 1`` whatever the padding.

    Returns:
        torch.Tensor: ``[B, S + max_new_tokens]`` int64: the prompts, then the generated tokens.

    Raises:
        TypeError / ValueError naming ``TinyDSAModel.generate``, before anything runs: ``input_ids`` as in
        ``TinyDSAModel.forward``, a bad ``max_new_tokens`` or ``attention_mask``, or sequences that would grow past
        ``config.max_seq_len`` (the longest prompt's real tokens plus ``max_new_tokens``).
    """
    caller = "TinyDSAModel.generate"
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"{caller}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    model._check_input_ids(input_ids, caller)
    batch, seq = input_ids.shape
    last = torch.full((batch,), seq - 1, dtype=torch.int64, device=input_ids.device)
    prompt = seq
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"{caller}: attention_mask must be [B, S] = {(batch, seq)} like input_ids, got "
                f"{tuple(attention_mask.shape)}"
            )
        offsets, lengths = model_cache.mask_runs(attention_mask.to(input_ids.device), caller=caller)
        if bool((lengths == 0).any()):
            raise ValueError(f"{caller}: every row of attention_mask needs at least one real token")
        last = offsets + lengths - 1
        prompt = int(lengths.max())
    limit = model.config.max_seq_len
    if prompt + max_new_tokens > limit:
        raise ValueError(
            f"{caller}: a {prompt}-token prompt plus max_new_tokens = {max_new_tokens} makes "
            f"{prompt + max_new_tokens} tokens, past config.max_seq_len = {limit}"
        )
    if max_new_tokens == 0:
        return input_ids.clone()
    cache = model.new_cache(batch, seq + max_new_tokens, dtype=cache_dtype, page_size=page_size)
    logits = model(input_ids, cache=cache, attention_mask=attention_mask)
    token = logits[torch.arange(batch, device=logits.device), last].argmax(dim=-1)
    generated = [token]
    for _ in range(max_new_tokens - 1):
        token = model(token.view(batch, 1), cache=cache)[:, -1].argmax(dim=-1)
        generated.append(token)
    logger.debug("TinyDSAModel.generate: %d rows, %d prompt columns, %d new tokens", batch, seq, max_new_tokens)
    return torch.cat((input_ids, torch.stack(generated, dim=1)), dim=1)
