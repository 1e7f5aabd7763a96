r"""Reading a user's encoder output as the posterior q(z|x).

An encoder may return ``(mean, log_var)``, a :class:`~torch.distributions.Normal`, an
``Independent(Normal, 1)``, or any reparameterisable :class:`~torch.distributions.Distribution`
over ``[*batch, d]`` (Laplace, Student-t, a zuko normalising flow, ...). :func:`read_posterior`
turns each into a :class:`Posterior`; diagonal Gaussians keep a fast path (their mean and
log-variance, no distribution object) that the ELBO, the closed-form KL and the engine use.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, TransformedDistribution

from .errors import VAEPriorsError, validation_enabled

__all__ = ["Encoder", "Location", "Posterior", "default_location", "gaussian_params", "read_posterior"]

Encoder = Callable[[Tensor], Any]
"""Any callable ``x -> (mean, log_var)`` or ``x ->`` a Distribution over ``[*batch, d]``."""

Location = Callable[[Distribution], Tensor]
"""A point of each posterior, ``Distribution [*batch] -> [*batch, d]`` (e.g. its mean)."""


def default_location(q: Distribution) -> Tensor:
    r"""The point of a posterior that exemplar-based priors centre their components on.

    The posterior's mean where the family has one; for a normalising flow (a
    :class:`~torch.distributions.TransformedDistribution`, or a zuko flow with ``base`` and
    ``transform``), which has none in closed form, the image of the base distribution's mean
    under the flow. It is deterministic and differentiable in the encoder's parameters.

    Example:
        >>> q = torch.distributions.Laplace(torch.ones(2, 3), 1.0)
        >>> default_location(q)[0]
        tensor([1., 1., 1.])
    """
    try:
        return q.mean
    except NotImplementedError:
        pass
    if isinstance(q, Independent):
        return default_location(q.base_dist)
    if isinstance(q, TransformedDistribution):
        z = default_location(q.base_dist)
        for t in q.transforms:
            z = t(z)
        return z
    base, transform = getattr(q, "base", None), getattr(q, "transform", None)
    if isinstance(base, Distribution) and transform is not None and hasattr(transform, "inv"):
        return transform.inv(default_location(base))  # zuko: transform maps z to the base
    raise VAEPriorsError(
        f"the encoder's {type(q).__name__} posterior has no mean; pass `location`, a callable "
        "posterior -> [*batch, d] point, to the prior"
    )


class Posterior:
    r"""q(z|x) for a batch, read from a user's encoder output.

    A diagonal Gaussian is held as its ``mean`` and ``log_var`` (the fast path: samples from
    the noise, the closed-form KL, the engine's diagonal components); any other family as its
    :class:`~torch.distributions.Distribution` with event shape ``[d]``.

    Arguments:
        distribution: a Distribution over ``[*batch, d]`` (event shape ``[d]``), or ``None``
            for a diagonal Gaussian given by ``mean`` and ``log_var``.
        mean: ``[*batch, d]``, with ``log_var``.
        log_var: ``[*batch, d]``.

    Example:
        >>> q = Posterior(mean=torch.zeros(4, 2), log_var=torch.zeros(4, 2))
        >>> z, log_q = q.rsample(3)
        >>> z.shape, log_q.shape, q.is_gaussian
        (torch.Size([3, 4, 2]), torch.Size([3, 4]), True)
    """

    __slots__ = ("_dist", "mean", "log_var")

    def __init__(
        self, distribution: Distribution | None = None, *, mean: Tensor | None = None, log_var: Tensor | None = None
    ) -> None:
        self._dist = distribution
        self.mean = mean
        self.log_var = log_var

    @property
    def is_gaussian(self) -> bool:
        """Whether q is a diagonal Gaussian held as ``(mean, log_var)``."""
        return self.mean is not None

    @property
    def distribution(self) -> Distribution:
        """q as a Distribution with event shape ``[d]`` (built on demand for a Gaussian)."""
        if self._dist is None:
            scale = torch.exp(0.5 * self.log_var)
            self._dist = Independent(Normal(self.mean, scale, validate_args=False), 1)
        return self._dist

    @property
    def shape(self) -> torch.Size:
        """``[*batch, d]``."""
        if self.is_gaussian:
            return self.mean.shape
        d = self._dist
        return d.batch_shape + d.event_shape

    def rsample(self, n: int, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""``n`` reparameterised samples and their log-densities: ``([n, *batch, d], [n, *batch])``;
        a Gaussian may be given its standard-normal ``noise`` ``[n, *batch, d]``."""
        if self.is_gaussian:
            z, eps = self.sample_noise(n, noise)
            return z, self.log_prob_noise(eps)
        z = self._dist.rsample((n,))
        return z, self._dist.log_prob(z)

    def sample_noise(self, n: int, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""A Gaussian's ``n`` reparameterised samples and the standard-normal noise that made
        them, ``([n, *batch, d], [n, *batch, d])``: :meth:`rsample` without the log-density,
        which :meth:`log_prob_noise` gives later, only where it is needed (the ELBO with a
        closed-form KL never needs it). ``noise``: the draws to use instead of fresh ones."""
        if not self.is_gaussian:
            raise VAEPriorsError(f"sample_noise needs a Gaussian posterior, this one is {self!r}; use rsample")
        mean, log_var = self.mean, self.log_var
        eps = torch.randn(n, *mean.shape, dtype=mean.dtype, device=mean.device) if noise is None else noise.to(mean)
        return mean + torch.exp(0.5 * log_var) * eps, eps

    def log_prob_noise(self, eps: Tensor) -> Tensor:
        r"""log q(z|x) of a Gaussian's samples from their noise ``eps`` (:meth:`sample_noise`):
        exact, and no second pass over z."""
        return -0.5 * (math.log(2 * math.pi) + self.log_var + eps.pow(2)).sum(-1)

    def log_prob(self, z: Tensor) -> Tensor:
        r"""log q(z|x) for ``z`` ``[*sample, *batch, d]``, giving ``[*sample, *batch]``."""
        if self.is_gaussian:
            return -0.5 * (math.log(2 * math.pi) + self.log_var + (z - self.mean).pow(2) * torch.exp(-self.log_var)).sum(-1)
        return self._dist.log_prob(z)

    def location(self, fn: Location | None = None) -> Tensor:
        r"""A point per posterior, ``[*batch, d]``: ``fn(q)``, or :func:`default_location`."""
        if fn is None:
            return self.mean if self.is_gaussian else default_location(self._dist)
        point = fn(self.distribution)
        if not isinstance(point, Tensor) or point.shape != self.shape:
            got = tuple(point.shape) if isinstance(point, Tensor) else type(point).__name__
            raise VAEPriorsError(f"`location` must return a tensor of shape {tuple(self.shape)}, got {got}")
        return point

    def __getitem__(self, rows: Any) -> "Posterior":
        """The posteriors of some batch rows (first batch dimension)."""
        if self.is_gaussian:
            return Posterior(mean=self.mean[rows], log_var=self.log_var[rows])
        raise VAEPriorsError("only Gaussian posteriors can be sliced; encode the rows you need instead")

    def __repr__(self) -> str:
        kind = "Gaussian" if self.is_gaussian else type(self._dist).__name__
        return f"Posterior({kind}, shape={tuple(self.shape)})"


def read_posterior(output: Any, name: str = "encoder") -> Posterior:
    r"""Reads an encoder's output as a :class:`Posterior` over ``[*batch, d]``.

    Accepted: a pair ``(mean, log_var)`` of tensors; a :class:`~torch.distributions.Normal`
    with batch shape ``[*batch, d]`` or ``Independent(Normal, 1)`` (both the Gaussian fast
    path); any other Distribution with ``rsample`` and event shape ``[d]``; a Distribution
    over scalars with batch shape ``[*batch, d]`` (e.g. ``Laplace(loc, scale)``) is read as
    independent over its last dimension, like ``Normal``; a :class:`Posterior` as it is.

    Example:
        >>> q = read_posterior(torch.distributions.Laplace(torch.zeros(5, 2), 1.0))
        >>> q.is_gaussian, tuple(q.shape)
        (False, (5, 2))
    """
    if isinstance(output, Posterior):
        return output
    if isinstance(output, Distribution):
        if isinstance(output, Normal) or (
            isinstance(output, Independent)
            and isinstance(output.base_dist, Normal)
            and output.reinterpreted_batch_ndims == 1
        ):
            mean, log_var = gaussian_params(output, name)
            return Posterior(mean=mean, log_var=log_var)
        if not output.has_rsample:
            raise VAEPriorsError(
                f"`{name}` returned a {type(output).__name__}, which has no rsample: the ELBO needs "
                "reparameterised samples of q(z|x)"
            )
        if len(output.event_shape) == 0 and len(output.batch_shape) >= 1:
            output = Independent(output, 1)
        if len(output.event_shape) != 1 or len(output.batch_shape) < 1:
            raise VAEPriorsError(
                f"`{name}` must return a distribution over [*batch, d] with event shape [d]; got batch shape "
                f"{tuple(output.batch_shape)} and event shape {tuple(output.event_shape)}"
            )
        return Posterior(output)
    mean, log_var = gaussian_params(output, name)
    return Posterior(mean=mean, log_var=log_var)


def gaussian_params(output: Any, name: str = "encoder") -> tuple[Tensor, Tensor]:
    r"""Returns ``(mean, log_var)``, each ``[*batch, d]``, of a diagonal-Gaussian encoder output.

    Accepted outputs: a pair ``(mean, log_var)`` of tensors of one shape, a
    :class:`~torch.distributions.Normal` with batch shape ``[*batch, d]``, an
    ``Independent(Normal(...), 1)``, or a Gaussian :class:`Posterior`. Other families go
    through :func:`read_posterior`.

    Example:
        >>> import torch
        >>> m, lv = gaussian_params(Normal(torch.zeros(2, 3), torch.ones(2, 3)))
        >>> lv.abs().max().item()
        0.0
    """
    if isinstance(output, Posterior):
        if not output.is_gaussian:
            raise VAEPriorsError(f"`{name}` returned a non-Gaussian posterior {output!r}; expected (mean, log_var)")
        return output.mean, output.log_var
    if isinstance(output, Independent):
        if output.reinterpreted_batch_ndims != 1:
            raise VAEPriorsError(
                f"`{name}` returned Independent(..., {output.reinterpreted_batch_ndims}); "
                "expected Independent(Normal(...), 1) over a [*batch, d] latent"
            )
        output = output.base_dist
    if isinstance(output, Normal):
        mean, log_var = output.loc, 2 * output.scale.log()
        if validation_enabled() and bool((output.scale <= 0).any()):
            raise VAEPriorsError(f"`{name}` returned a Normal with a scale <= 0 (log_var would be -inf or NaN)")
    elif isinstance(output, (tuple, list)) and len(output) == 2:
        mean, log_var = output
    else:
        raise VAEPriorsError(
            f"`{name}` must return (mean, log_var) or a torch Distribution over [*batch, d]; "
            f"got {type(output).__name__}"
        )
    if not (isinstance(mean, Tensor) and isinstance(log_var, Tensor)):
        raise VAEPriorsError(f"`{name}` must return tensors for mean and log_var")
    if mean.shape != log_var.shape:
        try:
            log_var = log_var.expand_as(mean)
        except RuntimeError:
            raise VAEPriorsError(
                f"`{name}` returned mean {tuple(mean.shape)} and log_var {tuple(log_var.shape)}: "
                "shapes must match"
            ) from None
    if mean.dim() < 1 or not mean.is_floating_point():
        raise VAEPriorsError(f"`{name}` must return floating tensors of shape [*batch, d], got {tuple(mean.shape)}")
    return mean, log_var
