"""Behaviour particular to GaussianPrior, MixturePrior and VampPrior."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vaepriors as vp
from examples import INPUT_DIM, ToyEncoder


def test_gaussian_analytic_kl_matches_torch_distributions():
    m, lv = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    q = torch.distributions.Independent(torch.distributions.Normal(m, (0.5 * lv).exp()), 1)
    p = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(4, dtype=torch.float64), 1.0), 1)
    torch.testing.assert_close(vp.GaussianPrior(4).analytic_kl(m, lv), torch.distributions.kl_divergence(q, p))


def test_mixture_without_learnable_weights_has_no_logits_and_is_uniform():
    prior = vp.MixturePrior(2, 4, learn_weights=False)
    assert prior.logits is None and prior.has_rsample
    assert {n for n, _ in prior.named_parameters()} == {"means", "log_var"}


def test_single_component_mixture_is_its_gaussian():
    prior = vp.MixturePrior(3, 1, init_spread=0.0)
    z = torch.randn(9, 3)
    torch.testing.assert_close(prior.log_prob(z), vp.GaussianPrior(3).log_prob(z))


def test_mixture_sampling_memory_is_per_sample():
    # 200k components of size 64: sampling all components would need 200k x 64 floats per draw.
    prior = vp.MixturePrior(64, 200_000, learn_weights=False)
    x = prior.sample(3)
    assert x.shape == (3, 64)


def test_mixture_component_frequencies_follow_weights():
    prior = vp.MixturePrior(1, 3, init_spread=0.0)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-100.0], [0.0], [100.0]]))
        prior.log_var.fill_(-4.0)
        prior.logits.copy_(torch.tensor([0.2, 0.5, 0.3]).log())
    n = 30_000
    x = prior.sample(n).squeeze(-1)
    counts = torch.stack([(x < -50).sum(), ((x > -50) & (x < 50)).sum(), (x > 50).sum()]).double()
    expected = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64) * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_vamp_needs_an_encoder():
    prior = vp.VampPrior(torch.rand(5, INPUT_DIM))
    assert prior.latent_dim is None
    with pytest.raises(vp.VAEPriorsError, match="encoder"):
        prior.log_prob(torch.zeros(2))
    prior.bind(ToyEncoder(2))
    assert prior.latent_dim == 2


def test_vamp_accepts_normal_encoders_and_matches_pair_encoders():
    enc = ToyEncoder(2)
    u = torch.rand(5, INPUT_DIM)
    as_pair = vp.VampPrior(u).bind(enc)

    def as_normal(x):
        m, lv = enc(x)
        return torch.distributions.Independent(torch.distributions.Normal(m, (0.5 * lv).exp()), 1)

    z = torch.randn(7, 2)
    torch.testing.assert_close(vp.VampPrior(u).bind(as_normal).log_prob(z), as_pair.log_prob(z))


def test_vamp_from_data_uses_distinct_rows():
    data = torch.arange(20.0)[:, None].expand(20, INPUT_DIM)
    prior = vp.VampPrior.from_data(data, 10, generator=torch.Generator().manual_seed(0))
    rows = prior.pseudo_inputs[:, 0]
    assert len(set(rows.tolist())) == 10 and set(rows.tolist()) <= set(range(20))
    with pytest.raises(vp.VAEPriorsError, match="n_components"):
        vp.VampPrior.from_data(data, 21)


def test_vamp_encoder_of_wrong_size_is_caught():
    prior = vp.VampPrior(torch.rand(5, INPUT_DIM), latent_dim=3).bind(ToyEncoder(2))
    with pytest.raises(vp.VAEPriorsError, match="latent_dim=3"):
        prior.log_prob(torch.zeros(3))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: vp.GaussianPrior(0), "latent_dim"),
        (lambda: vp.MixturePrior(2, 0), "n_components"),
        (lambda: vp.MixturePrior(2, 3, init_spread=-1.0), "init_spread"),
        (lambda: vp.VampPrior(torch.zeros(0, 3)), "pseudo_inputs"),
        (lambda: vp.VampPrior(torch.zeros(3, 2, dtype=torch.long)), "pseudo_inputs"),
        (lambda: vp.VampPrior(torch.rand(3, 2)).bind("not callable"), "encoder"),
    ],
)
def test_bad_construction_raises(make, match):
    with pytest.raises(vp.VAEPriorsError, match=match):
        make()
