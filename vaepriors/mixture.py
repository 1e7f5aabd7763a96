r"""Mixture-of-Gaussians prior with learnable components, and the mixture sampler all
mixture priors share."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _checks
from .engine import mixture_log_prob
from .errors import VAEPriorsError
from .prior import BasePrior

__all__ = ["MixturePrior", "sample_mixture"]


def sample_mixture(
    means: Tensor,
    log_var: Tensor,
    shape: torch.Size,
    log_weights: Tensor | None = None,
    generator: torch.Generator | None = None,
    index: Tensor | None = None,
) -> Tensor:
    r"""Draws ``[*shape, d]`` samples from a Gaussian mixture in O(samples x d) memory.

    The component is chosen first (uniformly, or by ``log_weights``), then only that
    component is sampled: :math:`z = \mu_j + s_j \epsilon`. Gradients flow to ``means`` and
    ``log_var`` (pathwise, given the chosen component), never to the weights.

    Arguments:
        means: ``[N, d]``.
        log_var: a scalar, ``[N]`` or ``[N, d]``.
        shape: the sample shape.
        log_weights: ``[N]`` unnormalised log-weights, or ``None`` for uniform.
        generator: an optional :class:`torch.Generator` for reproducible draws.
        index: the component of each sample, ``[shape.numel()]``, when already chosen.
    """
    n, d = means.shape
    count = shape.numel()
    if count == 0:
        return means.new_zeros(*shape, d)
    if index is not None:
        j = index
    elif log_weights is None:
        j = torch.randint(n, (count,), device=means.device, generator=generator)
    else:
        probs = torch.softmax(log_weights.detach(), 0)
        j = torch.multinomial(probs, count, replacement=True, generator=generator)
    lv = log_var[j] if log_var.dim() >= 1 else log_var
    if lv.dim() == 1:
        lv = lv[:, None]
    eps = torch.randn(count, d, dtype=means.dtype, device=means.device, generator=generator)
    return (means[j] + torch.exp(0.5 * lv) * eps).reshape(*shape, d)


class MixturePrior(BasePrior):
    r"""A mixture of K diagonal Gaussians with learnable means, log-variances and weights.

    .. math:: p(z) = \sum_{k=1}^K \pi_k\, \mathcal N(z; m_k, \mathrm{diag}(s_k^2))

    Arguments:
        latent_dim: the size d of z.
        n_components: K.
        learn_weights: learn mixture logits (``True``) or keep uniform weights 1/K.
        init_spread: standard deviation of the random initial means.
        init_log_var: initial log-variance of every component.
        backend: engine backend for the log-density (see :func:`~vaepriors.engine.mixture_log_prob`).

    With learnable weights the component choice is discrete, so :meth:`rsample` is not
    available (``has_rsample`` is ``False``); with uniform weights it is exact.

    Example:
        >>> prior = MixturePrior(latent_dim=2, n_components=10)
        >>> prior.sample((4,)).shape
        torch.Size([4, 2])

    References:
        Dilokthanakul et al., "Deep Unsupervised Clustering with Gaussian Mixture VAEs" (2016);
        Tomczak & Welling, "VAE with a VampPrior" (2018), the MoG baseline.
    """

    def __init__(
        self,
        latent_dim: int,
        n_components: int,
        *,
        learn_weights: bool = True,
        init_spread: float = 1.0,
        init_log_var: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(_checks.positive_int(latent_dim, "latent_dim"))
        k = _checks.positive_int(n_components, "n_components")
        init_spread = _checks.number(init_spread, "init_spread")
        init_log_var = _checks.number(init_log_var, "init_log_var")
        if not init_spread >= 0:
            raise VAEPriorsError(f"`init_spread` must be >= 0, got {init_spread}")
        self.means = nn.Parameter(init_spread * torch.randn(k, latent_dim))
        self.log_var = nn.Parameter(torch.full((k, latent_dim), float(init_log_var)))
        self.logits = nn.Parameter(torch.zeros(k)) if learn_weights else None
        self.has_rsample = not learn_weights
        self.backend = backend

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def log_weights(self) -> Tensor | None:
        """Normalised log mixture weights ``[K]``, or ``None`` when uniform."""
        return None if self.logits is None else torch.log_softmax(self.logits, 0)

    def _log_prob(self, z: Tensor, index: Tensor | None) -> Tensor:
        return mixture_log_prob(z, self.means, self.log_var, self.log_weights(), backend=self.backend)

    def _rsample(self, shape: torch.Size) -> Tensor:
        return sample_mixture(self.means, self.log_var, shape, self.log_weights())

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, n_components={self.n_components}, learn_weights={self.logits is not None}"
