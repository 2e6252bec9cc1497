"""``dsa.integrations.transformers``: transformers' DeepSeek-V3.2 and GLM-5 models served by the DSA ops.

Every model is a tiny random-weight configuration built in code (``tiny_config``: 3 layers, hidden 64, 4 heads,
latent 32 + RoPE 8, an indexer of 16 heads x 32 with top-k 16, YaRN; GLM-5 with a shared-selection layer); nothing is
downloaded. Sequences are longer than top-k, so the selection matters: attending densely instead moves the logits by
about the logit scale, 10^4 times the float32 tolerance. The reference is transformers' own eager model with the
same weights (float32, the CPU reference backend of the ops).
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from dsa import ops  # noqa: E402
from dsa.integrations import transformers as hf  # noqa: E402
from dsa.integrations import visibility  # noqa: E402
from dsa.testing import assert_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {
    "deepseek_v32": (transformers.DeepseekV32ForCausalLM, transformers.DeepseekV32Model),
    "glm_moe_dsa": (transformers.GlmMoeDsaForCausalLM, transformers.GlmMoeDsaModel),
}
FLOAT32_TOLERANCE = 1e-4
"""Logits must equal eager's within this share of the logit scale (the largest |logit|) in float32."""
SEQ = 64
"""Prompt length: four times the tiny config's top-k."""


def _model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family][0](hf.tiny_config(family, **overrides)).to(dtype).eval()


def _ids(seed: int, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, seq), generator=g)


def _left_padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` with ``pads[b]`` leading pad tokens per row, and the 2D attention mask."""
    ids, mask = ids.clone(), torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def _forbid_transformers_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, transformers' indexers and its dense mask builders raise if anything calls them."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers' own indexer or dense mask ran under apply_dsa")

    for module in (transformers.models.deepseek_v32.modeling_deepseek_v32,
                   transformers.models.glm_moe_dsa.modeling_glm_moe_dsa):  # fmt: skip
        monkeypatch.setattr(module, "create_causal_mask", forbidden)
        for name in ("DeepseekV32Indexer", "GlmMoeDsaIndexer"):
            if hasattr(module, name):
                monkeypatch.setattr(getattr(module, name), "forward", forbidden)
    monkeypatch.setattr(transformers.generation.utils, "create_masks_for_generate", forbidden)


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, share: float, name: str) -> None:
    scale = float(expected.abs().max())
    assert_close(actual, expected, atol=share * scale, rtol=0.0, name=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_logits_equal_eager_without_transformers_indexer_or_dense_mask(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(family, seed=1)
    ids = _ids(2)
    with torch.no_grad():
        eager = model(ids).logits
        for layer in model.model.layers:  # the test's sensitivity: the same model attending densely
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.index_topk = 10**6
        dense = model(ids).logits
        for layer in model.model.layers:
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.index_topk = model.config.index_topk
        _forbid_transformers_attention(monkeypatch)
        served = hf.apply_dsa(model)(ids).logits
    assert float((dense - eager).abs().max()) > 100 * FLOAT32_TOLERANCE * float(eager.abs().max())
    _assert_logits_close(served, eager, FLOAT32_TOLERANCE, f"{family} logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_hidden_states_equal_eager(family: str) -> None:
    torch.manual_seed(3)
    model = FAMILIES[family][1](hf.tiny_config(family)).eval()
    ids = _ids(4, batch=1)
    with torch.no_grad():
        eager = model(ids).last_hidden_state
        served = hf.apply_dsa(model)(ids).last_hidden_state
    _assert_logits_close(served, eager, FLOAT32_TOLERANCE, f"{family} hidden states")


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_eager_at_real_positions(family: str) -> None:
    model = _model(family, seed=5)
    ids, mask = _left_padded(_ids(6, batch=3), [0, 9, 30])
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        served = hf.apply_dsa(model)(ids, attention_mask=mask).logits
        alone = model(ids[2:, 30:]).logits
    real = mask.bool()
    _assert_logits_close(served[real], eager[real], FLOAT32_TOLERANCE, f"{family} padded logits")
    _assert_logits_close(served[2, 30:], alone[0], FLOAT32_TOLERANCE, f"{family} padded row vs alone")


def test_right_padded_batch_equals_eager_at_real_positions() -> None:
    model = _model("deepseek_v32", seed=7)
    ids = _ids(8)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        served = hf.apply_dsa(model)(ids, attention_mask=mask).logits
    real = mask.bool()
    _assert_logits_close(served[real], eager[real], FLOAT32_TOLERANCE, "right-padded logits")


def test_packed_sequences_equal_eager() -> None:
    """Two sequences packed in one row (no mask, no cache, position ids restarting): kept apart like transformers'
    packed-sequence mask does."""
    model = _model("glm_moe_dsa", seed=9)
    ids = _ids(10, batch=1)
    positions = torch.cat([torch.arange(24), torch.arange(SEQ - 24)]).unsqueeze(0)
    with torch.no_grad():
        eager = model(ids, position_ids=positions, use_cache=False).logits
        served = hf.apply_dsa(model)(ids, position_ids=positions, use_cache=False).logits
        second = model(ids[:, 24:], use_cache=False).logits
    _assert_logits_close(served, eager, FLOAT32_TOLERANCE, "packed logits")
    _assert_logits_close(served[:, 24:], second, FLOAT32_TOLERANCE, "packed second sequence vs alone")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_gives_eager_tokens_with_and_without_padding(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(family, seed=11)
    prompt = _ids(12, seq=40)
    ids, mask = _left_padded(prompt, [7, 0])
    new = 16
    with torch.no_grad():
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        hf.apply_dsa(model)
        decode_calls = []
        real_decode = ops.sparse_mla_decode
        monkeypatch.setattr(ops, "sparse_mla_decode", lambda *a, **k: decode_calls.append(1) or real_decode(*a, **k))
        _forbid_transformers_attention(monkeypatch)
        padded = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        alone = model.generate(prompt[:1, 7:], max_new_tokens=new, do_sample=False)
    assert torch.equal(padded, eager), (padded[:, -new:], eager[:, -new:])
    assert torch.equal(padded[0, -new:], alone[0, -new:])
    assert len(decode_calls) == (new - 1) * len(model.model.layers) * 2  # two generate calls, every step, layer


def test_static_cache_generate_equals_dynamic_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """``StaticCache`` (compilable: generate asks the model for its masks) gives the tokens of the default cache."""
    model = hf.apply_dsa(_model("deepseek_v32", seed=13))
    ids, mask = _left_padded(_ids(14, seq=32), [5, 0])
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        _forbid_transformers_attention(monkeypatch)
        static = model.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache_implementation="static"
        )
    assert torch.equal(static, dynamic)


def test_sampling_generate_draws_eager_tokens() -> None:
    model = _model("glm_moe_dsa", seed=15)
    ids = _ids(16, seq=32)
    with torch.no_grad():
        torch.manual_seed(17)
        eager = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
        hf.apply_dsa(model)
        torch.manual_seed(17)
        served = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(served, eager)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_loss_and_gradients_equal_eager(family: str) -> None:
    ids = _ids(18)
    losses, grads = [], []
    for served in (False, True):
        model = _model(family, seed=19).train()
        if served:
            hf.apply_dsa(model)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    _assert_logits_close(losses[1], losses[0], FLOAT32_TOLERANCE, "loss")
    assert grads[1].keys() == grads[0].keys()
    for name, expected in grads[0].items():
        actual = grads[1][name]
        if expected is None:  # transformers' indexer runs under no_grad: its weights get none, here neither
            assert actual is None and ".indexer." in name, name
            continue
        _assert_logits_close(actual, expected, 1e-3, f"grad of {name}")


def test_state_dict_is_unchanged_apply_is_idempotent_and_remove_restores() -> None:
    model = _model("glm_moe_dsa", seed=21)
    ids = _ids(22, batch=1)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    names = [name for name, _ in model.named_parameters()]
    with torch.no_grad():
        eager = model(ids).logits
        hf.apply_dsa(hf.apply_dsa(model))
        assert hf.is_dsa_applied(model)
        served = model(ids).logits
        after = model.state_dict()
        assert [name for name, _ in model.named_parameters()] == names
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        hf.remove_dsa(model)
        assert not hf.is_dsa_applied(model)
        again = model(ids).logits
    assert torch.equal(again, eager)
    _assert_logits_close(served, eager, FLOAT32_TOLERANCE, "served")
    reloaded = _model("glm_moe_dsa", seed=99)
    reloaded.load_state_dict(hf.apply_dsa(model).state_dict())
    with torch.no_grad():
        assert torch.equal(hf.apply_dsa(reloaded)(ids).logits, model(ids).logits)


def test_apply_dsa_rejects_other_models_naming_the_supported_classes() -> None:
    with pytest.raises(TypeError, match="apply_dsa: model must be one of DeepseekV32ForCausalLM.*GlmMoeDsaModel"):
        hf.apply_dsa(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="set_indexer_training: call apply_dsa"):
        hf.set_indexer_training(_model("deepseek_v32"), "sparse")


@pytest.mark.parametrize("stage", ["sparse", "dense"])
def test_indexer_losses_reach_only_the_indexer(stage: str) -> None:
    """``set_indexer_training``: each full layer's V3.2 KL loss, whose gradient reaches the indexer weights and
    nothing else; the dense warm-up attends to every visible key (transformers' dense attention)."""
    model = hf.apply_dsa(_model("deepseek_v32", seed=23).train())
    ids = _ids(24)
    hf.set_indexer_training(model, stage)
    out = model(ids, use_cache=False)
    loss = hf.indexer_loss(model)
    assert loss.dim() == 0 and bool(torch.isfinite(loss)) and float(loss.detach()) > 0
    loss.backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is not None and float(p.grad.abs().max()) > 0, name
        else:
            assert p.grad is None, name
    if stage == "dense":
        hf.set_indexer_training(model, None)
        hf.remove_dsa(model)
        for layer in model.model.layers:
            layer.self_attn.indexer.index_topk = 10**6
        with torch.no_grad():
            dense = model(ids, use_cache=False).logits
        _assert_logits_close(out.logits.detach(), dense, FLOAT32_TOLERANCE, "dense warm-up logits")


@pytest.mark.cpu_kernel
def test_bfloat16_c_target_kernels_track_eager_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 models under ``DSA_BACKEND=tilelang`` run the C-target kernels (the fused selection and sparse MLA), and
    their logits are within twice the error of transformers' own bf16 eager against its float32 eager (both the
    largest and the RMS error). Dense MLP layers only: bf16 flips MoE routing, which would dominate both errors."""
    from tests.test_ops import count_launches

    launches = count_launches(monkeypatch)
    for family in FAMILIES:
        ids = _ids(26)
        model32 = _model(family, seed=25, first_k_dense_replace=3)
        model16 = _model(family, seed=25, dtype=torch.bfloat16, first_k_dense_replace=3)
        with torch.no_grad():
            reference = model32(ids).logits
            eager16 = model16(ids).logits.float()
            monkeypatch.setenv("DSA_BACKEND", "tilelang")
            served16 = hf.apply_dsa(model16)(ids).logits.float()
            monkeypatch.setenv("DSA_BACKEND", "reference")

        def errors(x: torch.Tensor) -> tuple[float, float]:
            diff = x - reference
            scale = float(reference.abs().max())
            return float(diff.abs().max()) / scale, float(diff.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())

        (eager_max, eager_rms), (served_max, served_rms) = errors(eager16), errors(served16)
        assert served_max <= 2 * eager_max and served_rms <= 2 * eager_rms, (
            family, served_max, eager_max, served_rms, eager_rms,
        )  # fmt: skip
    assert launches["index_topk"] > 0 and launches["sparse_mla_fwd"] > 0, launches

    # Decoding through the C-target decode kernel picks the tokens the bf16 reference path picks.
    import dsa.launch.sparse_mla_decode as decode_launch

    decode_launches = []
    real_launch = decode_launch.sparse_mla_decode
    monkeypatch.setattr(
        decode_launch, "sparse_mla_decode", lambda *a, **k: decode_launches.append(1) or real_launch(*a, **k)
    )
    ids, mask = _left_padded(_ids(27, seq=32), [5, 0])
    tokens = {}
    with torch.no_grad():
        for backend in ("tilelang", "reference"):
            monkeypatch.setenv("DSA_BACKEND", backend)
            tokens[backend] = model16.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert decode_launches and torch.equal(tokens["tilelang"], tokens["reference"])


def _dense_padding_visibility(mask: torch.Tensor, seq: int, past: int) -> torch.Tensor:
    """``[B, S, T]`` bool: the obvious per-element rule (causal over cache positions and the padding mask)."""
    total = past + seq
    real = torch.nn.functional.pad(mask.bool(), (0, max(0, total - mask.shape[1])))[:, :total]
    query = torch.arange(seq).view(1, seq, 1) + past
    key = torch.arange(total).view(1, 1, total)
    return (key <= query) & real.unsqueeze(1)


@pytest.mark.parametrize("seed", range(6))
def test_key_ranges_from_padding_equal_the_dense_rule(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch, seq, past = 3, int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(0, 7, (1,), generator=g))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    left = torch.randint(0, past + seq + 1, (batch,), generator=g)
    for row in range(batch):
        if seed % 2:
            mask[row, : int(left[row])] = 0  # left padding
        else:
            mask[row, past + seq - int(left[row]) :] = 0  # right padding
    ranges = visibility.from_padding_mask(mask, batch=batch, seq=seq, past=past, device=torch.device("cpu"))
    keys = torch.arange(past + seq).view(1, 1, -1)
    from_ranges = (keys >= ranges.starts.unsqueeze(-1)) & (keys < ranges.ends.unsqueeze(-1))
    assert torch.equal(from_ranges, _dense_padding_visibility(mask, seq, past))
    additive = torch.zeros(batch, 1, seq, past + seq).masked_fill(~from_ranges.unsqueeze(1), torch.finfo().min)
    again = visibility.from_dense_mask(additive)
    assert torch.equal(again.starts[from_ranges.any(-1)], ranges.starts[from_ranges.any(-1)])
    assert torch.equal(again.ends, ranges.ends)


def test_a_mask_with_a_hole_is_refused() -> None:
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    with pytest.raises(ValueError, match="from_padding_mask: .*not one contiguous range"):
        visibility.from_padding_mask(mask, batch=1, seq=2, past=3, device=torch.device("cpu"))
    dense = torch.tensor([[[True, False, True]]])
    with pytest.raises(ValueError, match="from_dense_mask: .*not one contiguous range"):
        visibility.from_dense_mask(dense)


def test_one_layer_at_2k_tokens_peaks_under_a_quarter_of_eager_memory() -> None:
    """The README's memory table at S = 2048 (``benchmarks.hf``, in a fresh process): transformers' eager layer
    builds the indexer's ``[1, S, 16, S]`` float32 scores alone, 256 MiB (its whole peak is about 540 MiB: the table);
    ``apply_dsa`` must stay under a quarter of that bound, so nothing of size S x S may appear."""
    from benchmarks import hf as bench

    eager_scores_alone = 2048 * 16 * 2048 * 4
    served = bench.isolated_memory_record("dsa", 2048)["peak_increase_bytes"]
    assert served < eager_scores_alone / 4, served
