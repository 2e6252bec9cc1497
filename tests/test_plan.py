"""Plan once, validate once: what one decode step of the tiny model costs in choices, counted.

Per decode step and layer the model calls two ops (``index_topk_decode``, ``sparse_mla_decode``). Each op validates
its inputs exactly once on every backend (the reference's ``*_impl`` path does not check again); on the kernel
backend each launcher plans (target, config, compiled kernels) once per shape, so the first decode step makes one
plan that every layer reuses and later steps choose nothing; the positions and ranges of a step are computed once
for all layers (``ModelCache.begin_step`` / ``LayerCache.step``).
"""

from __future__ import annotations

import collections
import pathlib
import functools
from collections.abc import Callable

import pytest
import torch

from dsa import hardware, validation
from dsa.launch import common
from dsa.launch import sparse_mla_decode as decode_launch
from dsa.models import DSAConfig, TinyDSAModel
from dsa.serving import model_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAGE_SIZE = 8  # as tests/test_generate.py's kernel tests: TileLang's disk cache serves the same C-target kernels
BATCH, PROMPT, STEPS = 2, 6, 3


def _counting(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Count every ``check_*`` validator, every target choice and every config choice of this process (a choice that
    calls another function of its label, ``select_config`` falling back to ``default_config``, counts once)."""
    counts: collections.Counter[str] = collections.Counter()
    inside: collections.Counter[str] = collections.Counter()

    def wrap(owner: object, name: str, label: str) -> None:
        real: Callable[..., object] = getattr(owner, name)

        @functools.wraps(real)
        def counted(*args: object, **kwargs: object) -> object:
            counts[label] += not inside[label]
            inside[label] += 1
            try:
                return real(*args, **kwargs)
            finally:
                inside[label] -= 1

        monkeypatch.setattr(owner, name, counted)

    for name in dir(validation):
        if name.startswith("check_"):
            wrap(validation, name, name)
    wrap(common, "target_for", "target")
    wrap(hardware, "device_target", "target")
    wrap(common, "select_config", "config")
    wrap(decode_launch.kernels, "default_config", "config")
    wrap(model_cache.Step, "begin", "step")
    return counts


def _model_after_prefill() -> tuple[TinyDSAModel, model_cache.ModelCache, torch.Tensor]:
    torch.manual_seed(3)
    config = DSAConfig.tiny(init_std=0.1)
    model = TinyDSAModel(config).eval().to(torch.bfloat16)
    cache = model.new_cache(BATCH, PROMPT + STEPS + 2, page_size=PAGE_SIZE)
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (BATCH, PROMPT)), cache=cache)
    return model, cache, torch.randint(0, config.vocab_size, (BATCH, 1))


def test_reference_decode_step_validates_once_per_op_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference backend: per step and layer one ``check_index_topk_decode`` and one ``check_sparse_mla_decode``, and
    none of the prefill ops' checks (the reference decode once re-validated through ``index_scores``, ``topk_indices``
    and ``sparse_mla``: 5 checks per layer); one ``Step`` per decode step for all layers."""
    monkeypatch.setenv("DSA_BACKEND", "reference")
    model, cache, token = _model_after_prefill()
    counts = _counting(monkeypatch)
    with torch.no_grad():
        for _ in range(STEPS):
            model(token, cache=cache)
    layers = model.config.n_layers
    expected = {"check_index_topk_decode": STEPS * layers, "check_sparse_mla_decode": STEPS * layers, "step": STEPS}
    assert dict(counts) == expected


@pytest.mark.cpu_kernel
def test_kernel_decode_step_plans_once_for_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel backend (C target): the first decode step makes one plan per kernel, reused by every layer: the
    attention's and the paged selection's (its tuned config is looked up per ``(batch, s_q, context)`` bucket, so
    the prefill's plan does not serve ``s_q = 1``); later steps make none. Validation stays once per op."""
    monkeypatch.setenv("DSA_BACKEND", "tilelang")
    common.clear_plans()
    model, cache, token = _model_after_prefill()
    counts = _counting(monkeypatch)
    made = sum(plans.made for plans in common._PLAN_CACHES)
    with torch.no_grad():
        model(token, cache=cache)
    first = dict(counts)
    assert sum(plans.made for plans in common._PLAN_CACHES) - made == 2
    assert (first["target"], first["config"], first["step"]) == (2, 2, 1), first
    counts.clear()
    with torch.no_grad():
        for _ in range(STEPS):
            model(token, cache=cache)
    layers = model.config.n_layers
    assert dict(counts) == {
        "check_index_topk_decode": STEPS * layers, "check_sparse_mla_decode": STEPS * layers, "step": STEPS,
    }  # fmt: skip


def test_plans_are_keyed_by_shape_and_forgotten_on_a_hardware_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """One plan per (shapes, static parameters, settings): the same call reuses it, another topk width or
    ``DSA_CPU_COMPILE_FLAGS`` value gets a new one, and ``hardware.reset_caches()`` (a faked capability) forgets it.
    Kernels are not compiled here (``get_kernel`` is replaced)."""
    monkeypatch.setattr(common, "get_kernel", lambda builder, target, **params: (builder.__name__, params))
    common.clear_plans()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 4, 40, generator=g).bfloat16()
    pages = torch.randn(3, PAGE_SIZE, 40, generator=g).bfloat16()
    first = decode_launch.plan(q, [pages], [16], d_v=32, d_rope=8, has_sink=False)
    assert first is not None and first.layouts == (None,) and first.splits == (1,)
    assert decode_launch.plan(q.clone(), [pages], [16], d_v=32, d_rope=8, has_sink=False) is first
    assert decode_launch.plan(q, [pages], [24], d_v=32, d_rope=8, has_sink=False) is not first
    monkeypatch.setenv("DSA_CPU_COMPILE_FLAGS", "-O1")
    assert decode_launch.plan(q, [pages], [16], d_v=32, d_rope=8, has_sink=False) is not first
    monkeypatch.delenv("DSA_CPU_COMPILE_FLAGS")
    assert decode_launch.plan(q, [pages], [16], d_v=32, d_rope=8, has_sink=False) is first
    hardware.reset_caches()
    assert decode_launch.plan(q, [pages], [16], d_v=32, d_rope=8, has_sink=False) is not first
    common.clear_plans()


def test_begin_step_is_shared_by_every_layer_and_matches_the_cache_positions() -> None:
    """``ModelCache.begin_step`` computes the step once; each layer at that point reads the same ``Step``; a layer
    that has appended since begins the next one. Positions continue ``seq_lens``; padding queries see nothing."""
    cache = model_cache.ModelCache(
        n_layers=3, batch_size=2, max_seq_len=16, latent_dim=8, d_rope=4, index_dim=8, index_fp8=False, page_size=4,
        dtype=torch.float32,
    )  # fmt: skip
    lengths = torch.tensor([3, 1])
    step = cache.begin_step(3, lengths)
    assert all(layer.step(3, lengths, torch.device("cpu")) is step for layer in cache.layers)
    assert torch.equal(step.positions, torch.tensor([[0, 1, 2], [0, 1, 2]]))
    assert torch.equal(step.ends, torch.tensor([[1, 2, 3], [1, 0, 0]], dtype=torch.int32))
    g = torch.Generator().manual_seed(2)
    for layer in cache.layers:
        layer.append(torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g), None, lengths)
    following = cache.layers[0].step(1, None, torch.device("cpu"))
    assert following is not step and cache.layers[2].step(1, None, torch.device("cpu")) is following
    assert torch.equal(following.positions, torch.tensor([[3], [1]]))


def test_a_config_stored_by_this_process_replans_cuda_launches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    """A CUDA plan holds the tuned config it looked up: after the tuner stores a config in this same process, the next
    call of that shape plans again (the key holds ``autotune.lookup.cache.generation()``), with no ``clear_plans``.
    CPU plans never look up a tuned config and are kept. No CUDA device is needed: only the keys are exercised."""
    from autotune.lookup import cache as tuned_cache

    monkeypatch.setenv("DSA_CACHE_DIR", str(tmp_path))
    plans = common.PlanCache("test_generation")
    made: list[int] = []

    def make() -> int:
        made.append(len(made))
        return made[-1]

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert plans.get(cuda, ("shape",), make) == 0 and plans.get(cuda, ("shape",), make) == 0
    assert plans.get(cpu, ("shape",), make) == 1
    tuned_cache.store("topk", {"k": 8}, {"rows": 4}, {"block": 64}, sku="h100-sxm", cache_dir=tmp_path)
    assert plans.get(cuda, ("shape",), make) == 2
    assert plans.get(cuda, ("shape",), make) == 2
    assert plans.get(cpu, ("shape",), make) == 1
    tuned_cache.clear_memory_cache()
    assert plans.get(cuda, ("shape",), make) == 3
