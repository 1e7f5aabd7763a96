"""The one list of prior examples that the generic contract tests (test_prior.py) run over.

Each example builds a prior bound to a small encoder, and gives an independent float64
reference of its log-density computed by brute force from the prior's own parameters.
To add a prior, append a `PriorExample`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import vaepriors as vp

INPUT_DIM = 6


class ToyEncoder(nn.Module):
    """x [B, INPUT_DIM] -> (mean, log_var) [B, d]; log_var kept in a sane range."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Linear(INPUT_DIM, 2 * d)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.net(x).chunk(2, -1)
        return mean, 2 * torch.tanh(raw)


def normal_log_density64(z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(log_var))) in float64 by the difference form; broadcasts."""
    z, mean, log_var = z.double(), mean.double(), log_var.double()
    return -0.5 * (math.log(2 * math.pi) + log_var + (z - mean) ** 2 / log_var.exp()).sum(-1)


def mixture_reference64(z: Tensor, means: Tensor, log_var: Tensor, log_w: Tensor) -> Tensor:
    """log sum_k w_k N(z; m_k, diag(v_k)) for z [..., d], means/log_var [K, d], log_w [K]."""
    comp = normal_log_density64(z[..., None, :], means, log_var)  # [..., K]
    return torch.logsumexp(comp + log_w.double(), -1)


@dataclass
class PriorExample:
    """`make(d)` builds a float32 prior bound to an encoder; `reference(prior, z)` is an
    independent float64 log p(z); `components(prior)`, for mixtures, gives float64
    (means [K, d], log_var [K, d], log_w [K]) for checks of sampling statistics."""

    name: str
    make: Callable[[int], nn.Module]
    reference: Callable[[nn.Module, Tensor], Tensor]
    components: Callable[[nn.Module], tuple[Tensor, Tensor, Tensor]] | None = None


def from_components(components: Callable) -> Callable[[nn.Module, Tensor], Tensor]:
    """The float64 reference log-density of a prior given by its mixture components."""
    return lambda prior, z: mixture_reference64(z, *components(prior))


def _gaussian_components(prior: vp.GaussianPrior) -> tuple[Tensor, Tensor, Tensor]:
    d = prior.latent_dim
    return torch.zeros(1, d, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)


def _mog_components(prior: vp.MixturePrior) -> tuple[Tensor, Tensor, Tensor]:
    k = prior.n_components
    if prior.logits is not None:
        log_w = torch.log_softmax(prior.logits.detach().double(), 0)
    else:
        log_w = torch.full((k,), -math.log(k), dtype=torch.float64)
    return prior.means.detach().double(), prior.log_var.detach().double(), log_w


def _vamp_components(prior: vp.VampPrior) -> tuple[Tensor, Tensor, Tensor]:
    # A float64 copy of the encoder, so the reference does not share the prior's precision.
    enc = copy.deepcopy(prior.encoder).double()
    with torch.no_grad():
        m, lv = enc(prior.pseudo_inputs.detach().double())
    k = prior.n_components
    return m, lv, torch.full((k,), -math.log(k), dtype=torch.float64)


def _mog(d: int, learn: bool) -> vp.MixturePrior:
    p = vp.MixturePrior(d, 5, learn_weights=learn, init_log_var=-0.5)
    with torch.no_grad():
        p.log_var.uniform_(-1.0, 0.5)
        if p.logits is not None:
            p.logits.normal_()
    return p


def _vamp(d: int) -> vp.VampPrior:
    return vp.VampPrior(torch.rand(7, INPUT_DIM)).bind(ToyEncoder(d))


def _mixture_example(name: str, make: Callable, components: Callable) -> PriorExample:
    return PriorExample(name, make, from_components(components), components)


PRIOR_EXAMPLES: list[PriorExample] = [
    _mixture_example("gaussian", lambda d: vp.GaussianPrior(d), _gaussian_components),
    _mixture_example("mog", lambda d: _mog(d, True), _mog_components),
    _mixture_example("mog-uniform", lambda d: _mog(d, False), _mog_components),
    _mixture_example("vamp", _vamp, _vamp_components),
]


# -- ExemplarPrior ----------------------------------------------------------------------------


def _exemplar_components(prior: vp.ExemplarPrior) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluation (and training without index or subsampling): the full uniform mixture."""
    enc = copy.deepcopy(prior.encoder).double()
    with torch.no_grad():
        m, _ = enc(prior.exemplars.double())
    n = prior.n_exemplars
    log_var = prior.log_var.detach().double().expand(n, m.shape[-1])
    return m, log_var, torch.full((n,), -math.log(n), dtype=torch.float64)


def _exemplar(d: int, train: bool = False, **kwargs) -> vp.ExemplarPrior:
    prior = vp.ExemplarPrior(torch.rand(9, INPUT_DIM), init_log_var=-0.5, **kwargs).bind(ToyEncoder(d))
    return prior.train(train)


PRIOR_EXAMPLES += [
    _mixture_example("exemplar", _exemplar, _exemplar_components),
    # Training mode without `index` and without subsampling is the same full mixture.
    _mixture_example("exemplar-train", lambda d: _exemplar(d, train=True), _exemplar_components),
    # RAT and subsampling only change training; evaluation stays exact.
    _mixture_example("exemplar-rat", lambda d: _exemplar(d, n_subsample=6, k=3), _exemplar_components),
]


from copy import deepcopy  # noqa: E402


def _coreset(d: int) -> vp.PseudocoresetPrior:
    # Two zero weights: those components must drop out of the density.
    w = torch.tensor([0.0, 3.0, 1.5, 0.5, 2.0, 0.0, 3.0])
    return vp.PseudocoresetPrior(torch.rand(7, INPUT_DIM), w, init_log_var=-0.3).bind(ToyEncoder(d))


def _coreset_components(prior: vp.PseudocoresetPrior) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        m, _ = deepcopy(prior.encoder).double()(prior.pseudo_inputs.double())
    log_var = prior.log_var.detach().double().expand(m.shape)
    return m, log_var, torch.log(prior.weights.double() / prior.n_total)


def _coreset_ref(prior: vp.PseudocoresetPrior, z: Tensor) -> Tensor:
    return mixture_reference64(z, *_coreset_components(prior))


# Sampling statistics from the components where PriorExample has that field.
_extra = {"components": _coreset_components} if "components" in PriorExample.__dataclass_fields__ else {}
PRIOR_EXAMPLES.append(PriorExample("pseudocoreset", _coreset, _coreset_ref, **_extra))
