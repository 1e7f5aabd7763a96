"""Generative data augmentation: decoded exemplar-conditioned samples carry their exemplar's label."""

from __future__ import annotations

import math

import pytest
import torch

from vaepriors import ExemplarAugmenter, ExemplarPrior, VAEPriorsError, augment_batch

D_IN, D = 6, 3


def linear_model(log_var: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D_IN, D, generator=g)
    b = torch.randn(D, D_IN, generator=g)
    enc = lambda x: (x @ a, torch.zeros(x.shape[0], D))  # noqa: E731
    dec = lambda z: torch.distributions.Normal(z @ b, 0.5)  # noqa: E731
    exemplars = torch.rand(12, D_IN, generator=g)
    prior = ExemplarPrior(exemplars, init_log_var=log_var, generator=seed).bind(enc)
    return prior, dec, a, b, exemplars


def test_augment_batch_labels_follow_their_exemplar():
    # sigma ~ 1e-9: each decoded sample is the decoder mean at its exemplar's latent mean.
    prior, dec, a, b, _ = linear_model(-40.0)
    x = torch.rand(4, D_IN)
    y = torch.tensor([3, 1, 4, 1])
    xa, ya = augment_batch(prior, dec, x, y, n_per_exemplar=3)
    assert xa.shape == (12, D_IN) and ya.shape == (12,)
    want = (x.double() @ a.double() @ b.double()).repeat(3, 1)
    torch.testing.assert_close(xa.double(), want, rtol=1e-5, atol=1e-5)
    assert ya.tolist() == y.tolist() * 3
    onehot = torch.eye(5)[y]  # labels of any trailing shape
    assert augment_batch(prior, dec, x, onehot, n_per_exemplar=2)[1].shape == (8, 5)


def test_augment_batch_noise_statistics():
    # "mean": x_aug = (mu(x) + sigma eps) B, so x_aug - mu(x) B = sigma eps B.
    prior, dec, a, b, _ = linear_model(math.log(0.25))
    x = torch.rand(1, D_IN)
    n = 20000
    xa, _ = augment_batch(prior, dec, x, torch.zeros(1), n_per_exemplar=n)
    r = (xa.double() - x.double() @ a.double() @ b.double())
    cov = 0.25 * b.double().T @ b.double()
    assert (r.mean(0).abs() < 4 * cov.diagonal().sqrt() / math.sqrt(n)).all()
    torch.testing.assert_close(torch.cov(r.T), cov, rtol=0.1, atol=0.05)
    # "sample" adds the decoder's own noise (scale 0.5).
    xs, _ = augment_batch(prior, dec, x, torch.zeros(1), n_per_exemplar=n, to_input="sample")
    rs = xs.double() - x.double() @ a.double() @ b.double()
    torch.testing.assert_close(torch.cov(rs.T), cov + 0.25 * torch.eye(D_IN, dtype=torch.float64), rtol=0.1, atol=0.05)


def test_augment_batch_reproducible_with_the_prior_generator():
    prior, dec, *_ = linear_model(-1.0, seed=3)
    x, y = torch.rand(5, D_IN), torch.arange(5)
    prior.generator.manual_seed(7)
    first = augment_batch(prior, dec, x, y, n_per_exemplar=2)[0]
    prior.generator.manual_seed(7)
    torch.testing.assert_close(augment_batch(prior, dec, x, y, n_per_exemplar=2)[0], first)


def test_augmenter_draws_from_the_labelled_exemplar_set():
    prior, dec, a, b, ex = linear_model(-40.0)
    labels = torch.arange(12) * 10
    aug = ExemplarAugmenter(prior, dec, labels, batch_size=50, n_batches=4)
    assert len(aug) == 4
    batches = list(aug)
    assert len(batches) == 4
    images = (ex.double() @ a.double() @ b.double())  # the decoded mean of each exemplar
    seen = set()
    for xa, ya in batches:
        assert xa.shape == (50, D_IN) and ya.shape == (50,)
        nearest = torch.cdist(xa.double(), images).argmin(1)
        torch.testing.assert_close(xa.double(), images[nearest], rtol=1e-5, atol=1e-5)
        assert torch.equal(ya, labels[nearest])
        seen |= set(nearest.tolist())
    assert len(seen) == 12  # uniform draws over the set reach every exemplar
    endless = iter(ExemplarAugmenter(prior, dec, labels, batch_size=2))
    for _ in range(3):
        next(endless)
    with pytest.raises(TypeError):
        len(ExemplarAugmenter(prior, dec, labels, batch_size=2))


def test_bad_input():
    prior, dec, *_ = linear_model(0.0)
    x = torch.rand(3, D_IN)
    with pytest.raises(VAEPriorsError, match="`y`"):
        augment_batch(prior, dec, x, torch.zeros(4))
    with pytest.raises(VAEPriorsError, match="n_per_exemplar"):
        augment_batch(prior, dec, x, torch.zeros(3), n_per_exemplar=0)
    with pytest.raises(VAEPriorsError, match="to_input"):
        augment_batch(prior, dec, x, torch.zeros(3), to_input="mode")
    with pytest.raises(VAEPriorsError, match="to_input"):
        augment_batch(prior, lambda z: (lambda x: x.sum(-1)), x, torch.zeros(3))
    with pytest.raises(VAEPriorsError, match="shape"):
        augment_batch(prior, lambda z: torch.zeros(z.shape[0], 2), x, torch.zeros(3))
    with pytest.raises(VAEPriorsError, match="exemplars"):
        augment_batch(prior, dec, torch.rand(3, D_IN + 1), torch.zeros(3))
    with pytest.raises(VAEPriorsError, match="labels"):
        ExemplarAugmenter(prior, dec, torch.zeros(5), batch_size=2)
    with pytest.raises(VAEPriorsError, match="batch_size"):
        ExemplarAugmenter(prior, dec, torch.zeros(12), batch_size=0)
    aug = ExemplarAugmenter(prior, dec, torch.zeros(12), batch_size=2)
    prior.set_exemplars(torch.rand(20, D_IN))
    with pytest.raises(VAEPriorsError, match="labels"):
        aug.sample()
