"""ExemplarELBO against closed forms of a linear-Gaussian VAE, and its input handling.

Model: p(z) = N(0, I_d), p(x|z) = N(W z + b, s^2 I_D), so p(x) = N(b, W W^T + s^2 I). With
W = Q diag(lam) (orthonormal Q columns) the exact posterior is diagonal:
q*(z|x) = N(lam Q^T (x - b) / (s^2 + lam^2), s^2 / (s^2 + lam^2)).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, MultivariateNormal, Normal

import vaepriors as vp

D_X, D_Z = 5, 2


class LinearGaussian:
    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D_X, D_Z, generator=g, dtype=torch.float64))
        self.lam = torch.tensor([1.5, 0.7], dtype=torch.float64)
        self.W = q * self.lam
        self.Q = q
        self.b = torch.randn(D_X, generator=g, dtype=torch.float64)
        self.s2 = 0.3

    def decoder(self, z):
        return Normal(z @ self.W.T + self.b, math.sqrt(self.s2))

    def marginal(self, x):
        cov = self.W @ self.W.T + self.s2 * torch.eye(D_X, dtype=torch.float64)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def posterior(self, x):
        denom = self.s2 + self.lam**2
        mean = ((x - self.b) @ self.Q) * self.lam / denom
        log_var = torch.log(self.s2 / denom).expand_as(mean)
        return mean, log_var

    def closed_form_elbo(self, x, mean, log_var):
        """E_q[log p(x|z)] and KL(q || N(0, I)) for q = N(mean, diag(exp(log_var)))."""
        resid = x - mean @ self.W.T - self.b
        trace = (self.W**2 @ log_var.exp().T).sum(0)  # tr(W diag(v) W^T) per row
        rec = -0.5 * (D_X * math.log(2 * math.pi * self.s2) + (resid.pow(2).sum(-1) + trace) / self.s2)
        kl = 0.5 * (log_var.exp() + mean**2 - 1 - log_var).sum(-1)
        return rec, kl


def test_elbo_equals_log_marginal_exactly_with_the_exact_posterior():
    lg = LinearGaussian()
    x = torch.randn(8, D_X, dtype=torch.float64) * 2
    elbo = vp.ExemplarELBO(lg.posterior, lg.decoder, vp.GaussianPrior(D_Z).double(), analytic_kl=False)
    out = elbo(x)  # one sample: with q exact, log p(x,z) - log q(z|x) = log p(x) for every z
    torch.testing.assert_close(out.elbo, lg.marginal(x), rtol=1e-10, atol=1e-10)


def test_same_with_a_mixture_prior_that_is_the_standard_gaussian():
    lg = LinearGaussian()
    prior = vp.MixturePrior(D_Z, 1, init_spread=0.0).double()
    x = torch.randn(8, D_X, dtype=torch.float64)
    out = vp.ExemplarELBO(lg.posterior, lg.decoder, prior)(x)
    torch.testing.assert_close(out.elbo, lg.marginal(x), rtol=1e-10, atol=1e-10)


def test_analytic_kl_and_monte_carlo_reconstruction_match_closed_form():
    lg = LinearGaussian(1)
    x = torch.randn(4, D_X, dtype=torch.float64)
    mean = torch.randn(4, D_Z, dtype=torch.float64)
    log_var = torch.randn(4, D_Z, dtype=torch.float64) * 0.5
    rec, kl = lg.closed_form_elbo(x, mean, log_var)
    s = 20_000
    out = vp.ExemplarELBO(lambda _: (mean, log_var), lg.decoder, vp.GaussianPrior(D_Z).double(), n_samples=s)(x)
    torch.testing.assert_close(out.kl, kl, rtol=1e-12, atol=1e-12)
    per_sample = vp.ExemplarELBO(lambda _: (mean, log_var), lg.decoder, vp.GaussianPrior(D_Z)).log_likelihood(x, out.z)
    se = per_sample.std(0) / math.sqrt(s)
    assert ((out.reconstruction - rec).abs() < 5 * se).all()
    assert (out.elbo <= lg.marginal(x) + 5 * se).all()


def test_monte_carlo_kl_is_unbiased_for_the_analytic_kl():
    mean = torch.randn(3, D_Z, dtype=torch.float64)
    log_var = torch.randn(3, D_Z, dtype=torch.float64) * 0.5
    prior = vp.GaussianPrior(D_Z).double()
    dec = lambda z: Normal(z.new_zeros(z.shape[0], 1), 1.0)  # noqa: E731
    s = 20_000
    mc = vp.ExemplarELBO(lambda _: (mean, log_var), dec, prior, n_samples=s, analytic_kl=False)
    out = mc(torch.zeros(3, 1, dtype=torch.float64))
    eps = (out.z - mean) / (0.5 * log_var).exp()
    per_sample = (-0.5 * (log_var + eps**2) + 0.5 * out.z**2).sum(-1)  # log q - log p, the 2 pi cancels
    se = per_sample.std(0) / math.sqrt(s)
    assert ((out.kl - prior.analytic_kl(mean, log_var)).abs() < 5 * se).all()


def test_kl_weight_scales_only_the_loss():
    lg = LinearGaussian()
    x = torch.randn(6, D_X, dtype=torch.float64)
    mean, log_var = lg.posterior(x)
    m = vp.ExemplarELBO(lambda _: (mean + 0.3, log_var), lg.decoder, vp.GaussianPrior(D_Z).double(), kl_weight=0.25)
    # Independent references: the same noise drawn here, the decoder's density and the
    # closed-form KL computed from the posterior directly (not from the call's own outputs).
    torch.manual_seed(0)
    eps = torch.randn(1, *mean.shape, dtype=torch.float64)
    z = (mean + 0.3) + torch.exp(0.5 * log_var) * eps
    rec = lg.decoder(z[0]).log_prob(x).sum(-1)
    kl = 0.5 * (log_var.exp() + (mean + 0.3) ** 2 - 1 - log_var).sum(-1)
    torch.manual_seed(0)
    out = m(x)
    torch.testing.assert_close(out.loss, -(rec - 0.25 * kl).mean())
    torch.testing.assert_close(out.elbo, rec - kl)
    torch.manual_seed(0)
    out0 = m(x, kl_weight=0.0)
    torch.testing.assert_close(out0.loss, -rec.mean())
    with pytest.raises(vp.VAEPriorsError, match="kl_weight"):
        m(x, kl_weight=-1.0)
    with pytest.raises(vp.VAEPriorsError, match="kl_weight"):
        vp.ExemplarELBO(lg.posterior, lg.decoder, vp.GaussianPrior(D_Z), kl_weight=math.nan)


class TinyVAE(nn.Module):
    def __init__(self, d: int = D_Z, n: int = 6) -> None:
        super().__init__()
        self.enc = nn.Linear(n, 2 * d)
        self.dec = nn.Linear(d, n)

    def encode_pair(self, x):
        m, lv = self.enc(x).chunk(2, -1)
        return m, lv

    def encode_normal(self, x):
        m, lv = self.encode_pair(x)
        return Normal(m, (0.5 * lv).exp())

    def encode_independent(self, x):
        return Independent(self.encode_normal(x), 1)

    def decode_dist(self, z):
        return Bernoulli(logits=self.dec(z))

    def decode_independent(self, z):
        return Independent(self.decode_dist(z), 1)

    def decode_callable(self, z):
        logits = self.dec(z)
        return lambda x: (x * logits - nn.functional.softplus(logits)).sum(-1)


@pytest.mark.parametrize("enc", ["encode_pair", "encode_normal", "encode_independent"])
@pytest.mark.parametrize("dec", ["decode_dist", "decode_independent", "decode_callable"])
def test_encoder_and_decoder_forms_agree(enc, dec):
    vae = TinyVAE()
    x = torch.bernoulli(torch.rand(5, 6))
    ref = vp.ExemplarELBO(vae.encode_pair, vae.decode_dist, vp.MixturePrior(D_Z, 3), n_samples=2)
    prior = ref.prior
    torch.manual_seed(7)
    expected = ref(x)
    torch.manual_seed(7)
    got = vp.ExemplarELBO(getattr(vae, enc), getattr(vae, dec), prior, n_samples=2)(x)
    torch.testing.assert_close(got.elbo, expected.elbo, rtol=1e-5, atol=1e-5)
    assert got.z.shape == (2, 5, D_Z)


def test_gradients_reach_encoder_decoder_and_prior():
    vae = TinyVAE()
    prior = vp.VampPrior(torch.rand(4, 6))
    m = vp.ExemplarELBO(vae.encode_pair, vae.decode_dist, prior, n_samples=3)
    m(torch.bernoulli(torch.rand(5, 6))).loss.backward()
    for name, p in [*vae.named_parameters(), *prior.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_elbo_module_owns_user_modules_once():
    vae = TinyVAE()
    enc, dec = nn.Linear(6, 4), nn.Linear(2, 6)
    m = vp.ExemplarELBO(enc, lambda z: Bernoulli(logits=dec(z)), vp.VampPrior(torch.rand(3, 6)))
    names = dict(m.named_parameters())
    assert set(names) == {"encoder.weight", "encoder.bias", "prior.pseudo_inputs"}
    assert vae is not None


class RecordingPrior(vp.BasePrior):
    def __init__(self):
        super().__init__(D_Z)
        self.seen = []

    def _log_prob(self, z, index):
        self.seen.append(("log_prob", tuple(z.shape), None if index is None else index.tolist()))
        return vp.GaussianPrior(D_Z).log_prob(z)

    def observe(self, mean, index):
        self.seen.append(("observe", tuple(mean.shape), index.tolist()))

    def on_epoch_end(self, epoch):
        self.seen.append(("epoch", epoch))


def test_index_and_hooks_reach_the_prior():
    vae = TinyVAE()
    prior = RecordingPrior()
    m = vp.ExemplarELBO(vae.encode_pair, vae.decode_dist, prior, n_samples=2)
    x = torch.bernoulli(torch.rand(3, 6))
    m(x, torch.tensor([4, 1, 7]))
    m.eval()
    m(x, torch.tensor([4, 1, 7]))
    m.on_epoch_end(2)
    assert prior.seen == [
        ("observe", (3, D_Z), [4, 1, 7]),
        ("log_prob", (2, 3, D_Z), [4, 1, 7]),
        ("log_prob", (2, 3, D_Z), [4, 1, 7]),
        ("epoch", 2),
    ]


def test_bad_input_is_named():
    vae = TinyVAE()
    x = torch.bernoulli(torch.rand(3, 6))
    good = vp.ExemplarELBO(vae.encode_pair, vae.decode_dist, vp.GaussianPrior(D_Z))
    cases = [
        (lambda: vp.ExemplarELBO(vae.encode_pair, vae.decode_dist, vp.GaussianPrior(D_Z + 1))(x), "encoder.*latent_dim"),
        (lambda: vp.ExemplarELBO(vae.encode_pair, lambda z: vae.dec(z), vp.GaussianPrior(D_Z))(x), "decoder"),
        (lambda: vp.ExemplarELBO(vae.encode_pair, lambda z: Bernoulli(logits=vae.dec(z)[:, :4]), vp.GaussianPrior(D_Z))(x), "decoder"),
        (lambda: vp.ExemplarELBO(vae.encode_pair, lambda z: (lambda x: x.sum()), vp.GaussianPrior(D_Z))(x), "decoder"),
        (lambda: vp.ExemplarELBO(lambda x: vae.enc(x), vae.decode_dist, vp.GaussianPrior(D_Z))(x), "encoder"),
        (lambda: vp.ExemplarELBO(lambda x: (x[:, :2], x[:, :3]), vae.decode_dist, vp.GaussianPrior(D_Z))(x), "encoder"),
        (lambda: vp.ExemplarELBO(lambda x: (x[:1, :2], x[:1, :2]), vae.decode_dist, vp.GaussianPrior(D_Z))(x), "encoder"),
        (lambda: vp.ExemplarELBO(lambda x: (x[:, :2] * math.inf, x[:, :2]), vae.decode_dist, vp.GaussianPrior(D_Z))(x), "encoder mean"),
        (lambda: good(x, torch.tensor([0, 1])), "index"),
        (lambda: good(torch.tensor(1.0)), "`x`"),
        (lambda: vp.ExemplarELBO(vae.encode_pair, vae.decode_dist, "gaussian"), "prior"),
        (lambda: vp.ExemplarELBO(3, vae.decode_dist, vp.GaussianPrior(D_Z)), "encoder"),
        (lambda: vp.ExemplarELBO(vae.encode_pair, vae.decode_dist, vp.GaussianPrior(D_Z), n_samples=0), "n_samples"),
    ]
    for make, match in cases:
        with pytest.raises(vp.VAEPriorsError, match=match):
            make()


def test_bound_methods_register_their_module_once():
    vae = TinyVAE()
    m = vp.ExemplarELBO(vae.encode_pair, vae.decode_dist, vp.MixturePrior(D_Z, 2))
    assert m.model is vae
    assert {id(p) for p in m.parameters()} == {id(p) for p in [*vae.parameters(), *m.prior.parameters()]}
    assert set(m.state_dict()) == {f"model.{k}" for k in vae.state_dict()} | {f"prior.{k}" for k in m.prior.state_dict()}


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    vae = TinyVAE(d=2, n=6)
    data = torch.bernoulli(torch.rand(1, 6).expand(64, 6))
    m = vp.ExemplarELBO(vae.encode_pair, vae.decode_dist, vp.MixturePrior(2, 3))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    first = m(data).loss.item()
    for _ in range(80):
        opt.zero_grad()
        m(data).loss.backward()
        opt.step()
    assert m(data).loss.item() < first - 1.0


def _spoiled(vae, where, value):
    """An encoder whose mean or log_var holds ``value`` in one entry, for binary inputs (the
    batch; not the grey-level exemplars of an exemplar prior)."""

    def encoder(x):
        m, lv = vae.encode_pair(x)
        if not bool(((x == 0) | (x == 1)).all()):
            return m, lv
        t = m if where == "mean" else lv
        t = t.clone()
        t[1, 0] = value
        return (t, lv) if where == "mean" else (m, t)

    return encoder


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["mean", "log_var"])
@pytest.mark.parametrize("prior", ["gaussian", "mog", "exemplar-rat"])
def test_non_finite_encoder_output_is_named_whatever_the_prior(where, value, prior):
    """The ELBO checks its scalar loss; a non-finite encoder output makes it (or the prior's
    own checks) fail, and the error names the encoder output at fault."""
    vae = TinyVAE()
    x = torch.bernoulli(torch.rand(4, 6))
    priors = {
        "gaussian": lambda: vp.GaussianPrior(D_Z),
        "mog": lambda: vp.MixturePrior(D_Z, 3),
        "exemplar-rat": lambda: vp.ExemplarPrior(torch.rand(9, 6), k=2),
    }
    m = vp.ExemplarELBO(_spoiled(vae, where, value), vae.decode_dist, priors[prior]())
    if prior == "exemplar-rat":
        m.prior.refresh_cache()
    with pytest.raises(vp.VAEPriorsError, match=f"encoder {where}"):
        m(x, torch.arange(4))
    if prior == "exemplar-rat":  # nothing non-finite reached the cache
        assert bool(torch.isfinite(m.prior.rat_cache).all())


def test_nan_log_likelihood_is_named_and_infinite_losses_pass():
    vae = TinyVAE()
    x = torch.bernoulli(torch.rand(3, 6))
    nan_dec = lambda z: Normal(vae.dec(z) * math.nan, 1.0, validate_args=False)  # noqa: E731
    with pytest.raises(vp.VAEPriorsError, match="NaN"):
        vp.ExemplarELBO(vae.encode_pair, nan_dec, vp.GaussianPrior(D_Z))(x)
    # log p(x|z) = -inf is a legitimate value (x outside the decoder's support): no error
    hard = lambda z: (lambda x: z.sum(-1) * 0 - math.inf)  # noqa: E731
    out = vp.ExemplarELBO(vae.encode_pair, hard, vp.GaussianPrior(D_Z))(torch.ones(3, 6))
    assert out.loss.item() == math.inf
    vp.set_validation(False)
    try:  # checks off: nothing raised, the NaN comes back
        lenient = lambda z: Bernoulli(logits=vae.dec(z), validate_args=False)  # noqa: E731
        out = vp.ExemplarELBO(_spoiled(vae, "mean", math.nan), lenient, vp.GaussianPrior(D_Z))(x)
        assert math.isnan(out.loss.item())
    finally:
        vp.set_validation(True)


def test_a_prior_that_keeps_what_it_observes_gets_checked_posteriors():
    vae = TinyVAE()
    prior = RecordingPrior()
    m = vp.ExemplarELBO(_spoiled(vae, "mean", math.nan), vae.decode_dist, prior)
    with pytest.raises(vp.VAEPriorsError, match="encoder mean"):
        m(torch.bernoulli(torch.rand(3, 6)), torch.arange(3))
    assert prior.seen == []  # raised before observe


def test_finite_check_survives_an_overflowing_sum():
    big = torch.full((4,), 3e38)  # finite, but its float32 sum is inf
    assert vp._checks.all_finite(big)
    vp._checks.finite(big, "big")
    with pytest.raises(vp.VAEPriorsError, match="big"):
        vp._checks.finite(torch.tensor([1.0, math.nan]), "big")


def test_index_check_is_redone_after_an_in_place_edit():
    idx = torch.tensor([0, 1, 2])
    vp._checks.index(idx, idx.shape, 3)
    vp._checks.index(idx, idx.shape, 3)  # remembered
    idx[0] = 7
    with pytest.raises(vp.VAEPriorsError, match="index"):
        vp._checks.index(idx, idx.shape, 3)
    with pytest.raises(vp.VAEPriorsError, match="index"):
        vp._checks.index(torch.tensor([0, 1, 2]), torch.Size([3]), 2)
