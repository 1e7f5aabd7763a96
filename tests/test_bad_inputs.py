"""A table of bad inputs to the public entry points: each must raise VAEPriorsError naming
what the user passed (never a raw torch/Python error, never a silent NaN)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vaepriors as vp

D_IN, D = 6, 3


def _enc():
    net = nn.Linear(D_IN, 2 * D)
    return lambda x: net(x).chunk(2, -1)


def _dec():
    net = nn.Linear(D, D_IN)
    return lambda z: torch.distributions.Normal(net(z), 1.0)


def _elbo(prior=None):
    return vp.ExemplarELBO(_enc(), _dec(), prior or vp.GaussianPrior(D))


def _exemplar():
    return vp.ExemplarPrior(torch.rand(10, D_IN)).bind(_enc())


X = torch.rand(8, D_IN)
META = torch.empty(4, D_IN, device="meta")

CASES = {
    # constructors
    "mog-init_log_var-str": (lambda: vp.MixturePrior(D, 3, init_log_var="a"), "init_log_var"),
    "mog-init_spread-str": (lambda: vp.MixturePrior(D, 3, init_spread="a"), "init_spread"),
    "exemplar-init_log_var-str": (lambda: vp.ExemplarPrior(X, init_log_var="a"), "init_log_var"),
    "exemplar-init_log_var-list": (lambda: vp.ExemplarPrior(X, init_log_var=[1.0]), "init_log_var"),
    "exemplar-meta": (lambda: vp.ExemplarPrior(META), "meta"),
    "coreset-init_log_var-str": (lambda: vp.PseudocoresetPrior(X, n_total=10, init_log_var="a"), "init_log_var"),
    "vamp-nan-pseudo_inputs": (lambda: vp.VampPrior(torch.full((3, D_IN), math.nan)), "pseudo_inputs"),
    "vamp-meta": (lambda: vp.VampPrior(META), "pseudo_inputs"),
    "elbo-kl_weight-two": (lambda: vp.ExemplarELBO(_enc(), _dec(), vp.GaussianPrior(D), kl_weight=torch.ones(2)), "kl_weight"),
    "elbo-kl_weight-str": (lambda: vp.ExemplarELBO(_enc(), _dec(), vp.GaussianPrior(D), kl_weight="a"), "kl_weight"),
    # the ELBO's call
    "elbo-empty-batch": (lambda: _elbo()(torch.zeros(0, D_IN)), "`x`"),
    "elbo-meta": (lambda: _elbo()(META), "`x`"),
    "elbo-kl_weight-call-two": (lambda: _elbo()(X, kl_weight=torch.ones(2)), "kl_weight"),
    "elbo-encoder-wrong-width": (lambda: _elbo()(torch.rand(8, D_IN + 1)), "encoder failed in ExemplarELBO.encode"),
    "elbo-index-float": (lambda: _elbo(_exemplar())(X, torch.zeros(8)), "index"),
    "elbo-decoder-nan": (
        lambda: vp.ExemplarELBO(_enc(), lambda z: torch.distributions.Normal(z.new_full((len(z), D_IN), math.nan), 1.0,
                                                                             validate_args=False),
                                vp.GaussianPrior(D))(X),
        "decoder",
    ),
    "elbo-bernoulli-grey-x": (
        lambda: vp.ExemplarELBO(_enc(), lambda z: torch.distributions.Bernoulli(logits=nn.functional.linear(z, torch.ones(D_IN, D)),
                                                                                validate_args=True), vp.GaussianPrior(D))(X),
        "log_prob failed in ExemplarELBO.log_likelihood",
    ),
    # engine entry points
    "engine-log_var-none": (lambda: vp.mixture_log_prob(torch.zeros(2, D), torch.zeros(4, D), None), "log_var"),
    "engine-log_var-list": (lambda: vp.mixture_log_prob(torch.zeros(2, D), torch.zeros(4, D), [0.0]), "log_var"),
    "engine-log_var-str": (lambda: vp.mixture_log_prob(torch.zeros(2, D), torch.zeros(4, D), "a"), "log_var"),
    "engine-z-meta": (lambda: vp.mixture_log_prob(torch.zeros(2, D, device="meta"), torch.zeros(4, D), 0.0), "`z`"),
    # evaluation
    "loglik-device-bogus": (lambda: vp.log_likelihood(_elbo(), X, 4, device="bogus", progress=False), "device"),
    "loglik-device-int": (lambda: vp.log_likelihood(_elbo(), X, 4, device=3, progress=False), "device"),
    "loglik-generator-str": (lambda: vp.log_likelihood(_elbo(), X, 4, generator="x", progress=False), "generator"),
    "loglik-distributed-str": (lambda: vp.log_likelihood(_elbo(), X, 4, distributed="yes", progress=False), "distributed"),
    "bits_per_dim-str": (lambda: vp.bits_per_dim("x", 10), "log_px"),
    "bits_per_dim-nan": (lambda: vp.bits_per_dim(math.nan, 10), "log_px"),
    "active_units-distributed-str": (lambda: vp.active_units(_enc(), X, distributed="x"), "distributed"),
    # priors' other entry points
    "coreset-update-decoder-int": (
        lambda: vp.PseudocoresetPrior.from_data(X, 3).bind(_enc()).update_coreset(3, X, progress=False), "decoder"),
    "augment-decoder-none": (lambda: vp.augment_batch(_exemplar(), None, X, torch.arange(8)), "decoder"),
    "augment-prior-without-exemplars": (lambda: vp.augment_batch(vp.GaussianPrior(D), _dec(), X, torch.arange(8)), "prior"),
    "sample_around-nan": (lambda: _exemplar().sample_around(torch.full((2, D_IN), math.nan)), "exemplars"),
    "generate-nan-decoder": (
        lambda: _exemplar().generate_iteratively(lambda z: torch.full((len(z), D_IN), math.nan), 2, 1), "decoder"),
    "gaussian_params-zero-scale": (lambda: vp.gaussian_params(torch.distributions.Normal(torch.zeros(2), torch.zeros(2), validate_args=False)), "scale"),
    "read_posterior-no-rsample": (
        lambda: vp.read_posterior(torch.distributions.Categorical(logits=torch.zeros(2, 3))), "rsample"),
    "exemplar-transform-not-callable": (lambda: vp.ExemplarPrior(X, transform=3), "transform"),
    "exemplar-location-not-callable": (lambda: vp.ExemplarPrior(X, location="mean"), "location"),
    "set_timeout-negative": (lambda: vp.distributed.set_timeout(-1), "seconds|timeout"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_raises_a_clear_error(case):
    call, match = CASES[case]
    with pytest.raises(vp.VAEPriorsError, match=match):
        call()


def test_training_command_names_bad_out_and_checkpoints(tmp_path):
    from vaepriors.train import parse_args, run

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(vp.VAEPriorsError, match="--out must be a folder"):
        run(parse_args(["--out", str(afile), "--epochs", "1", "--no-progress"]))
    (tmp_path / "ck").mkdir()
    torch.save({"model": {}}, tmp_path / "ck" / "checkpoint.pt")
    with pytest.raises(vp.VAEPriorsError, match="not a checkpoint of this training command"):
        run(parse_args(["--out", str(tmp_path / "ck"), "--resume", "--epochs", "1", "--no-progress"]))
