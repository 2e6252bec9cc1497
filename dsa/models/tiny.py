"""A small causal LM of DSA blocks (``TinyDSAModel``): for tests, indexer training and the serving path's examples.

Prefill, chunked prefill and decode are one ``forward`` with a ``dsa.serving.model_cache.ModelCache``; packed
(``cu_seqlens``) and padded (``attention_mask``) batches are compacted through the helpers there.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

from dsa.models.attention import AttentionAux, DSAttention
from dsa.models.config import DENSE, SPARSE, AttentionMode, DSAConfig
from dsa.models.generate import generate as generate_tokens
from dsa.models.indexer import _linear
from dsa.serving import model_cache

# TinyDSAModel.save's file: {"format": this, "config": asdict(DSAConfig), "state_dict": ...}.
CHECKPOINT_FORMAT = "dsa-tiny-model/1"


class _MLP(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = _linear(dim, inter_dim)
        self.w2 = _linear(inter_dim, dim)
        self.w3 = _linear(dim, inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, config: DSAConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = DSAttention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = _MLP(config.dim, config.inter_dim)

    def forward(
        self, x: torch.Tensor, *, return_aux: bool, **attention: object
    ) -> tuple[torch.Tensor, AttentionAux | None]:
        aux = None
        if return_aux:
            h, aux = self.attn(self.attn_norm(x), return_aux=True)
        else:
            h = self.attn(self.attn_norm(x), **attention)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), aux


def _check_cache_room(cache: model_cache.ModelCache, new: int | torch.Tensor) -> None:
    """Raise (naming ``TinyDSAModel.forward``) when appending ``new`` tokens (an int, or ``[B]`` per sequence) would
    grow a sequence of ``cache`` past its capacity: checked once per call, before any layer appends."""
    held = cache.seq_lens.to(torch.int64)
    total = held + (new.to(held.device) if isinstance(new, torch.Tensor) else new)
    if bool((total > cache.capacity).any()):
        raise ValueError(
            f"TinyDSAModel.forward: the cache's sequences hold {held.tolist()} tokens; {total.sub(held).tolist()} "
            f"more would make {total.tolist()}, over its capacity {cache.capacity} (new_cache's max_seq_len "
            f"{cache.max_seq_len} rounded up to whole pages)"
        )


class TinyDSAModel(nn.Module):
    """A small causal LM of DSA blocks (pre-norm attention + SwiGLU MLP), for tests and indexer training."""

    def __init__(self, config: DSAConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = _linear(config.dim, config.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every projection and the embedding; norms start at identity."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                module.reset_parameters()

    def set_attention_mode(self, mode: AttentionMode) -> None:
        """``"dense"`` (warm-up) or ``"sparse"`` for every layer."""
        if mode not in (SPARSE, DENSE):
            raise ValueError(f"mode must be 'sparse' or 'dense', got {mode!r}")
        for layer in self.layers:
            layer.attn.mode = mode

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.attn.indexer.parameters()]

    def main_parameters(self) -> list[nn.Parameter]:
        indexer = {id(p) for p in self.indexer_parameters()}
        return [p for p in self.parameters() if id(p) not in indexer]

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        return_aux: bool = False,
        cache: model_cache.ModelCache | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[AttentionAux]]:
        """``input_ids [B, S]`` int64 -> ``logits [B, S, vocab_size]`` in the parameters' dtype (and one
        ``AttentionAux`` per layer with ``return_aux``).

        Args:
            cache (model_cache.ModelCache | None): from :meth:`new_cache`: the tokens continue each sequence from
                ``cache.seq_lens`` (prefill, chunked prefill and decode alike) and are appended to it.
            attention_mask (torch.Tensor | None): ``[B, S]``, 1 = real token, 0 = padding; each row's real tokens one
                contiguous run (left or right padding). Positions count real tokens only; padding keys are invisible;
                the logits at padding columns are unspecified (finite). With a cache only the real tokens are cached.
            cu_seqlens (torch.Tensor | None): ``[N + 1]`` int32/int64 offsets of ``N`` sequences packed into
                ``input_ids [1, total]``: positions restart at 0 per sequence, each sees only itself. No cache.

        ``return_aux`` and dense mode work only without ``cache``, ``attention_mask`` and ``cu_seqlens``
        (``NotImplementedError`` otherwise). Positions past ``config.max_seq_len`` are computed (RoPE takes any
        position); :meth:`generate` refuses to go past it.

        Raises:
            TypeError / ValueError naming ``TinyDSAModel.forward``: ``input_ids`` not a non-empty ``[B, S]`` int64
            tensor of ids in ``[0, vocab_size)``; a cache whose sequences cannot take the new tokens (checked before
            anything is appended).
        """
        self._check_input_ids(input_ids, "TinyDSAModel.forward")
        batch, seq = input_ids.shape
        if cache is None and attention_mask is None and cu_seqlens is None:
            x = self.embed(input_ids)
            auxes = []
            for layer in self.layers:
                x, aux = layer(x, return_aux=return_aux)
                auxes.append(aux)
            logits = self.head(self.norm(x))
            return (logits, auxes) if return_aux else logits
        if return_aux:
            raise NotImplementedError("TinyDSAModel.forward: return_aux needs no cache, attention_mask or cu_seqlens")
        if any(layer.attn.mode != SPARSE for layer in self.layers):
            raise NotImplementedError("TinyDSAModel.forward: cache, attention_mask and cu_seqlens need sparse mode")
        if cu_seqlens is not None:
            if cache is not None or attention_mask is not None:
                raise NotImplementedError("TinyDSAModel.forward: cu_seqlens excludes cache and attention_mask")
            if batch != 1:
                raise ValueError(
                    f"TinyDSAModel.forward: with cu_seqlens, input_ids must be [1, total], got {batch} rows"
                )
            positions, starts, ends = model_cache.packed_ranges(cu_seqlens.to(input_ids.device), seq)
            return self._run(input_ids, positions=positions, starts=starts, ends=ends)
        offsets = lengths = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, seq):
                raise ValueError(
                    f"TinyDSAModel.forward: attention_mask must be [B, S] = {(batch, seq)} like input_ids, got "
                    f"{tuple(attention_mask.shape)}"
                )
            offsets, lengths = model_cache.mask_runs(attention_mask.to(input_ids.device))
            # Rotate each row's real run to column 0: the layers then see right-padded rows only.
            input_ids = model_cache.compact_rows(input_ids, offsets)
        if cache is not None:
            if len(cache.layers) != len(self.layers) or cache.batch_size != batch:
                raise ValueError(
                    f"TinyDSAModel.forward: cache holds {len(cache.layers)} layers x {cache.batch_size} sequences, "
                    f"the model has {len(self.layers)} layers and input_ids {batch} rows"
                )
            _check_cache_room(cache, seq if lengths is None else lengths)
            logits = self._run(input_ids, cache=cache, lengths=lengths)
        else:
            positions, starts, ends = model_cache.padded_ranges(lengths, seq)
            logits = self._run(input_ids, positions=positions, starts=starts, ends=ends)
        return logits if offsets is None else model_cache.restore_rows(logits, offsets)

    def _check_input_ids(self, input_ids: object, caller: str) -> None:
        """``input_ids`` must be a non-empty ``[B, S]`` int64 tensor of ids in ``[0, vocab_size)``; the errors name
        ``caller``. One host sync (the id range), before any layer runs."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"{caller}: input_ids must be a torch.Tensor [B, S] int64, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(
                f"{caller}: input_ids must be [B, S] int64, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if input_ids.numel() == 0:
            raise ValueError(f"{caller}: input_ids must not be empty, got shape {tuple(input_ids.shape)}")
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()
        vocab = self.config.vocab_size
        if low < 0 or high >= vocab:
            raise ValueError(
                f"{caller}: input_ids must lie in [0, vocab_size = {vocab}), got values from {low} to {high}"
            )

    def _run(
        self, input_ids: torch.Tensor, *, cache: model_cache.ModelCache | None = None, **attention: object
    ) -> torch.Tensor:
        """Embedding, layers (``attention``: ``DSAttention.forward``'s keywords) and head; the layer caches go to
        their layers."""
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            if cache is not None:
                attention["cache"] = cache.layers[i]
            x, _ = layer(x, return_aux=False, **attention)
        return self.head(self.norm(x))

    def new_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | str = torch.bfloat16,
        page_size: int = 64,
    ) -> model_cache.ModelCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens on the model's device.

        ``dtype``: the latent rows' (``torch.bfloat16``, ``torch.float32`` or ``"fp8"``, FlashMLA's layout); the
        indexer keys are the model's FP8 keys with ``index_fp8``, else float32 for a float32 cache and bfloat16
        otherwise.
        """
        config = self.config
        return model_cache.ModelCache(
            n_layers=config.n_layers,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            latent_dim=config.latent_dim,
            d_rope=config.qk_rope_head_dim,
            index_dim=config.index_head_dim,
            index_fp8=config.index_fp8,
            dtype=dtype,
            page_size=page_size,
            device=self.embed.weight.device,
        )

    # Greedy generation over the model cache: ``dsa.models.generate.generate`` with this model as its first argument.
    generate = generate_tokens

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config (``dataclasses.asdict``) and the state dict to ``path`` (``torch.save`` of a plain dict,
        readable with ``weights_only=True``). The attention mode is training state and is not saved."""
        torch.save(
            {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.config), "state_dict": self.state_dict()},
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, map_location: torch.device | str = "cpu") -> TinyDSAModel:
        """A model rebuilt from :meth:`save`'s file: its config, then its weights (in their saved dtype)."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"TinyDSAModel.load: {path} is not a {CHECKPOINT_FORMAT!r} checkpoint")
        model = cls(DSAConfig(**blob["config"]))
        # assign=True keeps the saved tensors (dtype and device) instead of copying into the fresh float32 ones.
        model.load_state_dict(blob["state_dict"], assign=True)
        return model
