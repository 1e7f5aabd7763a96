"""PseudocoresetPrior: density, the coreset update's estimators, projection, sampling, state."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Independent,
    Laplace,
    Normal,
)

import vaepriors as vp
from vaepriors.coreset import PseudocoresetPrior, pairwise_log_likelihood, project_simplex

from tests.examples import PRIOR_EXAMPLES, ToyEncoder

F64 = torch.float64


# -- the density -------------------------------------------------------------------------


def brute_log_prob64(z, means, log_var, weights, n_total):
    """log sum_m (w_m / N) N(z; mu_m, sigma^2 I), one component at a time, float64."""
    z, means = z.double(), means.double()
    d = z.shape[-1]
    var = math.exp(float(torch.as_tensor(log_var).detach()))
    total = torch.zeros(z.shape[:-1], dtype=F64)
    for m in range(means.shape[0]):
        sq = ((z - means[m]) ** 2).sum(-1)
        total += float(weights[m]) / n_total * torch.exp(-0.5 * sq / var) / (2 * math.pi * var) ** (d / 2)
    return total.log()


def test_example_registered():
    assert any(e.name == "pseudocoreset" for e in PRIOR_EXAMPLES)
    ex = next(e for e in PRIOR_EXAMPLES if e.name == "pseudocoreset")
    prior = ex.make(3)
    z = torch.randn(5, 3)
    torch.testing.assert_close(prior.log_prob(z).double(), ex.reference(prior, z), rtol=1e-5, atol=1e-5)


def test_log_prob_matches_float64_formula(dtype):
    d = 3
    enc = ToyEncoder(d).to(dtype)
    w = torch.tensor([0.0, 4.0, 1.0, 0.0, 2.5, 2.5], dtype=dtype)  # zero weights included
    prior = PseudocoresetPrior(torch.rand(6, 6, dtype=dtype), w, init_log_var=-0.7).bind(enc)
    assert prior.n_total == 10.0
    z = torch.randn(4, 5, d, dtype=dtype)
    got = prior.log_prob(z)
    with torch.no_grad():
        means = copy.deepcopy(enc).double()(prior.pseudo_inputs.double())[0]
    ref = brute_log_prob64(z, means, prior.log_var, w, 10.0)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert got.shape == (4, 5) and got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    # Far-away queries stay finite (log-space all the way).
    far = prior.log_prob(torch.full((2, d), 1e3, dtype=dtype))
    assert torch.isfinite(far).all()


def test_zero_weight_components_drop_out():
    prior = PseudocoresetPrior(torch.rand(4, 6), torch.tensor([0.0, 2.0, 0.0, 2.0])).bind(ToyEncoder(2))
    z = torch.randn(7, 2)
    before = prior.log_prob(z)
    prior.pseudo_inputs[0] += 5.0  # move a zero-weight pseudo-input anywhere
    torch.testing.assert_close(prior.log_prob(z), before)


def test_gradcheck_log_prob_float64():
    prior = PseudocoresetPrior(torch.rand(5, 6, dtype=F64), torch.tensor([1.0, 0.0, 2.0, 3.0, 4.0], dtype=F64))
    prior.bind(ToyEncoder(2).double())
    z = torch.randn(3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: prior.log_prob(z), (z,))
    lv = prior.log_var
    # d/dlog_var by finite differences of the brute-force formula.
    prior.log_prob(z.detach()).sum().backward()
    g = float(lv.grad)
    with torch.no_grad():
        means = prior.encoder(prior.pseudo_inputs)[0]
        e = 1e-6
        fd = (
            brute_log_prob64(z, means, float(lv) + e, prior.weights, 10.0).sum()
            - brute_log_prob64(z, means, float(lv) - e, prior.weights, 10.0).sum()
        ) / (2 * e)
    assert abs(g - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


def test_elbo_trains_encoder_and_log_var_not_the_coreset():
    torch.manual_seed(1)
    enc, dec_net = ToyEncoder(2), nn.Linear(2, 6)
    data = torch.rand(30, 6)
    prior = PseudocoresetPrior.from_data(data, n_pseudo=5)
    elbo = vp.ExemplarELBO(enc, lambda z: Bernoulli(logits=dec_net(z)), prior)
    assert [n for n, _ in prior.named_parameters()] == ["log_var"]
    # Prior state, saved like buffers, but no buffer: DDP must not broadcast it.
    assert {"pseudo_inputs", "weights"} <= set(prior.state_dict())
    assert not {"pseudo_inputs", "weights"} & {n for n, _ in prior.named_buffers()}
    x = (torch.rand(8, 6) > 0.5).float()
    elbo(x).loss.backward()
    assert prior.log_var.grad is not None and prior.log_var.grad != 0
    assert all(p.grad is not None for p in enc.parameters())
    # The prior's means alone move the encoder: zero the ELBO's other path.
    enc.zero_grad()
    prior.log_prob(torch.randn(4, 2)).sum().backward()
    assert enc.net.weight.grad.abs().sum() > 0


# -- the likelihood matrix ---------------------------------------------------------------


def loop_reference(logp_one, x, s):
    """[B, S] by a double Python loop over points and latents, float64."""
    return torch.tensor([[float(logp_one(x[b], j)) for j in range(s)] for b in range(x.shape[0])], dtype=F64)


KINDS = ["bernoulli", "independent", "probs", "cbern", "normal", "normal-scalar", "laplace", "ind-laplace"]


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_log_likelihood(kind, dtype):
    s, b, shape = 4, 5, (2, 3)
    logits = 3 * torch.randn(s, *shape, dtype=dtype)
    x = torch.rand(b, *shape, dtype=dtype)  # grey-level: pseudo-inputs are
    loc, scale = torch.randn(s, *shape, dtype=dtype), torch.rand(s, *shape, dtype=dtype) + 0.2
    L, X = logits.double(), x.double()

    def bern(xb, j):
        return (xb * L[j] - F.softplus(L[j])).sum()

    if kind in ("bernoulli", "independent", "probs"):
        out = Bernoulli(logits=logits) if kind != "probs" else Bernoulli(probs=torch.sigmoid(logits))
        out = Independent(out, 2) if kind == "independent" else out
        ref = loop_reference(bern, X, s)
    elif kind == "cbern":
        out = ContinuousBernoulli(logits=logits)
        ref = loop_reference(lambda xb, j: ContinuousBernoulli(logits=L[j]).log_prob(xb).sum(), X, s)
    elif kind.startswith("normal"):
        sc = scale if kind == "normal" else torch.tensor(0.3, dtype=dtype)
        out = Normal(loc, sc)
        sc64 = sc.double().expand(s, *shape)
        ref = loop_reference(lambda xb, j: Normal(loc[j].double(), sc64[j]).log_prob(xb).sum(), X, s)
    else:
        out = Laplace(loc, scale)
        out = Independent(out, 2) if kind == "ind-laplace" else out
        ref = loop_reference(lambda xb, j: Laplace(loc[j].double(), scale[j].double()).log_prob(xb).sum(), X, s)
    got = pairwise_log_likelihood(out, x)
    assert got.shape == (b, s) and got.dtype == dtype
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_pairwise_generic_chunks(monkeypatch):
    import vaepriors.coreset as cs

    monkeypatch.setattr(cs, "_GENERIC_CHUNK", 7)  # forces one point per chunk
    out = Laplace(torch.randn(3, 4), torch.ones(3, 4))
    x = torch.randn(5, 4)
    ref = out.log_prob(x[:, None]).sum(-1)
    torch.testing.assert_close(pairwise_log_likelihood(out, x), ref)


# -- the estimators on a problem with an exact answer ------------------------------------
# Latent d = 1, three Bernoulli pixels with logits l(z) = a z + c sin(2z) + b, prior
# p0 = N(0, 1). Both p(z|X) ∝ exp(sum_n f(x_n, z)) p0 and p(z|U,w) ∝ exp(sum_m w_m f(u_m, z)) p0
# are evaluated on a fine grid, which gives the KL, its finite differences and exact samples.

A = torch.tensor([2.0, -1.5, 1.0], dtype=F64)
C = torch.tensor([0.5, 1.0, -0.8], dtype=F64)
B0 = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
X8 = torch.tensor(
    [[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=F64
)
GRID = torch.linspace(-10, 10, 4001, dtype=F64)
H = float(GRID[1] - GRID[0])


def toy_logits(z):
    return z * A + C * torch.sin(2 * z) + B0


def toy_decoder(z):  # [S, 1] -> Bernoulli over [S, 3]
    return Bernoulli(logits=toy_logits(z.double()))


def grid_log_density(weights, points):
    l = toy_logits(GRID[:, None])  # [G, 3]
    f = points.double() @ l.T - F.softplus(l).sum(-1)  # [K, G]
    lg = (weights.double()[:, None] * f).sum(0) - 0.5 * GRID**2
    return lg - torch.logsumexp(lg, 0) - math.log(H)


def grid_kl(weights, points):
    lp, lq = grid_log_density(weights, points), grid_log_density(torch.ones(8, dtype=F64), X8)
    return float((lp.exp() * (lp - lq)).sum() * H)


def exact_sampler(prior):
    """Draws from p(z|U,w) ∝ exp(sum_m w_m f(u_m, z)) p0(z) by inverse CDF on the grid."""

    def draw(n):
        cdf = torch.cumsum(grid_log_density(prior.weights, prior.pseudo_inputs).exp() * H, 0)
        cdf = cdf / cdf[-1]
        u = torch.rand(n, dtype=F64)
        i = torch.searchsorted(cdf, u).clamp(1, len(GRID) - 1)
        t = (u - cdf[i - 1]) / (cdf[i] - cdf[i - 1])
        return (GRID[i - 1] + t * H)[:, None]

    return draw


def toy_prior(**kwargs):
    u = torch.tensor([[0.9, 0.2, 0.3], [0.1, 0.8, 0.6], [0.5, 0.5, 0.9]], dtype=F64)
    return PseudocoresetPrior(u, torch.tensor([3.0, 2.5, 2.5], dtype=F64), **kwargs)


def test_gradients_agree_with_finite_differences_of_the_kl():
    prior = toy_prior()
    w, u = prior.weights.clone(), prior.pseudo_inputs.clone()
    e = 1e-5
    eye = torch.eye(3, dtype=F64)
    fd_w = torch.tensor([(grid_kl(w + e * eye[m], u) - grid_kl(w - e * eye[m], u)) / (2 * e) for m in range(3)])
    fd_u = torch.zeros(3, 3, dtype=F64)
    for m, j in itertools.product(range(3), range(3)):
        du = torch.zeros(3, 3, dtype=F64)
        du[m, j] = e
        fd_u[m, j] = (grid_kl(w, u + du) - grid_kl(w, u - du)) / (2 * e)
    draw = exact_sampler(prior)
    runs = [prior.coreset_gradients(toy_decoder, X8, draw(2000)) for _ in range(40)]
    gw, gu = torch.stack([r[0] for r in runs]), torch.stack([r[1] for r in runs])
    for est, fd in ((gw, fd_w), (gu, fd_u)):
        mean, se = est.mean(0), est.std(0) / math.sqrt(len(runs))
        # Unbiased: within 4.5 standard errors (plus the grid's quadrature error).
        assert ((mean - fd).abs() <= 4.5 * se + 1e-4 * fd.abs().max()).all(), (mean, fd, se)
        assert (fd.abs() > 10 * se).any()  # the test has power: the gradient is not ~0


def test_minibatch_estimate_is_unbiased_over_batches():
    prior = toy_prior()
    z = exact_sampler(prior)(50)
    full = prior.coreset_gradients(toy_decoder, X8, z)
    parts = [prior.coreset_gradients(toy_decoder, X8[i : i + 2], z) for i in range(0, 8, 2)]
    for k in range(2):
        torch.testing.assert_close(sum(p[k] for p in parts) / 4, full[k])


def test_bernoulli_input_gradient_is_the_logits():
    prior = toy_prior()
    z = torch.randn(6, 1, dtype=F64)
    gw, gu = prior.coreset_gradients(toy_decoder, X8, z)
    l = toy_logits(z)  # [S, 3]
    fu = prior.pseudo_inputs @ l.T - F.softplus(l).sum(-1)  # [M, S]
    r = (X8 @ l.T - F.softplus(l).sum(-1)).sum(0) - prior.weights @ fu
    rc = r - r.mean()
    cov = lambda a: (a * rc).sum(-1) / 5  # covariance over the 6 samples
    torch.testing.assert_close(gw, -cov(fu))
    torch.testing.assert_close(gu, -prior.weights[:, None] * cov(l.T)[None, :])


def test_kl_decreases_over_updates_exact_sampler():
    prior = toy_prior(lr_weights=0.05, lr_inputs=0.02, input_range=(0, 1))
    kls = [grid_kl(prior.weights, prior.pseudo_inputs)]
    for _ in range(4):
        # Minibatches of 4 of the 8 points (scaled by N/B = 2), 25 steps per call.
        prior.update_coreset(
            toy_decoder, X8, n_steps=25, batch_size=4, n_samples=64, sampler=exact_sampler(prior), progress=False
        )
        kls.append(grid_kl(prior.weights, prior.pseudo_inputs))
        assert (prior.weights >= 0).all() and abs(float(prior.weights.sum()) - 8) < 1e-9
    assert kls[0] > 0.5 and kls[-1] < 0.05 * kls[0], kls
    assert kls[-1] < kls[1]
    assert int(prior.adam_step) == 100


def test_kl_decreases_with_the_default_mixture_sampler():
    # The paper's choice: samples from the mixture prior through the encoder. Not an exact
    # gradient of this KL, but on this toy problem it still drives it down.
    enc = lambda x: (x @ torch.tensor([[1.0], [-1.0], [0.5]], dtype=F64), torch.zeros(x.shape[0], 1, dtype=F64))
    prior = toy_prior(lr_weights=0.05, lr_inputs=0.02, input_range=(0, 1), init_log_var=-1.0).bind(enc)
    kl0 = grid_kl(prior.weights, prior.pseudo_inputs)
    prior.update_coreset(toy_decoder, X8, n_steps=100, batch_size=8, n_samples=64, progress=False)
    assert grid_kl(prior.weights, prior.pseudo_inputs) < 0.05 * kl0


# -- the projection and the invariants -----------------------------------------------------


def brute_projection(v, total):
    """Exhaustive QP: over every support set S, the minimiser of |x - v|^2 with x_S free,
    sum x_S = total, x_{not S} = 0; keep the feasible (x >= 0) one nearest to v."""
    n = len(v)
    best, best_d = None, math.inf
    for k in range(1, n + 1):
        for s in itertools.combinations(range(n), k):
            idx = list(s)
            x = torch.zeros(n, dtype=F64)
            x[idx] = v[idx] - (v[idx].sum() - total) / k
            if (x >= -1e-12).all():
                dist = float(((x - v) ** 2).sum())
                if dist < best_d:
                    best, best_d = x, dist
    return best


@given(
    v=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=6),
    total=st.floats(1e-3, 1e3),
)
def test_project_simplex_matches_brute_force_qp(v, total):
    v = torch.tensor(v, dtype=F64)
    got = project_simplex(v, total)
    assert (got >= 0).all()
    assert abs(float(got.sum()) - total) <= 1e-9 * max(1.0, total + float(v.abs().sum()))
    ref = brute_projection(v, total)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-7 * (1 + float(v.abs().max())))


def test_project_simplex_fixed_points_and_dtype():
    w = torch.tensor([0.0, 2.0, 3.0, 5.0])
    torch.testing.assert_close(project_simplex(w, 10.0), w)  # already feasible: unchanged
    got = project_simplex(torch.tensor([1e30, -1e30, 0.0], dtype=torch.float32), 5.0)
    assert got.dtype == torch.float32 and got.tolist() == [5.0, 0.0, 0.0]


grads = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(
    data=st.data(),
    m=st.integers(1, 6),
    n_total=st.floats(1.0, 1e5),
    steps=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_weights_stay_on_the_simplex_under_adversarial_gradients(data, m, n_total, steps, dtype):
    u = torch.rand(m, 3, dtype=dtype)
    prior = PseudocoresetPrior(u, n_total=n_total, lr_weights=data.draw(st.floats(1e-3, 10.0)), input_range=(0, 1))
    for _ in range(steps):
        gw = torch.tensor(data.draw(st.lists(grads, min_size=m, max_size=m)), dtype=dtype)
        gu = torch.tensor(data.draw(st.lists(grads, min_size=3 * m, max_size=3 * m)), dtype=dtype).reshape(m, 3)
        prior.apply_gradients(gw, gu)
        w = prior.weights
        assert torch.isfinite(w).all() and (w >= 0).all()
        assert abs(float(w.double().sum()) - n_total) <= 1e-5 * n_total
        assert ((prior.pseudo_inputs >= 0) & (prior.pseudo_inputs <= 1)).all()
        for b in (prior.adam_m_weights, prior.adam_v_weights, prior.adam_m_inputs, prior.adam_v_inputs):
            assert torch.isfinite(b).all()


def test_adam_step_count_advances():
    # With a constant gradient Adam's bias-corrected step is exactly lr at every step; a step
    # counter stuck at 1 (a defect of the reference code) gives 1.34 lr at the second step.
    prior = PseudocoresetPrior(torch.zeros(2, 3, dtype=F64), n_total=4.0, lr_inputs=0.01)
    g = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1e4]], dtype=F64)
    for t in (1, 2, 3):
        before = prior.pseudo_inputs.clone()
        prior.apply_gradients(torch.zeros(2, dtype=F64), g)
        torch.testing.assert_close(prior.pseudo_inputs - before, -0.01 * torch.sign(g), rtol=1e-6, atol=1e-9)
        assert int(prior.adam_step) == t


@pytest.mark.parametrize("prior_dtype, grad_dtype", [(torch.float32, F64), (F64, torch.float32)])
def test_apply_gradients_mixed_dtypes_and_huge_values(prior_dtype, grad_dtype):
    prior = PseudocoresetPrior(torch.rand(3, 2, dtype=prior_dtype), n_total=6.0)
    big = torch.finfo(grad_dtype).max
    prior.apply_gradients(torch.tensor([big, -big, 0.0], dtype=grad_dtype), torch.full((3, 2), -big, dtype=grad_dtype))
    assert prior.weights.dtype == prior_dtype and all(torch.isfinite(b).all() for b in prior.buffers())
    # Adam's first step moves each coordinate by lr against the gradient's sign.
    assert prior.weights[1] > prior.weights[2] > prior.weights[0]
    assert abs(float(prior.weights.sum()) - 6.0) < 1e-5


@given(scale=st.floats(0.01, 50.0), seed=st.integers(0, 2**16))
def test_full_update_keeps_weights_valid(scale, seed):
    torch.manual_seed(seed)
    d, p = 2, 5
    W = scale * torch.randn(d, p)
    data = (torch.rand(40, p) > 0.5).float()
    prior = PseudocoresetPrior.from_data(data, n_pseudo=6, lr_weights=0.5)
    prior.bind(lambda x: (x[:, :d], torch.zeros(len(x), d)))
    prior.update_coreset(lambda z: Bernoulli(logits=z @ W), data, batch_size=10, n_samples=8, progress=False)
    w = prior.weights
    assert torch.isfinite(w).all() and (w >= 0).all() and abs(float(w.sum()) - 40) < 1e-3
    assert torch.isfinite(prior.pseudo_inputs).all()


def test_update_at_mnist_scale_float32():
    # N = 50000, 784 pixels: KL gradients of order 1e9 must not overflow or lose the sum.
    torch.manual_seed(0)
    n, dim, d = 50000, 784, 8
    prior = PseudocoresetPrior(torch.rand(50, dim), n_total=n, input_range=(0, 1))
    prior.bind(lambda x: (x[:, :d] * 4 - 2, torch.zeros(len(x), d)))
    W = torch.randn(d, dim)
    x = (torch.rand(100, dim) > 0.5).float()
    for _ in range(3):
        gw, gu = prior.coreset_gradients(lambda z: Bernoulli(logits=z @ W), x, prior.sample((16,)))
        prior.apply_gradients(gw, gu)
    assert gw.abs().max() > 1e6  # the scale this test is about
    assert abs(float(prior.weights.double().sum()) - n) < 1e-5 * n and (prior.weights >= 0).all()
    assert all(torch.isfinite(b).all() for b in prior.buffers())


# -- sampling ------------------------------------------------------------------------------


def test_sampling_frequencies_follow_the_weights():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [20.0, 0.0]])
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]) * 5  # N = 50, one zero weight
    prior = PseudocoresetPrior(torch.eye(5), w, init_log_var=2 * math.log(0.1))
    prior.bind(lambda x: (x @ centres, torch.zeros(len(x), 2)))
    n = 20000
    z = prior.sample((n // 4, 4))
    assert z.shape == (n // 4, 4, 2)
    z = z.reshape(n, 2)
    j = torch.cdist(z, centres).argmin(1)
    counts = torch.bincount(j, minlength=5).double()
    assert counts[0] == 0  # a zero-weight component is never drawn
    expected = n * w[1:].double() / 50
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 21.11  # chi-square, 3 degrees of freedom, p = 1e-4
    # Within a component, z ~ N(mu, sigma^2 I) with sigma = 0.1.
    spread = (z - centres[j]).std()
    assert abs(float(spread) - 0.1) < 0.005
    assert prior.sample(0).shape == (0, 2)


def test_rsample_is_pathwise_in_log_var_and_encoder():
    enc = ToyEncoder(2)
    prior = PseudocoresetPrior(torch.rand(4, 6), n_total=8).bind(enc)
    z = prior.rsample((5,))
    z.pow(2).sum().backward()
    assert prior.log_var.grad is not None and enc.net.weight.grad is not None


# -- state, schedule, isolation of the VAE -----------------------------------------------------


def small_setup(seed=0):
    torch.manual_seed(seed)
    enc, dec = ToyEncoder(2), nn.Linear(2, 6)
    data = (torch.rand(30, 6) > 0.5).float()
    prior = PseudocoresetPrior.from_data(data, n_pseudo=5).bind(enc)
    return prior, enc, dec, data


def test_state_round_trip_including_optimizer_state():
    prior, enc, dec, data = small_setup()
    decoder = lambda z: Bernoulli(logits=dec(z))
    prior.update_coreset(decoder, data, batch_size=10, n_samples=8, progress=False)
    assert int(prior.adam_step) == 3 and prior.adam_v_weights.abs().sum() > 0
    buf = io.BytesIO()
    torch.save(prior.state_dict(), buf)
    buf.seek(0)
    other = PseudocoresetPrior(torch.zeros(5, 6), n_total=1.0, input_range=prior.input_range).bind(enc)
    other.load_state_dict(torch.load(buf))
    assert all(isinstance(v, torch.Tensor) for v in prior.state_dict().values())
    assert other.n_total == 30.0
    for (name, a), (_, b) in zip(prior.state_dict().items(), other.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    # Same state + same randomness = same next update (the optimiser state matters).
    for p in (prior, other):
        torch.manual_seed(5)
        p.update_coreset(decoder, data, batch_size=10, n_samples=8, progress=False)
    assert torch.equal(prior.weights, other.weights) and torch.equal(prior.pseudo_inputs, other.pseudo_inputs)
    fresh = PseudocoresetPrior(torch.zeros(5, 6), n_total=1.0, input_range=prior.input_range).bind(enc)
    sd = prior.state_dict()
    sd["adam_step"] = torch.tensor(0)
    for k in ("adam_m_weights", "adam_v_weights", "adam_m_inputs", "adam_v_inputs"):
        sd[k] = torch.zeros_like(sd[k])
    fresh.load_state_dict(sd)
    torch.manual_seed(5)
    fresh.update_coreset(decoder, data, batch_size=10, n_samples=8, progress=False)
    torch.manual_seed(5)
    prior.update_coreset(decoder, data, batch_size=10, n_samples=8, progress=False)
    assert not torch.equal(prior.weights, fresh.weights)
    sd["weights"] = -sd["weights"]
    with pytest.raises(vp.VAEPriorsError, match="loaded `weights`"):
        fresh.load_state_dict(sd)


def test_update_leaves_the_vae_untouched():
    prior, enc, dec, data = small_setup()
    before = [p.detach().clone() for p in itertools.chain(enc.parameters(), dec.parameters(), [prior.log_var])]
    u0, w0 = prior.pseudo_inputs.clone(), prior.weights.clone()
    prior.update_coreset(lambda z: Bernoulli(logits=dec(z)), data, batch_size=10, n_samples=8, progress=False)
    after = list(itertools.chain(enc.parameters(), dec.parameters(), [prior.log_var]))
    assert all(p.grad is None for p in after)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(prior.weights, w0) and not torch.equal(prior.pseudo_inputs, u0)


def test_schedule_through_the_elbo_hook():
    prior, enc, dec, data = small_setup()
    elbo = vp.ExemplarELBO(enc, lambda z: Bernoulli(logits=dec(z)), prior)
    prior.schedule_updates(elbo.decoder, data, every=3, batch_size=10, n_samples=4, progress=False)
    steps = []
    for epoch in range(7):
        elbo.on_epoch_end(epoch)
        steps.append(int(prior.adam_step))
    assert steps == [0, 0, 3, 3, 3, 6, 6]  # after epochs 2 and 5 (0-based), 3 batches each
    assert "decoder" not in "".join(prior.state_dict())


def test_data_loader_input_and_progress_bar(capsys):
    prior, enc, dec, data = small_setup()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.arange(30)), batch_size=7)
    prior.update_coreset(lambda z: Bernoulli(logits=dec(z)), loader, n_samples=4, progress=True)
    assert int(prior.adam_step) == len(loader) == 5
    assert "coreset update" in capsys.readouterr().err
    prior.update_coreset(lambda z: Bernoulli(logits=dec(z)), loader, n_steps=12, n_samples=4, progress=False)
    assert int(prior.adam_step) == 17
    prior.reset_optimizer()
    assert int(prior.adam_step) == 0 and prior.adam_m_inputs.abs().sum() == 0


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights=torch.tensor([1.0, -1.0, 2.0])), "weights"),
        (dict(weights=torch.tensor([1.0, 2.0])), r"\[M\]"),
        (dict(weights=torch.tensor([1.0, 2.0, float("nan")])), "weights"),
        (dict(), "n_total"),
        (dict(n_total=0), "n_total"),
        (dict(weights=torch.ones(3), n_total=5.0), "sum to `n_total`"),
        (dict(n_total=3, input_range=(1, 0)), "input_range"),
        (dict(n_total=3, input_range=(0.5, 0.6)), "input_range"),
        (dict(n_total=3, input_range="x"), "input_range"),
        (dict(n_total=3, lr_weights=-1.0), "lr_weights"),
        (dict(n_total=3, lr_inputs=float("inf")), "lr_inputs"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(vp.VAEPriorsError, match=match):
        PseudocoresetPrior(torch.rand(3, 4), **kwargs)


def test_bad_construction_inputs():
    with pytest.raises(vp.VAEPriorsError, match="pseudo_inputs"):
        PseudocoresetPrior(torch.zeros(0, 4), n_total=1)
    with pytest.raises(vp.VAEPriorsError, match="pseudo_inputs"):
        PseudocoresetPrior(torch.tensor([[float("inf")]]), n_total=1)
    with pytest.raises(vp.VAEPriorsError, match="pseudo_inputs"):
        PseudocoresetPrior(torch.ones(3, 4, dtype=torch.long), n_total=1)
    with pytest.raises(vp.VAEPriorsError, match="n_pseudo"):
        PseudocoresetPrior.from_data(torch.rand(5, 4), n_pseudo=6)
    with pytest.raises(vp.VAEPriorsError, match="input_range"):
        PseudocoresetPrior.from_data(torch.rand(5, 4), n_pseudo=2, input_range="auto")
    with pytest.raises(vp.VAEPriorsError, match="needs the encoder"):
        PseudocoresetPrior(torch.rand(3, 4), n_total=3).log_prob(torch.zeros(2))


def test_bad_update_arguments():
    prior, enc, dec, data = small_setup()
    good = lambda z: Bernoulli(logits=dec(z))
    state = {k: v.clone() for k, v in prior.state_dict().items() if isinstance(v, torch.Tensor)}
    cases = [
        (dict(decoder=good, data=data, n_samples=1), "n_samples"),
        (dict(decoder=good, data=data[:, :5]), "input_shape"),
        (dict(decoder=good, data=data[:20]), "N = 30"),
        (dict(decoder=good, data=data, batch_size=0), "batch_size"),
        (dict(decoder=good, data=data, n_steps=0), "n_steps"),
        (dict(decoder=good, data=3), "iterable"),
        (dict(decoder=good, data=data, sampler=3), "sampler"),
        (dict(decoder=lambda z: dec(z), data=data), "Distribution"),
        (dict(decoder=lambda z: Bernoulli(logits=dec(z)[:, :4]), data=data), "shape"),
        (dict(decoder=lambda z: Normal(dec(z) * float("nan"), 1.0, validate_args=False), data=data), "not finite"),
        (dict(decoder=lambda z: Bernoulli(logits=dec(z) * float("inf"), validate_args=False), data=data), "not finite"),
    ]
    for kw, match in cases:
        with pytest.raises(vp.VAEPriorsError, match=match):
            prior.update_coreset(kw.pop("decoder"), kw.pop("data"), progress=False, **kw)
    for k, v in state.items():  # a refused update changes nothing
        assert torch.equal(prior.state_dict()[k], v), k
    with pytest.raises(vp.VAEPriorsError, match="unknown update_coreset"):
        prior.schedule_updates(good, data, lr=0.1)
    with pytest.raises(vp.VAEPriorsError, match="every"):
        prior.schedule_updates(good, data, every=0)
    with pytest.raises(vp.VAEPriorsError, match="must be finite"):
        prior.apply_gradients(torch.full((5,), float("nan")), torch.zeros(5, 6))
    with pytest.raises(vp.VAEPriorsError, match="shapes"):
        prior.apply_gradients(torch.zeros(4), torch.zeros(5, 6))
    with pytest.raises(vp.VAEPriorsError, match="S >= 2"):
        prior.coreset_gradients(good, data, torch.zeros(1, 2))
    bad = ((torch.zeros(0), "M >= 1"), (torch.tensor([1.0, float("nan")]), "NaN"), (torch.ones(2, 2), "vector"))
    for v, match in bad:
        with pytest.raises(vp.VAEPriorsError, match=match):
            project_simplex(v)
    with pytest.raises(vp.VAEPriorsError, match="total"):
        project_simplex(torch.ones(2), 0.0)


def test_update_is_adam_written_out():
    """Three steps with changing gradients against Adam's update written out in float64."""
    g = torch.Generator().manual_seed(0)
    u0 = torch.rand(3, 2, dtype=F64, generator=g)
    prior = PseudocoresetPrior(u0.clone(), n_total=6.0, lr_inputs=0.05)
    m = v = torch.zeros_like(u0)
    u = u0.clone()
    for t in (1, 2, 3):
        gu = torch.randn(3, 2, dtype=F64, generator=g)
        prior.apply_gradients(torch.zeros(3, dtype=F64), gu)
        m = 0.9 * m + 0.1 * gu
        v = 0.999 * v + 0.001 * gu**2
        u = u - 0.05 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        torch.testing.assert_close(prior.pseudo_inputs, u, rtol=1e-12, atol=1e-12)


def test_subsampled_training_density():
    d = 3
    enc = ToyEncoder(d).double()
    w = torch.tensor([0.0, 4.0, 1.0, 0.0, 2.5, 2.5, 3.0, 1.0], dtype=F64)
    prior = PseudocoresetPrior(torch.rand(8, 6, dtype=F64), w, n_subsample=3, init_log_var=-0.5).bind(enc)
    z = torch.randn(5, d, dtype=F64)
    with torch.no_grad():
        means = enc(prior.pseudo_inputs)[0]
    # Training mode: three of the six positive-weight components, weights renormalised.
    torch.manual_seed(3)
    got = prior.train().log_prob(z)
    torch.manual_seed(3)
    live = (w > 0).nonzero().squeeze(1)
    idx = live[torch.randperm(live.numel())[:3]]
    ref = brute_log_prob64(z, means[idx], prior.log_var, w[idx], float(w[idx].sum()))
    torch.testing.assert_close(got, ref)
    # Gradients reach the encoder through the chosen pseudo-inputs only.
    got.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    # Evaluation mode: every component.
    full = prior.eval().log_prob(z)
    torch.testing.assert_close(full, brute_log_prob64(z, means, prior.log_var, w, 14.0))
    # M at most the live components: the full density in training too.
    prior2 = PseudocoresetPrior(prior.pseudo_inputs, w, n_subsample=6).bind(enc).train()
    torch.testing.assert_close(prior2.log_prob(z), prior2.eval().log_prob(z))
    assert "n_subsample=3" in repr(prior)
    with pytest.raises(vp.VAEPriorsError, match="n_subsample"):
        PseudocoresetPrior(torch.rand(4, 6), n_total=4.0, n_subsample=0)


def test_leave_one_out_drops_the_own_component():
    d = 3
    enc = ToyEncoder(d).double()
    data = torch.rand(10, 6, dtype=F64)
    prior = PseudocoresetPrior.from_data(data, 4, leave_one_out=True, generator=torch.Generator().manual_seed(1))
    prior = prior.bind(enc)
    src = prior.source_index
    assert src.shape == (4,) and torch.equal(prior.pseudo_inputs, data[src])
    assert "source_index" not in prior.state_dict()
    z = torch.randn(2, 10, d, dtype=F64)
    index = torch.arange(10)
    got = prior.train().log_prob(z, index=index)
    with torch.no_grad():
        means = enc(prior.pseudo_inputs)[0]
    for b in range(10):
        keep = torch.tensor([m for m in range(4) if int(src[m]) != b])
        ref = brute_log_prob64(z[:, b], means[keep], prior.log_var, prior.weights[keep], float(prior.weights[keep].sum()))
        torch.testing.assert_close(got[:, b], ref)
    # Without index, in evaluation mode, or with leave_one_out=False: every component.
    full = brute_log_prob64(z, means, prior.log_var, prior.weights, 10.0)
    torch.testing.assert_close(prior.log_prob(z), full)
    torch.testing.assert_close(prior.eval().log_prob(z, index=index), full)
    plain = PseudocoresetPrior.from_data(data, 4, generator=torch.Generator().manual_seed(1)).bind(enc).train()
    torch.testing.assert_close(plain.log_prob(z, index=index), full)
    # With subsampling too: the own component is dropped when drawn.
    sub = PseudocoresetPrior.from_data(data, 4, leave_one_out=True, n_subsample=2,
                                       generator=torch.Generator().manual_seed(1)).bind(enc).train()  # fmt: skip
    assert torch.isfinite(sub.log_prob(z, index=index)).all()
    with pytest.raises(vp.VAEPriorsError, match="source_index"):
        PseudocoresetPrior(torch.rand(4, 6), n_total=4.0, source_index=torch.zeros(3, dtype=torch.long))
