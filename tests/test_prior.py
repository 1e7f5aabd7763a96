"""Contract tests run over every prior in examples.PRIOR_EXAMPLES, on --device and --dtype."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import vaepriors as vp
from examples import PRIOR_EXAMPLES, PriorExample

D = 3
EXAMPLES = pytest.mark.parametrize("example", PRIOR_EXAMPLES, ids=[e.name for e in PRIOR_EXAMPLES])


def build(example: PriorExample, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    torch.manual_seed(1)
    prior = example.make(D)
    prior.to(dtype=dtype, device=device)
    enc = prior._encoder
    if isinstance(enc, nn.Module):  # the encoder is the user's, not a submodule: move it too
        enc.to(dtype=dtype, device=device)
    return prior


def tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=2e-5, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@EXAMPLES
def test_is_a_prior(example):
    prior = build(example)
    assert isinstance(prior, vp.Prior)
    assert isinstance(prior, nn.Module)
    assert prior.latent_dim == D


@EXAMPLES
def test_log_prob_shapes_and_dtype(example, dtype, device):
    prior = build(example, dtype, device)
    for batch in [(), (5,), (2, 4)]:
        z = torch.randn(*batch, D, dtype=dtype, device=device)
        lp = prior.log_prob(z)
        assert lp.shape == batch and lp.dtype == dtype and lp.device == z.device
        assert torch.isfinite(lp).all()


@EXAMPLES
def test_log_prob_matches_float64_reference(example, dtype, device):
    prior = build(example, dtype, device)
    z = 2 * torch.randn(64, D, dtype=dtype, device=device)
    ref = example.reference(prior.cpu(), z.cpu())
    assert ref.dtype == torch.float64
    got = prior.log_prob(z.cpu()).double()
    torch.testing.assert_close(got, ref, **tolerance(dtype))


@EXAMPLES
@given(scale=st.floats(1e-3, 1e3), shift=st.floats(-50, 50))
def test_log_prob_far_and_near_points_stay_finite(example, scale, shift):
    prior = build(example, torch.float64)
    z = scale * torch.randn(16, D, dtype=torch.float64) + shift
    lp = prior.log_prob(z)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, example.reference(prior, z), rtol=1e-9, atol=1e-9)


@EXAMPLES
def test_gradients_reach_every_parameter(example, dtype):
    prior = build(example, dtype)
    z = torch.randn(32, D, dtype=dtype, requires_grad=True)
    prior.log_prob(z).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    for name, p in prior.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    enc = prior._encoder
    if isinstance(enc, nn.Module) and prior.training:  # the encoder learns through the components
        for name, p in enc.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"encoder.{name}"


@EXAMPLES
def test_sample_shapes(example, dtype, device):
    prior = build(example, dtype, device)
    for shape, expected in [((), ()), (5, (5,)), ((2, 3), (2, 3)), (torch.Size([4]), (4,))]:
        x = prior.sample(shape)
        assert x.shape == (*expected, D) and x.dtype == dtype and x.device.type == torch.device(device).type
        assert not x.requires_grad
    assert prior.sample(0).shape == (0, D)


@EXAMPLES
def test_sample_statistics_match_mixture_moments(example):
    if example.components is None:
        pytest.skip("no mixture components to compare with")
    prior = build(example, torch.float64)
    means, log_var, log_w = example.components(prior)
    w = log_w.exp()
    mean = w @ means
    second = w @ (log_var.exp() + means**2)
    var = second - mean**2
    n = 40_000
    torch.manual_seed(3)
    x = prior.sample(n)
    se = (var / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se).all(), (x.mean(0), mean)
    torch.testing.assert_close(x.var(0), var, rtol=0.06, atol=0)


@EXAMPLES
def test_rsample_carries_gradients_or_refuses(example):
    prior = build(example)
    if not prior.has_rsample:
        with pytest.raises(vp.VAEPriorsError, match="rsample|reparameterised"):
            prior.rsample(3)
        return
    x = prior.rsample((7,))
    assert x.shape == (7, D)
    params = list(prior.parameters())
    if isinstance(prior._encoder, nn.Module):
        params += list(prior._encoder.parameters())
    if params:
        x.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def _same(a, b) -> bool:
    """Equal state entries: tensors exactly, extra state (dicts) entry by entry."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@EXAMPLES
def test_state_dict_round_trips_exactly(example):
    a = build(example)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.1 * torch.randn_like(p))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    # Same construction (same exemplar data, which is not state), then the state is loaded
    # over parameters that differ from a's by the perturbation.
    torch.manual_seed(1)
    b = example.make(D)
    b.load_state_dict(torch.load(buf))
    if a._encoder is not None:
        b.bind(a._encoder)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and _same(va, vb), ka
    z = torch.randn(10, D)
    assert torch.equal(a.log_prob(z), b.log_prob(z))


@EXAMPLES
def test_state_dict_holds_no_encoder_weights(example):
    prior = build(example)
    enc = prior._encoder
    if isinstance(enc, nn.Module):
        enc_ids = {id(p) for p in enc.parameters()}
        assert not any(id(t) in enc_ids for t in prior.state_dict(keep_vars=True).values())


@EXAMPLES
def test_deepcopy_and_module_moves(example):
    prior = build(example)
    twin = copy.deepcopy(prior)
    z = torch.randn(4, D)
    torch.testing.assert_close(prior.log_prob(z), twin.log_prob(z))
    prior.double()
    if isinstance(prior._encoder, nn.Module):
        prior._encoder.double()
    assert prior.log_prob(z.double()).dtype == torch.float64


@EXAMPLES
@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: torch.randn(4, D + 1), "latent_dim"),
        (lambda: torch.tensor([[0.0, math.nan, 0.0]]), "NaN|infinite"),
        (lambda: torch.tensor([[0.0, math.inf, 0.0]]), "NaN|infinite"),
        (lambda: torch.zeros(2, D, dtype=torch.long), "floating"),
        (lambda: [[0.0] * D], "torch.Tensor"),
        (lambda: torch.tensor(1.0), "scalar"),
    ],
    ids=["size", "nan", "inf", "int", "list", "scalar"],
)
def test_bad_latents_raise_one_error_naming_z(example, bad, match):
    prior = build(example)
    with pytest.raises(vp.VAEPriorsError, match=match) as info:
        prior.log_prob(bad())
    assert "`z`" in str(info.value)


@EXAMPLES
@pytest.mark.parametrize("shape", [-1, (2, -3), "x", 2.5, True])
def test_bad_sample_shapes_raise(example, shape):
    prior = build(example)
    with pytest.raises(vp.VAEPriorsError, match="sample_shape"):
        prior.sample(shape)


def test_validation_switch_skips_value_checks_only():
    prior = vp.GaussianPrior(2)
    vp.set_validation(False)
    try:
        assert torch.isnan(prior.log_prob(torch.tensor([math.nan, 0.0])))
        with pytest.raises(vp.VAEPriorsError, match="latent_dim"):
            prior.log_prob(torch.zeros(3))
    finally:
        vp.set_validation(True)


def test_errors_are_value_errors():
    assert issubclass(vp.VAEPriorsError, ValueError)


# -- posterior families and the Distribution view ---------------------------------------------

from examples import FAMILIES, INPUT_DIM  # noqa: E402

OTHER_FAMILIES = [f for f in FAMILIES if f != "normal"]
FAMILY_CASES = pytest.mark.parametrize(
    "example, family",
    [(e, f) for e in PRIOR_EXAMPLES for f in OTHER_FAMILIES],
    ids=[f"{e.name}-{f}" for e in PRIOR_EXAMPLES for f in OTHER_FAMILIES],
)


def build_family(example: PriorExample, family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(1)
    prior = example.make(D, family)
    prior.to(dtype=dtype)
    if isinstance(prior._encoder, nn.Module):
        prior._encoder.to(dtype=dtype)
    return prior


@FAMILY_CASES
def test_log_prob_with_a_posterior_family_matches_float64_reference(example, family, dtype):
    prior = build_family(example, family, dtype)
    z = 2 * torch.randn(32, D, dtype=dtype)
    torch.testing.assert_close(prior.log_prob(z).double(), example.reference(prior, z), **tolerance(dtype))


@FAMILY_CASES
def test_elbo_with_a_posterior_family_uses_its_own_density(example, family):
    """KL = mean_s [log q(z_s|x) - log p(z_s)] on the ELBO's own samples, from the family's
    and the prior's float64 references."""
    prior = build_family(example, family, torch.float64)
    enc = prior._encoder if isinstance(prior._encoder, nn.Module) else FAMILIES[family](D).double()
    dec = nn.Linear(D, INPUT_DIM).double()
    elbo = vp.ExemplarELBO(enc, lambda z: torch.distributions.Normal(dec(z), 1.0), prior, n_samples=3)
    x = torch.rand(4, INPUT_DIM, dtype=torch.float64)
    out = elbo(x)
    log_q = copy.deepcopy(enc).double().log_q(out.z.detach(), x)  # [S, B]
    want = (log_q - example.reference(prior, out.z.detach())).mean(0)
    torch.testing.assert_close(out.kl.detach(), want, rtol=1e-9, atol=1e-9)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    ll = vp.log_likelihood(elbo.eval(), x, n_samples=16, progress=False)
    assert torch.isfinite(ll.values).all()


@FAMILY_CASES
def test_sampling_with_a_posterior_family(example, family):
    prior = build_family(example, family)
    z = prior.sample((5, 2))
    assert z.shape == (5, 2, D) and torch.isfinite(z).all()


def test_vamp_samples_from_the_family_mixture():
    """Laplace components: the sample mean is the mean of the components' locations."""
    prior = build_family(next(e for e in PRIOR_EXAMPLES if e.name == "vamp"), "laplace", torch.float64)
    with torch.no_grad():
        q = prior.encoder(prior.pseudo_inputs)
    n = 40_000
    z = prior.sample(n)
    mean = q.loc.mean(0)
    var = (2 * q.scale**2 + q.loc**2).mean(0) - mean**2  # Laplace variance 2 b^2
    assert ((z.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    torch.testing.assert_close(z.var(0), var, rtol=0.06, atol=0)


@EXAMPLES
def test_distribution_view_agrees_with_the_prior(example):
    prior = build(example)
    p = prior.as_distribution()
    assert isinstance(p, torch.distributions.Distribution)
    assert p.batch_shape == () and p.event_shape == (D,) and p.has_rsample == prior.has_rsample
    z = torch.randn(2, 5, D)
    torch.testing.assert_close(p.log_prob(z), prior.log_prob(z), rtol=0, atol=0)
    torch.testing.assert_close(p.log_prob(z).double(), example.reference(prior, z), **tolerance(torch.float32))
    assert p.sample((4,)).shape == (4, D)
    # Monte Carlo KL of a torch posterior against the view
    q = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(3, D), torch.ones(3, D)), 1)
    s = q.rsample((8,))
    assert (q.log_prob(s) - p.log_prob(s)).mean(0).shape == (3,)


def test_a_prior_of_another_dtype_is_named_at_the_entry_point():
    """A float64 encoder and decoder with a float32 prior: one clear error naming both."""
    enc, dec = nn.Linear(INPUT_DIM, 2 * D).double(), nn.Linear(D, INPUT_DIM).double()
    elbo = vp.ExemplarELBO(lambda x: enc(x).chunk(2, -1), lambda z: torch.distributions.Normal(dec(z), 1.0),
                           vp.MixturePrior(D, 4))
    x = torch.rand(5, INPUT_DIM, dtype=torch.float64)
    with pytest.raises(vp.VAEPriorsError, match="float64.*MixturePrior.*float32"):
        elbo(x)
    with pytest.raises(vp.VAEPriorsError, match="float64.*MixturePrior.*float32"):
        vp.log_likelihood(elbo, x, 4, progress=False)
    elbo.double()  # converting the model converts the prior
    assert torch.isfinite(vp.log_likelihood(elbo, x, 4, progress=False).values).all()
