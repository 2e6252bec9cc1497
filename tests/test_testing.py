"""The package's testing library (``dsa.testing``): the comparison every tier and the tuner use, the top-k contract
check, poisoning and the input makers. Each check is shown to fail on the bug it names."""

from __future__ import annotations

import pytest
import torch

from dsa import reference, testing


def test_compare_matches_nan_and_inf_positions_first() -> None:
    e = torch.tensor([1.0, 2.0, float("-inf"), 4.0])
    assert testing.compare(e.clone(), e, atol=1e-6, rtol=1e-6) is None
    assert "NaN" in testing.compare(torch.tensor([1.0, float("nan"), float("-inf"), 4.0]), e, atol=1, rtol=1)
    assert "-inf" in testing.compare(torch.tensor([1.0, 2.0, 3.0, 4.0]), e, atol=1, rtol=1)
    assert "+inf" in testing.compare(torch.tensor([1.0, float("inf"), float("-inf"), 4.0]), e, atol=1, rtol=1)
    assert "shape" in testing.compare(e[:3], e, atol=1, rtol=1)


def test_compare_elementwise_tolerances() -> None:
    e = torch.tensor([1.0, 2.0, 3.0])
    assert "outside" in testing.compare(e * 1.01, e, atol=1e-6, rtol=1e-6, max_diff=None)
    assert testing.compare(e + 0.005, e, atol=1e-2, rtol=0, max_diff=None) is None


def test_scale_sensitive_difference_catches_a_global_scale_error_cosine_cannot() -> None:
    """A 2 % scale error passes loose elementwise bounds and a cosine check (cosine = 1 exactly), but not the
    scale-sensitive difference."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4096, generator=g) * 0.3
    scaled = e * 1.02
    cosine = float((scaled * e).sum() / (scaled.norm() * e.norm()))
    assert cosine > 0.99999
    assert testing.compare(scaled, e, atol=2e-2, rtol=2e-2, max_diff=None) is None
    problem = testing.compare(scaled, e, atol=2e-2, rtol=2e-2)
    assert problem is not None and "scale-sensitive" in problem and "1.02" in problem
    assert testing.scale_sensitive_diff(scaled, e) == pytest.approx(0.02**2 / (1 + 1.02**2), rel=1e-3)
    # bf16 rounding of the same values stays far below the bound.
    assert testing.compare(e.to(torch.bfloat16).float(), e, atol=2e-2, rtol=2e-2) is None


def test_scale_check_is_skipped_for_a_reference_that_is_zero_up_to_atol() -> None:
    e = torch.zeros(8)
    noise = torch.full((8,), 1e-9)
    assert testing.compare(noise, e, atol=1e-6, rtol=0) is None
    assert testing.scale_sensitive_diff(torch.zeros(3), torch.zeros(3)) == 0.0


def test_assert_close_raises_with_the_reason() -> None:
    with pytest.raises(AssertionError, match="out: values outside"):
        testing.assert_close(torch.ones(2) * 2, torch.ones(2), atol=0.1, rtol=0.1)


def test_topk_error_checks_the_contract_as_sets() -> None:
    scores = testing.causal_scores(2, 6, 9, seed=1)
    expected = reference.topk_indices(scores, 5)
    assert testing.topk_error(scores, expected, 5) is None
    assert testing.topk_error(scores, expected.flip(-1), 5) is None  # order within a row is free
    wrong = expected.clone()
    wrong[0, 5, 0] = (set(range(9)) - set(wrong[0, 5].tolist())).pop()  # a lower score swapped in
    assert "below an unselected" in testing.topk_error(scores, wrong, 5)
    dup = expected.clone()
    dup[1, 5, 1] = dup[1, 5, 0]
    assert testing.topk_error(scores, dup, 5) is not None
    bad = expected.clone()
    bad[0, 0, 0] = 9
    assert "range" in testing.topk_error(scores, bad, 5)
    hidden = expected.clone()
    hidden[0, 0, 1] = 8  # query 0 sees keys 0..3 only: 8 is -inf
    assert testing.topk_error(scores, hidden, 5) is not None
    dropped = expected.clone()
    dropped[1, 5, 2] = -1  # row 5 has 9 finite scores: no -1 allowed
    assert "number of selected" in testing.topk_error(scores, dropped, 5)
    assert "dtype" in testing.topk_error(scores, expected.long(), 5)
    poisoned = testing.poison(expected.clone())
    assert testing.topk_error(scores, poisoned, 5) is not None


def test_topk_error_names_the_rows_and_an_example() -> None:
    """Each row-wise breach of the contract says how many rows break it and shows the first one's numbers."""
    g = testing.generator(11)
    scores = torch.randperm(64, generator=g).float().view(2, 4, 8)  # distinct scores: one right answer per row
    expected = reference.topk_indices(scores, 3)
    dropped = expected.clone()
    dropped[1, 2, 0] = -1
    count = testing.topk_error(scores, dropped, 3)
    assert count == (
        "indices: the number of selected positions differs from min(k, finite scores) in 1 rows, e.g. row [1, 2]: "
        "selected 2, expected 3"
    ), count
    lowest = scores.argsort(-1)[..., 0].to(torch.int32)  # each row's smallest score, never selected at k = 3
    wrong = expected.clone()
    wrong[0, :, 0] = lowest[0]
    below = testing.topk_error(scores, wrong, 3)
    row = scores[0, 0]
    kept = row[wrong[0, 0].long()]
    assert below == (
        f"indices: a selected score is below an unselected finite score in 4 rows, e.g. row [0, 0]: min selected "
        f"{float(kept.min())} < max unselected {float(row[[i for i in range(8) if i not in wrong[0, 0].tolist()]].max())}"
    ), below
    ties = torch.full((1, 1, 6), 2.0)  # every score equal: positions 0 and 1 must win
    tie = testing.topk_error(ties, torch.tensor([[[0, 4]]], dtype=torch.int32), 2)
    assert tie == (
        "indices: the tie rule (among equal scores the smaller position wins) is broken in 1 rows, e.g. row [0, 0]: "
        "position 1 is skipped but position 4 of the same score 2.0 is selected"
    ), tie


def test_causal_indices_are_unique_visible_positions_then_minus_one() -> None:
    batch, seq, seq_kv, topk = 2, 8, 12, 6
    idx = testing.causal_indices(batch, seq, seq_kv, topk, seed=0)
    assert idx.shape == (batch, seq, topk) and idx.dtype == torch.int32
    for t in range(seq):
        visible = t + seq_kv - seq + 1
        take = min(visible, topk)
        row = idx[:, t]
        assert bool(((row[:, :take] >= 0) & (row[:, :take] < visible)).all())
        assert bool((row[:, take:] == -1).all())
        for b in range(batch):
            assert len(set(row[b, :take].tolist())) == take
    assert torch.equal(idx, testing.causal_indices(batch, seq, seq_kv, topk, seed=0)), "reproducible by seed"


def test_causal_scores_hide_exactly_the_invisible_keys() -> None:
    scores = testing.causal_scores(2, 6, 9, seed=1)
    hidden = torch.arange(9).view(1, -1) > torch.arange(6).view(-1, 1) + 3
    assert bool(torch.isneginf(scores[:, hidden]).all()) and bool(torch.isfinite(scores[:, ~hidden]).all())


def test_poison_fills_every_dtype() -> None:
    assert torch.isnan(testing.poison(torch.zeros(3))).all()
    assert torch.isnan(testing.poison(torch.zeros(3, dtype=torch.bfloat16))).all()
    assert torch.isnan(testing.poison(torch.zeros(3, dtype=torch.float8_e4m3fn)).float()).all()
    assert (testing.poison(torch.zeros(3, dtype=torch.int32)) == testing.INT_POISON).all()
    with pytest.raises(TypeError):
        testing.poison(torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("mode", ["causal", "range"])
def test_indexer_inputs_are_random_and_complete(dtype: str, mode: str) -> None:
    inputs = testing.indexer_inputs(batch=2, seq=5, seq_kv=7, heads=3, dim=32, dtype=dtype, seed=3, mode=mode)
    assert inputs["q"].dtype == getattr(torch, dtype) and inputs["q"].float().abs().sum() > 0
    assert (inputs["k_scale"] is not None) == (dtype == "float8_e4m3fn")
    assert (inputs["starts"] is not None) == (mode == "range") == (inputs["ends"] is not None)
    reference.index_scores(inputs["q"], inputs["k"], inputs["weights"], k_scale=inputs["k_scale"],
                           starts=inputs["starts"], ends=inputs["ends"])  # fmt: skip


def test_sparse_mla_inputs_follow_the_requested_options() -> None:
    kwargs = dict(batch=2, seq=3, seq_kv=40, heads=4, d_qk=64, d_v=32, topk=20, seed=5, sm_scale=0.1)
    plain = testing.sparse_mla_inputs(**kwargs)
    assert plain["topk_length"] is None and plain["attn_sink"] is None and plain["indices"].shape == (2, 3, 20)
    full = testing.sparse_mla_bwd_inputs(**kwargs, has_topk_length=True, has_sink=True, kind="duplicates")
    assert full["topk_length"].shape == (2, 3) and full["attn_sink"].shape == (4,)
    assert full["out"].dtype == torch.bfloat16 and full["lse"].dtype == torch.float32
    assert full["d_out"].shape == (2, 3, 4, 32)
