r"""The standard Gaussian prior p(z) = N(0, I)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks
from .prior import BasePrior

__all__ = ["GaussianPrior"]


class GaussianPrior(BasePrior):
    r"""The standard normal prior :math:`p(z) = \mathcal N(z; 0, I_d)`, with a closed-form KL.

    Arguments:
        latent_dim: the size d of z.

    Example:
        >>> prior = GaussianPrior(2)
        >>> prior.log_prob(torch.zeros(2))
        tensor(-1.8379)

    References:
        Kingma & Welling, "Auto-Encoding Variational Bayes" (2014).
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__(_checks.positive_int(latent_dim, "latent_dim"))
        # A zero-size buffer carries the prior's dtype and device for sampling.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def _log_prob(self, z: Tensor, index: Tensor | None) -> Tensor:
        return -0.5 * (self.latent_dim * math.log(2 * math.pi) + z.pow(2).sum(-1))

    def _rsample(self, shape: torch.Size) -> Tensor:
        a = self._anchor
        return torch.randn(*shape, self.latent_dim, dtype=a.dtype, device=a.device)

    def analytic_kl(self, mean: Tensor, log_var: Tensor) -> Tensor:
        r""":math:`\mathrm{KL}(\mathcal N(m, \mathrm{diag}(e^{v})) \,\|\, \mathcal N(0, I))
        = \frac12 \sum_k (e^{v_k} + m_k^2 - 1 - v_k)`, shape ``[*batch]``."""
        return 0.5 * (log_var.exp() + mean.pow(2) - 1 - log_var).sum(-1)
