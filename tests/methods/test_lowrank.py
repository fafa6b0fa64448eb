"""SVDQuant's low-rank branch: Eckart–Young against known spectra, the even split, determinism, refinement."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidquant import formats
from vidquant.methods.fidelity import relative_output_error
from vidquant.methods.lowrank import (
    DEFAULT_ITERS,
    DEFAULT_TOL,
    MAX_ITERS,
    METHODS,
    OVERSAMPLING,
    LowRankResult,
    lowrank,
    refine_lowrank,
)

hif4 = formats.get("hif4").quantize_dequantize


def with_spectrum(s: list[float] | torch.Tensor, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``U diag(s) V^T`` (fp64) with random orthonormal U (n, len(s)) and V (k, len(s))."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(k, len(s), generator=g, dtype=torch.float64)).Q
    return (u * s) @ v.T


def sq_error(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> float:
    """``||W - up · down||_F^2`` in fp64."""
    return float(((weight.double() - up.double() @ down.double()) ** 2).sum())


def outlier_weight(n: int = 128, k: int = 256, seed: int = 0) -> torch.Tensor:
    """N(0, 0.02) plus a few large columns (what smoothing leaves) and a slowly decaying low-rank part."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, torch.randperm(k, generator=g)[:6]] *= torch.tensor([8.0, 12.0, 16.0, 20.0, 25.0, 30.0])
    return w + with_spectrum(0.5 * torch.arange(1, 33.0) ** -0.7, n, k, seed + 1).float()


GEOMETRIC = [0.7**i for i in range(48)]  # decays past any rank: the randomized SVD is exact here


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-4)])
@pytest.mark.parametrize("n, k", [(64, 96), (96, 48)])
def test_eckart_young_on_a_known_spectrum(method: str, dtype: torch.dtype, tol: float, n: int, k: int) -> None:
    s = GEOMETRIC[: min(n, k)]
    weight = with_spectrum(s, n, k).float()
    total = sum(v * v for v in s)
    for rank in (1, 5, 12):
        down, up = lowrank(weight, rank, method=method, dtype=dtype)
        assert down.shape == (rank, k) and up.shape == (n, rank)
        assert down.dtype == up.dtype == dtype
        optimum = sum(v * v for v in s[rank:])  # Eckart–Young: the discarded squared singular values
        assert sq_error(weight, down, up) == pytest.approx(optimum, abs=tol * total)
        # the even split: row i of down and column i of up both have norm sqrt(s_i)
        root = torch.tensor(s[:rank], dtype=torch.float64).sqrt()
        torch.testing.assert_close(down.double().norm(dim=1), root, rtol=8 * tol, atol=0)
        torch.testing.assert_close(up.double().norm(dim=0), root, rtol=8 * tol, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_factors_are_the_truncated_svd(method: str) -> None:
    """Not just the error: the branch is U_r S_r V_r^T, and a rank-r matrix is reproduced."""
    weight = with_spectrum(GEOMETRIC[:40], 80, 40, seed=3).float()
    u, s, vh = torch.linalg.svd(weight.double())
    down, up = lowrank(weight, 6, method=method)
    torch.testing.assert_close(up.double() @ down.double(), (u[:, :6] * s[:6]) @ vh[:6], atol=1e-6, rtol=0)
    low = with_spectrum([3.0, 2.0, 1.0, 0.5], 50, 70, seed=4).float()
    down, up = lowrank(low, 4, method=method)
    torch.testing.assert_close(up @ down, low, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_fp64_is_computed_in_fp64(method: str) -> None:
    s = GEOMETRIC[:30]
    weight = with_spectrum(s, 30, 50)
    down, up = lowrank(weight, 7, method=method)
    assert down.dtype == up.dtype == torch.float64
    assert sq_error(weight, down, up) == pytest.approx(sum(v * v for v in s[7:]), rel=1e-10)
    down32, up32 = lowrank(weight, 7, method=method, dtype=torch.float32)
    assert down32.dtype == up32.dtype == torch.float32
    torch.testing.assert_close(down32, down.float())


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40),
    k=st.integers(2, 40),
    data=st.data(),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**16),
)
def test_eckart_young_property(n: int, k: int, data: st.DataObject, method: str, seed: int) -> None:
    """On random matrices of random rank and spectrum, ``||W - L||^2 = sum_{i > r} s_i^2`` and ``L`` is a projection
    of W (``||L||^2 + ||W - L||^2 = ||W||^2``). The randomized SVD is held to that where its sketch is the whole
    space or the spectrum drops by half after rank r, and to 1e-3 ||W||^2 above the optimum otherwise (a two-level
    spectrum, 1 then 0.98, is the worst case seen: 4e-4)."""
    m = data.draw(st.integers(1, min(n, k)), label="true rank")
    s = sorted(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=m, max_size=m), label="spectrum"), reverse=True)
    rank = data.draw(st.integers(1, min(n, k)), label="rank")
    weight = with_spectrum(s, n, k, seed).float()
    down, up = lowrank(weight, rank, method=method, seed=seed)
    total, optimum = sum(v * v for v in s), sum(v * v for v in s[rank:])
    error = sq_error(weight, down, up)
    captured = float((up.double() @ down.double()).square().sum())
    assert error + captured == pytest.approx(total, abs=1e-5 * total)
    assert error >= optimum - 1e-5 * total  # no rank-r matrix does better
    exact = method == "svd" or rank >= m or s[rank] <= s[rank - 1] / 2 or rank + OVERSAMPLING >= min(n, k)
    assert error <= optimum + (1e-5 if exact else 1e-3) * total


@pytest.mark.parametrize("n, k", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reproduces_the_weight(n: int, k: int, method: str) -> None:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(5))
    down, up = lowrank(weight, min(n, k), method=method)
    torch.testing.assert_close(up @ down, weight, atol=2e-5, rtol=0)


def test_randomized_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    weight = outlier_weight()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected_next = torch.rand(4)
    torch.set_rng_state(state)
    first = lowrank(weight, 8, method="svd_lowrank", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    second = lowrank(weight, 8, method="svd_lowrank", seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(torch.rand(4), expected_next)
    other = lowrank(weight, 8, method="svd_lowrank", seed=8)
    assert not torch.equal(other[0], first[0])  # another sketch: other rounding, the same branch up to it
    assert sq_error(weight, *other) == pytest.approx(sq_error(weight, *first), rel=1e-4)


def realistic_weight(n: int, k: int, decay: float, seed: int = 0) -> torch.Tensor:
    """bench/lowrank.py's weight: N(0, 0.02), 6 columns x 10, plus ``s_i = decay · edge · i^-0.6`` (i <= 128)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, torch.randperm(k, generator=g)[:6]] *= 10
    edge = 0.02 * (n**0.5 + k**0.5)  # the largest singular value of the noise
    return w + with_spectrum(decay * edge * torch.arange(1, 129.0) ** -0.6, n, k, seed + 1).float()


@pytest.mark.parametrize("decay, tol", [(8.0, 1e-4), (0.0, 5e-3)])
def test_randomized_is_as_good_as_exact_on_a_realistic_weight(decay: float, tol: float) -> None:
    """The stated tolerance: 1e-4 of the optimum when the spectrum decays past the rank (trained weights), 0.5 %
    when the rank cuts into a flat noise spectrum (all the directions left there are about equally good)."""
    weight = realistic_weight(256, 384, decay, seed=2)
    exact = sq_error(weight, *lowrank(weight, 16, method="svd"))
    randomized = sq_error(weight, *lowrank(weight, 16, method="svd_lowrank"))
    assert exact <= randomized * (1 + 1e-6)
    assert randomized <= exact * (1 + tol)


def manual_error(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, quantize, hessian=None) -> float:
    """The definition, in fp64: E = W - L - Q(W - L) with L from the stored factors."""
    w = weight.float()
    lr = up.float() @ down.float()
    e = (w - lr - quantize(w - lr)).double()
    if hessian is None:
        return float(e.square().sum() / w.double().square().sum())
    h = hessian.double()
    return float(torch.trace(e @ h @ e.T) / torch.trace(w.double() @ h @ w.double().T))


def check_result(result: LowRankResult, iters: int) -> None:
    """Stops at the first non-improving iteration; keeps the best, never worse than the plain SVD."""
    errors, best = result.errors, result.best
    assert 1 <= len(errors) <= iters + 1
    assert errors[best] == min(errors) <= errors[0]
    assert all(errors[i + 1] < errors[i] for i in range(best))
    assert len(errors) == best + 1 or (len(errors) == best + 2 and errors[-1] >= errors[best])


def hessian_with_heavy_channels(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, k, generator=g) * (torch.rand(k, generator=g) * 3 + 0.1)
    x[:, :4] *= 10
    return x.T @ x


@pytest.mark.parametrize("use_hessian", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refinement_improves_on_outlier_columns(use_hessian: bool, dtype: torch.dtype) -> None:
    weight = outlier_weight().to(dtype)
    hessian = hessian_with_heavy_channels(weight.shape[1]) if use_hessian else None
    result = refine_lowrank(weight, 8, hif4, hessian=hessian, iters=6)
    check_result(result, 6)
    assert result.best > 0 and result.errors[result.best] < 0.97 * result.errors[0]
    assert result.down.shape == (8, 256) and result.up.shape == (128, 8)
    assert result.down.dtype == result.up.dtype == dtype
    # the recorded errors are the definition, for the stored (rounded) factors
    assert manual_error(weight, result.down, result.up, hif4, hessian) == pytest.approx(
        result.errors[result.best], rel=1e-4
    )
    down0, up0 = lowrank(weight.float(), 8, dtype=dtype)
    assert manual_error(weight, down0, up0, hif4, hessian) == pytest.approx(result.errors[0], rel=1e-4)
    # the branch beats plain quantization of the whole weight
    assert result.errors[0] < manual_error(weight, torch.zeros(1, 256), torch.zeros(128, 1), hif4, hessian)


@pytest.mark.parametrize("name", ["hif4", "mxfp4", "int4"])
@pytest.mark.parametrize("method", METHODS)
def test_refinement_stops_and_keeps_the_best(name: str, method: str) -> None:
    if name not in formats.names():
        pytest.skip(f"no format {name}")
    weight = outlier_weight(96, 192, seed=4)
    quantize = formats.get(name).quantize_dequantize
    for iters in (0, 2, 8):
        result = refine_lowrank(weight, 4, quantize, iters=iters, method=method)
        check_result(result, iters)
    plain = refine_lowrank(weight, 4, quantize, iters=0, method=method)
    assert plain.best == 0 and len(plain.errors) == 1
    expected = lowrank(weight, 4, method=method)
    assert torch.equal(plain.down, expected[0]) and torch.equal(plain.up, expected[1])


def test_refinement_stops_when_nothing_is_left_to_absorb() -> None:
    """A quantizer that rounds nothing (and hands back its input): error 0, one more try, stop."""
    weight = outlier_weight(32, 64)
    result = refine_lowrank(weight, 4, lambda r: r, iters=5)
    assert result.errors[0] == pytest.approx(0.0, abs=1e-12) and len(result.errors) == 2 and result.best == 0


def test_refinement_is_deterministic() -> None:
    weight = outlier_weight(64, 128, seed=6)
    a = refine_lowrank(weight, 4, hif4, iters=3, seed=1)
    b = refine_lowrank(weight, 4, hif4, iters=3, seed=1)
    assert a.errors == b.errors and a.best == b.best
    assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up)


@pytest.mark.parametrize(
    "weight, rank, kwargs, match",
    [
        (torch.ones(4, 6), 0, {}, "rank"),
        (torch.ones(4, 6), 5, {}, "rank"),
        (torch.ones(4, 6), 2.0, {}, "rank"),
        (torch.ones(4, 6), True, {}, "rank"),
        (torch.ones(4, 6), 2, {"method": "eig"}, "method"),
        (torch.ones(4, 6), 2, {"dtype": torch.int32}, "dtype"),
        (torch.ones(6), 1, {}, "2-D"),
        (torch.ones(4, 6, dtype=torch.int32), 1, {}, "floating"),
        (torch.ones(0, 6), 1, {}, "non-empty"),
        (torch.tensor([[1.0, math.nan], [0.0, 1.0]]), 1, {}, "NaN or inf"),
        (torch.tensor([[1.0, math.inf], [0.0, 1.0]]), 1, {}, "NaN or inf"),
    ],
)
def test_lowrank_errors(weight: torch.Tensor, rank, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lowrank(weight, rank, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iters": -1}, "iters"),
        ({"hessian": torch.eye(5)}, "hessian"),
        ({"hessian": torch.full((64, 64), math.nan)}, "hessian"),
        ({"quantize": lambda r: r[:, :3]}, "shape"),
        ({"quantize": lambda r: torch.full_like(r, math.nan)}, "NaN or inf"),
        ({"quantize": "hif4"}, "callable"),
        ({"hessian": torch.zeros(64, 64)}, "undefined"),
        ({"weight": torch.zeros(8, 64)}, "undefined"),
        ({"weight": torch.full((8, 64), math.inf)}, "NaN or inf"),
        ({"rank": 40}, "rank"),
        ({"tol": 1.0}, "tol"),
        ({"tol": -0.1}, "tol"),
        ({"held_out": torch.ones(5, 63)}, "held_out"),
        ({"held_out": torch.ones(0, 64)}, "held_out"),
        ({"held_out": torch.full((3, 64), math.nan)}, "held_out holds NaN"),
        ({"held_out": torch.zeros(3, 64)}, "held-out rows is 0.0"),
    ],
)
def test_refine_errors(kwargs: dict, match: str) -> None:
    args = {"weight": torch.randn(32, 64), "rank": 4, "quantize": hif4, **kwargs}
    with pytest.raises(ValueError, match=match):
        refine_lowrank(**args)


def held_out_rows(k: int, seed: int, m: int = 256) -> torch.Tensor:
    """Correlated input rows (m, k): mixed channels, as a layer's inputs are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.1 + torch.eye(k))


@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_stopping_runs_past_the_old_cap_until_the_gain_is_below_tol(seed: int) -> None:
    """Judged on held-out rows the refinement keeps going while it improves (more than the old fixed 8
    iterations on these layers), stops at the first iteration that gains less than ``tol``, and its
    recorded errors are the held-out output errors of the stored factors."""
    weight = outlier_weight(128, 256, seed=seed)
    x = held_out_rows(256, seed + 100)
    result = refine_lowrank(weight, 8, hif4, held_out=x, iters=MAX_ITERS, tol=DEFAULT_TOL)
    ran = len(result.errors) - 1
    assert DEFAULT_ITERS < ran < MAX_ITERS
    errors = result.errors
    assert all(errors[i + 1] < errors[i] * (1 - DEFAULT_TOL) for i in range(ran - 1))  # each kept going for a gain
    assert not errors[-1] < min(errors[:-1]) * (1 - DEFAULT_TOL)  # and the last one stopped it
    assert result.best in (ran - 1, ran) and errors[result.best] == min(errors)
    approx = result.up.float() @ result.down.float()
    q = approx + hif4(weight - approx)
    assert relative_output_error(x, weight, q) == pytest.approx(errors[result.best], rel=1e-4)
    capped = refine_lowrank(weight, 8, hif4, held_out=x, iters=3, tol=DEFAULT_TOL)
    assert len(capped.errors) == 4 and capped.errors == errors[:4]  # the safety bound


def test_a_large_tolerance_stops_early_and_keeps_a_small_gain() -> None:
    weight = outlier_weight(96, 192, seed=2)
    x = held_out_rows(192, 7)
    result = refine_lowrank(weight, 4, hif4, held_out=x, iters=MAX_ITERS, tol=0.5)
    assert len(result.errors) == 2  # iteration 1 gains, but less than half
    assert result.best == (1 if result.errors[1] < result.errors[0] else 0)


def test_held_out_replaces_the_hessian() -> None:
    """With held-out rows the calibration Hessian plays no part (it is what the branch would overfit)."""
    weight = outlier_weight(64, 128, seed=3)
    x = held_out_rows(128, 8)
    a = refine_lowrank(weight, 4, hif4, held_out=x, iters=5)
    b = refine_lowrank(weight, 4, hif4, held_out=x, iters=5, hessian=hessian_with_heavy_channels(128))
    assert a.errors == b.errors and torch.equal(a.down, b.down)
