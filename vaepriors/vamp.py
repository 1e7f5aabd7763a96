r"""VampPrior: a mixture of the encoder's own posteriors at learnable pseudo-inputs."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _checks
from .encoder import Posterior, gaussian_params
from .engine import get_memory_budget, mixture_log_prob
from .errors import VAEPriorsError
from .mixture import sample_mixture
from .prior import BasePrior

__all__ = ["VampPrior"]


class VampPrior(BasePrior):
    r"""The variational mixture of posteriors prior.

    .. math:: p(z) = \frac1K \sum_{k=1}^K q_\phi(z \mid u_k)

    Each component is the encoder's posterior at a learnable pseudo-input :math:`u_k`, which
    lives in input space. For a diagonal-Gaussian encoder the components are those Gaussians
    (mean *and* variance) and the density goes through the engine; for any other posterior
    family (Laplace, a normalising flow, ...) the components are that family itself,
    evaluated through its own ``log_prob`` in row chunks of at most ``memory_budget`` bytes
    of broadcast queries. The prior needs the encoder: :class:`~vaepriors.ExemplarELBO`
    binds it, or call :meth:`bind`.

    Arguments:
        pseudo_inputs: initial pseudo-inputs ``[K, *input_shape]`` (copied into a parameter).
        latent_dim: the size d of z; inferred from the encoder when omitted.
        backend: engine backend for the log-density (Gaussian posteriors).
        memory_budget: bytes of temporaries per call (engine, and the chunks of a
            non-Gaussian family); default :func:`~vaepriors.engine.get_memory_budget`.

    Example:
        >>> enc = lambda x: (x[..., :2], torch.zeros_like(x[..., :2]))
        >>> prior = VampPrior(torch.rand(8, 5)).bind(enc)
        >>> prior.log_prob(torch.zeros(3, 2)).shape
        torch.Size([3])

    References:
        Tomczak & Welling, "VAE with a VampPrior" (AISTATS 2018).
    """

    def __init__(
        self,
        pseudo_inputs: Tensor,
        latent_dim: int | None = None,
        *,
        backend: str = "auto",
        memory_budget: int | None = None,
    ) -> None:
        super().__init__(latent_dim)
        u = _checks.floating(pseudo_inputs, "pseudo_inputs")
        if u.dim() < 1 or u.shape[0] == 0:
            raise VAEPriorsError(f"`pseudo_inputs` must have shape [K, *input_shape] with K >= 1, got {tuple(u.shape)}")
        _checks.finite(u, "pseudo_inputs")
        self.pseudo_inputs = nn.Parameter(u.detach().clone())
        self.backend = backend
        self.memory_budget = memory_budget

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
        """``(means, log_var)`` of the K components, each ``[K, d]``, through the encoder
        (diagonal-Gaussian encoders; see :meth:`posteriors` for any family)."""
        return gaussian_params(self.posteriors(), "encoder")

    def posteriors(self) -> Posterior:
        """The K components: the encoder's posterior at the pseudo-inputs, batch ``[K]``."""
        return self.encode(self.pseudo_inputs)

    def _log_prob(self, z: Tensor, index: Tensor | None) -> Tensor:
        q = self.posteriors()
        if q.is_gaussian:
            return mixture_log_prob(z, q.mean, q.log_var, backend=self.backend, memory_budget=self.memory_budget)
        # The posterior family's own log_prob at every (query, component) pair, in row
        # chunks; families such as zuko's flows need the batch expanded, not broadcast.
        k, d = q.shape
        flat = z.reshape(-1, d)
        budget = get_memory_budget() if self.memory_budget is None else self.memory_budget
        rows = max(1, budget // (4 * k * d * flat.element_size()))
        parts = [
            torch.logsumexp(q.log_prob(c.unsqueeze(-2).expand(c.shape[0], k, d)), -1)
            for c in flat.split(rows)
        ]
        out = torch.cat(parts) if parts else flat.new_zeros(0)
        return (out - math.log(k)).reshape(z.shape[:-1])

    def _rsample(self, shape: torch.Size) -> Tensor:
        count = shape.numel()
        u = self.pseudo_inputs
        j = torch.randint(self.n_components, (count,), device=u.device)
        chosen, inverse = torch.unique(j, return_inverse=True)
        q = self.encode(u[chosen])
        if q.is_gaussian:
            return sample_mixture(q.mean, q.log_var, shape, index=inverse)
        # One draw from the posterior at each chosen pseudo-input per sample: encode the
        # chosen ones once, then draw from that batch as many times as the most-chosen needs.
        counts = torch.bincount(inverse, minlength=len(chosen))
        draws = q.rsample(int(counts.max()) if count else 0)[0]  # [max count, len(chosen), d]
        order = torch.argsort(inverse, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(count, device=u.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        return draws[rank, inverse].reshape(*shape, q.shape[-1])

    def _example_input(self) -> Tensor:
        return self.pseudo_inputs[:1]

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, input_shape={tuple(self.pseudo_inputs.shape[1:])}"
