"""The one list of prior examples that the generic contract tests (test_prior.py) run over.

Each example builds a prior bound to a small encoder, and gives an independent float64
reference of its log-density computed by brute force from the prior's own parameters.
To add a prior, append a `PriorExample`.
"""

from __future__ import annotations

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
    name: str
    make: Callable[[int], nn.Module]  # latent_dim -> prior (float32, cpu, bound)
    reference: Callable[[nn.Module, Tensor], Tensor]  # (prior, z) -> float64 log p(z)


def _gaussian_ref(prior: nn.Module, z: Tensor) -> Tensor:
    return normal_log_density64(z, torch.zeros(()), torch.zeros(()))


def _mog_ref(prior: vp.MixturePrior, z: Tensor) -> Tensor:
    k = prior.n_components
    log_w = torch.log_softmax(prior.logits.double(), 0) if prior.logits is not None else torch.full((k,), -math.log(k))
    return mixture_reference64(z, prior.means, prior.log_var, log_w)


def _vamp_ref(prior: vp.VampPrior, z: Tensor) -> Tensor:
    with torch.no_grad():
        enc = prior.encoder.double()
        m, lv = enc(prior.pseudo_inputs.double())
        prior.encoder.to(prior.pseudo_inputs.dtype)
    k = prior.n_components
    return mixture_reference64(z, m, lv, torch.full((k,), -math.log(k)))


def _mog(d: int, learn: bool) -> vp.MixturePrior:
    p = vp.MixturePrior(d, 5, learn_weights=learn, init_log_var=-0.5)
    with torch.no_grad():
        p.log_var.uniform_(-1.0, 0.5)
        if p.logits is not None:
            p.logits.normal_()
    return p


def _vamp(d: int) -> vp.VampPrior:
    return vp.VampPrior(torch.rand(7, INPUT_DIM)).bind(ToyEncoder(d))


PRIOR_EXAMPLES: list[PriorExample] = [
    PriorExample("gaussian", lambda d: vp.GaussianPrior(d), _gaussian_ref),
    PriorExample("mog", lambda d: _mog(d, True), _mog_ref),
    PriorExample("mog-uniform", lambda d: _mog(d, False), _mog_ref),
    PriorExample("vamp", _vamp, _vamp_ref),
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
