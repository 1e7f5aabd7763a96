"""Tests of vaepriors.evaluation against closed forms and float64 brute force.

The log-likelihood tests use a linear-Gaussian VAE, p(x|z) = N(W z + b, s2 I), whose marginal
likelihood is a Gaussian mixture in x for any Gaussian-mixture prior in z:
    p(x) = sum_k pi_k N(x; W m_k + b, W diag(v_k) W^T + s2 I).
To cover another prior, append a `LinearPriorCase` to `LINEAR_PRIORS` (its mixture in z).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.distributions import MultivariateNormal, Normal

import vaepriors as vp
from vaepriors import evaluation as ev
from vaepriors.errors import VAEPriorsError

D, d = 4, 2  # data and latent sizes of the linear-Gaussian VAE


# -- the linear-Gaussian VAE ---------------------------------------------------------------


class LinearEncoder(nn.Module):
    """q(z|x) = N(A x + a0, diag(exp(log_var)))."""

    def __init__(self, A: Tensor, a0: Tensor, log_var: Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("a0", a0)
        self.register_buffer("log_var", log_var)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ self.A.T + self.a0, self.log_var.expand(x.shape[0], -1)


class LinearDecoder(nn.Module):
    """p(x|z) = N(W z + b, s2 I)."""

    def __init__(self, W: Tensor, b: Tensor, s2: float) -> None:
        super().__init__()
        self.register_buffer("W", W)
        self.register_buffer("b", b)
        self.s2 = s2

    def forward(self, z: Tensor) -> Normal:
        return Normal(z @ self.W.T + self.b, math.sqrt(self.s2))


@dataclass
class Linear:
    W: Tensor  # [D, d], orthogonal columns
    b: Tensor  # [D]
    s2: float

    def encoder(self, prior_var: float = 1.0, inflate: float = 1.0, dtype=torch.float64) -> LinearEncoder:
        """The exact posterior of a N(0, prior_var I) prior (diagonal: W has orthogonal columns),
        its variance multiplied by `inflate`."""
        c2 = (self.W**2).sum(0)
        var = 1.0 / (1.0 / prior_var + c2 / self.s2)
        A = var[:, None] * self.W.T / self.s2
        return LinearEncoder(A, -A @ self.b, (var * inflate).log()).to(dtype)

    def decoder(self, dtype=torch.float64) -> LinearDecoder:
        return LinearDecoder(self.W, self.b, self.s2).to(dtype)

    def log_px(self, mixture: tuple[Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
        """Closed-form log p(x), float64, for a prior sum_k pi_k N(m_k, diag(v_k))."""
        log_w, m, v = (t.double() for t in mixture)
        loc = m @ self.W.T + self.b  # [K, D]
        cov = torch.einsum("ik,nk,jk->nij", self.W, v, self.W) + self.s2 * torch.eye(D, dtype=torch.float64)
        comp = MultivariateNormal(loc, cov).log_prob(x.double()[:, None, :])  # [B, K]
        return torch.logsumexp(comp + log_w, -1)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z), float64, z [..., B, d] and x [B, D]."""
        mean = z.double() @ self.W.T + self.b
        return Normal(mean, math.sqrt(self.s2)).log_prob(x.double()).sum(-1)


def make_linear(seed: int = 0, c=(1.5, 0.8), s2: float = 0.3) -> Linear:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
    W = Q * torch.tensor(c, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    return Linear(W, b, s2)


@dataclass
class LinearPriorCase:
    name: str
    make: Callable[[int, nn.Module], nn.Module]  # (latent_dim, encoder) -> prior, float64
    mixture: Callable[[nn.Module], tuple[Tensor, Tensor, Tensor]]  # prior -> (log_w [K], means [K, d], var [K, d])


def _gaussian_mixture(prior: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    return torch.zeros(1, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64), torch.ones(1, d, dtype=torch.float64)


def _make_mog(latent_dim: int, encoder: nn.Module) -> vp.MixturePrior:
    g = torch.Generator().manual_seed(1)
    p = vp.MixturePrior(latent_dim, 3, learn_weights=True).double()
    with torch.no_grad():
        p.means.copy_(1.2 * torch.randn(3, latent_dim, generator=g, dtype=torch.float64))
        p.log_var.copy_(torch.rand(3, latent_dim, generator=g, dtype=torch.float64) * 1.5 - 1.0)
        p.logits.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    return p


def _mog_mixture(prior: vp.MixturePrior) -> tuple[Tensor, Tensor, Tensor]:
    return torch.log_softmax(prior.logits.detach(), 0), prior.means.detach(), prior.log_var.detach().exp()


def _make_exemplar(latent_dim: int, encoder: nn.Module) -> vp.ExemplarPrior:
    g = torch.Generator().manual_seed(3)
    exemplars = 1.5 * torch.randn(7, D, generator=g, dtype=torch.float64)
    return vp.ExemplarPrior(exemplars, latent_dim, init_log_var=-0.7).double()


def _exemplar_mixture(prior: vp.ExemplarPrior) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        means = prior.encoder(prior.exemplars)[0]  # the test's own linear encoder
    k = means.shape[0]
    var = prior.log_var.detach().exp().expand(k, means.shape[1])
    return torch.full((k,), -math.log(k), dtype=torch.float64), means, var


LINEAR_PRIORS = [
    LinearPriorCase("gaussian", lambda k, enc: vp.GaussianPrior(k), _gaussian_mixture),
    LinearPriorCase("mog", _make_mog, _mog_mixture),
    LinearPriorCase("exemplar", _make_exemplar, _exemplar_mixture),
]


def _is_standard_error(lin: Linear, mixture, encoder: nn.Module, x: Tensor, s: int) -> Tensor:
    """sd(w) / (mean(w) sqrt(S)) per point for weights w = p(x, z) / q(z|x), z ~ q, float64."""
    log_w_mix, m, v = (t.double() for t in mixture)
    with torch.no_grad():
        mean, log_var = encoder(x.double())
    g = torch.Generator().manual_seed(11)
    z = mean + (0.5 * log_var).exp() * torch.randn(s, *mean.shape, generator=g, dtype=torch.float64)
    log_q = Normal(mean, (0.5 * log_var).exp()).log_prob(z).sum(-1)
    log_prior = torch.logsumexp(Normal(m, v.sqrt()).log_prob(z[..., None, :]).sum(-1) + log_w_mix, -1)
    w = torch.exp(lin.log_joint(x, z) + log_prior - log_q - lin.log_px(mixture, x))
    return w.std(0) / (w.mean(0) * math.sqrt(s))


def _points(lin: Linear, n: int, seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return lin.b + torch.randn(n, D, generator=g, dtype=torch.float64) * 1.3


def _model(case: LinearPriorCase, lin: Linear, inflate: float = 1.5, **kw) -> vp.ExemplarELBO:
    enc = lin.encoder(inflate=inflate)
    return vp.ExemplarELBO(enc, lin.decoder(), case.make(d, enc), **kw)


# -- log-likelihood ------------------------------------------------------------------------


@pytest.mark.parametrize("case", LINEAR_PRIORS, ids=lambda c: c.name)
def test_log_likelihood_converges_to_closed_form(case: LinearPriorCase) -> None:
    lin = make_linear()
    model = _model(case, lin)
    x = _points(lin, 6)
    truth = lin.log_px(case.mixture(model.prior), x)
    big = ev.log_likelihood(model, x, n_samples=4000, progress=False).values
    small = ev.log_likelihood(model, x.repeat(50, 1), n_samples=1, progress=False).values.view(50, -1)
    err_big = (big - truth).abs()
    err_small = (small - truth).abs().mean(0)
    # Tolerance: 5 standard errors of the estimator (delta method, from an independent float64
    # draw of the importance weights), plus its O(1/S) bias.
    se = _is_standard_error(lin, case.mixture(model.prior), model.encoder, x, 4000)
    assert bool((err_big < 5 * se + 1e-3).all()), (err_big, se)
    assert bool((err_big < err_small / 5).all())


@pytest.mark.parametrize("case", LINEAR_PRIORS, ids=lambda c: c.name)
def test_log_likelihood_is_a_lower_bound_in_expectation(case: LinearPriorCase) -> None:
    # A deliberately poor proposal (variance x 6) makes the bias visible at small S.
    lin = make_linear()
    model = _model(case, lin, inflate=6.0)
    x = _points(lin, 3)
    truth = lin.log_px(case.mixture(model.prior), x)
    reps = 400
    gaps = {}
    for s in (1, 8):
        est = ev.log_likelihood(model, x.repeat(reps, 1), n_samples=s, progress=False).values.view(reps, -1)
        gap = est.mean(0) - truth
        se = est.std(0) / math.sqrt(reps)
        assert bool((gap <= 3 * se).all()), (s, gap, se)
        gaps[s] = gap
    # More samples: a tighter bound (Burda et al., theorem 1), significantly so here.
    assert bool((gaps[1] < gaps[8]).all())
    assert bool((gaps[1] < -0.05).all())


@pytest.mark.parametrize("case", LINEAR_PRIORS, ids=lambda c: c.name)
def test_log_likelihood_at_one_sample_is_the_elbo(case: LinearPriorCase, dtype: torch.dtype, monkeypatch) -> None:
    lin = make_linear()
    enc = lin.encoder(inflate=1.5, dtype=dtype)
    prior = case.make(d, enc).to(dtype)
    model = vp.ExemplarELBO(enc, lin.decoder(dtype), prior, analytic_kl=False)
    x = _points(lin, 7).to(dtype)
    est = ev.log_likelihood(model, x, n_samples=1, generator=torch.Generator().manual_seed(123), progress=False).values
    # The ELBO with the same noise: point i's stream is seeded with one draw of the
    # generator plus i (log_likelihood's documented rule).
    base = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(123)))
    eps = torch.stack([torch.randn(1, d, dtype=dtype, generator=torch.Generator().manual_seed(base + i)) for i in range(len(x))], 1)
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: eps)
    elbo = model(x).elbo
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(est, elbo.double(), rtol=0, atol=tol)


def test_log_likelihood_with_exact_posterior_is_exact(dtype: torch.dtype) -> None:
    # q = p(z|x) makes every importance weight equal to p(x): zero variance, any S.
    lin = make_linear()
    model = vp.ExemplarELBO(lin.encoder(dtype=dtype), lin.decoder(dtype), vp.GaussianPrior(d).to(dtype))
    x = _points(lin, 5).to(dtype)
    truth = lin.log_px(_gaussian_mixture(None), x)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for s in (1, 7, 300):
        out = ev.log_likelihood(model, x, n_samples=s, progress=False)
        torch.testing.assert_close(out.values, truth, rtol=0, atol=tol)
    # Tiny budget: one sample of one point per chunk.
    out = ev.log_likelihood(model, x, n_samples=9, memory_budget=1, progress=False)
    torch.testing.assert_close(out.values, truth, rtol=0, atol=tol)


class RecordingELBO(vp.ExemplarELBO):
    """Records every (x, z) chunk the estimator evaluates."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.records: list[tuple[Tensor, Tensor]] = []

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        self.records.append((x.clone(), z.clone()))
        return super().log_likelihood(x, z)


@pytest.mark.parametrize("budget", [1, 3000, 10**9])
def test_log_likelihood_combines_chunks_exactly(budget: int) -> None:
    # Recompute, in float64 from the very latents used, log (1/S) sum_s w_s per point.
    lin = make_linear()
    case = LINEAR_PRIORS[1]
    enc = lin.encoder(inflate=1.5)
    model = RecordingELBO(enc, lin.decoder(), case.make(d, enc))
    x = _points(lin, 5)
    s = 23
    out = ev.log_likelihood(model, x, n_samples=s, memory_budget=budget, batch_size=3, progress=False)
    log_w: list[list[Tensor]] = [[] for _ in range(len(x))]
    mean, log_var = enc(x)
    for xc, z in model.records:
        for j in range(xc.shape[0]):
            i = int(((x - xc[j]).abs().sum(1) == 0).nonzero())
            zj = z[:, j]
            lq = Normal(mean[i], (0.5 * log_var[i]).exp()).log_prob(zj).sum(-1)
            lw_mix, m, v = case.mixture(model.prior)
            lp = torch.logsumexp(Normal(m, v.sqrt()).log_prob(zj[:, None]).sum(-1) + lw_mix, -1)
            log_w[i].append(lin.log_joint(xc[j : j + 1], zj[:, None]).squeeze(-1) + lp - lq)
    ref = torch.stack([torch.logsumexp(torch.cat(w), 0) - math.log(s) for w in log_w])
    assert all(sum(len(t) for t in w) == s for w in log_w)  # every sample exactly once
    torch.testing.assert_close(out.values, ref, rtol=0, atol=1e-10)
    if budget == 1:
        assert len(model.records) == s * len(x)


def test_log_likelihood_does_not_depend_on_chunking_for_a_seed() -> None:
    """Each point draws its noise from its own stream: one generator seed gives the same
    values whatever the memory budget and batch size (and a new seed other values)."""
    lin = make_linear()
    case = LINEAR_PRIORS[1]
    enc = lin.encoder(inflate=1.5)
    model = vp.ExemplarELBO(enc, lin.decoder(), case.make(d, enc))
    x = _points(lin, 7)

    def run(budget: int, batch: int, seed: int = 3) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return ev.log_likelihood(model, x, n_samples=31, memory_budget=budget, batch_size=batch, generator=gen, progress=False).values

    ref = run(10**9, 7)
    for budget, batch in ((1, 7), (500, 2), (3000, 3), (10**9, 1)):
        torch.testing.assert_close(run(budget, batch), ref, rtol=0, atol=1e-12)
    assert not torch.allclose(run(10**9, 7, seed=4), ref)


def test_log_likelihood_bits_per_dim_and_summary() -> None:
    lin = make_linear()
    model = _model(LINEAR_PRIORS[0], lin)
    x = _points(lin, 8)
    out = ev.log_likelihood(model, x, n_samples=20, progress=False)
    assert out.n_dims == D and out.n_samples == 20
    assert out.mean == pytest.approx(float(out.values.mean()), abs=1e-12)
    assert out.std_error == pytest.approx(float(out.values.std()) / math.sqrt(8), rel=1e-12)
    assert out.bits_per_dim == pytest.approx(-out.mean / (D * math.log(2)), rel=1e-12)
    torch.testing.assert_close(ev.bits_per_dim(out.values, D), -out.values / (D * math.log(2)))
    single = ev.log_likelihood(model, x[:1], n_samples=5, progress=False)
    assert math.isnan(single.std_error)


def test_log_likelihood_accepts_loaders_triples_and_restores_modes() -> None:
    lin = make_linear()
    enc, dec = lin.encoder(), lin.decoder()
    prior = vp.MixturePrior(d, 4).double()
    seen: list[bool] = []
    original = prior.log_prob

    def spy(z: Tensor, **kw) -> Tensor:
        seen.append(prior.training)
        return original(z, **kw)

    prior.log_prob = spy  # type: ignore[method-assign]
    model = vp.ExemplarELBO(enc, dec, prior)
    model.train()
    dec.eval()
    x = _points(lin, 10)
    y = torch.arange(10)
    ref = ev.log_likelihood((lin.encoder(inflate=0.5), dec, vp.GaussianPrior(d)), x, n_samples=1, progress=False)
    assert ref.values.shape == (10,)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    for data in (x, loader, [(x[:3], y[:3]), (x[3:], y[3:])], [x[:6], x[6:]]):
        seen.clear()
        out = ev.log_likelihood(model, data, n_samples=3, progress=False)
        assert out.values.shape == (10,) and out.values.dtype == torch.float64
        assert seen and not any(seen)  # the prior evaluated in eval mode
        assert model.training and prior.training and enc.training and not dec.training
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    "k", [pytest.param(5_000, id="5k"), pytest.param(50_000, marks=pytest.mark.slow, id="50k")]
)
def test_log_likelihood_memory_bounded(k: int, monkeypatch) -> None:
    # S = 5000 samples against K components: S x K component terms per point (2.5e8 for
    # K = 50000). Each layer bounds its own memory: the estimator's chunks of latents fit its
    # budget, and every dense [rows, K] reduction the engine runs fits the engine's budget
    # (larger ones go to its chunked backend). Never an S x K block, let alone S x K x batch.
    from vaepriors.engine import _dense

    lin = make_linear()
    s, budget, engine_budget = 5000, 32 * 2**20, 8 * 2**20
    prior = vp.MixturePrior(d, k, learn_weights=False, init_spread=3.0, init_log_var=math.log(0.1))
    rows: list[int] = []
    dense_cells: list[int] = []
    original, dense = prior.log_prob, _dense.logsumexp

    def spy(z: Tensor, **kw) -> Tensor:
        rows.append(z.shape[:-1].numel())
        return original(z, **kw)

    def dense_spy(z, means, *args, **kw):
        dense_cells.append(z.shape[0] * means.shape[0])
        return dense(z, means, *args, **kw)

    prior.log_prob = spy  # type: ignore[method-assign]
    monkeypatch.setattr(_dense, "logsumexp", dense_spy)
    model = vp.ExemplarELBO(lin.encoder(prior_var=9.0, inflate=1.5, dtype=torch.float32), lin.decoder(torch.float32), prior)
    x = _points(lin, 1).float()
    saved = vp.get_memory_budget()
    vp.set_memory_budget(engine_budget)
    try:
        out = ev.log_likelihood(model, x, n_samples=s, memory_budget=budget, progress=False)
    finally:
        vp.set_memory_budget(saved)
    assert sum(rows) == s * len(x)
    assert max(rows) * (4 * D + 8 * d) * 4 <= budget  # the estimator's own chunk temporaries
    assert all(c * 4 <= engine_budget for c in dense_cells)  # each dense [rows, K] float32 block
    mix = (torch.full((k,), -math.log(k)), prior.means.detach(), prior.log_var.detach().exp())
    truth = lin.log_px(mix, x)
    torch.testing.assert_close(out.values, truth, rtol=0, atol=0.05)


def test_log_likelihood_bad_input() -> None:
    lin = make_linear()
    model = _model(LINEAR_PRIORS[0], lin)
    x = _points(lin, 3)
    cases = [
        (dict(n_samples=0), "n_samples"),
        (dict(n_samples=2.5), "n_samples"),
        (dict(memory_budget=0), "memory_budget"),
        (dict(batch_size=-1), "batch_size"),
    ]
    for kw, name in cases:
        with pytest.raises(VAEPriorsError, match=name):
            ev.log_likelihood(model, x, progress=False, **kw)
    with pytest.raises(VAEPriorsError, match="data"):
        ev.log_likelihood(model, 3.0, progress=False)
    with pytest.raises(VAEPriorsError, match="data"):
        ev.log_likelihood(model, torch.tensor(1.0), progress=False)
    with pytest.raises(VAEPriorsError, match="data"):
        ev.log_likelihood(model, [], progress=False)
    with pytest.raises(VAEPriorsError, match="data"):
        ev.log_likelihood(model, [x[:2], x[:2, :3]], progress=False)
    with pytest.raises(VAEPriorsError, match="model"):
        ev.log_likelihood(object(), x, progress=False)
    with pytest.raises(VAEPriorsError, match="model"):
        ev.log_likelihood((lin.encoder(), lin.decoder()), x, progress=False)
    with pytest.raises(VAEPriorsError, match="n_dims"):
        ev.bits_per_dim(-1.0, 0)
    # A decoder giving NaN must not produce a silently wrong number.
    bad = vp.ExemplarELBO(lin.encoder(), lambda z: Normal(z @ lin.W.T * math.nan, 1.0, validate_args=False), vp.GaussianPrior(d))
    with pytest.raises(VAEPriorsError, match="NaN"):
        ev.log_likelihood(bad, x, n_samples=2, progress=False)


# -- active units --------------------------------------------------------------------------


SCALES = torch.tensor([1.0, 0.3, 0.05, 0.0, 2.0], dtype=torch.float64)


def _scaled_encoder(x: Tensor) -> tuple[Tensor, Tensor]:
    return x * SCALES.to(x.dtype) + 3.0, torch.zeros_like(x)


def test_active_units_known_answer() -> None:
    x = torch.randn(3001, 5, dtype=torch.float64)
    ref = (x * SCALES).var(0, unbiased=False)  # population variance, float64 brute force
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(3001)), batch_size=250)
    for data in (x, loader):
        out = ev.active_units(_scaled_encoder, data, batch_size=333)
        torch.testing.assert_close(out.variances, ref, rtol=1e-12, atol=1e-14)
        # variances ~ (1, 0.09, 0.0025, 0, 4) against the threshold 0.01
        assert out.count == 3
        assert out.active.tolist() == [True, True, False, False, True]
    assert ev.active_units(_scaled_encoder, x, threshold=0.0).count == 4
    assert ev.active_units(_scaled_encoder, x, threshold=10.0).count == 0


def test_active_units_through_an_elbo_restores_mode() -> None:
    lin = make_linear()
    model = _model(LINEAR_PRIORS[1], lin)
    model.train()
    x = _points(lin, 50)
    out = ev.active_units(model, x)
    ref = model.encoder(x)[0].var(0, unbiased=False)
    torch.testing.assert_close(out.variances, ref.detach())
    assert model.training


def test_active_units_bad_input() -> None:
    x = torch.randn(10, 5)
    for t in (-0.1, math.nan, math.inf, "a", True):
        with pytest.raises(VAEPriorsError, match="threshold"):
            ev.active_units(_scaled_encoder, x, threshold=t)
    with pytest.raises(VAEPriorsError, match="data"):
        ev.active_units(_scaled_encoder, x[:1])
    with pytest.raises(VAEPriorsError, match="data"):
        ev.active_units(_scaled_encoder, "x")
    with pytest.raises(VAEPriorsError, match="model"):
        ev.active_units(42, x)


# -- kNN -----------------------------------------------------------------------------------


def _identity(x: Tensor) -> tuple[Tensor, Tensor]:
    return x, torch.zeros_like(x)


def _knn_reference(train: Tensor, ty: Tensor, test: Tensor, k: int) -> list[int]:
    """Majority among the k nearest; ties to the class whose first member is nearest."""
    preds = []
    for q in test.double():
        order = ((train.double() - q) ** 2).sum(1).argsort().tolist()[:k]
        labels = [int(ty[j]) for j in order]
        votes = Counter(labels)
        best = max(votes.values())
        preds.append(next(lab for lab in labels if votes[lab] == best))
    return preds


def test_knn_accuracy_known_answer() -> None:
    # One test point at 0; training points at distances 1..5 with labels a b b a a.
    train = torch.tensor([[1.0], [-2.0], [3.0], [-4.0], [5.0]])
    ty = torch.tensor([7, 2, 2, 7, 7])
    test = torch.zeros(1, 1)
    acc_a = ev.knn_accuracy(_identity, train, ty, test, torch.tensor([7]), k=(1, 2, 3, 4, 5))
    assert acc_a == {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0, 5: 1.0}  # k=2, 4: ties, nearest class (7) wins
    # Clusters: every k up to the cluster size classifies perfectly.
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    train = (centres[:, None] + 0.5 * torch.randn(3, 20, 2, generator=g)).reshape(60, 2)
    ty = torch.arange(3).repeat_interleave(20)
    test = (centres[:, None] + 0.5 * torch.randn(3, 7, 2, generator=g)).reshape(21, 2)
    acc = ev.knn_accuracy(_identity, train, ty, test, torch.arange(3).repeat_interleave(7))
    assert acc == {k: 1.0 for k in (3, 5, 7, 9, 11, 13, 15)}


@given(st.integers(0, 10_000), st.integers(1, 9), st.integers(1, 4))
def test_knn_accuracy_matches_brute_force(seed: int, k: int, n_classes: int) -> None:
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(12, 3, generator=g, dtype=torch.float64)
    ty = torch.randint(n_classes, (12,), generator=g) * 3 - 1  # arbitrary integer labels
    test = torch.randn(9, 3, generator=g, dtype=torch.float64)
    test_y = torch.randint(n_classes, (9,), generator=g) * 3 - 1
    pred = _knn_reference(train, ty, test, k)
    expected = sum(p == int(t) for p, t in zip(pred, test_y)) / 9
    # A tiny budget forces one test point per chunk.
    for budget in (1, 10**9):
        acc = ev.knn_accuracy(_identity, train, ty, test, test_y, k=k, memory_budget=budget)
        assert acc == {k: pytest.approx(expected)}


def test_knn_accuracy_bad_input() -> None:
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(VAEPriorsError, match="train_y"):
        ev.knn_accuracy(_identity, x, y[:5], x, y)
    with pytest.raises(VAEPriorsError, match="test_y"):
        ev.knn_accuracy(_identity, x, y, x[:4], y)
    with pytest.raises(VAEPriorsError, match="train_y"):
        ev.knn_accuracy(_identity, x, y.float(), x, y)
    with pytest.raises(VAEPriorsError, match="`k`"):
        ev.knn_accuracy(_identity, x, y, x, y, k=0)
    with pytest.raises(VAEPriorsError, match="`k`"):
        ev.knn_accuracy(_identity, x, y, x, y, k=(3, 7))
    with pytest.raises(VAEPriorsError, match="`k`"):
        ev.knn_accuracy(_identity, x, y, x, y, k=())
    with pytest.raises(VAEPriorsError, match="train_x"):
        ev.knn_accuracy(_identity, x[:0], y[:0], x, y)


# -- novelty -------------------------------------------------------------------------------


class NoveltyEncoder(nn.Module):
    """x [N, 3] -> mean x[:, :2] * scale, per-point log-variance from x[:, 2]."""

    def __init__(self, scale: float = 1.0, lv_scale: float = 1.0, lv_shift: float = 0.0) -> None:
        super().__init__()
        self.scale, self.lv_scale, self.lv_shift = scale, lv_scale, lv_shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lv = torch.tanh(x[:, 2:3]) * self.lv_scale + self.lv_shift + torch.tensor([0.0, 0.3], dtype=x.dtype)
        return x[:, :2] * self.scale, lv


def _novelty_decoder(z: Tensor) -> Normal:
    return Normal(torch.cat([z, z.sum(-1, keepdim=True)], -1) * 0.7, 1.0)


def _brute_weights(enc: nn.Module, z: Tensor, train_x: Tensor) -> Tensor:
    m, lv = (t.double() for t in enc(train_x))  # the encoder's own outputs, then float64
    log_q = Normal(m, (0.5 * lv).exp()).log_prob(z.double()[:, None, :]).sum(-1)  # [Q, N]
    return torch.softmax(log_q, 1)


@pytest.mark.parametrize("budget", [1, 20_000, 10**9])
def test_novelty_matches_float64_brute_force(budget: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    train_x = torch.randn(37, 3, generator=g).to(dtype)
    z = torch.randn(11, 2, generator=g).to(dtype)
    enc = NoveltyEncoder(lv_scale=1.5, lv_shift=-1.0)
    w = _brute_weights(enc, z, train_x)
    weights, index = ev.novelty_weights(enc, z, train_x, memory_budget=budget)
    assert weights.dtype == torch.float64 and weights.shape == (11, 37)
    torch.testing.assert_close(weights.sum(1), torch.ones(11, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(weights, w.gather(1, index), rtol=1e-9, atol=1e-14)
    assert bool((weights[:, :-1] >= weights[:, 1:]).all())
    top_w, top_i = ev.novelty_weights(enc, z, train_x, k=4, memory_budget=budget)
    ref_w, ref_i = w.topk(4, dim=1)
    torch.testing.assert_close(top_w, ref_w, rtol=1e-9, atol=1e-14)
    assert torch.equal(top_i, ref_i)

    nov = ev.novelty_diagnostics((enc, _novelty_decoder, None), z, train_x, memory_budget=budget)
    entropy = -(w * w.log()).sum(1)
    torch.testing.assert_close(nov.perplexity, entropy.exp(), rtol=1e-9, atol=0)
    torch.testing.assert_close(nov.max_weight, w.max(1).values, rtol=1e-9, atol=0)
    assert torch.equal(nov.nearest, w.argmax(1))
    avg = w @ train_x.double()
    torch.testing.assert_close(nov.weighted_average, avg, rtol=1e-9, atol=1e-12)
    dec = _novelty_decoder(z).mean.double()
    torch.testing.assert_close(nov.decoder_mean, dec)
    torch.testing.assert_close(nov.distance, (dec - avg).norm(dim=1), rtol=1e-9, atol=1e-12)


def test_novelty_perplexity_extremes() -> None:
    # One training point dominates: means 100 apart, small variances, query on one mean.
    train_x = torch.cat([100.0 * torch.randn(20, 2, dtype=torch.float64), torch.full((20, 1), -3.0, dtype=torch.float64)], 1)
    enc = NoveltyEncoder()
    z = enc(train_x[[4, 11]])[0]
    nov = ev.novelty_diagnostics((enc, _novelty_decoder, None), z, train_x)
    torch.testing.assert_close(nov.perplexity, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-9)
    assert nov.nearest.tolist() == [4, 11]
    torch.testing.assert_close(nov.weighted_average, train_x[[4, 11]], rtol=0, atol=1e-9)
    # All training points alike: uniform weights, perplexity N, average = the point.
    same = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64).repeat(25, 1)
    nov = ev.novelty_diagnostics((enc, _novelty_decoder, None), torch.randn(4, 2, dtype=torch.float64), same, memory_budget=5000)
    torch.testing.assert_close(nov.perplexity, torch.full((4,), 25.0, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(nov.max_weight, torch.full((4,), 1 / 25, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(nov.weighted_average, same[:4], rtol=1e-12, atol=1e-15)


def test_novelty_extreme_scales_stay_finite() -> None:
    # A far query and tiny variances: log q ~ -1e12, yet the weights are finite and sum to 1.
    train_x = torch.randn(30, 3)
    enc = NoveltyEncoder(lv_scale=0.0, lv_shift=-20.0)
    z = torch.tensor([[1e4, -1e4], [0.0, 0.0]])
    w, i = ev.novelty_weights(enc, z, train_x)
    assert bool(torch.isfinite(w).all())
    torch.testing.assert_close(w.sum(1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    nov = ev.novelty_diagnostics((enc, _novelty_decoder, None), z, train_x)
    assert bool(torch.isfinite(nov.perplexity).all() and torch.isfinite(nov.weighted_average).all())
    assert bool((nov.perplexity >= 1 - 1e-9).all())


def test_novelty_report_sources() -> None:
    lin = make_linear()
    model = _model(LINEAR_PRIORS[1], lin)
    train_x = _points(lin, 40, seed=5)
    test_x = _points(lin, 6, seed=6)
    model.train()
    by_prior = ev.novelty_report(model, train_x, n_samples=9)
    assert by_prior.source == "prior" and by_prior.novelty.perplexity.shape == (9,)
    assert model.training
    by_post = ev.novelty_report(model, train_x, test_x=test_x)
    assert by_post.source == "posterior" and by_post.novelty.distance.shape == (6,)
    z = torch.randn(5, d, dtype=torch.float64)
    given_ = ev.novelty_report(model, train_x, z=z)
    assert given_.source == "given"
    assert given_.perplexity_mean == pytest.approx(float(given_.novelty.perplexity.mean()))
    assert given_.distance_median == pytest.approx(float(given_.novelty.distance.median()))
    nov = ev.novelty_diagnostics(model, z, train_x)
    torch.testing.assert_close(given_.novelty.weighted_average, nov.weighted_average)
    for t in (nov.perplexity, nov.max_weight):
        assert bool(((t > 0) & (t <= 40 + 1e-9)).all())


def test_novelty_bad_input() -> None:
    enc = NoveltyEncoder()
    train_x = torch.randn(10, 3)
    with pytest.raises(VAEPriorsError, match="`z`"):
        ev.novelty_weights(enc, torch.randn(4, 3), train_x)
    with pytest.raises(VAEPriorsError, match="`z`"):
        ev.novelty_weights(enc, torch.randn(2), train_x)
    with pytest.raises(VAEPriorsError, match="`z`"):
        ev.novelty_weights(enc, torch.zeros(2, 2, dtype=torch.long), train_x)
    with pytest.raises(VAEPriorsError, match="`k`"):
        ev.novelty_weights(enc, torch.randn(4, 2), train_x, k=11)
    with pytest.raises(VAEPriorsError, match="`k`"):
        ev.novelty_weights(enc, torch.randn(4, 2), train_x, k=0)
    with pytest.raises(VAEPriorsError, match="train_x"):
        ev.novelty_weights(enc, torch.randn(4, 2), train_x[:0])
    with pytest.raises(VAEPriorsError, match="decoder"):
        ev.novelty_diagnostics(enc, torch.randn(4, 2), train_x)
    with pytest.raises(VAEPriorsError, match="decoder"):
        ev.novelty_diagnostics((enc, lambda z: z, None), torch.randn(4, 2), train_x)
    with pytest.raises(VAEPriorsError, match="prior"):
        ev.novelty_report((enc, _novelty_decoder, None), train_x)


def test_novelty_and_representation_with_a_laplace_posterior():
    """Non-Gaussian posteriors: the weights are the family's own densities, normalised."""
    torch.manual_seed(0)
    net = nn.Linear(5, 4).double()

    def encoder(x):
        loc, raw = net(x).chunk(2, -1)
        return torch.distributions.Laplace(loc, torch.exp(torch.tanh(raw)))

    train = torch.rand(30, 5, dtype=torch.float64)
    z = torch.randn(7, 2, dtype=torch.float64)
    w, i = vp.novelty_weights(encoder, z, train, k=None, batch_size=8)
    q = encoder(train)
    log_q = torch.distributions.Independent(q, 1).log_prob(z[:, None, :].expand(7, 30, 2))  # [7, 30]
    want = torch.softmax(log_q, 1)
    got = torch.zeros_like(want).scatter(1, i, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # active units and kNN read each posterior's mean (the Laplace location)
    au = vp.active_units(encoder, train, 0.0)
    torch.testing.assert_close(au.variances, q.loc.detach().var(0, unbiased=False))
