r"""The example model of the VampPrior and Exemplar VAE papers: a gated MLP VAE.

Built only from the public interface :class:`~vaepriors.ExemplarELBO` expects of a user's
model: the encoder returns ``(mean, log_var)``, the decoder returns a
:class:`torch.distributions.Distribution` over x. Any prior plugs into it.

Example:
    >>> import vaepriors as vp
    >>> encoder, decoder = make_mlp_vae((1, 28, 28))
    >>> elbo = vp.ExemplarELBO(encoder, decoder, vp.GaussianPrior(40))
    >>> elbo(torch.rand(8, 1, 28, 28).bernoulli()).elbo.shape
    torch.Size([8])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent

from . import _checks
from .errors import VAEPriorsError

__all__ = ["GatedDecoder", "GatedDense", "GatedEncoder", "make_mlp_vae"]

# The encoder's log-variance is squashed into this range by a hardtanh (the convention of
# the VampPrior authors' code, which the Exemplar VAE code keeps): the posterior standard
# deviation stays in [e^-3, e] ~ [0.05, 2.7], which keeps early training stable.
LOG_VAR_RANGE = (-6.0, 2.0)


def _shape(input_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise VAEPriorsError(f"`input_shape` must be a positive int or a tuple of positive ints, got {input_shape!r}")
    return shape


def _widths(hidden: int | Sequence[int]) -> tuple[int, ...]:
    widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    if not widths:
        raise VAEPriorsError("`hidden` must name at least one layer width")
    return tuple(_checks.positive_int(w, "hidden") for w in widths)


class GatedDense(nn.Module):
    r"""A gated dense layer: :math:`h = (W_1 x + b_1) \odot \sigma(W_2 x + b_2)`.

    Arguments:
        in_features: size of x's last dimension.
        out_features: size of h's last dimension.

    Example:
        >>> GatedDense(5, 3)(torch.randn(2, 5)).shape
        torch.Size([2, 3])

    References:
        Dauphin et al., "Language Modeling with Gated Convolutional Networks" (ICML 2017).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.h = nn.Linear(in_features, out_features)
        self.g = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def _gated_stack(widths: Sequence[int]) -> nn.Sequential:
    return nn.Sequential(*(GatedDense(a, b) for a, b in zip(widths[:-1], widths[1:])))


class GatedEncoder(nn.Module):
    r"""q(z|x) = N(mean(x), diag(exp(log_var(x)))) from a stack of gated dense layers.

    ``x [*batch, *input_shape]`` is flattened, passed through the gated layers, and two
    linear heads give the mean and the log-variance; the log-variance goes through a
    hardtanh onto ``log_var_range`` (default [-6, 2], as in the papers' code).

    Arguments:
        input_shape: shape of one input, e.g. ``(1, 28, 28)`` or ``784``.
        latent_dim: the size d of z.
        hidden: widths of the gated layers (the papers: ``(300, 300)``).
        log_var_range: ``(low, high)`` of the log-variance, or ``None`` for no clamp.

    Returns (forward):
        ``(mean, log_var)``, each ``[*batch, latent_dim]``.

    Example:
        >>> enc = GatedEncoder((1, 28, 28), latent_dim=40)
        >>> mean, log_var = enc(torch.rand(5, 1, 28, 28))
        >>> mean.shape, bool(log_var.min() >= -6)
        (torch.Size([5, 40]), True)

    References:
        Tomczak & Welling, "VAE with a VampPrior" (2018), appendix;
        Norouzi et al., "Exemplar VAE" (2020), supplementary section L.
    """

    def __init__(
        self,
        input_shape: int | Sequence[int],
        latent_dim: int = 40,
        hidden: int | Sequence[int] = (300, 300),
        *,
        log_var_range: tuple[float, float] | None = LOG_VAR_RANGE,
    ) -> None:
        super().__init__()
        self.input_shape = _shape(input_shape)
        self.latent_dim = _checks.positive_int(latent_dim, "latent_dim")
        widths = _widths(hidden)
        if log_var_range is not None and not (len(log_var_range) == 2 and log_var_range[0] < log_var_range[1]):
            raise VAEPriorsError(f"`log_var_range` must be (low, high) with low < high, or None; got {log_var_range!r}")
        self.log_var_range = None if log_var_range is None else tuple(map(float, log_var_range))
        self.layers = _gated_stack((math.prod(self.input_shape), *widths))
        self.mean = nn.Linear(widths[-1], self.latent_dim)
        self.log_var = nn.Linear(widths[-1], self.latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k = len(self.input_shape)
        if tuple(x.shape[x.dim() - k :]) != self.input_shape:
            raise VAEPriorsError(f"`x` must have shape [*batch, *{self.input_shape}], got {tuple(x.shape)}")
        h = self.layers(x.flatten(-k) if k > 1 else x)
        log_var = self.log_var(h)
        if self.log_var_range is not None:
            log_var = nn.functional.hardtanh(log_var, *self.log_var_range)
        return self.mean(h), log_var

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, latent_dim={self.latent_dim}, log_var_range={self.log_var_range}"


class GatedDecoder(nn.Module):
    r"""p(x|z): independent Bernoulli pixels whose logits come from gated dense layers.

    ``z [*batch, d]`` passes through the gated layers and a linear layer to logits of
    shape ``[*batch, *input_shape]``. The papers' code applies a sigmoid and clamps the
    probabilities before taking logs; this decoder keeps the logits, from which the
    Bernoulli log-likelihood is computed stably without any clamp.

    Arguments:
        input_shape: shape of one output, e.g. ``(1, 28, 28)``.
        latent_dim: the size d of z.
        hidden: widths of the gated layers, from z outwards (the papers: ``(300, 300)``).

    Returns (forward):
        ``Independent(Bernoulli(logits=...), len(input_shape))``: batch shape ``[*batch]``,
        event shape ``input_shape``.

    Example:
        >>> dec = GatedDecoder((1, 28, 28), latent_dim=40)
        >>> px = dec(torch.randn(5, 40))
        >>> px.batch_shape, px.event_shape
        (torch.Size([5]), torch.Size([1, 28, 28]))

    References:
        Tomczak & Welling, "VAE with a VampPrior" (2018), appendix;
        Norouzi et al., "Exemplar VAE" (2020), supplementary section L.
    """

    def __init__(
        self,
        input_shape: int | Sequence[int],
        latent_dim: int = 40,
        hidden: int | Sequence[int] = (300, 300),
    ) -> None:
        super().__init__()
        self.input_shape = _shape(input_shape)
        self.latent_dim = _checks.positive_int(latent_dim, "latent_dim")
        widths = _widths(hidden)
        self.layers = _gated_stack((self.latent_dim, *widths))
        self.logits = nn.Linear(widths[-1], math.prod(self.input_shape))

    def forward(self, z: Tensor) -> Independent:
        if z.dim() < 1 or z.shape[-1] != self.latent_dim:
            raise VAEPriorsError(f"`z` must have shape [*batch, {self.latent_dim}], got {tuple(z.shape)}")
        logits = self.logits(self.layers(z)).unflatten(-1, self.input_shape)
        return Independent(Bernoulli(logits=logits, validate_args=False), len(self.input_shape))

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, latent_dim={self.latent_dim}"


def make_mlp_vae(
    input_shape: int | Sequence[int] = (1, 28, 28),
    latent_dim: int = 40,
    hidden: int | Sequence[int] = (300, 300),
) -> tuple[GatedEncoder, GatedDecoder]:
    r"""The papers' VAE: gated MLP encoder and decoder (784-300-300, d = 40, Bernoulli).

    Arguments:
        input_shape: shape of one input.
        latent_dim: the size d of z.
        hidden: widths of the gated layers; the decoder mirrors them.

    Returns:
        ``(encoder, decoder)``, ready for :class:`~vaepriors.ExemplarELBO`.

    Example:
        >>> encoder, decoder = make_mlp_vae(784, latent_dim=8, hidden=64)
        >>> decoder(encoder(torch.rand(3, 784))[0]).event_shape
        torch.Size([784])

    References:
        Tomczak & Welling, "VAE with a VampPrior" (2018);
        Norouzi et al., "Exemplar VAE" (2020), supplementary section L.
    """
    widths = _widths(hidden)
    return GatedEncoder(input_shape, latent_dim, widths), GatedDecoder(input_shape, latent_dim, widths[::-1])
