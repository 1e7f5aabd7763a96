r"""The :class:`Prior` protocol every prior satisfies, and :class:`BasePrior`, which implements
its plumbing so that a new prior only writes its density and its sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from . import _checks
from .encoder import Encoder, Posterior, read_posterior
from ._state import StateModule
from .errors import VAEPriorsError, user_call

if TYPE_CHECKING:
    from .distribution import PriorDistribution

__all__ = ["BasePrior", "Prior"]

SampleShape = int | Sequence[int] | torch.Size


@runtime_checkable
class Prior(Protocol):
    r"""What :class:`~vaepriors.ExemplarELBO` (and any training loop) needs of a prior p(z).

    A prior is an :class:`~torch.nn.Module` that owns its parameters, so ``train()`` /
    ``eval()``, ``to(device)`` and ``state_dict()`` work as for any module; its training
    mode selects training-time objectives (e.g. leave-one-out), its evaluation mode the
    exact density.

    Attributes:
        latent_dim: the size d of z (``None`` while an encoder-based prior is unbound).
        has_rsample: whether :meth:`rsample` gives reparameterised samples.

    Methods:
        log_prob(z, *, index=None): log p(z), ``[*batch, d] -> [*batch]``. ``index``
            (``[*batch]`` or broadcastable, integers) gives the training-set index of the
            data point each z was encoded from; priors built on the training set use it
            in training mode to leave that point out.
        sample(sample_shape) / rsample(sample_shape): draws, ``[*sample_shape, d]``.
        bind(encoder): gives priors whose components come from the encoder (VampPrior,
            exemplar, pseudocoreset) the user's encoder; returns the prior.
        observe(posterior, index): tells the prior the posteriors (a
            :class:`~vaepriors.encoder.Posterior`, or encoder means ``[B, d]``) just
            computed for the training points ``index`` ``[B]`` (e.g. to refresh a cache).
        on_epoch_end(epoch): per-epoch hook, ``epoch`` the index of the epoch just ended,
            counted from 0 (e.g. refresh a retrieval cache, or run a coreset update).
        analytic_kl(mean, log_var): KL(q || p) per data point in closed form, or ``None``
            when there is none (the ELBO then estimates it by Monte Carlo).
    """

    @property
    def latent_dim(self) -> int | None: ...

    has_rsample: bool

    def log_prob(self, z: Tensor, *, index: Tensor | None = None) -> Tensor: ...

    def sample(self, sample_shape: SampleShape = ()) -> Tensor: ...

    def rsample(self, sample_shape: SampleShape = ()) -> Tensor: ...

    def bind(self, encoder: Encoder) -> "Prior": ...

    def observe(self, posterior: Posterior | Tensor, index: Tensor) -> None: ...

    def on_epoch_end(self, epoch: int) -> None: ...

    def analytic_kl(self, mean: Tensor, log_var: Tensor) -> Tensor | None: ...


class BasePrior(StateModule):
    r"""Base class implementing :class:`Prior`'s plumbing.

    Subclasses implement ``_log_prob(z, index)`` on validated ``[*batch, d]`` input, and
    ``_rsample(shape)``; :meth:`sample` is :meth:`rsample` without gradients. A subclass
    whose components come from the encoder reads them through :meth:`encode`.

    Arguments:
        latent_dim: the size d of z, or ``None`` if it is only known once an encoder is bound.
    """

    has_rsample: bool = True

    def __init__(self, latent_dim: int | None = None) -> None:
        super().__init__()
        self._latent_dim = None if latent_dim is None else _checks.positive_int(latent_dim, "latent_dim")
        # Not a submodule: the encoder's weights belong to the user's model (and to the
        # ELBO's state_dict), not to the prior's.
        object.__setattr__(self, "_encoder", None)

    # -- the encoder -------------------------------------------------------------------
    @property
    def latent_dim(self) -> int | None:
        """The size d of z; ``None`` while unknown (an encoder-based prior not yet bound)."""
        if self._latent_dim is None and self._encoder is not None:
            example = self._example_input()
            if example is not None:
                with torch.no_grad():
                    self.encode(example)
        return self._latent_dim

    @property
    def encoder(self) -> Encoder:
        """The bound encoder (see :meth:`bind`)."""
        if self._encoder is None:
            raise VAEPriorsError(
                f"{type(self).__name__} needs the encoder: pass it to ExemplarELBO or call prior.bind(encoder)"
            )
        return self._encoder

    def bind(self, encoder: Encoder) -> "BasePrior":
        """Gives the prior the user's encoder (a callable returning ``(mean, log_var)`` or a
        Distribution, see :func:`~vaepriors.encoder.read_posterior`); returns ``self``.
        Priors that do not use the encoder ignore it."""
        if not callable(encoder):
            raise VAEPriorsError(f"`encoder` must be callable, got {type(encoder).__name__}")
        object.__setattr__(self, "_encoder", encoder)
        return self

    def encode(self, x: Tensor) -> Posterior:
        """The bound encoder's posterior at ``x``, checked against ``latent_dim``."""
        out = user_call(self.encoder, x, "encoder", f"{type(self).__name__}.encode", "its inputs")
        q = read_posterior(out, "encoder")
        d = q.shape[-1]
        if self._latent_dim is None:
            self._latent_dim = d
        elif d != self._latent_dim:
            raise VAEPriorsError(
                f"`encoder` returns latents of size {d}, but the prior has latent_dim={self._latent_dim}"
            )
        return q

    def _reference_tensor(self) -> Tensor | None:
        """A floating parameter of the prior: its dtype and device are the prior's (a prior
        without parameters, e.g. N(0, I), takes any)."""
        for t in self.parameters(recurse=False):
            if t.is_floating_point():
                return t
        return None

    def _check_like(self, z: Tensor, name: str = "z") -> None:
        """Latents must have the prior's dtype and device; say which side to convert."""
        ref = self._reference_tensor()
        if ref is not None and (ref.dtype != z.dtype or ref.device != z.device):
            raise VAEPriorsError(
                f"`{name}` is {z.dtype} on {z.device} but {type(self).__name__}'s parameters are {ref.dtype} on "
                f"{ref.device}: convert the model as a whole (e.g. elbo.to(dtype, device), which converts the "
                "prior too) or the prior (prior.to(...))"
            )

    # -- the contract ------------------------------------------------------------------
    def log_prob(self, z: Tensor, *, index: Tensor | None = None) -> Tensor:
        r"""log p(z), shape ``[*batch, d] -> [*batch]``; ``index`` as in :class:`Prior`."""
        d = self.latent_dim
        if d is None:
            raise VAEPriorsError(
                f"{type(self).__name__} needs the encoder: pass it to ExemplarELBO or call prior.bind(encoder)"
            )
        z = _checks.latent(z, d, "z")
        self._check_like(z)
        return self._log_prob(z, index)

    def rsample(self, sample_shape: SampleShape = ()) -> Tensor:
        r"""Reparameterised samples, ``[*sample_shape, d]``."""
        if not self.has_rsample:
            raise VAEPriorsError(f"{type(self).__name__} has no reparameterised sampler; use sample()")
        return self._rsample(_checks.sample_shape(sample_shape))

    def sample(self, sample_shape: SampleShape = ()) -> Tensor:
        r"""Samples without gradients, ``[*sample_shape, d]``."""
        with torch.no_grad():
            return self._rsample(_checks.sample_shape(sample_shape))

    def forward(self, z: Tensor, *, index: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(z, index=index)

    def as_distribution(self) -> "PriorDistribution":
        r"""This prior as a :class:`torch.distributions.Distribution` (batch shape ``()``,
        event shape ``[d]``) for code that expects one; see
        :class:`~vaepriors.distribution.PriorDistribution`."""
        from .distribution import PriorDistribution

        return PriorDistribution(self)

    def observe(self, posterior: Posterior | Tensor, index: Tensor) -> None:
        """Hook: the posteriors (or encoder means ``[B, d]``) of training points ``index``;
        does nothing by default."""

    def on_epoch_end(self, epoch: int) -> None:
        """Hook: called at the end of epoch ``epoch`` (counted from 0) by the training loop;
        does nothing by default."""

    def analytic_kl(self, mean: Tensor, log_var: Tensor) -> Tensor | None:
        """Closed-form KL(q || p) per data point, or ``None`` (the default) if there is none."""
        return None

    def _example_input(self) -> Tensor | None:
        """An input batch ``[1, *input_shape]`` for priors that encode inputs: encoding it
        tells ``latent_dim`` once an encoder is bound. ``None`` for the others."""
        return None

    def _log_prob(self, z: Tensor, index: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _rsample(self, shape: torch.Size) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"latent_dim={self._latent_dim}"
