"""Layer inputs for GPTQ and the clip search: exact X^T X, per-bin samples, determinism, non-finite rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidquant.calib.calibrate import CalibSettings
from vidquant.calib.capture import Reservoir
from vidquant.calib.layer_inputs import HeldOutRows, LayerInputs, collect_layer_inputs, hessian_nbytes
from vidquant.calib.prompts import default_prompts
from vidquant.models import adapter_for, timestep_bin, tiny, wan

SETTINGS = CalibSettings(num_prompts=2, steps=4, height=32, width=32, frames=5)
PROMPTS = default_prompts()[:2]
BINS = 2


@pytest.fixture(scope="module")
def pipe():
    return tiny.build_tiny_pipeline()


def _all_groups(pipe) -> dict[str, list[list[str]]]:
    return {name: wan.input_groups(model) for name, model in wan.experts(pipe).items()}


def test_hessian_is_xtx_of_every_call_and_samples_follow_the_bins(pipe) -> None:
    edges = adapter_for(pipe).bin_edges(BINS)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in wan.experts(pipe)}
    bins: dict[str, list[int]] = {name: [] for name in wan.experts(pipe)}
    handles = []
    for expert, model in wan.experts(pipe).items():
        def on_input(_m, args, expert=expert):
            inputs[expert].append(args[0].reshape(-1, args[0].shape[-1]).clone())

        def on_call(_m, args, kwargs, expert=expert):
            t = adapter_for(pipe).call_info(expert, args, kwargs, None).timestep
            bins[expert].append(timestep_bin(t, edges[expert]))

        handles += [model.get_submodule("blocks.1.ffn.net.2").register_forward_pre_hook(on_input),
                    model.register_forward_pre_hook(on_call, with_kwargs=True)]
    try:
        settings = SETTINGS.model_copy(update={"steps": 12})  # enough steps to reach every bin of both experts
        records = collect_layer_inputs(pipe, PROMPTS, settings, _all_groups(pipe), edges, max_tokens=10_000)
    finally:
        for h in handles:
            h.remove()
    for expert in wan.experts(pipe):
        rec = records[expert]["blocks.1.ffn.net.2"]
        x = torch.cat(inputs[expert])
        assert rec.tokens == x.shape[0]
        torch.testing.assert_close(rec.hessian.double(), x.double().T @ x.double(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(rec.mean_hessian(), rec.hessian / rec.tokens)
        row_bins = torch.tensor(bins[expert]).repeat_interleave(inputs[expert][0].shape[0])
        for b, sample in enumerate(rec.bin_samples()):
            expected = x[row_bins == b]  # every row of the bin (max_tokens is large); None for a bin never met
            assert torch.equal(sample, expected) if len(expected) else sample is None
    assert set(bins["transformer_2"]) == set(range(BINS))


def test_groups_share_one_record_and_runs_are_deterministic(pipe) -> None:
    edges = adapter_for(pipe).bin_edges(BINS)
    groups = {"transformer": [["blocks.0.attn1.to_q", "blocks.0.attn1.to_k"], ["blocks.0.ffn.net.0.proj"]]}
    first = collect_layer_inputs(pipe, PROMPTS, SETTINGS, groups, edges, max_tokens=7)
    second = collect_layer_inputs(pipe, PROMPTS, SETTINGS, groups, edges, max_tokens=7)
    assert list(first) == ["transformer"] and list(first["transformer"]) == ["blocks.0.attn1.to_q",
                                                                             "blocks.0.ffn.net.0.proj"]
    assert first["transformer"]["blocks.0.attn1.to_q"].layers == ["blocks.0.attn1.to_q", "blocks.0.attn1.to_k"]
    for key, rec in first["transformer"].items():
        other = second["transformer"][key]
        assert torch.equal(rec.hessian, other.hessian)
        for a, b in zip(rec.bin_samples(), other.bin_samples(), strict=True):
            assert a.shape[0] == 7 and torch.equal(a, b)


def test_non_finite_rows_are_left_out() -> None:
    rec = LayerInputs(["l"], torch.zeros(3, 3), 0, [Reservoir(8, seed=0)])
    x = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 0.0], [0.5, 0.0, float("inf")]])
    rec.update(x, 0)
    assert rec.tokens == 1 and torch.equal(rec.hessian, x[:1].T @ x[:1])
    assert torch.equal(rec.bin_samples()[0], x[:1])
    empty = LayerInputs(["blocks.0.x"], torch.zeros(2, 2), 0, [Reservoir(2, seed=0)])
    assert empty.bin_samples() == [None]
    with pytest.raises(ValueError, match="blocks.0.x"):
        empty.mean_hessian()


def test_hessian_nbytes_at_full_size() -> None:
    assert hessian_nbytes(5120) == 100 * 2**20 and hessian_nbytes(13824) == 4 * 13824**2


def test_too_few_prompts_is_a_clear_error(pipe) -> None:
    with pytest.raises(ValueError, match="2 calibration prompts asked for, the prompt set has 1"):
        collect_layer_inputs(pipe, PROMPTS[:1], SETTINGS, {}, {})


def _with_held_out(capacity: int, fraction: float, bins: int = 2, seed: int = 3) -> LayerInputs:
    return LayerInputs(["l"], torch.zeros(6, 6), 0,
                       [Reservoir(10_000, seed=b) for b in range(bins)], [HeldOutRows(capacity) for _ in range(bins)],
                       torch.Generator().manual_seed(seed), fraction)


@settings(max_examples=25, deadline=None)
@given(capacity=st.integers(1, 12), fraction=st.floats(0.05, 0.9), batches=st.lists(st.integers(0, 40), max_size=12),
       seed=st.integers(0, 2**16))
def test_held_out_rows_are_in_neither_the_hessian_nor_the_samples(capacity: int, fraction: float, batches: list[int],
                                                                   seed: int) -> None:
    """Every finite row is in exactly one of: the Hessian (fitted) or the held-out set; the bin samples hold only
    fitted rows; at most ``capacity`` rows per bin are held out; the same seed gives the same split."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, 6, generator=g) for n in batches]
    rec, again = _with_held_out(capacity, fraction, seed=seed), _with_held_out(capacity, fraction, seed=seed)
    for i, x in enumerate(rows):
        rec.update(x, i % 2)
        again.update(x, i % 2)
    everything = torch.cat(rows) if rows else torch.zeros(0, 6)
    held = [h for h in rec.held_out_samples() if h is not None]
    held = torch.cat(held) if held else torch.zeros(0, 6)
    assert all(h is None or h.shape[0] <= capacity for h in rec.held_out_samples())
    is_held = (everything[:, None, :] == held[None, :, :]).all(-1).any(-1)  # rows are distinct (continuous draws)
    assert int(is_held.sum()) == held.shape[0] == rec.held_out_tokens
    fitted = everything[~is_held]
    assert rec.tokens == everything.shape[0] and rec.fitted_tokens == fitted.shape[0]
    torch.testing.assert_close(rec.hessian.double(), fitted.double().T @ fitted.double(), rtol=1e-5, atol=1e-4)
    for sample in rec.bin_samples():
        if sample is not None and held.shape[0]:
            assert not (sample[:, None, :] == held[None, :, :]).all(-1).any()
    assert torch.equal(rec.hessian, again.hessian)
    for a, b in zip(rec.held_out_samples(), again.held_out_samples(), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_held_out_split_on_the_pipeline_adds_up_to_the_full_hessian(pipe) -> None:
    """Collected with a held-out split, ``H_fitted + X_held^T X_held`` is the Hessian of every row."""
    edges = adapter_for(pipe).bin_edges(BINS)
    groups = {"transformer": [["blocks.0.ffn.net.0.proj"], ["blocks.1.attn2.to_q"]]}
    full = collect_layer_inputs(pipe, PROMPTS, SETTINGS, groups, edges, max_tokens=16)
    split = collect_layer_inputs(pipe, PROMPTS, SETTINGS, groups, edges, max_tokens=16, held_out_tokens=8,
                                 held_out_fraction=0.25)
    for key, rec in split["transformer"].items():
        whole = full["transformer"][key]
        held = torch.cat([h for h in rec.held_out_samples() if h is not None])
        assert 0 < held.shape[0] == rec.held_out_tokens <= 8 * BINS and rec.tokens == whole.tokens
        assert rec.fitted_tokens == whole.tokens - held.shape[0]
        torch.testing.assert_close(rec.hessian + held.float().T @ held.float(), whole.hessian, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(rec.mean_hessian(), rec.hessian / rec.fitted_tokens)
    assert all(h is None for h in full["transformer"]["blocks.0.ffn.net.0.proj"].held_out_samples())
    with pytest.raises(ValueError, match="held_out_fraction"):
        collect_layer_inputs(pipe, PROMPTS, SETTINGS, groups, edges, held_out_tokens=8, held_out_fraction=1.0)
    with pytest.raises(ValueError, match="held_out_tokens"):
        collect_layer_inputs(pipe, PROMPTS, SETTINGS, groups, edges, held_out_tokens=-1)
