"""Rotary position embeddings: YaRN-corrected inverse frequencies, cos/sin tables by length or by position, and
their application in the interleaved (MLA) or non-interleaved (indexer) layout."""

from __future__ import annotations

import math

import torch

from dsa.models.config import DSAConfig
from dsa.reference import compute_dtype


def rope_inv_freq(config: DSAConfig) -> torch.Tensor:
    """``[qk_rope_head_dim / 2]`` float32 inverse frequencies, YaRN-corrected when ``max_seq_len > original``."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if config.yarn:

        def correction_dim(rotations: float) -> float:
            return dim * math.log(config.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(config.beta_fast)), 0)
        high = min(math.ceil(correction_dim(config.beta_slow)), dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / config.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_cos_sin(inv_freq: torch.Tensor, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [seq, r/2]`` float32 for positions ``0 .. seq-1``."""
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq.to(device))
    return torch.cos(angles), torch.sin(angles)


def rope_cos_sin_at(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [B, S, r/2]`` float32 at arbitrary integer ``positions [B, S]`` (per-row positions: packed
    sequences, padded rows, tokens after a cache). Position ``p`` gets exactly ``rope_cos_sin``'s row ``p``."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Rotate ``x [B, S, ..., r]`` by position (``cos``/``sin [S, r/2]`` shared by the batch, or ``[B, S, r/2]`` per
    row from ``rope_cos_sin_at``), in float32 (float64 for float64 input); returns x's dtype.

    ``interleaved``: pairs are ``(x[2i], x[2i+1])`` (the main MLA's layout); otherwise ``(x[i], x[i + r/2])`` (the
    indexer's layout).
    """
    compute = compute_dtype(x.dtype)
    rows = cos.shape[0] if cos.dim() == 3 else 1
    shape = (rows, x.shape[1]) + (1,) * (x.dim() - 3) + (cos.shape[-1],)
    c, s = cos.view(shape).to(compute), sin.view(shape).to(compute)
    xf = x.to(compute)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)
