r"""Reading a user's encoder output as the mean and log-variance of a diagonal Gaussian."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor
from torch.distributions import Independent, Normal

from .errors import VAEPriorsError

__all__ = ["Encoder", "gaussian_params"]

Encoder = Callable[[Tensor], Any]
"""Any callable ``x -> (mean, log_var)`` or ``x -> Normal`` / ``Independent(Normal, 1)``."""


def gaussian_params(output: Any, name: str = "encoder") -> tuple[Tensor, Tensor]:
    r"""Returns ``(mean, log_var)``, each ``[*batch, d]``, of an encoder's output.

    Accepted outputs: a pair ``(mean, log_var)`` of tensors of one shape, a
    :class:`~torch.distributions.Normal` with batch shape ``[*batch, d]``, or an
    ``Independent(Normal(...), 1)``.

    Example:
        >>> import torch
        >>> m, lv = gaussian_params(Normal(torch.zeros(2, 3), torch.ones(2, 3)))
        >>> lv.abs().max().item()
        0.0
    """
    if isinstance(output, Independent):
        if output.reinterpreted_batch_ndims != 1:
            raise VAEPriorsError(
                f"`{name}` returned Independent(..., {output.reinterpreted_batch_ndims}); "
                "expected Independent(Normal(...), 1) over a [*batch, d] latent"
            )
        output = output.base_dist
    if isinstance(output, Normal):
        mean, log_var = output.loc, 2 * output.scale.log()
    elif isinstance(output, (tuple, list)) and len(output) == 2:
        mean, log_var = output
    else:
        raise VAEPriorsError(
            f"`{name}` must return (mean, log_var), a Normal or an Independent(Normal, 1); "
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
