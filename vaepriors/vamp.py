r"""VampPrior: a mixture of the encoder's own posteriors at learnable pseudo-inputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _checks
from .engine import mixture_log_prob
from .errors import VAEPriorsError
from .mixture import sample_mixture
from .prior import BasePrior

__all__ = ["VampPrior"]


class VampPrior(BasePrior):
    r"""The variational mixture of posteriors prior.

    .. math:: p(z) = \frac1K \sum_{k=1}^K q_\phi(z \mid u_k)

    Each component is the encoder's Gaussian (its mean *and* variance) at a learnable
    pseudo-input :math:`u_k`, which lives in input space. The prior needs the encoder:
    :class:`~vaepriors.ExemplarELBO` binds it, or call :meth:`bind`.

    Arguments:
        pseudo_inputs: initial pseudo-inputs ``[K, *input_shape]`` (copied into a parameter).
        latent_dim: the size d of z; inferred from the encoder when omitted.
        backend: engine backend for the log-density.

    Example:
        >>> enc = lambda x: (x[..., :2], torch.zeros_like(x[..., :2]))
        >>> prior = VampPrior(torch.rand(8, 5)).bind(enc)
        >>> prior.log_prob(torch.zeros(3, 2)).shape
        torch.Size([3])

    References:
        Tomczak & Welling, "VAE with a VampPrior" (AISTATS 2018).
    """

    def __init__(self, pseudo_inputs: Tensor, latent_dim: int | None = None, *, backend: str = "auto") -> None:
        super().__init__(latent_dim)
        u = _checks.floating(pseudo_inputs, "pseudo_inputs")
        if u.dim() < 1 or u.shape[0] == 0:
            raise VAEPriorsError(f"`pseudo_inputs` must have shape [K, *input_shape] with K >= 1, got {tuple(u.shape)}")
        self.pseudo_inputs = nn.Parameter(u.detach().clone())
        self.backend = backend

    @classmethod
    def from_data(
        cls,
        data: Tensor,
        n_components: int = 500,
        *,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> "VampPrior":
        """Initialises the pseudo-inputs with ``n_components`` distinct random rows of ``data``
        ``[N, *input_shape]``; other arguments as for the constructor."""
        data = _checks.floating(data, "data")
        k = _checks.positive_int(n_components, "n_components")
        if data.dim() < 1 or k > data.shape[0]:
            raise VAEPriorsError(f"`n_components` must be at most len(data) = {data.shape[0] if data.dim() else 0}, got {k}")
        idx = torch.randperm(data.shape[0], generator=generator)[:k]
        return cls(data[idx.to(data.device)], **kwargs)

    @property
    def n_components(self) -> int:
        return self.pseudo_inputs.shape[0]

    def components(self) -> tuple[Tensor, Tensor]:
        """``(means, log_var)`` of the K components, each ``[K, d]``, through the encoder."""
        return self.encode(self.pseudo_inputs)

    def _log_prob(self, z: Tensor, index: Tensor | None) -> Tensor:
        means, log_var = self.components()
        return mixture_log_prob(z, means, log_var, backend=self.backend)

    def _rsample(self, shape: torch.Size) -> Tensor:
        means, log_var = self.components()
        return sample_mixture(means, log_var, shape)

    def _example_input(self) -> Tensor:
        return self.pseudo_inputs[:1]

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, input_shape={tuple(self.pseudo_inputs.shape[1:])}"
