r"""A prior as a :class:`torch.distributions.Distribution`, for code that expects one."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from .errors import VAEPriorsError

__all__ = ["PriorDistribution"]


class PriorDistribution(Distribution):
    r"""A view of a vaepriors prior as a :class:`~torch.distributions.Distribution` over
    ``R^d``: batch shape ``()``, event shape ``[d]``.

    ``log_prob`` is the prior's (through the engine, in the prior's current mode: the exact
    density in ``eval()``), ``sample`` / ``rsample`` the prior's samplers, so the view can be
    handed to code written for torch distributions (a Monte Carlo KL, a library that takes a
    ``prior`` Distribution). The view holds the prior itself, not a copy: parameters, mode
    and device are the prior's. There is no closed-form KL; estimate it on reparameterised
    samples of the posterior, as :class:`~vaepriors.ExemplarELBO` does::

        z = q.rsample((S,))
        kl = (q.log_prob(z) - prior.as_distribution().log_prob(z)).mean(0)

    Arguments:
        prior: any prior (bound to its encoder if it needs one).

    Example:
        >>> import vaepriors as vp
        >>> p = vp.MixturePrior(2, 3).as_distribution()
        >>> p.batch_shape, p.event_shape, p.log_prob(torch.zeros(4, 2)).shape
        (torch.Size([]), torch.Size([2]), torch.Size([4]))
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, prior: torch.nn.Module, validate_args: bool | None = None) -> None:
        d = getattr(prior, "latent_dim", None)
        if d is None:
            raise VAEPriorsError(
                f"{type(prior).__name__} does not know its latent size yet: bind it to the encoder first"
            )
        self.prior = prior
        super().__init__(torch.Size(), torch.Size([d]), validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return bool(self.prior.has_rsample)

    def log_prob(self, value: Tensor) -> Tensor:
        r"""log p(value), ``[*sample, d] -> [*sample]``."""
        return self.prior.log_prob(value)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return self.prior.sample(sample_shape)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return self.prior.rsample(sample_shape)

    def expand(self, batch_shape: torch.Size, _instance: Distribution | None = None) -> Distribution:
        if torch.Size(batch_shape) != torch.Size():
            raise VAEPriorsError("a prior's distribution view has batch shape (); it cannot be expanded")
        return self

    def __repr__(self) -> str:
        return f"PriorDistribution({type(self.prior).__name__}, event_shape={tuple(self.event_shape)})"
