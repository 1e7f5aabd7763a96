"""The engine at the edges of float32: ties from rounding, extreme log-variances, far
queries; every backend against float64 and against each other."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_engine import TORCH, TORCH_IDS, pytestmark, tiny_blocks  # noqa: F401 (module mark, autouse fixture)
from vaepriors.engine import _chunked, _keops, mixture_logsumexp

# Every backend: the torch ones, fused under Triton's interpreter on CPU (conftest sets
# TRITON_INTERPRET=1), KeOps where it compiles.
ALL = TORCH + [("fused", None), pytest.param("keops", None, marks=pytest.mark.keops)]
ALL_IDS = TORCH_IDS + ["fused", "keops"]


@pytest.fixture
def usable(backend):
    if backend == "fused" and (importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("the fused backend runs on CPU only under TRITON_INTERPRET=1")
    if backend == "keops" and not _keops.check(torch.device("cpu"), torch.float32)[0]:
        pytest.skip(f"KeOps unusable here: {_keops.check(torch.device('cpu'), torch.float32)[1]}")
    return backend


def values_and_grads(z, means, log_var, backend, budget=None, dtype=None):
    """Log-sum-exp and the gradients of its weighted sum w.r.t. z, means, log_var."""
    dtype = dtype or z.dtype
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (z, means, log_var)]
    out = mixture_logsumexp(*leaves, backend=backend, memory_budget=budget).log()
    w = torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype)
    return out.detach(), torch.autograd.grad((out * w).sum(), leaves)


def rel(g, ref):
    return ((g.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("backend,budget", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("sigma2,far", [(1e-3, 1e4), (1e-3, 1e3), (1e-4, 1e2)])
def test_exponents_tied_by_rounding_share_the_probability(usable, backend, budget, sigma2, far):
    """Queries far from duplicated means at a small variance: the exponents reach ~1e11,
    log-sum-exp = max + log(k) rounds to max, and a backward that normalised by it gave each
    of k tied components probability 1: dL/dz times k. The tied components sit in different
    blocks of the chunked backend."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(7, 3, generator=gen)
    means = base.repeat(3, 1)  # each mean three times: exact ties in any precision
    z = base[torch.randint(0, 7, (11,), generator=gen)] + far * torch.randn(11, 3, generator=gen)
    lv = torch.tensor(math.log(sigma2))
    _, ref = values_and_grads(z, means, lv, "dense", dtype=torch.float64)
    _, got = values_and_grads(z, means, lv, backend, budget)
    for name, g, r in zip(("z", "means", "log_var"), got, ref):
        assert rel(g, r) < 1e-5, (name, rel(g, r))


def naive(z, means, log_var):
    """The plain float formula, the yardstick of what the dtype can resolve: differences
    scaled by exp(-log_var / 2) before squaring, max-shifted log-sum-exp, autograd."""
    n, d = means.shape
    lv = log_var.expand(n) if log_var.dim() == 0 else log_var
    r = torch.exp(-0.5 * lv)
    r = r[:, None] if r.dim() == 1 else r
    dist = (((z[:, None, :] - means[None]) * r) ** 2).sum(-1)
    a = -0.5 * (d * math.log(2 * math.pi) + (lv.sum(-1) if lv.dim() == 2 else d * lv))
    arg = a - 0.5 * dist
    m = arg.detach().amax(1, keepdim=True)
    return (m + torch.exp(arg - m).sum(1, keepdim=True).log()).squeeze(1)


def naive_grads(z, means, log_var, dtype):
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (z, means, log_var)]
    out = naive(*leaves)
    w = torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype)
    return out.detach(), torch.autograd.grad((out * w).sum(), leaves)


@pytest.mark.parametrize("backend,budget", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("kind", ["scalar", "per-component", "diagonal"])
@pytest.mark.parametrize("log_var", [-88.0, -90.0, -100.0])
def test_log_variances_below_float32_range_keep_values_and_gradients(usable, backend, budget, kind, log_var):
    """exp(-log_var) overflows float32 below -88.7 while the distances it scales are
    ordinary numbers (data on the scale of sigma = exp(log_var / 2) ~ 1e-20). A clamped
    inverse variance gave wrong values and log-variance gradients (-1.0 dense, -0.944
    chunked, exact -0.451); the engine must match float64 wherever the plain float32
    formula, which scales differences before squaring, does."""
    if backend == "fused" and kind == "diagonal":
        pytest.skip("fused hands diagonal scales to chunked")
    gen = torch.Generator().manual_seed(5)
    sigma = math.exp(log_var / 2)
    means = (sigma * torch.randn(6, 3, generator=gen)).float()
    z = (means[torch.randint(0, 6, (5,), generator=gen)] + 0.7 * sigma * torch.randn(5, 3, generator=gen)).float()
    shape = {"scalar": (), "per-component": (6,), "diagonal": (6, 3)}[kind]
    lv = (log_var + 0.3 * torch.randn(shape, generator=gen)).float()
    value64, ref = naive_grads(z, means, lv, torch.float64)
    value32, plain = naive_grads(z, means, lv, torch.float32)
    assert (value32.double() - value64).abs().max() < 1e-5 * value64.abs().max()  # float32 resolves it
    assert all(rel(g, r) < 1e-5 for g, r in zip(plain, ref))
    value, got = values_and_grads(z, means, lv, backend, budget)
    assert torch.isfinite(value).all()
    assert (value.double() - value64).abs().max() < 1e-5 * value64.abs().max()
    for name, g, r in zip(("z", "means", "log_var"), got, ref):
        assert rel(g, r) < 1e-4, (name, rel(g, r))


@st.composite
def extreme_problems(draw):
    d = draw(st.integers(1, 4))
    return dict(
        b=draw(st.integers(1, 6)),
        n=draw(st.integers(1, 7)),
        d=d,
        kind=draw(st.sampled_from(["scalar", "per-component", "diagonal"])),
        log_var=draw(st.floats(-100.0, 80.0)),
        spread=draw(st.sampled_from([0.0, 0.5])),  # of the log-variances
        centre=draw(st.sampled_from([0.0, 1e2, 1e4])),  # where the data sit
        scale=draw(st.sampled_from([1e-3, 1.0, 30.0])),  # data spread, in sigmas
        far=draw(st.sampled_from([0.0, 10.0, 1e3])),  # queries' offset, in sigmas
        near=draw(st.booleans()),  # queries within 1e-3 sigma of a mean
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _extreme_inputs(p):
    """float64 draws rounded to the dtype (every backend and reference sees the same numbers)."""
    g = torch.Generator().manual_seed(p["seed"])
    b, n, d = p["b"], p["n"], p["d"]
    shape = {"scalar": (), "per-component": (n,), "diagonal": (n, d)}[p["kind"]]
    lv = p["log_var"] + p["spread"] * torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = math.exp(p["log_var"] / 2)
    means = p["centre"] + p["scale"] * sigma * torch.randn(n, d, generator=g, dtype=torch.float64)
    if p["near"]:
        z = means[torch.randint(0, n, (b,), generator=g)] + 1e-3 * sigma * torch.randn(b, d, generator=g, dtype=torch.float64)
    else:
        z = p["centre"] + p["scale"] * sigma * torch.randn(b, d, generator=g, dtype=torch.float64)
    z = z + p["far"] * sigma * torch.randn(b, d, generator=g, dtype=torch.float64)
    return [t.to(p["dtype"]) for t in (z, means, lv)]


def _expansion_scale(z, means, lv):
    """The largest scaled ``|z - c|^2 + |mu - c|^2`` (``c`` the means' mean, as the engine
    centres), against the sharpest variance."""
    z, means, lv = z.double(), means.double(), lv.double()
    c = means.mean(0)
    inv = torch.exp(-lv.min())
    return float(inv * (((z - c) ** 2).sum(-1).max() + ((means - c) ** 2).sum(-1).max()))


def _close(x, ref, tol):
    """Normwise relative agreement (values: relative to their size, at least 1)."""
    x, ref = x.double(), ref.double()
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return False
    return bool((x - ref).norm() <= tol * max(ref.norm().item(), 1e-300))


def _sensitivity(z, means, lv):
    """How much the float64 formula's value and gradients move when its inputs move by a
    few ulps: float64 has no higher-precision reference, so this sets its tolerances."""
    g = torch.Generator().manual_seed(1)
    wiggle = [t * (1 + 4e-16 * torch.randn(t.shape, generator=g, dtype=t.dtype)) for t in (z, means, lv)]
    v0, g0 = naive_grads(z, means, lv, torch.float64)
    v1, g1 = naive_grads(*wiggle, torch.float64)
    return [((x - y).norm() / max(y.norm().item(), 1e-300)).item() for x, y in zip([v1, *g1], [v0, *g0])]


@settings(max_examples=25)
@given(extreme_problems())
def test_backends_agree_with_float64_at_extreme_scales(p):
    """Log-variances -100..80, data up to 1e4 from the origin, near-coincident and far
    queries, float32 and float64. Float32: wherever the plain formula in float32 matches
    float64 to 1e-5 (float32 resolves the problem), every backend matches float64 (values
    1e-5, gradients 1e-4) and the other backends (1e-5). Float64: within 1e-12 (or 8 eps of
    the scaled squared norms, the expansion's own error), or 100x what a few ulps of input
    move the plain formula, whichever is larger."""
    z, means, lv = _extreme_inputs(p)
    names = ("value", "z", "means", "log_var")
    v64, g64 = naive_grads(z, means, lv, torch.float64)
    ref = [v64, *g64]
    if p["dtype"] == torch.float32:
        vdt, gdt = naive_grads(z, means, lv, torch.float32)
        resolved = [_close(x, r, 1e-5) for x, r in zip([vdt, *gdt], ref)]
        tol, pair = [1e-5, 1e-4, 1e-4, 1e-4], [1e-5] * 4
    else:
        resolved = [bool(torch.isfinite(r).all()) for r in ref]
        # The expansion's documented error: ~8 eps of |z - c|^2 + |mu - c|^2 (scaled) in each
        # distance. A query 1000 sigma from means 1e-3 sigma apart has weights set by O(1)
        # differences of distances of 1e6: mean gradients within 4e-11, not 1e-12.
        floor = max(1e-12, 8 * torch.finfo(torch.float64).eps * _expansion_scale(z, means, lv))
        tol = pair = [max(floor, 100 * s) for s in _sensitivity(z, means, lv)]
    if not any(resolved):
        return
    backends = [("dense", None), ("chunked", None), ("chunked", 300)]
    if p["kind"] != "diagonal" and importlib.util.find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1":
        backends.append(("fused", None))
    if p["d"] == 3 and p["dtype"] == torch.float32 and _keops.check(torch.device("cpu"), torch.float32)[0]:
        backends.append(("keops", None))  # (d = 3, float32: the formulas the KeOps tests compile)
    saved = _chunked.MIN_CELLS
    _chunked.MIN_CELLS = 1  # budget 300: blocks of a few cells
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the tiny budget's
            results = {f"{b}{s or ''}": values_and_grads(z, means, lv, b, s) for b, s in backends}
    finally:
        _chunked.MIN_CELLS = saved
    first = None
    for label, (value, grads) in results.items():
        got = [value, *grads]
        first = first or got
        for k, name in enumerate(names):
            if resolved[k]:
                assert _close(got[k], ref[k], tol[k]), (label, name, p)
                assert _close(got[k], first[k], pair[k]), (label, name, "vs dense", p)
