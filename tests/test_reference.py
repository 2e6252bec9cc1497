"""Reference tier: the normative PyTorch ops against dense masked attention and against their own definitions."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa import reference
from dsa.testing import (
    assert_close,
    assert_topk_valid,
    index_mask,
    poison_unreferenced_rows,
)
from tests import strategies as sts

FLOAT_DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
# Per-output tolerances: float32 paths differ only in summation order; bf16 outputs differ by one rounding step.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2), torch.float64: dict(atol=1e-10, rtol=1e-10)}
LSE_TOL = dict(atol=2e-5, rtol=2e-5)


def _attention_inputs(shape: sts.AttentionShape, seed: int, dtype: torch.dtype):
    g = sts.generator(seed)
    q = torch.randn((shape.batch, shape.seq, shape.heads, shape.d_qk), generator=g).to(dtype)
    kv = torch.randn((shape.batch, shape.seq_kv, shape.d_qk), generator=g).to(dtype)
    return q, kv


def _sm_scale(shape: sts.AttentionShape) -> float:
    return shape.d_qk**-0.5


def _sink(seed: int, heads: int) -> torch.Tensor:
    return torch.randn(heads, generator=sts.generator(seed + 1)) * 2


@given(shape=sts.attention_shapes(), data=st.data(), seed=sts.SEEDS, dtype=FLOAT_DTYPES, with_sink=st.booleans())
def test_sparse_mla_matches_dense_masked_attention(shape, data, seed, dtype, with_sink):
    """With unique indices, sparse MLA equals dense attention masked to the selected positions (out and lse)."""
    _, indices = data.draw(sts.index_patterns(shape.batch, shape.seq, shape.seq_kv, shape.topk, unique=True))
    q, kv = _attention_inputs(shape, seed, dtype)
    sink = _sink(seed, shape.heads) if with_sink else None
    out, lse = reference.sparse_mla(q, kv, indices, sm_scale=_sm_scale(shape), d_v=shape.d_v, attn_sink=sink)
    mask = index_mask(indices, shape.seq_kv)
    out_ref, lse_ref = reference.dense_masked_attention(q, kv, mask, sm_scale=_sm_scale(shape), d_v=shape.d_v, attn_sink=sink)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, out_ref, **TOL[dtype], name="out")
    assert_close(lse, lse_ref, **LSE_TOL, max_diff=None, name="lse")


@given(shape=sts.attention_shapes(), data=st.data(), seed=sts.SEEDS)
def test_sparse_mla_topk_length_equals_truncated_rows(shape, data, seed):
    """``topk_length`` masks the tail of each row exactly like writing ``-1`` there."""
    _, indices = data.draw(sts.index_patterns(shape.batch, shape.seq, shape.seq_kv, shape.topk))
    length = sts.make_topk_length(seed, shape.batch, shape.seq, shape.topk)
    q, kv = _attention_inputs(shape, seed, torch.float32)
    position = torch.arange(shape.topk).view(1, 1, -1)
    truncated = torch.where(position < length.unsqueeze(-1), indices, torch.full_like(indices, -1))
    out, lse = reference.sparse_mla(q, kv, indices, sm_scale=0.3, d_v=shape.d_v, topk_length=length)
    out_ref, lse_ref = reference.sparse_mla(q, kv, truncated, sm_scale=0.3, d_v=shape.d_v)
    assert_close(out, out_ref, atol=1e-6, rtol=1e-6, name="out")
    assert_close(lse, lse_ref, atol=1e-6, rtol=1e-6, max_diff=None, name="lse")


@given(shape=sts.attention_shapes(), data=st.data(), seed=sts.SEEDS, extra=st.integers(1, 8))
def test_sparse_mla_permutation_and_invalid_padding_change_nothing(shape, data, seed, extra):
    """Permuting a row, or appending invalid entries (-1, >= S_kv, beyond topk_length), leaves out and lse unchanged."""
    _, indices = data.draw(sts.index_patterns(shape.batch, shape.seq, shape.seq_kv, shape.topk))
    q, kv = _attention_inputs(shape, seed, torch.float32)
    kwargs = dict(sm_scale=_sm_scale(shape), d_v=shape.d_v)
    out, lse = reference.sparse_mla(q, kv, indices, **kwargs)
    g = sts.generator(seed)
    perm = torch.rand(indices.shape, generator=g).argsort(dim=-1)
    out_p, lse_p = reference.sparse_mla(q, kv, indices.gather(-1, perm), **kwargs)
    assert_close(out_p, out, atol=1e-6, rtol=1e-5, name="permuted out")
    assert_close(lse_p, lse, atol=1e-6, rtol=1e-6, max_diff=None, name="permuted lse")
    junk = sts.make_indices("all_invalid", seed, shape.batch, shape.seq, shape.seq_kv, extra)
    out_j, lse_j = reference.sparse_mla(q, kv, torch.cat([indices, junk], dim=-1), **kwargs)
    assert_close(out_j, out, atol=1e-6, rtol=1e-6, name="padded out")
    assert_close(lse_j, lse, atol=1e-6, rtol=1e-6, max_diff=None, name="padded lse")
    # Valid-looking entries beyond topk_length are ignored too.
    tail = sts.make_indices("regular", seed + 2, shape.batch, shape.seq, shape.seq_kv, extra)
    length = torch.full((shape.batch, shape.seq), shape.topk, dtype=torch.int32)
    out_t, lse_t = reference.sparse_mla(q, kv, torch.cat([indices, tail], dim=-1), topk_length=length, **kwargs)
    assert_close(out_t, out, atol=1e-6, rtol=1e-6, name="topk_length out")
    assert_close(lse_t, lse, atol=1e-6, rtol=1e-6, max_diff=None, name="topk_length lse")


@given(shape=sts.attention_shapes(), data=st.data(), seed=sts.SEEDS, with_length=st.booleans(), extra=st.integers(0, 4))
def test_sparse_mla_ignores_non_finite_rows_only_invalid_entries_reach(shape, data, seed, with_length, extra):
    """Rows that no valid entry selects may hold NaN/±inf (unwritten cache slots): invalid entries pointing at them,
    or clamped onto them, change nothing in out, lse or the gradients, and those rows get a zero dkv."""
    _, indices = data.draw(sts.index_patterns(shape.batch, shape.seq, shape.seq_kv, shape.topk))
    length = sts.make_topk_length(seed, shape.batch, shape.seq, shape.topk) if with_length else None
    # Invalid entries that name every row, so poisoned rows are certainly reached (out of range and negative too).
    junk = torch.randint(-2, shape.seq_kv + 2, (shape.batch, shape.seq, extra), generator=sts.generator(seed + 3))
    if length is not None:
        indices = torch.cat([indices, junk.to(indices.dtype)], dim=-1)  # past topk_length: invalid
    q, kv = _attention_inputs(shape, seed, torch.float32)
    kv_poisoned, unreferenced = poison_unreferenced_rows(kv, indices, length)
    kwargs = dict(sm_scale=_sm_scale(shape), d_v=shape.d_v, topk_length=length)
    results = []
    for source in (kv, kv_poisoned):
        q_g, kv_g = q.clone().requires_grad_(True), source.clone().requires_grad_(True)
        out, lse = reference.sparse_mla(q_g, kv_g, indices, **kwargs)
        finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        dq, dkv = torch.autograd.grad((out * out).sum() + finite_lse.sum(), (q_g, kv_g))
        results.append((out, lse, dq, dkv))
    for name, clean, poisoned in zip(("out", "lse", "dq", "dkv"), *results):
        assert torch.equal(clean, poisoned), name
    assert (results[1][3][unreferenced] == 0).all()


@given(shape=sts.attention_shapes(), seed=sts.SEEDS, dtype=FLOAT_DTYPES, with_sink=st.booleans())
def test_sparse_mla_all_invalid_rows_give_zero_and_neg_inf(shape, seed, dtype, with_sink):
    """A query with no valid index gets out == 0 and lse == -inf, and no NaN anywhere (also in the gradients)."""
    indices = sts.make_indices("all_invalid", seed, shape.batch, shape.seq, shape.seq_kv, shape.topk)
    q, kv = _attention_inputs(shape, seed, dtype)
    q.requires_grad_(True)
    kv.requires_grad_(True)
    sink = _sink(seed, shape.heads) if with_sink else None
    out, lse = reference.sparse_mla(q, kv, indices, sm_scale=_sm_scale(shape), d_v=shape.d_v, attn_sink=sink)
    assert (out == 0).all()
    assert torch.isneginf(lse).all()
    out.float().sum().backward()
    assert (q.grad == 0).all() and (kv.grad == 0).all()


@given(shape=sts.attention_shapes(), data=st.data(), seed=sts.SEEDS)
def test_attn_sink_is_an_extra_zero_value_column(shape, data, seed):
    """attn_sink equals a softmax over one extra column whose logit is the sink and whose value row is zero."""
    _, indices = data.draw(sts.index_patterns(shape.batch, shape.seq, shape.seq_kv, shape.topk, unique=True))
    q, kv = _attention_inputs(shape, seed, torch.float64)
    sink = _sink(seed, shape.heads).double()
    sm_scale = _sm_scale(shape)
    out, lse = reference.sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=shape.d_v, attn_sink=sink)
    mask = index_mask(indices, shape.seq_kv).unsqueeze(2)
    scores = torch.einsum("bshd,btd->bsht", q, kv) * sm_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    sink_column = sink.view(1, 1, -1, 1).expand(*scores.shape[:-1], 1)
    p = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)
    expected = torch.einsum("bsht,btd->bshd", p[..., :-1], kv[..., : shape.d_v])
    assert_close(out, expected, **TOL[torch.float64], name="out")
    assert_close(lse, torch.logsumexp(scores, dim=-1), **TOL[torch.float64], max_diff=None, name="lse")


@given(batch=st.integers(1, 2), seq=st.integers(1, 6), extra_kv=st.integers(0, 6), heads=st.integers(1, 4), seed=sts.SEEDS,
       pad=st.integers(0, 3))
def test_indices_covering_every_causal_position_reproduce_dense_causal_attention(batch, seq, extra_kv, heads, seed, pad):
    """Indices listing every causally visible position (bottom-right aligned) give dense causal attention."""
    seq_kv = seq + extra_kv
    g = sts.generator(seed)
    q = torch.randn((batch, seq, heads, 16), generator=g)
    kv = torch.randn((batch, seq_kv, 16), generator=g)
    t = torch.arange(seq).view(-1, 1)
    s = torch.arange(seq_kv + pad).view(1, -1)
    rows = torch.where(s <= t + extra_kv, s, torch.full_like(s, -1)).to(torch.int32)
    rows = rows.gather(1, torch.rand(rows.shape, generator=g).argsort(dim=1))  # any order
    indices = rows.unsqueeze(0).expand(batch, -1, -1).contiguous()
    out, lse = reference.sparse_mla(q, kv, indices, sm_scale=0.25, d_v=12)
    causal = (s[:, :seq_kv] <= t + extra_kv).unsqueeze(0).expand(batch, -1, -1)
    scores = torch.einsum("bshd,btd->bsht", q, kv) * 0.25
    scores = scores.masked_fill(~causal.unsqueeze(2), float("-inf"))
    expected = torch.einsum("bsht,btd->bshd", torch.softmax(scores, dim=-1), kv[..., :12])
    assert_close(out, expected, atol=2e-6, rtol=2e-5, name="out")
    assert_close(lse, torch.logsumexp(scores, dim=-1), **LSE_TOL, max_diff=None, name="lse")


@given(data=st.data(), seed=sts.SEEDS, with_sink=st.booleans(), with_length=st.booleans())
def test_sparse_mla_gradcheck_float64(data, seed, with_sink, with_length):
    """``torch.autograd.gradcheck`` in float64 of out and lse w.r.t. q, kv (and the sink), duplicates included."""
    shape = data.draw(sts.attention_shapes(max_batch=1, max_seq=2, max_seq_kv=5, max_heads=2, d_qk_choices=(4,), max_topk=5))
    _, indices = data.draw(sts.index_patterns(shape.batch, shape.seq, shape.seq_kv, shape.topk))
    q, kv = _attention_inputs(shape, seed, torch.float64)
    length = sts.make_topk_length(seed, shape.batch, shape.seq, shape.topk) if with_length else None
    sink = _sink(seed, shape.heads).double() if with_sink else None
    inputs = [q.requires_grad_(True), kv.requires_grad_(True)] + ([sink.requires_grad_(True)] if with_sink else [])

    def fn(q, kv, *rest):
        out, lse = reference.sparse_mla(q, kv, indices, sm_scale=0.7, d_v=shape.d_v, topk_length=length,
                                        attn_sink=rest[0] if rest else None)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)  # an empty row's -inf has no finite difference

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@given(shape=sts.attention_shapes(), data=st.data(), seed=sts.SEEDS)
def test_sparse_mla_gradients_match_dense_and_duplicates_accumulate(shape, data, seed):
    """Gradients equal those of an explicit per-entry expansion: duplicates add up in dkv (gather semantics)."""
    kind, indices = data.draw(sts.index_patterns(shape.batch, shape.seq, shape.seq_kv, shape.topk))
    q, kv = _attention_inputs(shape, seed, torch.float64)
    g = sts.generator(seed + 3)
    d_out = torch.randn((shape.batch, shape.seq, shape.heads, shape.d_v), generator=g, dtype=torch.float64)
    d_lse = torch.randn((shape.batch, shape.seq, shape.heads), generator=g, dtype=torch.float64)
    sm_scale = _sm_scale(shape)

    def loss(out, lse):
        return (out * d_out).sum() + (lse.masked_fill(torch.isinf(lse), 0.0) * d_lse).sum()

    q1, kv1 = q.clone().requires_grad_(True), kv.clone().requires_grad_(True)
    loss(*reference.sparse_mla(q1, kv1, indices, sm_scale=sm_scale, d_v=shape.d_v)).backward()
    # Oracle: gather every entry into its own key row (duplicates become separate rows), then dense attention over
    # a per-query key set; autograd of the gather sums duplicates back into kv.
    q2, kv2 = q.clone().requires_grad_(True), kv.clone().requires_grad_(True)
    valid = reference.valid_index_mask(indices, shape.seq_kv)
    safe = torch.where(valid, indices.long(), 0)
    b = torch.arange(shape.batch).view(-1, 1, 1)
    keys = kv2[b, safe]  # [B, S, k, d_qk]
    scores = torch.einsum("bshd,bskd->bshk", q2, keys) * sm_scale
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    empty = ~valid.any(-1, keepdim=True).unsqueeze(2).expand_as(scores)
    lse = torch.logsumexp(scores.masked_fill(empty, 0.0), -1).masked_fill(empty[..., 0], float("-inf"))
    p = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    out = torch.einsum("bshk,bskd->bshd", p, keys[..., : shape.d_v])
    loss(out, lse).backward()
    assert_close(q1.grad, q2.grad, atol=1e-10, rtol=1e-8, name=f"dq ({kind})")
    assert_close(kv1.grad, kv2.grad, atol=1e-10, rtol=1e-8, name=f"dkv ({kind})")


def test_duplicate_index_counts_twice():
    """Gather semantics, pinned: an index listed twice has twice the weight of one listed once."""
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    kv = torch.randn(1, 2, 8, dtype=torch.float64)
    out, lse = reference.sparse_mla(q, kv, torch.tensor([[[0, 0, 1]]], dtype=torch.int32), sm_scale=1.0, d_v=8)
    s = (q[0, 0, 0] @ kv[0].T)
    w = torch.softmax(torch.stack([s[0], s[0], s[1]]), 0)
    assert_close(out[0, 0, 0], w[0] * kv[0, 0] + w[1] * kv[0, 0] + w[2] * kv[0, 1], atol=1e-12, rtol=1e-12)
    assert_close(lse[0, 0, 0], torch.logsumexp(torch.stack([s[0], s[0], s[1]]), 0), atol=1e-12, rtol=1e-12, max_diff=None)


# ---------------------------------------------------------------------------------------------------------------
# index_scores


def _index_inputs(seed, batch, seq, seq_kv, heads, dim, dtype):
    g = sts.generator(seed)
    q = torch.randn((batch, seq, heads, dim), generator=g)
    k = torch.randn((batch, seq_kv, dim), generator=g)
    weights = torch.randn((batch, seq, heads), generator=g)
    return q.to(dtype), k.to(dtype), weights


def _ranges(seed, batch, seq, seq_kv):
    g = sts.generator(seed + 5)
    a = torch.randint(-1, seq_kv + 2, (batch, seq), generator=g)
    b = torch.randint(-1, seq_kv + 2, (batch, seq), generator=g)
    return torch.minimum(a, b).to(torch.int32), torch.maximum(a, b).to(torch.int32)


INDEX_SIZES = dict(batch=st.integers(1, 2), seq=st.integers(1, 5), seq_kv=st.integers(1, 9), heads=st.integers(1, 3),
                   dim=st.integers(1, 6))


@given(**INDEX_SIZES, seed=sts.SEEDS, dtype=st.sampled_from([torch.bfloat16, torch.float32]), ranged=st.booleans())
def test_index_scores_equals_explicit_loops(batch, seq, seq_kv, heads, dim, seed, dtype, ranged):
    """index_scores equals its definition written as loops; invisible positions are exactly -inf."""
    q, k, w = _index_inputs(seed, batch, seq, seq_kv, heads, dim, dtype)
    starts, ends = _ranges(seed, batch, seq, seq_kv) if ranged else (None, None)
    scores = reference.index_scores(q, k, w, starts=starts, ends=ends)
    assert scores.dtype == torch.float32 and scores.shape == (batch, seq, seq_kv)
    qd, kd, wd = q.double(), k.double(), w.double()
    for b in range(batch):
        for t in range(seq):
            for s in range(seq_kv):
                visible = (starts[b, t] <= s < ends[b, t]) if ranged else (s <= t + seq_kv - seq)
                if not visible:
                    assert scores[b, t, s] == float("-inf"), (b, t, s)
                    continue
                expected = sum(wd[b, t, j] * max(0.0, float(qd[b, t, j] @ kd[b, s])) for j in range(heads))
                assert math.isclose(float(scores[b, t, s]), float(expected), rel_tol=1e-5, abs_tol=1e-5), (b, t, s)


@given(**INDEX_SIZES, seed=sts.SEEDS, ranged=st.booleans())
def test_index_scores_fp8_equals_bf16_on_dequantised_inputs(batch, seq, seq_kv, heads, dim, seed, ranged):
    """The FP8 path equals the bf16 path applied to the dequantised inputs, times k_scale."""
    q, k, w = _index_inputs(seed, batch, seq, seq_kv, heads, dim, torch.float32)
    q8, k8 = (q * 4).to(torch.float8_e4m3fn), (k * 4).to(torch.float8_e4m3fn)
    k_scale = torch.rand((batch, seq_kv), generator=sts.generator(seed + 9)) + 0.1
    starts, ends = _ranges(seed, batch, seq, seq_kv) if ranged else (None, None)
    fp8 = reference.index_scores(q8, k8, w, k_scale=k_scale, starts=starts, ends=ends)
    bf16 = reference.index_scores(q8.to(torch.bfloat16), k8.to(torch.bfloat16), w, starts=starts, ends=ends)
    assert_close(fp8, bf16 * k_scale.unsqueeze(1), atol=1e-5, rtol=1e-5, max_diff=None, name="scores")


# ---------------------------------------------------------------------------------------------------------------
# topk_indices


@given(batch=st.integers(1, 2), seq=st.integers(1, 4), seq_kv=st.integers(1, 64), k=st.integers(1, 80), data=st.data())
def test_topk_indices_is_a_valid_topk_set(batch, seq, seq_kv, k, data):
    """No duplicates, selected >= unselected, -1 padding exactly when fewer finite scores than k, never -inf/NaN."""
    kind, scores = data.draw(sts.score_patterns(batch, seq, seq_kv, k))
    indices = reference.topk_indices(scores, k)
    assert_topk_valid(scores, indices, k)


def _topk_oracle(scores: torch.Tensor, k: int) -> list[list[list[int]]]:
    """The contract by brute force: per row, the positions of the first ``k`` finite scores in (score descending,
    position ascending) order, sorted."""
    return [
        [sorted(s for _, s in sorted((-v, s) for s, v in enumerate(row) if math.isfinite(v))[:k]) for row in rows]
        for rows in scores.tolist()
    ]


@given(batch=st.integers(1, 2), seq=st.integers(1, 4), seq_kv=st.integers(1, 64), k=st.integers(1, 80), data=st.data(),
       how=sts.sprinkles(), seed=sts.SEEDS)
def test_topk_indices_with_non_finite_scores_selects_the_largest_finite(batch, seq, seq_kv, k, data, how, seed):
    """NaN, ``+inf`` and ``-inf`` sprinkled into every score pattern are never selected: the set is the brute-force
    one over the finite scores (ties to the smaller position), ``-1`` padding where fewer than ``k`` are finite."""
    _, scores = data.draw(sts.score_patterns(batch, seq, seq_kv, k))
    scores = sts.sprinkle(scores, how, seed)
    indices = reference.topk_indices(scores, k)
    assert_topk_valid(scores, indices, k)
    assert [[sorted(i for i in row if i >= 0) for row in rows] for rows in indices.tolist()] == _topk_oracle(scores, k)


# ---------------------------------------------------------------------------------------------------------------
# the whole pipeline


@given(batch=st.integers(1, 2), seq=st.integers(1, 6), extra_kv=st.integers(0, 20), heads=st.integers(1, 4),
       topk=st.integers(1, 16), seed=sts.SEEDS, dtype=FLOAT_DTYPES)
def test_pipeline_equals_v32_index_mask_formulation(batch, seq, extra_kv, heads, topk, seed, dtype):
    """sparse_mla(q, kv, topk_indices(index_scores(...))) equals dense causal attention plus a scattered index mask."""
    seq_kv = seq + extra_kv
    qi, ki, w = _index_inputs(seed, batch, seq, seq_kv, 3, 8, torch.bfloat16)
    shape = sts.AttentionShape(batch, seq, seq_kv, heads, 24, 16, topk)
    q, kv = _attention_inputs(shape, seed + 1, dtype)
    scores = reference.index_scores(qi, ki, w)
    indices = reference.topk_indices(scores, topk)
    out, lse = reference.sparse_mla(q, kv, indices, sm_scale=0.2, d_v=16)
    # DeepSeek-V3.2's inference code: an index mask of -inf with 0 scattered at the top-k, added to the causal scores.
    index_bias = torch.full((batch, seq, seq_kv), float("-inf"))
    top = scores.topk(min(topk, seq_kv), dim=-1).indices
    index_bias.scatter_(-1, top, 0.0)
    causal = reference.visibility_mask(batch, seq, seq_kv)
    logits = torch.einsum("bshd,btd->bsht", q.double(), kv.double()) * 0.2
    logits = logits.masked_fill(~causal.unsqueeze(2), float("-inf")) + index_bias.unsqueeze(2).double()
    expected = torch.einsum("bsht,btd->bshd", torch.softmax(logits, -1), kv[..., :16].double())
    # The reference breaks ties in the indexer scores the same way only when the top-k sets agree; compare on rows
    # whose selected sets match (rows with ties at the threshold may legitimately differ).
    same_set = (index_mask(indices, seq_kv) == (index_bias == 0) & causal).all(-1)
    assert_close(out[same_set], expected.to(dtype)[same_set], **TOL[dtype], name="out")
    assert_close(lse[same_set], torch.logsumexp(logits, -1).float()[same_set], **LSE_TOL, max_diff=None, name="lse")
    # Rows where the sets differ can only be rows with ties: the selected score multisets must still be equal.
    for b, t in (~same_set).nonzero().tolist():
        chosen = scores[b, t, indices[b, t][indices[b, t] >= 0].long()]
        oracle = scores[b, t, top[b, t]]
        assert torch.equal(chosen.sort().values, oracle[torch.isfinite(oracle)].sort().values), (b, t)


def test_infinite_sinks():
    """Pinned edge cases (found in review): a +inf sink takes all the mass (out = 0), a -inf sink is no sink."""
    g = sts.generator(11)
    q, kv = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    indices = torch.tensor([[[0, 1, 4], [2, -1, 3]]], dtype=torch.int32)
    plain_out, plain_lse = reference.sparse_mla(q, kv, indices, sm_scale=0.5, d_v=6)
    sink = torch.tensor([float("inf"), float("-inf"), 0.0])
    out, lse = reference.sparse_mla(q, kv, indices, sm_scale=0.5, d_v=6, attn_sink=sink)
    assert not out.isnan().any()
    assert (out[:, :, 0] == 0).all()
    assert_close(out[:, :, 1], plain_out[:, :, 1], atol=1e-7, rtol=1e-6)
    assert_close(lse, plain_lse, atol=0, rtol=0, max_diff=None, name="lse")
