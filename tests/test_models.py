"""The papers' gated MLP VAE: shapes, float64 hand-written references, use with every prior."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vaepriors as vp
from vaepriors import VAEPriorsError
from vaepriors.models import GatedDecoder, GatedDense, GatedEncoder, make_mlp_vae


def gated64(layer: GatedDense, x: torch.Tensor) -> torch.Tensor:
    """(W1 x + b1) * sigmoid(W2 x + b2), in float64, written out."""
    w1, b1, w2, b2 = (t.detach().double() for t in (layer.h.weight, layer.h.bias, layer.g.weight, layer.g.bias))
    return (x @ w1.T + b1) * (1 / (1 + torch.exp(-(x @ w2.T + b2))))


def encoder64(enc: GatedEncoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.double().reshape(*x.shape[: x.dim() - len(enc.input_shape)], -1)
    for layer in enc.layers:
        h = gated64(layer, h)
    mean = h @ enc.mean.weight.detach().double().T + enc.mean.bias.detach().double()
    log_var = h @ enc.log_var.weight.detach().double().T + enc.log_var.bias.detach().double()
    return mean, log_var.clamp(-6.0, 2.0)


def decoder_log_lik64(dec: GatedDecoder, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over pixels of x log p + (1 - x) log(1 - p), p = sigmoid(logits), in float64."""
    h = z.double()
    for layer in dec.layers:
        h = gated64(layer, h)
    logits = h @ dec.logits.weight.detach().double().T + dec.logits.bias.detach().double()
    p = 1 / (1 + torch.exp(-logits))
    x = x.double().reshape(*x.shape[: x.dim() - len(dec.input_shape)], -1)
    return (x * torch.log(p) + (1 - x) * torch.log1p(-p)).sum(-1)


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (784,), (3, 5, 4)], ids=["mnist", "flat", "rgb"])
def test_shapes(input_shape):
    enc, dec = make_mlp_vae(input_shape, latent_dim=6, hidden=(16, 12))
    assert [l.h.out_features for l in enc.layers] == [16, 12] and [l.h.out_features for l in dec.layers] == [12, 16]
    x = torch.rand(2, 3, *input_shape).bernoulli()
    mean, log_var = enc(x)
    assert mean.shape == log_var.shape == (2, 3, 6)
    px = dec(mean)
    assert px.batch_shape == (2, 3) and px.event_shape == input_shape
    assert px.log_prob(x).shape == (2, 3)
    assert px.mean.shape == x.shape and bool(((px.mean > 0) & (px.mean < 1)).all())


def test_paper_architecture_size():
    enc, dec = make_mlp_vae()
    # Two gated layers (two linear maps each) 784-300-300, heads 300->40 (x2); mirrored decoder to 784.
    n_enc = 2 * (784 * 300 + 300) + 2 * (300 * 300 + 300) + 2 * (300 * 40 + 40)
    n_dec = 2 * (40 * 300 + 300) + 2 * (300 * 300 + 300) + (300 * 784 + 784)
    assert sum(p.numel() for p in enc.parameters()) == n_enc
    assert sum(p.numel() for p in dec.parameters()) == n_dec
    assert enc.latent_dim == dec.latent_dim == 40 and enc.input_shape == (1, 28, 28)


def test_encoder_matches_float64_reference():
    enc = GatedEncoder((1, 6, 6), latent_dim=5, hidden=(20, 10))
    with torch.no_grad():
        enc.log_var.bias.copy_(torch.tensor([-20.0, -3.0, 0.0, 1.0, 20.0]))  # both clamp ends reached
    x = torch.rand(7, 1, 6, 6)
    with torch.no_grad():
        mean, log_var = enc(x)
    ref_mean, ref_log_var = encoder64(enc, x)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_var.double(), ref_log_var, rtol=1e-5, atol=1e-5)
    assert float(log_var[:, 0].max()) == -6.0 and float(log_var[:, 4].min()) == 2.0
    # Without the clamp the head's raw output comes through.
    free = GatedEncoder((1, 6, 6), latent_dim=5, hidden=(20, 10), log_var_range=None)
    free.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert float(free(x)[1][:, 4].min()) > 10


def test_bernoulli_log_likelihood_matches_float64_formula(dtype):
    dec = GatedDecoder((1, 5, 5), latent_dim=4, hidden=(16, 16)).to(dtype)
    z = 2 * torch.randn(9, 4, dtype=dtype)
    x = torch.rand(9, 1, 5, 5, dtype=dtype).bernoulli()
    got = dec(z).log_prob(x)
    ref = decoder_log_lik64(dec, z, x)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_log_likelihood_finite_at_extreme_logits(scale, seed):
    # Saturated logits must give finite, non-positive log-likelihoods (no log(0)).
    torch.manual_seed(seed)
    dec = GatedDecoder(8, latent_dim=3, hidden=8)
    with torch.no_grad():
        dec.logits.weight.mul_(scale)
        dec.logits.bias.mul_(scale)
    lp = dec(10 * torch.randn(5, 3)).log_prob(torch.rand(5, 8).bernoulli())
    assert bool(torch.isfinite(lp).all()) and bool((lp <= 0).all())


def test_decoder_gradcheck_float64():
    dec = GatedDecoder(6, latent_dim=3, hidden=5).double()
    x = torch.rand(4, 6, dtype=torch.float64).bernoulli()
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: dec(z).log_prob(x), (z,))


@pytest.mark.parametrize("prior", ["gaussian", "mog", "vamp"])
def test_trains_with_every_prior(prior):
    enc, dec = make_mlp_vae((1, 8, 8), latent_dim=4, hidden=16)
    x = torch.rand(12, 1, 8, 8).bernoulli()
    p = {
        "gaussian": lambda: vp.GaussianPrior(4),
        "mog": lambda: vp.MixturePrior(4, 3),
        "vamp": lambda: vp.VampPrior.from_data(torch.rand(20, 1, 8, 8), 5),
    }[prior]()
    elbo = vp.ExemplarELBO(enc, dec, p)
    torch.manual_seed(0)
    out = elbo(x, torch.arange(12))
    # The same ELBO written out in float64 from the weights, on the same noise.
    torch.manual_seed(0)
    eps = torch.randn(1, 12, 4).double()
    mean, log_var = encoder64(enc, x)
    z = mean + torch.exp(0.5 * log_var) * eps
    rec = decoder_log_lik64(dec, z[0], x)
    if prior == "gaussian":
        kl = 0.5 * (log_var.exp() + mean**2 - 1 - log_var).sum(-1)
    else:
        if prior == "mog":
            comp_m, comp_lv = p.means.detach().double(), p.log_var.detach().double()
            log_w = torch.log_softmax(p.logits.detach().double(), 0)
        else:
            comp_m, comp_lv = encoder64(enc, p.pseudo_inputs)
            log_w = torch.full((5,), -torch.log(torch.tensor(5.0)).item(), dtype=torch.float64)
        normal = lambda v, m, lv: -0.5 * (lv + (v - m) ** 2 / lv.exp() + math.log(2 * math.pi)).sum(-1)  # noqa: E731
        log_p = torch.logsumexp(normal(z[0][:, None], comp_m, comp_lv) + log_w, -1)
        kl = normal(z[0], mean, log_var) - log_p
    torch.testing.assert_close(out.elbo.double(), rec - kl, rtol=1e-4, atol=1e-3)
    out.loss.backward()
    for name, param in elbo.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


def test_errors():
    enc, dec = make_mlp_vae((1, 4, 4), latent_dim=3, hidden=8)
    with pytest.raises(VAEPriorsError, match="`x`"):
        enc(torch.rand(2, 16))
    with pytest.raises(VAEPriorsError, match="`z`"):
        dec(torch.rand(2, 4))
    with pytest.raises(VAEPriorsError, match="`input_shape`"):
        make_mlp_vae((1, 0, 4))
    with pytest.raises(VAEPriorsError, match="`hidden`"):
        make_mlp_vae(16, hidden=())
    with pytest.raises(VAEPriorsError, match="`hidden`"):
        make_mlp_vae(16, hidden=(8, -1))
    with pytest.raises(VAEPriorsError, match="`latent_dim`"):
        make_mlp_vae(16, latent_dim=0)
    with pytest.raises(VAEPriorsError, match="`log_var_range`"):
        GatedEncoder(16, log_var_range=(2.0, -6.0))


def test_gated_dense_formula():
    layer = GatedDense(3, 2)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(layer.double()(x), gated64(layer, x))
    # The gate halves the linear branch where its pre-activation is zero.
    with torch.no_grad():
        layer.g.weight.zero_()
        layer.g.bias.zero_()
    torch.testing.assert_close(layer(x), 0.5 * layer.h(x))
