r"""The evidence lower bound of any encoder and decoder under any prior."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from . import _checks
from .encoder import Encoder, Posterior, read_posterior
from .errors import VAEPriorsError, user_call
from .prior import BasePrior, Prior

__all__ = ["ELBOOutput", "ExemplarELBO"]

Decoder = Callable[[Tensor], Any]


class ELBOOutput(NamedTuple):
    r"""What :class:`ExemplarELBO` returns.

    Attributes:
        loss: the scalar to minimise, :math:`-\frac1B\sum_i (\text{rec}_i - \beta\, \text{kl}_i)`.
        elbo: the per-example ELBO ``[B]`` (with KL weight 1, whatever :math:`\beta`).
        reconstruction: :math:`\mathbb E_q \log p(x_i|z)` per example, ``[B]``.
        kl: the KL term per example, ``[B]`` (closed form or Monte Carlo).
        z: the latent samples used, ``[n_samples, B, d]``.
    """

    loss: Tensor
    elbo: Tensor
    reconstruction: Tensor
    kl: Tensor
    z: Tensor


def _owner(f: Callable) -> nn.Module | None:
    owner = getattr(f, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _observe_validates(prior: Prior) -> bool:
    """Whether ``prior.observe`` checks the posteriors it is given itself, or ignores them."""
    return type(prior).observe is BasePrior.observe or bool(getattr(prior, "_observe_validates", False))


class ExemplarELBO(nn.Module):
    r"""Wraps a user's encoder and decoder with any prior into the ELBO.

    .. math:: \mathrm{ELBO}(x) = \mathbb E_{q(z|x)}[\log p(x|z)] - \mathrm{KL}(q(z|x) \,\|\, p(z))

    The KL is in closed form where the prior has one (:class:`~vaepriors.GaussianPrior`), the
    posterior is a diagonal Gaussian and ``analytic_kl`` is set; otherwise it is the Monte
    Carlo estimate :math:`\log q(z|x) - \log p(z)` on the same reparameterised samples as
    the reconstruction term, with the posterior's own ``log_prob``.

    Modules passed as ``encoder`` / ``decoder`` are registered as submodules; for bound
    methods such as ``vae.encode``, their module is registered (as ``model``), so
    ``elbo.parameters()`` holds every parameter to train.

    Arguments:
        encoder: ``x [B, ...] -> (mean, log_var)`` each ``[B, d]``, or any reparameterisable
            Distribution over ``[B, d]`` (Normal, Laplace, a normalising flow, ...; see
            :func:`~vaepriors.encoder.read_posterior`). Diagonal Gaussians take a fast path.
        decoder: ``z [n, d] ->`` a :class:`~torch.distributions.Distribution` over x whose
            ``batch_shape + event_shape`` is ``[n, *x.shape[1:]]`` (Bernoulli,
            ContinuousBernoulli, Normal, ...), or a callable ``x [n, ...] -> log p(x|z) [n]``.
        prior: any :class:`~vaepriors.Prior`; it is bound to ``encoder``.
        n_samples: latent samples per data point (averaged).
        kl_weight: the default :math:`\beta` of ``loss`` (KL warm-up); see :meth:`forward`.
        analytic_kl: use the prior's closed-form KL where it has one.

    Example:
        >>> enc = nn.Linear(4, 2 * 2)
        >>> encoder = lambda x: enc(x).chunk(2, -1)
        >>> decoder = lambda z: torch.distributions.Normal(z @ torch.ones(2, 4), 1.0)
        >>> from vaepriors import GaussianPrior
        >>> out = ExemplarELBO(encoder, decoder, GaussianPrior(2))(torch.randn(8, 4))
        >>> out.loss.shape, out.elbo.shape
        (torch.Size([]), torch.Size([8]))

    References:
        Kingma & Welling (2014); Norouzi et al., "Exemplar VAE" (NeurIPS 2020).
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        prior: Prior,
        *,
        n_samples: int = 1,
        kl_weight: float = 1.0,
        analytic_kl: bool = True,
    ) -> None:
        super().__init__()
        for name, f in (("encoder", encoder), ("decoder", decoder)):
            if not callable(f):
                raise VAEPriorsError(f"`{name}` must be callable, got {type(f).__name__}")
        if not isinstance(prior, Prior):
            raise VAEPriorsError(f"`prior` must implement vaepriors.Prior, got {type(prior).__name__}")
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        # Bound methods (``vae.encode``) hide their module's parameters: register the owners
        # too, so that ``elbo.parameters()`` is everything an optimiser must train.
        owners = [_owner(f) for f in (encoder, decoder) if not isinstance(f, nn.Module)]
        owners = [o for i, o in enumerate(owners) if o is not None and not any(o is p for p in owners[:i])]
        owners = [o for o in owners if o is not encoder and o is not decoder]
        if len(owners) == 1:
            self.model = owners[0]
        elif len(owners) == 2:
            self.encoder_owner, self.decoder_owner = owners
        prior.bind(encoder)
        self.n_samples = _checks.positive_int(n_samples, "n_samples")
        self.kl_weight = self._check_weight(kl_weight)
        self.analytic_kl = bool(analytic_kl)

    @staticmethod
    def _check_weight(w: float) -> float:
        w = _checks.number(w, "kl_weight")
        if not w >= 0:
            raise VAEPriorsError(f"`kl_weight` must be a finite number >= 0, got {w!r}")
        return w

    def encode(self, x: Tensor) -> Posterior:
        """The posterior q(z|x) over ``[B, d]`` (a :class:`~vaepriors.encoder.Posterior`),
        checked against the prior."""
        q = read_posterior(user_call(self.encoder, x, "encoder", "ExemplarELBO.encode"), "encoder")
        shape = q.shape
        if len(shape) != 2 or shape[0] != x.shape[0]:
            raise VAEPriorsError(f"`encoder` must return [B, d] with B = len(x) = {x.shape[0]}, got {tuple(shape)}")
        if shape[-1] != self.prior.latent_dim:
            raise VAEPriorsError(
                f"`encoder` returns latents of size {shape[-1]}, the prior has latent_dim={self.prior.latent_dim}"
            )
        return q

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        r"""log p(x|z) for latents ``z [S, B, d]`` and data ``x [B, ...]``; returns ``[S, B]``."""
        s, b, _ = z.shape
        return self._log_likelihood(x, z).reshape(s, b)

    def _log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """:meth:`log_likelihood` flat, ``[S * B]`` (no copy of ``x`` for one sample)."""
        s, b, d = z.shape
        out = user_call(self.decoder, z.reshape(s * b, d), "decoder", "ExemplarELBO.log_likelihood", "z")
        target = x if s == 1 else x.unsqueeze(0).expand(s, *x.shape).reshape(s * b, *x.shape[1:])
        if isinstance(out, Distribution):
            shape = tuple(out.batch_shape + out.event_shape)
            if shape != tuple(target.shape):
                raise VAEPriorsError(
                    f"`decoder` returned a distribution over shape {shape}; expected [n, *x.shape[1:]] = "
                    f"{tuple(target.shape)}"
                )
            who = f"decoder's {type(out).__name__}.log_prob"
            lp = user_call(out.log_prob, target, who, "ExemplarELBO.log_likelihood")
            if lp.dim() != 1:  # a distribution with batch dimensions beyond the first
                lp = lp.reshape(s * b, -1).sum(-1)
        elif callable(out) and not isinstance(out, Tensor):
            lp = out(target)
            if not isinstance(lp, Tensor) or lp.shape != (s * b,):
                got = tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__
                raise VAEPriorsError(f"the callable returned by `decoder` must give log p(x|z) of shape [{s * b}], got {got}")
        else:
            raise VAEPriorsError(
                "`decoder` must return a torch Distribution over x or a callable x -> log p(x|z); "
                f"got {type(out).__name__}"
            )
        return lp

    def forward(
        self,
        x: Tensor,
        index: Tensor | None = None,
        *,
        kl_weight: float | None = None,
        noise: Tensor | None = None,
    ) -> ELBOOutput:
        r"""The ELBO of a batch.

        Arguments:
            x: data ``[B, ...]``.
            index: the training-set indices of the batch ``[B]`` (priors built on the
                training set leave each point out of its own prior in training mode).
            kl_weight: :math:`\beta` for this call (default: the module's ``kl_weight``).
            noise: the standard-normal draws of a Gaussian posterior's samples,
                ``[n_samples, B, d]`` (default: drawn from torch's generator). Common random
                numbers: e.g. a run split over processes passes each rank its rows of one
                global draw, and reproduces the single-process run.

        Returns:
            An :class:`ELBOOutput`.
        """
        x = _checks.tensor(x, "x")
        if x.dim() < 1:
            raise VAEPriorsError("`x` must have a batch dimension, got a scalar")
        if x.shape[0] == 0:
            raise VAEPriorsError(f"`x` must hold at least one data point, got shape {tuple(x.shape)}")
        beta = self.kl_weight if kl_weight is None else self._check_weight(kl_weight)
        if index is not None:
            index = _checks.tensor(index, "index")
            if index.shape != (x.shape[0],):
                raise VAEPriorsError(f"`index` must have shape [B] = [{x.shape[0]}], got {tuple(index.shape)}")
        q = self.encode(x)
        s, b = self.n_samples, x.shape[0]
        if noise is not None:
            if not q.is_gaussian:
                raise VAEPriorsError("`noise` applies to Gaussian posteriors; this encoder returns another family")
            noise = _checks.floating(noise, "noise")
            if noise.shape != (s, *q.mean.shape):
                raise VAEPriorsError(f"`noise` must have shape [n_samples, B, d] = {(s, *q.mean.shape)}, got {tuple(noise.shape)}")
        z = rec = None
        try:
            if index is not None and self.training:
                if not _observe_validates(self.prior):  # it may keep what it is told: check first
                    self._diagnose(q, None, None)
                self.prior.observe(q, index)
            if q.is_gaussian:
                z, eps = q.sample_noise(s, noise)
            else:
                z, log_q = q.rsample(s)
                _checks.finite(z, "encoder sample")
            rec = self._log_likelihood(x, z)
            rec = rec if s == 1 else rec.reshape(s, b).mean(0)
            kl = self.prior.analytic_kl(q.mean, q.log_var) if self.analytic_kl and q.is_gaussian else None
            if kl is None:
                if q.is_gaussian:
                    log_q = q.log_prob_noise(eps)
                kl = log_q - self.prior.log_prob(z, index=index)
                kl = kl.reshape(b) if s == 1 else kl.mean(0)
        except VAEPriorsError:
            # A non-finite encoder output makes the decoder or the prior fail: name the cause.
            self._diagnose(q, z, rec)
            raise
        elbo = rec - kl
        loss = -elbo.mean() if beta == 1 else -(rec - beta * kl).mean()
        # One check of the scalar loss stands for the checks of its inputs: a NaN or an
        # infinity in the encoder's output, or a NaN log-likelihood, makes it non-finite;
        # only then are the inputs looked at, to name the one at fault.
        if _checks.validation_enabled() and not math.isfinite(loss.item()):
            self._diagnose(q, z, rec)
        return ELBOOutput(loss, elbo, rec, kl, z)

    @staticmethod
    def _diagnose(q: Posterior, z: Tensor | None, rec: Tensor | None) -> None:
        """Raises the error that names a non-finite encoder output or a NaN log-likelihood, if
        there is one (a loss may be infinite for other reasons, e.g. log p(z) = -inf)."""
        if not _checks.validation_enabled():
            return
        if q.is_gaussian:
            _checks.finite(q.mean, "encoder mean")
            _checks.finite(q.log_var, "encoder log_var")
        elif z is not None:
            _checks.finite(z, "encoder sample")
        if rec is not None and bool(torch.isnan(rec.detach()).any()):
            raise VAEPriorsError(
                "the decoder's log-likelihood log p(x|z) is NaN for some data points (check the decoder's "
                "output and the data it scores)"
            )

    def on_epoch_end(self, epoch: int) -> None:
        """Forwards the per-epoch hook to the prior (``epoch`` counted from 0)."""
        self.prior.on_epoch_end(epoch)
