"""The reduction engine: every backend against float64 difference-form references."""

from __future__ import annotations

import math
import signal
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vaepriors.engine as engine
from vaepriors.engine import _auto, _chunked, _keops
from vaepriors.engine import BACKENDS, LogSumExp, knn, mixture_log_prob, mixture_logsumexp
from vaepriors.errors import VAEPriorsError

# (backend, memory budget): a tiny budget forces many blocks of sizes that do not divide B, N
# (with the smallest block lowered to one cell by `tiny_blocks`; such budgets warn that they
# cannot be met, which these tests ignore: tests/test_engine_memory.py checks the warning).
TORCH = [("dense", None), ("chunked", None), ("chunked", 200)]
TORCH_IDS = ["dense", "chunked", "chunked-tiny"]
pytestmark = pytest.mark.filterwarnings("ignore:vaepriors. memory_budget=:RuntimeWarning")


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch):
    """Blocks down to 1 x 1, so that the small shapes here span many blocks."""
    monkeypatch.setattr(_chunked, "MIN_CELLS", 1)
KINDS = ["scalar", "per-component", "diagonal"]


# ----------------------------------------------------------------------------- references


def full_log_var(log_var: torch.Tensor, n: int, d: int) -> torch.Tensor:
    if log_var.dim() == 0:
        return log_var.expand(n, d)
    if log_var.dim() == 1:
        return log_var[:, None].expand(n, d)
    return log_var


def reference(z, means, log_var, log_weights=None, exclude=None):
    """float64 log sum_{j != e_i} w_j N(z_i; mu_j, diag(exp(lv_j))), difference form; also
    a per-row scale sum_j p_ij (|a_j| + D_ij / 2) of the terms the value is made of."""
    n, d = means.shape
    lv = full_log_var(log_var, n, d)
    dist = ((z[:, None, :] - means[None]) ** 2 / lv.exp()).sum(-1)
    a = -0.5 * (d * math.log(2 * math.pi) + lv.sum(-1))
    if log_weights is not None:
        a = a + log_weights
    comp = a - 0.5 * dist
    if exclude is not None:
        drop = exclude[:, None] == torch.arange(n, device=z.device)
        comp = comp.masked_fill(drop, -math.inf)
    value = torch.logsumexp(comp, 1)
    with torch.no_grad():
        p = torch.where(torch.isfinite(value)[:, None], torch.exp(comp - value[:, None]), torch.zeros_like(comp))
        scale = (p * (a.abs() + 0.5 * dist)).nan_to_num(0.0).sum(1)
    return value, scale


def make(b, n, d, kind, dtype, device, gen=None, lv_centre=0.0, lv_spread=0.5):
    kw = dict(dtype=torch.float64, device="cpu", generator=gen)
    z, means = torch.randn(b, d, **kw), torch.randn(n, d, **kw)
    shape = {"scalar": (), "per-component": (n,), "diagonal": (n, d)}[kind]
    log_var = lv_centre + lv_spread * torch.randn(shape, **kw)
    return [t.to(dtype=dtype, device=device) for t in (z, means, log_var)]


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def as64(*ts):
    return leaves(*[t.double() if t is not None else None for t in ts])


def assert_values(value, ref, scale, rtol):
    assert value.shape == ref.shape
    ref = ref.to(value.device)
    inf = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(value), inf), "rows that should be -inf (empty) differ"
    assert not torch.isnan(value).any()
    err = (value.double() - ref).abs()[~inf]
    bound = rtol * torch.maximum(scale.to(value.device)[~inf], torch.ones_like(err))
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, relative {(err / bound).max().item() * rtol:.3g}"


def assert_grad(g, ref, rtol, floor=0.0):
    """Normwise relative error, ``floor`` standing in for the size of cancelling terms."""
    assert g is not None and g.shape == ref.shape
    assert torch.isfinite(g).all()
    err = (g.double() - ref.to(g.device)).norm()
    assert err <= rtol * max(ref.norm().item(), floor, 1e-30), f"gradient error {err.item():.3g} vs {ref.norm().item():.3g}"


def check_against_reference(z, means, log_var, log_weights, exclude, backend, budget, rtol_v, rtol_g):
    """Values and gradients of every input vs the float64 reference."""
    z, means, log_var, log_weights = leaves(z, means, log_var, log_weights)
    part = mixture_logsumexp(z, means, log_var, log_weights, exclude, backend=backend, memory_budget=budget)
    value = part.log()
    z64, m64, v64, w64 = as64(z, means, log_var, log_weights)
    ref, scale = reference(z64, m64, v64, w64, exclude)
    assert_values(value, ref, scale, rtol_v)
    assert value.dtype == z.dtype
    weights = torch.linspace(0.5, 1.5, value.shape[0], dtype=value.dtype, device=value.device)
    fin = torch.isfinite(ref).to(value.device)
    inputs = [t for t in (z, means, log_var, log_weights) if t is not None]
    grads = torch.autograd.grad((value * weights)[fin].sum(), inputs)
    inputs64 = [t for t in (z64, m64, v64, w64) if t is not None]
    # the reference over the non-empty rows only: logsumexp's gradient at -inf is NaN
    ex_fin = exclude[fin] if exclude is not None else None
    ref_fin, _ = reference(z64[fin], m64, v64, w64, ex_fin)
    refs = torch.autograd.grad((ref_fin * weights.double()[fin]).sum(), inputs64)
    # A scalar log-variance's gradient sums terms of size ~d/2 per query that cancel.
    floor = 0.5 * z.shape[0] * z.shape[1] if log_var.dim() == 0 else 0.0
    for name, g, r in zip(["z", "means", "log_var", "log_weights"], grads, refs):
        assert_grad(g, r, rtol_g, floor if name == "log_var" else 0.0)


# ----------------------------------------------------------------------------- torch backends


@pytest.mark.parametrize("backend,budget", TORCH, ids=TORCH_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_values_and_gradients(backend, budget, kind, dtype, device):
    z, means, log_var = make(37, 53, 5, kind, dtype, device)
    log_weights = torch.randn(53, dtype=dtype, device=device)
    log_weights[[3, 7]] = -math.inf
    exclude = torch.randint(-1, 53, (37,), device=device)
    tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-12, 1e-10)
    check_against_reference(z, means, log_var, log_weights, exclude, backend, budget, *tol)


@pytest.mark.parametrize("backend,budget", TORCH, ids=TORCH_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(backend, budget, kind, device):
    z, means, log_var = make(4, 5, 3, kind, torch.float64, device)
    log_weights = torch.randn(5, dtype=torch.float64, device=device)
    exclude = torch.tensor([1, -1, 4, 0], device=device)

    def f(z, means, log_var, log_weights):
        return mixture_logsumexp(z, means, log_var, log_weights, exclude, backend=backend, memory_budget=budget).log()

    assert torch.autograd.gradcheck(f, leaves(z, means, log_var, log_weights))


def test_dense_double_backward(device):
    z, means, log_var = make(3, 4, 2, "diagonal", torch.float64, device)
    f = lambda z, m, v: mixture_logsumexp(z, m, v, backend="dense").log()  # noqa: E731
    assert torch.autograd.gradgradcheck(f, leaves(z, means, log_var))


@st.composite
def problems(draw):
    b, n, d = draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 4))
    return dict(
        b=b,
        n=n,
        d=d,
        kind=draw(st.sampled_from(KINDS)),
        lv_centre=draw(st.floats(math.log(1e-6), math.log(1e6))),
        spread=draw(st.sampled_from([1e-3, 1.0, 1e3])),
        offset=draw(st.sampled_from([0.0, 10.0, -1e4])),
        exclude=draw(st.booleans()),
        near=draw(st.booleans()),
        zero_weights=draw(st.booleans()),
        backend=draw(st.sampled_from(["dense", "chunked"])),
        budget=draw(st.integers(1, 2000)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(problems())
def test_random_problems(p):
    """Random shapes, sigma^2 from 1e-6 to 1e6, far or near queries, exclusion, zero weights,
    block sizes (the budget) from 1 x 1 up."""
    gen = torch.Generator().manual_seed(p["seed"])
    z, means, log_var = make(p["b"], p["n"], p["d"], p["kind"], torch.float64, "cpu", gen, p["lv_centre"])
    if p["near"]:  # queries next to a mean: the expansion's worst case
        pick = torch.randint(0, p["n"], (p["b"],), generator=gen)
        z = means[pick] + 1e-4 * torch.randn(z.shape, dtype=z.dtype, generator=gen)
    z, means = p["spread"] * z + p["offset"], p["spread"] * means + p["offset"]
    log_weights = None
    if p["zero_weights"]:
        log_weights = torch.randn(p["n"], dtype=torch.float64, generator=gen)
        log_weights[torch.rand(p["n"], generator=gen) < 0.4] = -math.inf
    exclude = torch.randint(-1, p["n"], (p["b"],), generator=gen) if p["exclude"] else None
    check_against_reference(z, means, log_var, log_weights, exclude, p["backend"], p["budget"], 1e-12, 1e-7)
    # float32 inputs: values within 1e-5 of the size of their terms
    z32, m32, v32 = z.float(), means.float(), log_var.float()
    w32 = log_weights.float() if log_weights is not None else None
    value = mixture_logsumexp(z32, m32, v32, w32, exclude, backend=p["backend"], memory_budget=p["budget"]).log()
    ref, scale = reference(*[t.double() if t is not None else None for t in (z32, m32, v32, w32)], exclude)
    assert_values(value, ref, scale, 1e-5)


@pytest.mark.parametrize("backend,budget", TORCH, ids=TORCH_IDS)
@pytest.mark.parametrize("log_var", [math.log(1e-6), math.log(1e6)])
def test_extreme_scales_and_far_queries(backend, budget, log_var, dtype, device):
    z, means, _ = make(6, 9, 4, "scalar", dtype, device)
    z = z + torch.tensor([1e4, -1e4, 0, 0], dtype=dtype, device=device)  # far from every mean
    lv = torch.tensor(log_var, dtype=dtype, device=device)
    tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-12, 1e-9)
    check_against_reference(z, means, lv, None, None, backend, budget, *tol)


def naive_expansion(z, means, log_var):
    """What the engine must beat: the expansion on centred float32 data, no correction."""
    c = means.mean(0)
    z, means = z - c, means - c
    d2 = (z * z).sum(-1, keepdim=True) + (means * means).sum(-1) - 2 * z @ means.T
    d = z.shape[1]
    return torch.logsumexp(-0.5 * (d * math.log(2 * math.pi) + d * log_var) - 0.5 * d2 / log_var.exp(), 1)


@pytest.mark.parametrize("backend,budget", TORCH, ids=TORCH_IDS)
@pytest.mark.parametrize("kind", ["scalar", "diagonal"])
def test_near_points_float32(backend, budget, kind, device):
    """Queries 1e-3 from a mean, sigma^2 ~ 1e-6, data away from the origin: the expansion
    |z|^2 + |mu|^2 - 2 z.mu cancels; the engine must stay within 1e-5 of float64."""
    gen = torch.Generator().manual_seed(1)
    means = 3 * torch.randn(60, 16, generator=gen) + 5
    z = means[torch.randint(0, 60, (20,), generator=gen)] + 1e-3 * torch.randn(20, 16, generator=gen)
    shape = () if kind == "scalar" else (60, 16)
    log_var = math.log(1e-6) + 0.1 * torch.randn(shape, generator=gen)
    z, means, log_var = z.to(device), means.to(device), log_var.to(device)
    ref, _ = reference(*as64(z, means, log_var))
    if kind == "scalar":  # the case is hard: the plain expansion is far off
        naive = naive_expansion(z, means, log_var)
        assert ((naive.double() - ref.detach()).abs() / ref.detach().abs()).max() > 1e-3
    value = mixture_logsumexp(z, means, log_var, backend=backend, memory_budget=budget).log()
    assert ((value.double() - ref.detach()).abs() / ref.detach().abs()).max() < 1e-5
    check_against_reference(z, means, log_var, None, None, backend, budget, 1e-5, 1e-4)


@pytest.mark.parametrize("backend,budget", TORCH, ids=TORCH_IDS)
def test_leave_one_out_dominant_component(backend, budget, dtype, device):
    """The excluded component beats all others by >100 nats: compare with simply dropping it."""
    n, d = 12, 3
    means = torch.arange(n, dtype=dtype, device=device)[:, None] * torch.tensor([3.0, 0, 0], dtype=dtype, device=device)
    exclude = torch.tensor([0, 5, 11, 7], device=device)
    z = means[exclude] + 1e-3  # on top of the excluded mean; the next is 3 away: 4.5 / s^2 nats
    log_var = torch.tensor(math.log(0.02), dtype=dtype, device=device)  # 225 nats lower
    value = mixture_log_prob(z, means, log_var, exclude=exclude, backend=backend, memory_budget=budget)
    for i, e in enumerate(exclude.tolist()):
        keep = torch.arange(n, device=device) != e
        alone = mixture_log_prob(z[i : i + 1].double(), means[keep].double(), log_var.double(), backend="dense")
        assert abs(value[i].item() - alone.item()) <= 1e-6 * abs(alone.item())
        full = mixture_log_prob(z[i : i + 1].double(), means.double(), log_var.double())
        assert full.item() - alone.item() > 100  # the dominance the test is about
    tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-12, 1e-9)
    check_against_reference(z, means, log_var, None, exclude, backend, budget, *tol)


@pytest.mark.parametrize("backend,budget", TORCH, ids=TORCH_IDS)
def test_zero_weights_and_empty_rows(backend, budget, device):
    """Row 0's only non-excluded component has zero weight: -inf, no NaN, zero gradients."""
    means = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]], device=device)
    log_weights = torch.tensor([-math.inf, 0.0, -math.inf], device=device)
    z = torch.tensor([[0.1, 0.0], [0.5, 0.5], [2.0, 0.0]], device=device)
    exclude = torch.tensor([1, -1, 0], device=device)
    z, means, log_weights = leaves(z, means, log_weights)
    log_var = torch.tensor(0.0, device=device, requires_grad=True)
    part = mixture_logsumexp(z, means, log_var, log_weights, exclude, backend=backend, memory_budget=budget)
    value = part.log()
    assert torch.isneginf(value[0]) and torch.isfinite(value[1:]).all()
    assert part.sum[0] == 0 and torch.isneginf(part.max[0])
    grads = torch.autograd.grad(value[1:].sum() + 0 * value[0].clamp_min(0), [z, means, log_var, log_weights])
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0] == 0).all() and grads[3][0] == 0 and grads[3][2] == 0
    check_against_reference(z, means, log_var, log_weights, exclude, backend, budget, 1e-5, 1e-4)


def test_uniform_normaliser_with_exclusion(device):
    z, means, log_var = make(5, 8, 2, "scalar", torch.float64, device)
    exclude = torch.tensor([0, -1, 3, 7, -1], device=device)
    value = mixture_log_prob(z, means, log_var, exclude=exclude)
    ref, _ = reference(z, means, log_var, None, exclude)
    kept = torch.tensor([7, 8, 7, 7, 8], dtype=torch.float64)
    torch.testing.assert_close(value.cpu(), ref.cpu() - kept.log())


@pytest.mark.parametrize("backend,budget", TORCH, ids=TORCH_IDS)
@pytest.mark.parametrize("kind", ["scalar", "diagonal"])
def test_shards_combine_exactly(backend, budget, kind, device):
    """Splitting the components into shards and combining the partials == the whole."""
    z, means, log_var = make(9, 23, 3, kind, torch.float64, device)
    log_weights = torch.randn(23, dtype=torch.float64, device=device)
    exclude = torch.tensor([0, 4, 9, 22, -1, 10, 15, 3, 21], device=device)
    z, means, log_var, log_weights = leaves(z, means, log_var, log_weights)
    run = dict(backend=backend, memory_budget=budget)
    whole = mixture_logsumexp(z, means, log_var, log_weights, exclude, **run).log()
    parts = []
    for s in (slice(0, 4), slice(4, 10), slice(10, 23)):
        local = torch.where((exclude >= s.start) & (exclude < s.stop), exclude - s.start, -1)
        lv = log_var if kind == "scalar" else log_var[s]
        parts.append(mixture_logsumexp(z, means[s], lv, log_weights[s], local, **run))
    combined = LogSumExp.combine(parts).log()
    torch.testing.assert_close(combined, whole, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(whole.sum(), [z, means, log_var, log_weights])
    g2 = torch.autograd.grad(combined.sum(), [z, means, log_var, log_weights])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batch_shapes_and_half_precision(device):
    z = torch.randn(2, 3, 4, device=device)
    means = torch.randn(6, 4, device=device)
    value = mixture_log_prob(z, means, 0.0, exclude=torch.tensor([0, 1, -1], device=device))
    assert value.shape == (2, 3)
    half = mixture_log_prob(z.bfloat16(), means.bfloat16(), 0.0)
    assert half.dtype == torch.bfloat16
    # An independent float64 reference on the bfloat16-rounded inputs; the result may differ
    # from it only by the final rounding to bfloat16 (8 bits: 2^-8 relative).
    zb, mb = z.bfloat16().double().cpu(), means.bfloat16().double().cpu()
    ref = torch.logsumexp(-0.5 * (zb[..., None, :] - mb).pow(2).sum(-1), -1) - 2 * math.log(2 * math.pi) - math.log(6)
    torch.testing.assert_close(half.double().cpu(), ref, rtol=2**-8, atol=0)


def test_chunked_backward_saves_no_block(device):
    """The chunked backward saves only inputs and the per-query partial, nothing B x N (its
    peak memory is measured in tests/test_engine_memory.py)."""
    z, means, log_var = leaves(*make(40, 50, 3, "diagonal", torch.float32, device))
    value = mixture_logsumexp(z, means, log_var, backend="chunked", memory_budget=1000).log()
    todo, node = [value.grad_fn], None
    while todo and node is None:
        f = todo.pop()
        if "ChunkedLogSumExp" in type(f).__name__:
            node = f
        todo += [g for g, _ in f.next_functions if g is not None]
    assert node is not None
    assert max(t.numel() for t in node.saved_tensors if t is not None) < 40 * 50


# ----------------------------------------------------------------------------- kNN


def brute_knn(queries, points, k, exclude=None):
    d2 = ((queries[:, None, :].double() - points[None].double()) ** 2).sum(-1)
    if exclude is not None:
        d2 = d2.masked_fill(exclude[:, None] == torch.arange(points.shape[0], device=d2.device), math.inf)
    return torch.sort(d2, dim=1)


@pytest.mark.parametrize("backend,budget", TORCH + [("auto", None)], ids=TORCH_IDS + ["auto"])
@pytest.mark.parametrize("use_exclude", [False, True])
def test_knn_brute_force(backend, budget, use_exclude, dtype, device):
    q = torch.randn(17, 4, dtype=dtype, device=device)
    pts = torch.cat([torch.randn(30, 4, dtype=dtype, device=device), q[:3] + 1e-4])  # near duplicates
    exclude = torch.randint(-1, 33, (17,), device=device) if use_exclude else None
    exclude = exclude.index_fill(0, torch.tensor([0, 1], device=device), 30) if use_exclude else None
    for k in (1, 5, 32 if use_exclude else 33):
        d2, idx = knn(q, pts, k, exclude, backend=backend, memory_budget=budget)
        ref_d2, ref_idx = brute_knn(q, pts, k, exclude)
        assert idx.shape == (17, k) and d2.dtype == dtype
        torch.testing.assert_close(d2.double(), ref_d2[:, :k], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(idx, ref_idx[:, :k])  # random data: no ties
        if exclude is not None:
            assert not (idx == exclude[:, None]).any()


# ----------------------------------------------------------------------------- bad input


def test_bad_input():
    z, means = torch.randn(3, 2), torch.randn(5, 2)
    with pytest.raises(VAEPriorsError, match="means"):
        mixture_log_prob(z, torch.randn(5, 3), 0.0)
    with pytest.raises(VAEPriorsError, match="means"):
        mixture_log_prob(z, means.double(), 0.0)
    with pytest.raises(VAEPriorsError, match="log_var"):
        mixture_log_prob(z, means, torch.zeros(4))
    with pytest.raises(VAEPriorsError, match="log_weights"):
        mixture_log_prob(z, means, 0.0, torch.zeros(3))
    with pytest.raises(VAEPriorsError, match="backend"):
        mixture_log_prob(z, means, 0.0, backend="fast")
    with pytest.raises(VAEPriorsError, match="`z`"):
        mixture_log_prob(z.index_fill(0, torch.tensor([1]), math.nan), means, 0.0)
    with pytest.raises(VAEPriorsError, match="`means`"):
        mixture_log_prob(z, means.index_fill(0, torch.tensor([4]), math.inf), 0.0)
    with pytest.raises(VAEPriorsError, match="`log_var`"):
        mixture_log_prob(z, means, torch.tensor([0.0, 1, math.nan, 0, 0]))
    with pytest.raises(VAEPriorsError, match="`z`"):
        mixture_log_prob(torch.tensor(1.0), means, 0.0)
    with pytest.raises(VAEPriorsError, match="`z`"):
        mixture_log_prob(torch.ones(3, 2, dtype=torch.long), means, 0.0)
    with pytest.raises(VAEPriorsError, match="exclude"):
        mixture_log_prob(z, means, 0.0, exclude=torch.tensor([0, 1, 5]))
    with pytest.raises(VAEPriorsError, match="memory_budget"):
        mixture_log_prob(z, means, 0.0, memory_budget=0)
    with pytest.raises(VAEPriorsError, match="memory_budget"):
        engine.set_memory_budget(-5)
    with pytest.raises(VAEPriorsError, match="`k`"):
        knn(z, means, 6)
    with pytest.raises(VAEPriorsError, match="`k`"):
        knn(z, means, 5, torch.tensor([0, -1, 1]))
    with pytest.raises(VAEPriorsError, match="backend"):
        knn(z, means, 2, backend="gpu")


def test_memory_budget_default_and_auto_rules(monkeypatch):
    old = engine.get_memory_budget()
    try:
        engine.set_memory_budget(1000)
        assert engine.get_memory_budget() == 1000
        z, means = torch.randn(30, 2), torch.randn(40, 2)
        ref, _ = reference(z.double(), means.double(), torch.zeros((), dtype=torch.float64))
        torch.testing.assert_close(mixture_logsumexp(z, means, 0.0).log().double(), ref, rtol=1e-6, atol=1e-6)
    finally:
        engine.set_memory_budget(old)
    assert set(BACKENDS) == {"auto", "dense", "chunked", "keops", "fused"}
    cpu, cuda, f32 = torch.device("cpu"), torch.device("cuda"), torch.float32
    choose = _auto.choose
    assert choose("logsumexp", cpu, f32, 100, 1000, 40, True, 2**28) == "dense"
    assert choose("logsumexp", cpu, f32, 10**4, 10**6, 40, False, 2**28) == "chunked"
    assert choose("logsumexp", cpu, f32, 10**5, 10**6, 40, False, 2**28) == "chunked"  # never KeOps on CPU
    assert choose("logsumexp", cuda, f32, 1000, 60000, 40, True, 2**31) == "dense"
    monkeypatch.setitem(_keops._VERDICT, ("cuda", "float32"), (True, ""))
    assert choose("logsumexp", cuda, f32, 50000, 60000, 40, True, 2**28) == "keops"
    assert choose("logsumexp", cuda, f32, 5000, 10**6, 40, True, 2**28) == "chunked"
    monkeypatch.setitem(_keops._VERDICT, ("cuda", "float32"), (False, "no compiler"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto does not need KeOps: no warning either
        assert choose("logsumexp", cuda, f32, 50000, 60000, 40, True, 2**28) == "chunked"


# ----------------------------------------------------------------------------- KeOps


def test_keops_fallback_warns_once(monkeypatch, device):
    monkeypatch.setitem(_keops._VERDICT, (device.type, "float32"), (False, "a test compile crashed"))
    monkeypatch.setattr(_keops, "_WARNED", set())
    z, means = torch.randn(4, 3, device=device), torch.randn(6, 3, device=device)
    with pytest.warns(RuntimeWarning, match="(?s)crashed.*CXX=/usr/bin/g\\+\\+"):
        value = mixture_log_prob(z, means, 0.0, backend="keops")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = mixture_log_prob(z, means, 0.0, backend="keops")
        knn(z, means, 2, backend="keops")
    torch.testing.assert_close(value, again)
    torch.testing.assert_close(value, mixture_log_prob(z, means, 0.0, backend="dense"))


def test_keops_probe_survives_a_crash(monkeypatch, tmp_path):
    """A segfaulting compile kills only the child; the verdict says why."""
    monkeypatch.setattr(_keops, "_PROBE", f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})")
    monkeypatch.setattr(_keops, "_VERDICT", {})
    monkeypatch.setenv("VAEPRIORS_CACHE_DIR", str(tmp_path))
    ok, cause = _keops.check(torch.device("cpu"), torch.float32)
    assert not ok and "crashed" in cause and f"signal {int(signal.SIGSEGV)}" in cause
    assert _keops.check(torch.device("cpu"), torch.float32) == (ok, cause)  # cached
    monkeypatch.setenv("VAEPRIORS_KEOPS", "0")
    assert not _keops.check(torch.device("cpu"), torch.float64)[0]


@pytest.fixture
def keops_device(device):
    ok, cause = _keops.check(device, torch.float32)
    if not ok:
        pytest.skip(f"KeOps unusable here: {cause}")
    return device


# All KeOps tests use float32 and d = 3: four compiled formulas in all (forward, two
# backward reductions, argKmin with k = 4), cached in ~/.cache/keops* after the first run.
@pytest.mark.keops
def test_keops_values_and_gradients(keops_device):
    device = keops_device
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: KeOps itself runs
        for kind in KINDS:
            z, means, log_var = make(30, 41, 3, kind, torch.float32, device)
            log_weights = torch.randn(41, device=device)
            log_weights[[2, 9]] = -math.inf
            exclude = torch.randint(-1, 41, (30,), device=device)
            check_against_reference(z, means, log_var, log_weights, exclude, "keops", None, 1e-5, 1e-4)
        # an empty row (only a zero-weight component left) and far queries at tiny scale
        means = torch.tensor([[0.0, 0, 0], [1, 1, 1]], device=device)
        z = torch.tensor([[0.1, 0, 0], [50.0, 0, 0]], device=device)
        w = torch.tensor([-math.inf, 0.0], device=device)
        lv = torch.tensor(math.log(1e-6), device=device)
        check_against_reference(z, means, lv, w, torch.tensor([1, -1], device=device), "keops", None, 1e-5, 1e-4)


@pytest.mark.keops
def test_keops_knn(keops_device):
    device = keops_device
    q, pts = torch.randn(25, 3, device=device), torch.randn(40, 3, device=device)
    exclude = torch.randint(-1, 40, (25,), device=device)
    for ex in (None, exclude):
        d2, idx = knn(q, pts, 4, ex, backend="keops")
        ref_d2, ref_idx = brute_knn(q, pts, 4, ex)
        torch.testing.assert_close(idx, ref_idx[:, :4])
        torch.testing.assert_close(d2.double(), ref_d2[:, :4], rtol=1e-5, atol=1e-9)


def test_partial_log_keeps_nan_visible():
    from vaepriors.engine import LogSumExp

    part = LogSumExp(torch.tensor([0.0, -math.inf, 1.0]), torch.tensor([math.nan, 0.0, 2.0]))
    value = part.log()
    assert torch.isnan(value[0]) and value[1] == -math.inf
    assert torch.isclose(value[2], torch.tensor(1.0 + math.log(2.0)))


# ----------------------------------------------------------------------------- TF32

# Each case runs in a fresh interpreter: once a process has used torch's newer fp32_precision
# API, reading the legacy flag raises, so the cases cannot share one.
TF32_SETTINGS = {
    "unset": "",
    "legacy-precision": "torch.set_float32_matmul_precision('high')",
    "legacy-flag": "torch.backends.cuda.matmul.allow_tf32 = True",
    "new-api": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "new-api-ieee": "torch.backends.cuda.matmul.fp32_precision = 'ieee'",
}

_TF32_SCRIPT = r"""
import torch
{setting}
from vaepriors.engine import _chunked, _core, knn, mixture_logsumexp
_core.tf32_capable = lambda t: True  # take the CUDA path on CPU tensors
_chunked.MIN_CELLS = 1  # several blocks at budget 20

flags = torch.backends.cuda.matmul
def state():
    try:
        return "legacy", flags.allow_tf32
    except RuntimeError:
        return "new", flags.fp32_precision

def exact():
    api, value = state()
    return value is False if api == "legacy" else value == "ieee"

before = state()
seen = []
real_addmm, real_matmul = torch.addmm, torch.Tensor.__matmul__
def addmm(*a, **k):
    seen.append(exact())
    return real_addmm(*a, **k)
def matmul(x, y):
    seen.append(exact())
    return real_matmul(x, y)
torch.addmm, torch.Tensor.__matmul__ = addmm, matmul

z = torch.randn(7, 3, requires_grad=True)
mu = torch.randn(9, 3, requires_grad=True)
lv = torch.zeros(9, 3, requires_grad=True)
for backend, budget in (("dense", None), ("chunked", 20)):
    out = mixture_logsumexp(z, mu, lv, backend=backend, memory_budget=budget).log()
    g = torch.autograd.grad(out.sum(), (z, mu, lv), create_graph=backend == "dense")
    if backend == "dense":  # double backward
        torch.autograd.grad(g[0].sum(), mu)
knn(z.detach(), mu.detach(), 2, backend="chunked", memory_budget=20)
with torch.no_grad():
    mixture_logsumexp(z, mu, lv[:, 0], backend="dense")
assert seen and all(seen), seen
assert state() == before, (state(), before)
print("IEEE_OK", len(seen))
"""


@pytest.mark.parametrize("setting", list(TF32_SETTINGS), ids=list(TF32_SETTINGS))
def test_gemms_run_in_ieee_fp32_whatever_the_tf32_setting(setting):
    """Every GEMM of the torch backends (forward, backward, double backward, kNN) runs with
    TF32 off, through whichever of torch's APIs the caller used, and the caller's setting
    is restored afterwards. On CPU the flags are only read; a GPU run checks the values."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    script = _TF32_SCRIPT.format(setting=TF32_SETTINGS[setting])
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "IEEE_OK" in res.stdout, res.stderr[-2000:]


def test_tf32_does_not_reach_the_values(device):
    """On a GPU with TF32 switched on by the user, the engine stays exact to float32."""
    if device.type != "cuda":
        pytest.skip("TF32 is a CUDA setting")
    gen = torch.Generator().manual_seed(1)
    z, mu = torch.randn(300, 40, generator=gen), torch.randn(2000, 40, generator=gen)
    lv = torch.tensor(math.log(0.05))
    ref, scale = reference(z.double(), mu.double(), lv.double())
    flags = torch.backends.cuda.matmul
    saved = flags.allow_tf32
    flags.allow_tf32 = True
    try:
        for backend, budget in TORCH:
            zz, mm = leaves(z.to(device), mu.to(device))
            value = mixture_logsumexp(zz, mm, lv.to(device), backend=backend, memory_budget=budget).log()
            assert flags.allow_tf32
            assert_values(value, ref, scale, 1e-5)
            (gz,) = torch.autograd.grad(value.sum(), zz)
            z64 = z.double().requires_grad_()
            (rz,) = torch.autograd.grad(reference(z64, mu.double(), lv.double())[0].sum(), z64)
            assert_grad(gz, rz, 1e-4)
    finally:
        flags.allow_tf32 = saved


def test_ieee_matmul_gradients(monkeypatch):
    """The CUDA path's GEMM (an autograd Function) differentiates right, twice."""
    from vaepriors.engine import _core

    monkeypatch.setattr(_core, "tf32_capable", lambda t: True)
    z, means, log_var = make(3, 4, 2, "diagonal", torch.float64, torch.device("cpu"))
    f = lambda z, m, v: mixture_logsumexp(z, m, v, backend="dense").log()  # noqa: E731
    assert torch.autograd.gradcheck(f, leaves(z, means, log_var))
    assert torch.autograd.gradgradcheck(f, leaves(z, means, log_var))


# ----------------------------------------------------------------------------- edge inputs


@pytest.mark.parametrize("backend,budget", TORCH, ids=TORCH_IDS)
def test_log_variances_beyond_float32_range(backend, budget):
    """exp(-log_var) overflows float32 below about -88.7: no NaN, and the float64 values."""
    gen = torch.Generator().manual_seed(0)
    z, mu = torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.randn(4, 2, generator=gen, dtype=torch.float64)
    lv = torch.zeros(4, 2, dtype=torch.float64)
    lv[1, 0] = -90.0  # one dimension of one component sharper than float32 can scale
    mu[1, 0] = 5.0  # far enough from the centre that its expansion overflows (inf - inf)
    cases = [
        (z, mu, lv),
        (mu[:2], mu, lv),  # a query on the sharp component's mean: that term dominates
        (mu[:1], mu, torch.tensor(-89.0, dtype=torch.float64)),  # isotropic, a query on a mean
    ]
    for zz, mm, vv in cases:
        ref = mixture_log_prob(zz, mm, vv, backend="dense")
        out = mixture_log_prob(zz.float(), mm.float(), vv.float(), backend=backend, memory_budget=budget)
        assert torch.isfinite(out).all() and torch.allclose(out.double(), ref, rtol=1e-5), (out, ref)
        inputs = [t.float().requires_grad_() for t in (zz, mm, vv)]
        grads = torch.autograd.grad(mixture_log_prob(*inputs, backend=backend, memory_budget=budget).sum(), inputs)
        assert all(torch.isfinite(g).all() for g in grads)


def test_half_precision_sum_over_many_components():
    """float16 tops out at 65504: the partial of 70000 near-equal terms must not hold the sum."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(70_000, 2, generator=gen) * 0.01
    z, lv = torch.zeros(3, 2), torch.tensor(4.0)
    ref = mixture_log_prob(z.double(), mu.double(), lv.double())
    for dt in (torch.float16, torch.bfloat16):
        part = mixture_logsumexp(z.to(dt), mu.to(dt), lv.to(dt))
        assert part.max.dtype == dt and torch.isfinite(part.sum).all()
        out = mixture_log_prob(z.to(dt), mu.to(dt), lv.to(dt))
        assert torch.allclose(out.double(), ref, rtol=2e-2), (dt, out, ref)


@pytest.mark.parametrize("backend", ["dense", "chunked", "auto"])
def test_empty_batch(backend):
    mu = torch.randn(5, 3)
    assert mixture_log_prob(torch.empty(0, 3), mu, 0.0, backend=backend).shape == (0,)
    assert mixture_log_prob(torch.empty(2, 0, 3), mu, 0.0, exclude=torch.empty(2, 0, dtype=torch.long), backend=backend).shape == (2, 0)
    d2, idx = knn(torch.empty(0, 3), mu, 2, backend=backend)
    assert d2.shape == idx.shape == (0, 2)


def test_excluding_the_only_component_is_an_error():
    z, mu = torch.randn(2, 3), torch.randn(1, 3)
    with pytest.raises(VAEPriorsError, match="exclude"):
        mixture_log_prob(z, mu, 0.0, exclude=torch.tensor([0, -1]))
    ref = -0.5 * (z - mu).square().sum(-1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(mixture_log_prob(z, mu, 0.0, exclude=torch.tensor([-1, -1])), ref)


@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    cap=st.integers(1, 60),
    seed=st.integers(0, 2**16),
)
def test_near_chunks_cover_the_mask_within_cap(rows, cols, density, cap, seed):
    """Near.chunks hands out every near pair exactly once, at most ``cap`` at a time."""
    from vaepriors.engine._core import Near

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    counts = mask.sum(1)
    seen = torch.zeros(rows, cols, dtype=torch.int64)
    for i, j in Near(mask, counts).chunks(cap):
        assert 0 < i.numel() <= cap
        seen.index_put_((i, j), torch.ones_like(i), accumulate=True)
    assert torch.equal(seen, mask.long())


@pytest.mark.parametrize("backend", ["dense", "chunked"])
def test_terms_below_the_exp_floor(backend, dtype, device):
    """Terms thousands of nats below each row's maximum (most of a wide mixture's terms:
    exp would return denormals or 0 and leave its fast path): value and gradients as the
    float64 brute force, excluded and zero-weight components exactly without gradient."""
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(7, 3, generator=g) * 40).to(device, dtype)
    means = (torch.randn(50, 3, generator=g) * 40).to(device, dtype)
    log_w = torch.zeros(50, dtype=dtype, device=device)
    log_w[5] = -math.inf
    exclude = torch.tensor([0, -1, 2, -1, 4, -1, 49], device=device)
    z, means, log_w = leaves(z, means, log_w)
    log_var = torch.tensor(-1.0, dtype=dtype, device=device, requires_grad=True)
    out = mixture_logsumexp(z, means, log_var, log_w, exclude, backend=backend).log()
    # float64 reference with plain autograd
    zr, mr, vr, wr = (t.detach().double().requires_grad_() for t in (z, means, log_var, log_w))
    arg = wr - 0.5 * ((zr[:, None] - mr[None]) ** 2).sum(-1) / vr.exp() - 1.5 * (math.log(2 * math.pi) + vr)
    arg = arg.scatter(1, exclude.clamp(min=0)[:, None], torch.where(exclude[:, None] >= 0, -math.inf, arg.gather(1, exclude.clamp(min=0)[:, None])))
    ref = torch.logsumexp(arg, 1)
    spread = (arg.amax(1, keepdim=True) - arg.masked_fill(arg.isinf(), 0)).amax().item()
    assert spread > 1000  # the case the test is about
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=0)
    grads = torch.autograd.grad(out.sum(), [z, means, log_var, log_w])
    refs = torch.autograd.grad(ref.sum(), [zr, mr, vr, wr])
    for got, want in zip(grads, refs):
        want = want.nan_to_num(0.0)
        torch.testing.assert_close(got.double(), want, rtol=10 * tol, atol=10 * tol * want.abs().max().item())
    assert grads[3][5] == 0 and (grads[1][5] == 0).all()  # zero weight: no gradient at all


@pytest.mark.parametrize("kind", ["scalar", "per-component", "diagonal"])
@pytest.mark.parametrize("backend", ["dense", "chunked"])
def test_floored_terms_carry_no_gradient(backend, kind):
    """Queries on their means at log-variance -86 (float32), every other component at a
    scaled distance near the largest the expansion takes: the terms raised to the exp floor
    (true weight ~0) once added exp(floor) x distance to the log-variance gradient (+4e5
    where the exact total is -6)."""
    g = torch.Generator().manual_seed(0)
    d, n = 4, 2000
    means = torch.randn(n, d, generator=g)
    z = means[:3].clone().requires_grad_()
    shape = {"scalar": (), "per-component": (n,), "diagonal": (n, d)}[kind]
    log_var = torch.full(shape, -86.0, requires_grad=True)
    out = mixture_log_prob(z, means, log_var, backend=backend, memory_budget=1 << 20)
    gz, gv = torch.autograd.grad(out.sum(), [z, log_var])
    # each query's own component holds all the weight: d/d log_var = -d/2 per query, d/dz = 0
    assert abs(gv.sum().item() - (-3 * d / 2)) < 1e-4
    assert gz.abs().max().item() == 0.0
