r"""The Bayesian pseudocoreset prior of ByPE-VAE, and the coreset update that fits it.

.. math:: p(z \mid U, w) = \sum_{m=1}^M \frac{w_m}{N}\, \mathcal N(z; \mu_\phi(u_m), \sigma^2 I),
   \qquad w_m \ge 0,\ \textstyle\sum_m w_m = N

A small weighted set of pseudo-inputs :math:`U` stands in for the N training points of the
exemplar prior. The ELBO trains the encoder (through the component means) and
:math:`\log\sigma^2`; the pseudo-inputs and weights are changed only by
:meth:`PseudocoresetPrior.update_coreset`, run every few epochs with the VAE fixed.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, ContinuousBernoulli, Distribution, Independent, Normal

from . import _checks
from . import distributed as dist
from .encoder import Location
from .engine import mixture_log_prob
from .errors import VAEPriorsError, user_call
from .prior import BasePrior

__all__ = ["PseudocoresetPrior", "pairwise_log_likelihood", "project_simplex"]

Decoder = Callable[[Tensor], Any]

# Elements of the [chunk, S, D] temporary of the generic likelihood path.
_GENERIC_CHUNK = 1 << 24


def project_simplex(v: Tensor, total: float = 1.0) -> Tensor:
    r"""Euclidean projection of ``v`` ``[M]`` onto the scaled simplex
    :math:`\{w : w_m \ge 0, \sum_m w_m = \text{total}\}`.

    The projection is :math:`w_m = \max(v_m - \theta, 0)` with the unique :math:`\theta`
    that makes the sum right, found by sorting (Held, Wolfe & Crowder 1974; Duchi et al.
    2008). It is computed in float64 and returned in ``v``'s dtype; the result is never
    negative and never NaN for finite input.

    Arguments:
        v: a finite floating vector ``[M]``, ``M >= 1``.
        total: the sum of the result, ``> 0``.

    Returns:
        The projection, ``[M]``.

    Example:
        >>> project_simplex(torch.tensor([3.0, 1.0, -2.0]), total=2.0)
        tensor([2., 0., 0.])
    """
    v = _checks.floating(v, "v")
    if v.dim() != 1 or v.shape[0] == 0:
        raise VAEPriorsError(f"`v` must be a vector [M] with M >= 1, got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise VAEPriorsError("`v` contains NaN or infinite values")
    total = float(total)
    if not (total > 0 and math.isfinite(total)):
        raise VAEPriorsError(f"`total` must be a finite number > 0, got {total}")
    # The projection commutes with shifts v + c 1; shifting the largest entry to 0 keeps
    # the cumulative sums free of cancellation against huge entries.
    x = v.double()
    x = x - x.max()
    s, _ = torch.sort(x, descending=True)
    excess = (torch.cumsum(s, 0) - total) / torch.arange(1, len(s) + 1, dtype=x.dtype, device=x.device)
    # The largest k with s_k > (sum_{j<=k} s_j - total) / k; k = 1 always qualifies (0 > -total).
    k = int((s > excess).nonzero()[-1])
    return (x - excess[k]).clamp_min(0).to(v.dtype)


def _flat(t: Tensor, s: int) -> Tensor:
    return t.reshape(s, -1)


def pairwise_log_likelihood(out: Distribution, x: Tensor) -> Tensor:
    r"""``log p(x_b | z_s)`` for every data point and every latent, ``[B, S]``.

    ``out`` is the decoder's distribution for S latents (``batch_shape + event_shape`` is
    ``[S, *input_shape]``), ``x`` the data ``[B, *input_shape]``. Likelihoods that allow it
    are evaluated as matrix products over the flattened input (no ``[B, S, D]`` tensor):

    - Bernoulli and continuous Bernoulli (also inside ``Independent``), linear in x:
      :math:`\log p(x|z) = x \cdot l(z) + \log p(0|z)`, so the matrix is
      ``x @ l.T + log p(0|z)``. For Bernoulli this is :math:`x\cdot l - \sum \mathrm{softplus}(l)`;
      it is also the extension to grey-level x (pseudo-inputs) that the coreset update uses.
    - Normal: the quadratic expanded into three products with the precisions.

    Any other :class:`~torch.distributions.Distribution` is evaluated by broadcasting
    ``out.log_prob(x[:, None])`` over chunks of x. Differentiable w.r.t. ``x``.

    Arguments:
        out: the decoder's distribution over ``[S, *input_shape]``.
        x: data ``[B, *input_shape]``.

    Returns:
        The log-likelihoods ``[B, S]``.

    Example:
        >>> out = torch.distributions.Bernoulli(logits=torch.zeros(3, 4))
        >>> pairwise_log_likelihood(out, torch.ones(2, 4))
        tensor([[-2.7726, -2.7726, -2.7726],
                [-2.7726, -2.7726, -2.7726]])
    """
    if not isinstance(out, Distribution):
        raise VAEPriorsError(
            "`decoder` must return a torch Distribution over x for the coreset update; "
            f"got {type(out).__name__}"
        )
    shape = tuple(out.batch_shape + out.event_shape)
    if len(shape) != x.dim() or shape[1:] != tuple(x.shape[1:]):
        raise VAEPriorsError(
            f"`decoder` returned a distribution over shape {shape}; expected [S, *input_shape] with "
            f"input_shape = {tuple(x.shape[1:])}"
        )
    s, b = shape[0], x.shape[0]
    base = out
    while isinstance(base, Independent):
        base = base.base_dist
    xf = x.reshape(b, math.prod(x.shape[1:]))
    if isinstance(base, (Bernoulli, ContinuousBernoulli)):
        logits = base.logits.expand(shape)
        if isinstance(base, Bernoulli):
            log_p0 = -torch.nn.functional.softplus(logits)
        else:  # -softplus(l) + the continuous Bernoulli's log normaliser
            log_p0 = base.log_prob(torch.zeros_like(logits))
        return xf @ _flat(logits, s).T + _flat(log_p0, s).sum(-1)
    if isinstance(base, Normal):
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        loc, log_scale = _flat(loc.expand(shape), s), _flat(scale.expand(shape).log(), s)
        prec = torch.exp(-2 * log_scale)
        quad = (xf * xf) @ prec.T - 2 * xf @ (loc * prec).T + (loc * loc * prec).sum(-1)
        return -0.5 * quad - log_scale.sum(-1) - 0.5 * loc.shape[1] * math.log(2 * math.pi)
    step = max(1, _GENERIC_CHUNK // max(1, s * xf.shape[1]))
    rows = []
    for i in range(0, b, step):
        lp = out.log_prob(x[i : i + step].unsqueeze(1))  # broadcasts to [chunk, S, ...]
        rows.append(lp.reshape(lp.shape[0], s, -1).sum(-1))
    return torch.cat(rows, 0)


class PseudocoresetPrior(BasePrior):
    r"""The ByPE-VAE prior: a weighted mixture over M pseudo-inputs, with its coreset update.

    .. math:: \log p(z \mid U, w) = \log \sum_{m=1}^M \frac{w_m}{N}
       \mathcal N\big(z; \mu_\phi(u_m), \sigma^2 I\big)

    The component means are the bound encoder's means at the pseudo-inputs :math:`u_m`
    (input space), recomputed with gradients at every :meth:`log_prob`, so the ELBO trains
    the encoder through them; :math:`\log\sigma^2` (``log_var``, one shared scalar) is a
    parameter the ELBO trains. Zero weights are allowed (those components drop out).

    The pseudo-inputs ``pseudo_inputs`` ``[M, *input_shape]`` and weights ``weights``
    ``[M]`` are **buffers**, not parameters: the user's optimiser never sees them (not even
    through ``model.parameters()`` or ``requires_grad_()``), yet they follow ``.to()`` and
    round-trip through ``state_dict`` together with N (``weight_sum``) and the update's own
    Adam state (``lr_*`` and ``input_range`` are settings, given to the constructor).
    Only :meth:`update_coreset` changes them, minimising
    :math:`\mathrm{KL}(p(z|U,w) \,\|\, p(z|X))` with the VAE fixed; call it every k epochs
    (k = 10 in the paper), directly or through :meth:`schedule_updates` and
    :meth:`on_epoch_end`. In that update the pseudo-inputs enter only as the data argument
    of the decoder's likelihood :math:`\log p_\theta(u_m|z)` (see :meth:`coreset_gradients`).

    What the defaults buy (issue #17; in ``benchmarks/results``, ``coreset_ablation.md``:
    MNIST, 5000 images x 10 epochs, and ``coreset_cpu-long.md``: the cpu-long reproduction,
    10000 images x 40 epochs; test log-likelihoods paired against the exemplar prior): the
    update as defined here is nearly inert (M = 500: -2.28 nats behind the exemplar prior
    with the default update, -2.26 without any), and none of its settings (latent samples,
    binarised data, input box, step sizes and frequency, an EM refit of the weights, latents
    from the pseudocoreset posterior, whose importance resampling degenerates to one sample)
    nor the initialisation moves the likelihood beyond noise. The gap shrinks with M, then
    stops, while the cost grows: in cpu-long -1.46 nats at M = 500 (0.15x the exemplar
    prior's step time), -1.07 at 1000 (0.24x), -0.84 at 1500 (0.32x), -0.92 at 2000 (0.41x)
    and at 4000 (0.87x), where the exemplar prior with 1000 exemplars per step is -0.48
    (0.23x) and RAT +0.12. The encoder must learn through the component means: without
    those gradients, M = 2500 ends 3.95 nats behind. ``leave_one_out`` and ``n_subsample``
    are off by default: neither helped.

    Arguments:
        pseudo_inputs: initial pseudo-inputs ``[M, *input_shape]`` (copied).
        weights: initial weights ``[M]`` (``>= 0``, positive sum); default ``N/M`` each.
        n_total: N, the training-set size the weights sum to; default ``weights.sum()``
            (one of the two is required).
        latent_dim: the size d of z; inferred from the encoder when omitted.
        init_log_var: initial :math:`\log\sigma^2`.
        lr_weights: Adam step size of the coreset update for the weights, in units of the
            mean weight N/M.
        lr_inputs: Adam step size for the pseudo-inputs (input units).
        input_range: ``(low, high)``: the update keeps pseudo-inputs in this box (e.g.
            ``(0, 1)`` for Bernoulli pixels, whose log-likelihood is linear, hence unbounded,
            in the input); ``None`` for no bound.
        backend: engine backend for the log-density.
        location: ``posterior -> [*batch, d]`` point per pseudo-input for posterior
            families without a mean (``None``: :func:`~vaepriors.encoder.default_location`).
        process_group: the group the coreset update communicates in under torch.distributed
            (``None``: the default group).
        sync: communicate under torch.distributed at all (``False``: every rank on its own).
        n_subsample: in training mode, each :meth:`log_prob` call uses this many components
            of positive weight, drawn uniformly without replacement (torch's global generator), with the weights
            renormalised over them, and encodes only those pseudo-inputs (as exemplar
            subsampling does); evaluation mode and :meth:`sample` always use all M.
            ``None``: all M in training too. Under torch.distributed each rank draws its own.
        source_index: ``[M]`` integers: the training-set row each pseudo-input was copied
            from (``-1``: none); :meth:`from_data` sets it. Not saved in ``state_dict`` (it is
            fixed at construction).
        leave_one_out: in training mode, a call with ``index`` (the ELBO passes the training
            rows) leaves out, for each row, the component whose ``source_index`` is that row,
            renormalising the rest, as the exemplar prior does: without it the ELBO of a
            training image that is also a pseudo-input can match the image's own component.

    Under torch.distributed (world size > 1) :meth:`update_coreset` is computed over all
    ranks' data: the latents are drawn on rank 0 and broadcast, each rank's batch
    log-likelihoods are summed across ranks (the batch scale is N over the global batch),
    so every rank applies the same step and the coreset stays identical everywhere. Every
    rank must call it, with its own share of the data (e.g. a loader with a
    ``DistributedSampler``) or the whole set as a tensor (each rank then takes its part of
    every shuffled batch).

    Example:
        >>> enc = lambda x: (x[..., :2], torch.zeros_like(x[..., :2]))
        >>> data = torch.rand(100, 5)
        >>> prior = PseudocoresetPrior.from_data(data, n_pseudo=10).bind(enc)
        >>> prior.log_prob(torch.zeros(3, 2)).shape
        torch.Size([3])
        >>> dec = lambda z: torch.distributions.Bernoulli(logits=z @ torch.ones(2, 5))
        >>> prior.update_coreset(dec, data, batch_size=20, n_samples=8, progress=False)
        >>> round(float(prior.weights.sum()), 3), bool((prior.weights >= 0).all())
        (100.0, True)

    References:
        Ai et al., "ByPE-VAE: Bayesian Pseudocoresets Exemplar VAE" (NeurIPS 2021);
        Manousakas et al., "Bayesian Pseudocoresets" (NeurIPS 2020).
    """

    def __init__(
        self,
        pseudo_inputs: Tensor,
        weights: Tensor | None = None,
        *,
        n_total: float | None = None,
        latent_dim: int | None = None,
        init_log_var: float = 0.0,
        lr_weights: float = 1e-2,
        lr_inputs: float = 1e-3,
        input_range: tuple[float, float] | None = None,
        backend: str = "auto",
        location: Location | None = None,
        process_group: Any = None,
        sync: bool = True,
        n_subsample: int | None = None,
        source_index: Tensor | None = None,
        leave_one_out: bool = False,
    ) -> None:
        super().__init__(latent_dim)
        u = _checks.floating(pseudo_inputs, "pseudo_inputs")
        if u.dim() < 1 or u.shape[0] == 0:
            raise VAEPriorsError(f"`pseudo_inputs` must have shape [M, *input_shape] with M >= 1, got {tuple(u.shape)}")
        if not bool(torch.isfinite(u).all()):
            raise VAEPriorsError("`pseudo_inputs` contains NaN or infinite values")
        m = u.shape[0]
        if weights is None:
            if n_total is None:
                raise VAEPriorsError("give `weights` or `n_total` (the training-set size N the weights sum to)")
            n = self._check_total(n_total)
            w = torch.full((m,), n / m, dtype=u.dtype, device=u.device)
        else:
            w = _checks.floating(weights, "weights")
            if w.shape != (m,):
                raise VAEPriorsError(f"`weights` must have shape [M] = [{m}], got {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise VAEPriorsError("`weights` must be finite and >= 0")
            total = float(w.double().sum())
            if n_total is None:
                n = self._check_total(total)
            else:
                n = self._check_total(n_total)
                if abs(total - n) > 1e-5 * n:
                    raise VAEPriorsError(f"`weights` must sum to `n_total` = {n}, got {total}")
            w = w.detach().to(u.dtype)
        self.input_range = self._check_range(input_range)
        if self.input_range is not None:
            lo, hi = self.input_range
            if bool((u < lo).any() | (u > hi).any()):
                raise VAEPriorsError(f"`pseudo_inputs` must lie in `input_range` = {self.input_range}")
        for name, lr in (("lr_weights", lr_weights), ("lr_inputs", lr_inputs)):
            if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
                raise VAEPriorsError(f"`{name}` must be a finite number > 0, got {lr!r}")
        self.lr_weights = float(lr_weights)
        self.lr_inputs = float(lr_inputs)
        self.backend = backend
        init_log_var = _checks.number(init_log_var, "init_log_var")
        self.log_var = nn.Parameter(torch.tensor(init_log_var, dtype=u.dtype, device=u.device))
        if location is not None and not callable(location):
            raise VAEPriorsError(f"`location` must be callable or None, got {type(location).__name__}")
        self.location = location
        self.process_group = process_group
        self.sync = bool(sync)
        self.n_subsample = None if n_subsample is None else _checks.positive_int(n_subsample, "n_subsample")
        self.leave_one_out = bool(leave_one_out)
        if self.leave_one_out and self.n_subsample == 1:
            raise VAEPriorsError("`n_subsample` must be at least 2 with `leave_one_out` (a row may draw its own component)")
        if source_index is None:
            src = torch.full((m,), -1, dtype=torch.long, device=u.device)
        else:
            src = _checks.tensor(source_index, "source_index")
            if src.shape != (m,) or src.is_floating_point() or src.dtype == torch.bool:
                raise VAEPriorsError(f"`source_index` must be an integer tensor [M] = [{m}], got {src.dtype} {tuple(src.shape)}")
            src = src.to(device=u.device, dtype=torch.long)
        self.register_state("source_index", src, persistent=False)
        u = u.detach().clone()
        # Prior state, not buffers: identical on every rank by construction of the update
        # (computed over all ranks' data), so DDP has nothing to broadcast.
        self.register_state("pseudo_inputs", u)
        self.register_state("weights", w.clone())
        # N, kept as a tensor so that it round-trips exactly (0-d; follows the module's dtype).
        self.register_state("weight_sum", torch.tensor(n, dtype=u.dtype, device=u.device))
        # Adam state of the coreset update: first and second moments and the step count.
        self.register_state("adam_step", torch.zeros((), dtype=torch.long, device=u.device))
        self.register_state("adam_m_weights", torch.zeros_like(w))
        self.register_state("adam_v_weights", torch.zeros_like(w))
        self.register_state("adam_m_inputs", torch.zeros_like(u))
        self.register_state("adam_v_inputs", torch.zeros_like(u))
        self._schedule: tuple | None = None

    # -- construction --------------------------------------------------------------------
    @staticmethod
    def _check_total(n: object) -> float:
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not (n > 0 and math.isfinite(n)):
            raise VAEPriorsError(f"`n_total` must be a finite number > 0, got {n!r}")
        return float(n)

    @staticmethod
    def _check_range(r: object) -> tuple[float, float] | None:
        if r is None:
            return None
        try:
            lo, hi = (float(v) for v in r)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise VAEPriorsError(f"`input_range` must be None or a pair (low, high), got {r!r}") from None
        if not lo < hi:
            raise VAEPriorsError(f"`input_range` must have low < high, got {(lo, hi)}")
        return lo, hi

    @classmethod
    def from_data(
        cls,
        data: Tensor,
        n_pseudo: int = 500,
        *,
        n_total: float | None = None,
        input_range: tuple[float, float] | None | str = "data",
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> "PseudocoresetPrior":
        r"""The paper's initialisation: ``n_pseudo`` distinct random rows of ``data``
        ``[N, *input_shape]`` as pseudo-inputs, each with weight N/M.

        Arguments:
            data: the training set (or the exemplars the update will fit).
            n_pseudo: M, at most ``len(data)``.
            n_total: N; default ``len(data)``.
            input_range: ``"data"`` (the default) keeps the pseudo-inputs within
                ``[data.min(), data.max()]``; a pair or ``None`` as for the constructor.
            generator: for a reproducible choice.
            kwargs: passed to the constructor.

        Example:
            >>> prior = PseudocoresetPrior.from_data(torch.rand(50, 4), n_pseudo=5)
            >>> prior.weights
            tensor([10., 10., 10., 10., 10.])
        """
        data = _checks.floating(data, "data")
        m = _checks.positive_int(n_pseudo, "n_pseudo")
        if data.dim() < 1 or m > data.shape[0]:
            size = data.shape[0] if data.dim() else 0
            raise VAEPriorsError(f"`n_pseudo` must be at most len(data) = {size}, got {m}")
        if isinstance(input_range, str):
            if input_range != "data":
                raise VAEPriorsError(f'`input_range` must be "data", None or a pair (low, high), got {input_range!r}')
            lo, hi = float(data.min()), float(data.max())
            input_range = (lo, hi) if lo < hi else None
        idx = torch.randperm(data.shape[0], generator=generator)[:m].to(data.device)
        n = data.shape[0] if n_total is None else n_total
        return cls(data[idx], n_total=n, input_range=input_range, source_index=idx, **kwargs)

    # -- state ---------------------------------------------------------------------------
    # The state holds tensors only (it saves anywhere, e.g. safetensors); the update's
    # settings (lr_*, input_range) are the constructor's, as for any module.
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Checked before anything is copied, so a refused state leaves the prior as it was.
        w = state_dict.get(prefix + "weights")
        if isinstance(w, Tensor):
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.double().sum()) > 0:
                raise VAEPriorsError("the loaded `weights` must be finite, >= 0 and have a positive sum")
            if w.shape != self.weights.shape:
                raise VAEPriorsError(
                    f"the state holds {w.shape[0] if w.dim() else 0} pseudo-inputs; this prior has {self.n_pseudo}"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def n_total(self) -> float:
        """N, the sum the weights keep (the training-set size)."""
        return float(self.weight_sum)

    @property
    def n_pseudo(self) -> int:
        """M, the number of pseudo-inputs."""
        return self.pseudo_inputs.shape[0]

    # -- the density -----------------------------------------------------------------------
    def log_weights(self) -> Tensor:
        r""":math:`\log(w_m / N)`, ``[M]``; ``-inf`` for zero weights."""
        return torch.log(self.weights / self.weight_sum)

    def components(self) -> tuple[Tensor, Tensor]:
        r"""``(means [M, d], log_var [])``: the encoder means at the pseudo-inputs (with
        gradients into the encoder) and the shared :math:`\log\sigma^2`."""
        return self.encode(self.pseudo_inputs).location(self.location), self.log_var

    def _log_prob(self, z: Tensor, index: Tensor | None) -> Tensor:
        k = self.n_subsample
        live = None if k is None or not self.training else (self.weights > 0).nonzero().squeeze(1)
        if live is not None and k < live.numel():
            idx = live[torch.randperm(live.numel(), device=live.device)[:k]]
            means = self.encode(self.pseudo_inputs[idx]).location(self.location)
            w = self.weights[idx]
        else:
            idx, w = None, self.weights
            means = self.components()[0]
        log_w = torch.log(w / w.sum())
        if not (self.training and self.leave_one_out and index is not None):
            return mixture_log_prob(z, means, self.log_var, log_w, backend=self.backend)
        src = self.source_index if idx is None else self.source_index[idx]
        own = _checks.index(index, z.shape[:-1], math.ceil(self.n_total), "index").to(z.device)
        match = own.unsqueeze(-1) == src  # [*batch, M']
        hit = match.any(-1)
        exclude = torch.where(hit, match.long().argmax(-1), torch.full_like(own, -1))
        lp = mixture_log_prob(z, means, self.log_var, log_w, exclude=exclude, backend=self.backend)
        # Renormalise over the components each row keeps: subtract log(1 - w_e / sum w).
        w_e = torch.where(hit, (w / w.sum())[exclude.clamp_min(0)], torch.zeros_like(lp))
        return lp - torch.log1p(-w_e.clamp(max=1 - 1e-12))

    def _rsample(self, shape: torch.Size) -> Tensor:
        count = shape.numel()
        u = self.pseudo_inputs
        if count == 0:
            d = self.latent_dim
            return torch.zeros(*shape, d, dtype=u.dtype, device=u.device)
        # Choose the components first, then encode only the chosen pseudo-inputs.
        j = torch.multinomial(self.weights, count, replacement=True)
        chosen, inverse = torch.unique(j, return_inverse=True)
        means = self.encode(u[chosen]).location(self.location)[inverse]
        eps = torch.randn_like(means)
        return (means + torch.exp(0.5 * self.log_var) * eps).reshape(*shape, means.shape[-1])

    def _example_input(self) -> Tensor:
        return self.pseudo_inputs[:1]

    # -- the coreset update --------------------------------------------------------------
    def coreset_gradients(
        self,
        decoder: Decoder,
        x: Tensor,
        z: Tensor,
        *,
        scale: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Stochastic gradients of :math:`\mathrm{KL}(p(z|U,w) \,\|\, p(z|X))` w.r.t. the
        weights and the pseudo-inputs, from latent samples ``z`` and a data batch ``x``.

        With :math:`f(x, z) = \log p_\theta(x|z)` the decoder's own likelihood and

        .. math:: r(z) = \tfrac{N}{B} \sum_{b} f(x_b, z) - \sum_m w_m f(u_m, z),

        .. math:: \nabla_{w_m} \mathrm{KL} = -\mathrm{Cov}_z[f(u_m, z), r(z)], \qquad
           \nabla_{u_m} \mathrm{KL} = -w_m\, \mathrm{Cov}_z[\nabla_u f(u_m, z), r(z)],

        the covariances taken over the S samples (unbiased, centred over samples). The
        pseudo-input gradient treats :math:`u_m` as the *data argument* of the decoder's
        likelihood (the pseudocoreset's potential); it is one backward pass of
        :math:`\sum_s c_s f(u_m, z_s)` with :math:`c_s = (r_s - \bar r)/(S-1)`. For a
        Bernoulli decoder :math:`\nabla_u f(u, z) = l(z)`, the logits. No gradient reaches
        the decoder, the encoder or the prior's own parameters.

        These are the exact gradients of the KL between the pseudocoreset posterior
        :math:`\propto \exp(\sum_m w_m f(u_m, z))\, p_0(z)` and the data posterior when
        ``z`` is drawn from the former; :meth:`update_coreset` draws from the mixture
        prior by default, as the paper does.

        Arguments:
            decoder: ``z [S, d] ->`` a Distribution over ``[S, *input_shape]``.
            x: a data batch ``[B, *input_shape]``.
            z: latent samples ``[S, d]``, ``S >= 2``.
            scale: the factor on the batch sum; default ``N / B`` (B over all ranks under
                torch.distributed, where the batch sum is summed across ranks too).

        Returns:
            ``(grad_weights [M], grad_inputs [M, *input_shape])``, in float64 and the
            pseudo-inputs' dtype respectively.
        """
        u = self.pseudo_inputs
        comm = dist.comm(self.process_group, enabled=self.sync)
        x = self._check_batch(x, allow_empty=comm is not None)  # a rank may hold none of a last batch
        z = _checks.latent(z, self.latent_dim, "z")
        if z.dim() != 2 or z.shape[0] < 2:
            raise VAEPriorsError(f"`z` must have shape [S, d] with S >= 2 samples, got {tuple(z.shape)}")
        batch = x.shape[0]
        if comm is not None:
            what = "PseudocoresetPrior.coreset_gradients: summing the batch over ranks"
            batch = int(dist.all_reduce_sum(torch.tensor([float(batch)], dtype=torch.float64, device=u.device), comm, what))
        scale = self.n_total / batch if scale is None else float(scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise VAEPriorsError(f"`scale` must be a finite number > 0, got {scale}")
        with torch.no_grad():
            out = user_call(decoder, z.to(u.dtype), "decoder", "PseudocoresetPrior.coreset_gradients", "z")
            fx = pairwise_log_likelihood(out, x).double().sum(0)  # [S]
            if comm is not None:
                fx = dist.all_reduce_sum(fx, comm, "PseudocoresetPrior.coreset_gradients: summing the data term")
        with torch.enable_grad():
            uu = u.detach().requires_grad_(True)
            fu = pairwise_log_likelihood(out, uu)  # [M, S]
        w = self.weights.double()
        fu64 = fu.detach().double()
        if not bool(torch.isfinite(fx).all() & torch.isfinite(fu64).all()):
            raise VAEPriorsError(
                "the decoder's log-likelihood of the data or of the pseudo-inputs is not finite; "
                "check the decoder's output (e.g. probabilities of exactly 0 or 1) and `input_range`"
            )
        r = scale * fx - w @ fu64  # [S]
        c = (r - r.mean()) / (r.shape[0] - 1)
        grad_w = -(fu64 @ c)
        (g,) = torch.autograd.grad(fu, uu, grad_outputs=c.to(fu.dtype).expand_as(fu))
        grad_u = -self.weights.reshape(-1, *[1] * (u.dim() - 1)) * g
        return grad_w, grad_u

    @torch.no_grad()
    def apply_gradients(self, grad_weights: Tensor, grad_inputs: Tensor) -> None:
        r"""One Adam step (:class:`torch.optim.Adam`) on the weights and pseudo-inputs, then
        the projections.

        The moments and step count are this prior's state (``adam_*``: they follow ``.to()``
        and round-trip through ``state_dict``); the step count advances at every call (bias
        correction uses it; the weights' step is ``lr_weights * N / M``); the weights are
        then projected onto :math:`\{w \ge 0, \sum w = N\}` (:func:`project_simplex`) and
        the pseudo-inputs clamped to ``input_range``. Non-finite gradients are refused, so
        the state can never become NaN.

        Arguments:
            grad_weights: ``[M]``.
            grad_inputs: ``[M, *input_shape]``.
        """
        u, w = self.pseudo_inputs, self.weights
        gw = _checks.floating(grad_weights, "grad_weights")
        gu = _checks.floating(grad_inputs, "grad_inputs")
        if gw.shape != w.shape or gu.shape != u.shape:
            raise VAEPriorsError(
                f"`grad_weights` and `grad_inputs` must have shapes {tuple(w.shape)} and {tuple(u.shape)}, "
                f"got {tuple(gw.shape)} and {tuple(gu.shape)}"
            )
        if not bool(torch.isfinite(gw).all() & torch.isfinite(gu).all()):
            raise VAEPriorsError(
                "`grad_weights` and `grad_inputs` must be finite (check the decoder's log-likelihood)"
            )
        lr_w = self.lr_weights * self.n_total / self.n_pseudo
        groups, state = [], {}
        for p, g, m, v, lr in (
            (w, gw, self.adam_m_weights, self.adam_v_weights, lr_w),
            (u, gu, self.adam_m_inputs, self.adam_v_inputs, self.lr_inputs),
        ):
            # Bound |g| so that g^2 cannot overflow the moments (1e18 in float32: far
            # above real KL gradients, ~N * pixels); keeps the state finite whatever g.
            limit = min(math.sqrt(torch.finfo(m.dtype).max) / 4, torch.finfo(g.dtype).max)
            p.grad = g.clamp(-limit, limit).to(m.dtype)
            groups.append({"params": [p], "lr": lr})
            # The moments live in this prior's state (they follow .to() and state_dict);
            # torch.optim.Adam updates them in place.
            state[p] = {"step": self.adam_step.to(torch.float32).clone(), "exp_avg": m, "exp_avg_sq": v}
        opt = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8, foreach=False)
        opt.state.update(state)
        opt.step()
        w.grad = u.grad = None
        self.adam_step += 1
        w.copy_(project_simplex(w, self.n_total))
        if self.input_range is not None:
            u.clamp_(*self.input_range)

    def reset_optimizer(self) -> None:
        """Zeroes the update's Adam moments and step count."""
        for b in (self.adam_step, self.adam_m_weights, self.adam_v_weights, self.adam_m_inputs, self.adam_v_inputs):
            b.zero_()

    def update_coreset(
        self,
        decoder: Decoder,
        data: Tensor | Iterable,
        *,
        n_steps: int | None = None,
        batch_size: int = 100,
        n_samples: int = 100,
        sampler: Callable[[int], Tensor] | None = None,
        progress: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        r"""Fits the pseudo-inputs and weights to the data with the VAE fixed.

        Each step draws ``n_samples`` latents from the prior (or ``sampler``), takes one
        minibatch, computes :meth:`coreset_gradients` (the batch sum scaled by N/B) and
        applies :meth:`apply_gradients`. By default it runs one pass over the data, with a
        progress bar. No gradient reaches the VAE's parameters; put a VAE with dropout or
        batch norm in ``eval()`` mode first, as the decoder (and, through :meth:`sample`,
        the encoder) is called as it is.

        Arguments:
            decoder: ``z [S, d] ->`` a Distribution over ``[S, *input_shape]`` (the VAE's
                decoder); Bernoulli, continuous Bernoulli and Normal are matrix products.
            data: the N training points ``[N, *input_shape]`` (shuffled into minibatches of
                ``batch_size``), or an iterable of batches (e.g. a DataLoader) yielding
                tensors or tuples whose first element is x. Each batch is scaled by N/B
                with the prior's N.
            n_steps: steps to take (cycling over the data); default one pass.
            batch_size: minibatch size when ``data`` is a tensor.
            n_samples: S, latent samples per step (at least 2).
            sampler: ``S -> [S, d]`` latents to use instead of :meth:`sample`. The default,
                the mixture prior itself, is the paper's choice; the estimators are exact
                gradients of the KL for samples from the pseudocoreset posterior (see
                :meth:`coreset_gradients`), which a sampler (e.g. MCMC) can provide.
            progress: show a tqdm progress bar.
            generator: shuffles a tensor ``data`` reproducibly.

        Example:
            In a training loop, every 10 epochs::

                for epoch in range(n_epochs):
                    for x, idx in loader:
                        loss = elbo(x).loss; opt.zero_grad(); loss.backward(); opt.step()
                    if (epoch + 1) % 10 == 0:
                        prior.update_coreset(decoder, train_x)
        """
        steps, batches = self._plan(data, n_steps, batch_size, generator)
        s = _checks.positive_int(n_samples, "n_samples")
        if s < 2:
            raise VAEPriorsError(f"`n_samples` must be at least 2 (covariances over samples), got {s}")
        if sampler is not None and not callable(sampler):
            raise VAEPriorsError(f"`sampler` must be callable or None, got {type(sampler).__name__}")
        draw = sampler if sampler is not None else (lambda k: self.sample((k,)))
        comm = dist.comm(self.process_group, enabled=self.sync)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="coreset update", leave=False)
        try:
            for x in itertools.islice(batches, steps):
                with torch.no_grad():
                    z = draw(s)
                    if comm is not None:  # every rank steps with rank 0's latents
                        z = dist.broadcast(z.contiguous(), comm, "PseudocoresetPrior.update_coreset: sharing the latents")
                gw, gu = self.coreset_gradients(decoder, x, z)
                self.apply_gradients(gw, gu)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def _check_batch(self, x: object, allow_empty: bool = False) -> Tensor:
        u = self.pseudo_inputs
        x = _checks.tensor(x, "x")
        if x.dim() != u.dim() or x.shape[1:] != u.shape[1:] or (x.shape[0] == 0 and not allow_empty):
            raise VAEPriorsError(
                f"data batches must have shape [B, *input_shape] = [B, {', '.join(map(str, u.shape[1:]))}] "
                f"with B >= 1 (the pseudo-inputs' input shape), got {tuple(x.shape)}"
            )
        x = x.to(device=u.device, dtype=u.dtype)
        return _checks.finite(x, "x")

    def _plan(
        self, data: object, n_steps: int | None, batch_size: int, generator: torch.Generator | None
    ) -> tuple[int, Iterator[Tensor]]:
        """Number of steps and an endless iterator over data batches."""
        if n_steps is not None:
            n_steps = _checks.positive_int(n_steps, "n_steps")
        if isinstance(data, Tensor):
            bs = _checks.positive_int(batch_size, "batch_size")
            self._check_batch(data[:1] if data.dim() else data)  # shape; values: batch by batch
            if abs(data.shape[0] - self.n_total) > 1e-6 * self.n_total:
                raise VAEPriorsError(
                    f"`data` has {data.shape[0]} points but the prior's weights sum to N = {self.n_total}"
                )
            n = data.shape[0]
            comm = dist.comm(self.process_group, enabled=self.sync)
            rank, ranks = (0, 1) if comm is None else (comm.rank, comm.world_size)
            # Under torch.distributed one shuffle (rank 0's) for all; a global batch is ranks x bs
            # rows, this rank's part the r-th block of bs.
            per_pass = math.ceil(n / (bs * ranks))

            def batches() -> Iterator[Tensor]:
                while True:
                    perm = torch.randperm(n, generator=generator)
                    if comm is not None:
                        perm = dist.broadcast(perm, comm, "PseudocoresetPrior.update_coreset: sharing the shuffle")
                    perm = perm.to(data.device)
                    for i in range(0, n, bs * ranks):
                        part = perm[i + rank * bs : min(i + (rank + 1) * bs, i + bs * ranks)]
                        yield data[part]

            return (n_steps or per_pass), batches()
        if not isinstance(data, Iterable):
            raise VAEPriorsError(f"`data` must be a tensor or an iterable of batches, got {type(data).__name__}")
        size = getattr(getattr(data, "dataset", None), "__len__", None)
        if size is not None and abs(size() - self.n_total) > 1e-6 * self.n_total:
            raise VAEPriorsError(f"`data` holds {size()} points but the prior's weights sum to N = {self.n_total}")
        if n_steps is None:
            try:
                n_steps = len(data)  # type: ignore[arg-type]
            except TypeError:
                raise VAEPriorsError("`n_steps` is required when `data` is an iterable without len()") from None
            if n_steps == 0:
                raise VAEPriorsError("`data` yields no batches")

        def loader() -> Iterator[Tensor]:
            while True:
                empty = True
                for batch in data:  # type: ignore[union-attr]
                    empty = False
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    yield self._check_batch(x)
                if empty:
                    raise VAEPriorsError("`data` yields no batches")

        return n_steps, loader()

    # -- the schedule ----------------------------------------------------------------------
    def schedule_updates(
        self, decoder: Decoder, data: Tensor | Iterable, *, every: int = 10, **kwargs: Any
    ) -> "PseudocoresetPrior":
        r"""Registers the decoder and data so that :meth:`on_epoch_end` runs
        :meth:`update_coreset` every ``every`` epochs; returns ``self``.

        The update runs at the end of epoch ``epoch`` (counted from 0) when
        ``(epoch + 1) % every == 0``: after the 10th, 20th, ... epoch for ``every=10``.
        The decoder is held by reference, not as a submodule (it stays out of the prior's
        ``state_dict``). ``kwargs`` go to :meth:`update_coreset`.

        Example:
            >>> enc = lambda x: (x[..., :2], torch.zeros_like(x[..., :2]))
            >>> dec = lambda z: torch.distributions.Bernoulli(logits=z @ torch.ones(2, 5))
            >>> data = torch.rand(40, 5)
            >>> prior = PseudocoresetPrior.from_data(data, n_pseudo=4).bind(enc)
            >>> _ = prior.schedule_updates(dec, data, every=2, n_samples=4, progress=False)
            >>> for epoch in range(4):
            ...     prior.on_epoch_end(epoch)  # ExemplarELBO.on_epoch_end forwards here
            >>> int(prior.adam_step)  # two updates of one pass (one batch of 100 > 40) each
            2
        """
        if not callable(decoder):
            raise VAEPriorsError(f"`decoder` must be callable, got {type(decoder).__name__}")
        every = _checks.positive_int(every, "every")
        allowed = {"n_steps", "batch_size", "n_samples", "sampler", "progress", "generator"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise VAEPriorsError(f"unknown update_coreset arguments {sorted(unknown)}; allowed: {sorted(allowed)}")
        self._plan(data, kwargs.get("n_steps"), kwargs.get("batch_size", 100), None)  # checks data now
        self._schedule = (decoder, data, every, dict(kwargs))
        return self

    def on_epoch_end(self, epoch: int) -> None:
        """Runs the scheduled coreset update when ``(epoch + 1) % every == 0`` (see
        :meth:`schedule_updates`); does nothing if none is scheduled."""
        if self._schedule is None:
            return
        decoder, data, every, kwargs = self._schedule
        if (int(epoch) + 1) % every == 0:
            self.update_coreset(decoder, data, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"n_pseudo={self.n_pseudo}, input_shape={tuple(self.pseudo_inputs.shape[1:])}, "
            f"n_total={self.n_total:g}, input_range={self.input_range}"
            + (f", n_subsample={self.n_subsample}" if self.n_subsample is not None else "")
        )
