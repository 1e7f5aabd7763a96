r"""How much a model memorises its training set: the optimal decoder's weights and the distance to it."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution

from .. import _checks
from ..engine import LogSumExp, mixture_logsumexp
from ..errors import VAEPriorsError
from ._common import _LOG_2PI, _budget, _data_tensor, _device_of, _evaluating, _Parts, _parts

__all__ = ["Novelty", "NoveltyReport", "novelty_diagnostics", "novelty_report", "novelty_weights"]


class Novelty(NamedTuple):
    r"""Per-query novelty diagnostics, what :func:`novelty_diagnostics` returns.

    With :math:`w_i(z) = q(z|x_i) / \sum_j q(z|x_j)` over the N training points:

    Attributes:
        perplexity: :math:`\exp H(w)`, ``[Q]``: the effective number of training points the
            optimal decoder averages (1: one point, memorised; N: all alike).
        max_weight: :math:`\max_i w_i(z)`, ``[Q]``.
        nearest: the index of the heaviest training point, ``[Q]``.
        weighted_average: :math:`\sum_i w_i(z)\, x_i`, the optimal decoder's mean output,
            ``[Q, *x_shape]`` float64.
        decoder_mean: the model decoder's mean output at z, ``[Q, *x_shape]`` float64.
        distance: the Euclidean distance between the two, ``[Q]`` float64.
    """

    perplexity: Tensor
    max_weight: Tensor
    nearest: Tensor
    weighted_average: Tensor
    decoder_mean: Tensor
    distance: Tensor


class NoveltyReport(NamedTuple):
    r"""What :func:`novelty_report` returns: :class:`Novelty` per query and its summary.

    Attributes:
        novelty: the per-query :class:`Novelty`.
        source: where the latents came from: ``"prior"``, ``"posterior"`` (one draw from
            q(z|x) per test point) or ``"given"``.
        perplexity_mean, perplexity_median: of the weight perplexity.
        max_weight_mean: mean of the largest weight.
        distance_mean, distance_median: of the decoder-to-weighted-average distance.
    """

    novelty: Novelty
    source: str
    perplexity_mean: float
    perplexity_median: float
    max_weight_mean: float
    distance_mean: float
    distance_median: float


def _queries(z: object, d: int) -> Tensor:
    z = _checks.floating(z, "z")
    if z.dim() != 2 or z.shape[-1] != d:
        raise VAEPriorsError(f"`z` must have shape [Q, d] with d = {d} (the encoder's latent size), got {tuple(z.shape)}")
    return _checks.finite(z, "z")


def _log_normal(z: Tensor, means: Tensor, log_var: Tensor) -> Tensor:
    r"""log N(z_q; mu_i, diag(exp(log_var_i))), ``[Q, Nc]``, by the expansion (call in float64)."""
    c = means.mean(0)
    z, means = z - c, means - c  # centring keeps the expansion's cancellation small
    inv = torch.exp(-log_var)
    d2 = (z * z) @ inv.T - 2 * z @ (means * inv).T + (means * means * inv).sum(-1)
    return -0.5 * (d2.clamp_min(0) + log_var.sum(-1) + z.shape[-1] * _LOG_2PI)


class _Pass(NamedTuple):
    entropy: Tensor  # [Q]
    max_weight: Tensor  # [Q]
    nearest: Tensor  # [Q]
    average: Tensor | None  # [Q, D]
    top_w: Tensor | None  # [Q, k]
    top_i: Tensor | None  # [Q, k]


def _novelty_pass(z: Tensor, post: "_TrainPosteriors", x: Tensor | None, top: int | None, budget: int) -> _Pass:
    r"""Weights of each query over the training set, in chunks, everything float64.

    The normaliser :math:`\log \sum_j q(z|x_j)` comes first from the engine (exact over every
    point), so each chunk's weights :math:`\exp(\log q - \log Z) \le 1` need no running max;
    weighted sums are then renormalised by the accumulated total weight, which makes the
    average an exact convex combination whatever rounding the normaliser carries.
    """
    n, d = post.n, post.d
    dim = 0 if x is None else x[0].numel()
    q = z.shape[0]
    q_chunk = max(1, budget // (8 * (4 * n + 2 * dim + 2 * (top or 0))))
    out: list[_Pass] = []
    for q0 in range(0, q, q_chunk):
        zc = z[q0 : q0 + q_chunk]
        qc = zc.shape[0]
        log_z = post.normaliser(zc)
        n_chunk = post.block_size(budget, qc, dim)
        wsum = torch.zeros(qc, dtype=torch.float64, device=z.device)
        wlogw = torch.zeros_like(wsum)
        best = torch.full_like(wsum, -1.0)
        nearest = torch.zeros(qc, dtype=torch.long, device=z.device)
        avg = None if x is None else torch.zeros(qc, dim, dtype=torch.float64, device=z.device)
        top_w = top_i = None
        for n0 in range(0, n, n_chunk):
            n1 = min(n, n0 + n_chunk)
            log_w = post.block(zc, n0, n1) - log_z[:, None]
            w = torch.exp(log_w)
            wsum += w.sum(1)
            wlogw += torch.where(w > 0, w * log_w, 0.0).sum(1)
            cmax, carg = w.max(1)
            better = cmax > best
            best = torch.where(better, cmax, best)
            nearest = torch.where(better, carg + n0, nearest)
            if avg is not None:
                avg += w @ x[n0:n1].reshape(n1 - n0, dim).to(device=z.device, dtype=torch.float64)
            if top is not None:
                kk = min(top, n1 - n0)
                cw, ci = w.topk(kk, dim=1)
                ci = ci + n0
                if top_w is not None:
                    cw, ci = torch.cat([top_w, cw], 1), torch.cat([top_i, ci], 1)
                    cw, order = cw.topk(min(top, cw.shape[1]), dim=1)
                    ci = ci.gather(1, order)
                top_w, top_i = cw, ci
        # Renormalise by the total weight W: H(w/W) = -sum(w log w)/W + log W.
        entropy = -wlogw / wsum + wsum.log()
        out.append(
            _Pass(
                entropy,
                best / wsum,
                nearest,
                None if avg is None else avg / wsum[:, None],
                None if top_w is None else top_w / wsum[:, None],
                top_i,
            )
        )
    cat = lambda field: None if getattr(out[0], field) is None else torch.cat([getattr(o, field) for o in out])  # noqa: E731
    return _Pass(*(cat(f) for f in _Pass._fields))


class _TrainPosteriors:
    """log q(z | x_j) of queries against the training points' posteriors, in blocks of
    training points, float64. Gaussian posteriors are kept as their means and log-variances
    (the normaliser is then one engine call); other families are re-encoded block by block
    and evaluated with their own ``log_prob``."""

    def __init__(self, parts: _Parts, train_x: Tensor, batch_size: int, dev: torch.device | None) -> None:
        self.parts, self.x, self.batch_size, self.dev = parts, train_x, batch_size, dev
        self.n = train_x.shape[0]
        means, log_vars, gaussian = [], [], True
        for i in range(0, self.n, batch_size):
            xb = train_x[i : i + batch_size]
            q = parts.encode(xb.to(dev) if dev is not None else xb)
            if len(q.shape) != 2:
                raise VAEPriorsError(f"`model` encoder must return posteriors over [B, d], got {tuple(q.shape)}")
            gaussian = gaussian and q.is_gaussian
            if not gaussian:
                break
            means.append(_checks.finite(q.mean, "encoder mean").double())
            log_vars.append(_checks.finite(q.log_var, "encoder log_var").double())
        self.d = q.shape[-1]
        self.gaussian = gaussian
        self.means = torch.cat(means) if gaussian else None
        self.log_var = torch.cat(log_vars) if gaussian else None
        probe = q.mean if q.is_gaussian else q.rsample(1)[0].detach()
        self.device, self.dtype = probe.device, probe.dtype

    def block_size(self, budget: int, qc: int, dim: int) -> int:
        if self.gaussian:
            return max(1, budget // (8 * (4 * qc + 2 * dim + self.d)))
        return self.batch_size

    def block(self, z: Tensor, n0: int, n1: int) -> Tensor:
        """``[Q, n1 - n0]``."""
        if self.gaussian:
            return _log_normal(z, self.means[n0:n1], self.log_var[n0:n1])
        xb = self.x[n0:n1]
        q = self.parts.encode(xb.to(self.dev) if self.dev is not None else xb)
        zz = z[:, None, :].expand(z.shape[0], n1 - n0, self.d).to(self.dtype)
        return q.log_prob(zz).double()

    def normaliser(self, z: Tensor) -> Tensor:
        r""":math:`\log \sum_j q(z|x_j)`, ``[Q]``, exact over every training point."""
        if self.gaussian:
            return mixture_logsumexp(z, self.means, self.log_var).log()
        parts = []
        for n0 in range(0, self.n, self.batch_size):
            lp = self.block(z, n0, min(self.n, n0 + self.batch_size))
            parts.append(LogSumExp.reduce(lp, torch.ones_like(lp), 1))
        return LogSumExp.combine(parts).log()


def novelty_weights(
    model: Any,
    z: Tensor,
    train_x: Tensor,
    *,
    k: int | None = None,
    batch_size: int = 256,
    memory_budget: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The optimal decoder's weights of the training points at latents z, largest first.

    .. math:: w_i(z) = \frac{q(z \mid x_i)}{\sum_{j=1}^N q(z \mid x_j)}

    with each :math:`q(z|x_i)` the encoder's Gaussian at training point :math:`x_i` (its own
    mean and diagonal variance). The normaliser is the engine's exact mixture log-sum-exp;
    the weights are computed in float64 in chunks of training points, so memory is
    O((Q + N) d + Q k) for the top ``k`` (O(Q N) with ``k=None``: every weight).

    Arguments:
        model: an :class:`~vaepriors.ExemplarELBO`, a triple ``(encoder, decoder, prior)``,
            or an encoder alone.
        z: latents ``[Q, d]``.
        train_x: the training inputs ``[N, ...]``.
        k: keep the k largest weights per query (``None``: all N).
        batch_size: training points encoded at once.
        memory_budget: bytes of temporaries one chunk may use (default as in
            :func:`log_likelihood`).
        device: where to compute (default: the model's device, else the data's).

    Returns:
        ``(weights, index)``, each ``[Q, k]`` (``[Q, N]`` for ``k=None``), sorted by
        decreasing weight; ``weights`` is float64 and the full set sums to 1 per query.

    Example:
        >>> encoder = lambda x: (x, torch.zeros_like(x))
        >>> w, i = novelty_weights(encoder, torch.zeros(1, 2), torch.randn(50, 2), k=3)
        >>> w.shape, i.shape
        (torch.Size([1, 3]), torch.Size([1, 3]))

    References:
        Bozkurt et al., "Can VAEs Generate Novel Examples?" (2018), eq. 1;
        Shu et al., "Amortized Inference Regularization" (NeurIPS 2018), theorem 1.
    """
    train_x = _data_tensor(train_x, "train_x")
    n = train_x.shape[0]
    if k is not None:
        k = _checks.positive_int(k, "k")
        if k > n:
            raise VAEPriorsError(f"`k` must be at most the number of training points {n}, got {k}")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    parts = _parts(model)
    dev = _device_of(parts.roots, device)
    budget = _budget(memory_budget, dev)
    with _evaluating(parts.roots):
        post = _TrainPosteriors(parts, train_x, batch_size, dev)
        zq = _queries(z, post.d).to(device=post.device, dtype=torch.float64)
        res = _novelty_pass(zq, post, None, n if k is None else k, budget)
    return res.top_w, res.top_i


def _decoder_mean_fn(parts: _Parts, decoder_mean: Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor]:
    if decoder_mean is not None:
        if not callable(decoder_mean):
            raise VAEPriorsError(f"`decoder_mean` must be callable, got {type(decoder_mean).__name__}")
        return decoder_mean
    if parts.decoder is None:
        raise VAEPriorsError(
            "`model` has no decoder: pass an ExemplarELBO or (encoder, decoder, prior), or give `decoder_mean`"
        )

    def mean_of(z: Tensor) -> Tensor:
        out = parts.decoder(z)
        if not isinstance(out, Distribution):
            raise VAEPriorsError(
                "`model` decoder must return a torch Distribution (its mean is the output compared with the "
                f"weighted average); got {type(out).__name__}: pass `decoder_mean=` instead"
            )
        return out.mean

    return mean_of


def novelty_diagnostics(
    model: Any,
    z: Tensor,
    train_x: Tensor,
    *,
    decoder_mean: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 256,
    memory_budget: int | None = None,
    device: torch.device | str | None = None,
) -> Novelty:
    r"""How close a decoder is to the optimal, memorising one at latents z.

    For a fixed encoder, an infinitely flexible decoder whose likelihood is an exponential
    family with sufficient statistic x (Bernoulli, Gaussian mean) outputs the weighted
    average :math:`\sum_i w_i(z)\, x_i` of the training inputs, with
    :math:`w_i(z) = q(z|x_i) / \sum_j q(z|x_j)`. This returns, per latent: the perplexity
    :math:`\exp H(w)` of the weights (1 means one training point is copied), the largest
    weight and its training point, the weighted average, the model decoder's mean output and
    the Euclidean distance between the two. Memory is bounded over the training set (chunks
    of training points, float64, the normaliser from the exact engine reduction).

    Arguments:
        model: an :class:`~vaepriors.ExemplarELBO` or a triple ``(encoder, decoder, prior)``;
            its decoder must return a Distribution with a ``mean`` (or give ``decoder_mean``).
        z: latents ``[Q, d]`` (e.g. prior samples, or draws from q of test points).
        train_x: the training inputs ``[N, ...]``.
        decoder_mean: ``z [Q, d] -> [Q, *x_shape]``, the decoder's output to compare
            (default: ``model.decoder(z).mean``).
        batch_size: training points encoded at once.
        memory_budget: bytes of temporaries one chunk may use (default as in
            :func:`log_likelihood`).
        device: where to compute (default: the model's device, else the data's).

    Returns:
        A :class:`Novelty` of per-query tensors.

    Example:
        >>> encoder = lambda x: (x[:, :2], torch.zeros(len(x), 2))
        >>> decoder = lambda z: torch.distributions.Normal(z.repeat(1, 2), 1.0)
        >>> out = novelty_diagnostics((encoder, decoder, None), torch.zeros(5, 2), torch.randn(30, 4))
        >>> out.weighted_average.shape, out.perplexity.shape
        (torch.Size([5, 4]), torch.Size([5]))

    References:
        Bozkurt et al., "Can VAEs Generate Novel Examples?" (2018);
        Shu et al., "Amortized Inference Regularization" (NeurIPS 2018), theorem 1.
    """
    train_x = _data_tensor(train_x, "train_x")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    parts = _parts(model)
    mean_fn = _decoder_mean_fn(parts, decoder_mean)
    dev = _device_of(parts.roots, device)
    budget = _budget(memory_budget, dev)
    with _evaluating(parts.roots):
        post = _TrainPosteriors(parts, train_x, batch_size, dev)
        zq = _queries(z, post.d).to(post.device)
        res = _novelty_pass(zq.double(), post, train_x, None, budget)
        x_shape = train_x.shape[1:]
        outs = []
        for i in range(0, zq.shape[0], batch_size):
            zb = zq[i : i + batch_size].to(z.dtype)
            outs.append(mean_fn(zb).double().reshape(zb.shape[0], -1))
        dec = torch.cat(outs)
    if dec.shape[1] != x_shape.numel():
        raise VAEPriorsError(
            f"the decoder mean has {dec.shape[1]} entries per point, the training inputs {x_shape.numel()}"
        )
    distance = (dec - res.average).norm(dim=1)
    return Novelty(
        torch.exp(res.entropy),
        res.max_weight,
        res.nearest,
        res.average.reshape(-1, *x_shape),
        dec.reshape(-1, *x_shape),
        distance,
    )


def novelty_report(
    model: Any,
    train_x: Tensor,
    *,
    test_x: Tensor | None = None,
    z: Tensor | None = None,
    n_samples: int = 1000,
    generator: torch.Generator | None = None,
    decoder_mean: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 256,
    memory_budget: int | None = None,
    device: torch.device | str | None = None,
) -> NoveltyReport:
    r"""Novelty diagnostics summarised over a set of latents.

    The latents are, in order of precedence: ``z`` as given; one draw from q(z|x) per test
    point of ``test_x`` (how the model reconstructs unseen data); or ``n_samples`` draws
    from the model's prior (how novel its samples are). See :func:`novelty_diagnostics`.

    Arguments:
        model: an :class:`~vaepriors.ExemplarELBO` or a triple ``(encoder, decoder, prior)``.
        train_x: the training inputs ``[N, ...]``.
        test_x: test inputs ``[M, ...]`` (latents drawn from their posteriors).
        z: latents ``[Q, d]``.
        n_samples: prior draws when neither ``z`` nor ``test_x`` is given.
        generator: a :class:`torch.Generator` for the posterior draws.
        decoder_mean, batch_size, memory_budget, device: as in :func:`novelty_diagnostics`.

    Returns:
        A :class:`NoveltyReport`.

    Example:
        >>> from vaepriors import GaussianPrior
        >>> encoder = lambda x: (x[:, :2], torch.zeros(len(x), 2))
        >>> decoder = lambda z: torch.distributions.Normal(z.repeat(1, 2), 1.0)
        >>> r = novelty_report((encoder, decoder, GaussianPrior(2)), torch.randn(30, 4), n_samples=10)
        >>> r.source, r.novelty.distance.shape
        ('prior', torch.Size([10]))

    References:
        Bozkurt et al., "Can VAEs Generate Novel Examples?" (2018).
    """
    parts = _parts(model)
    dev = _device_of(parts.roots, device)
    batch_size = _checks.positive_int(batch_size, "batch_size")
    if z is not None:
        source = "given"
    elif test_x is not None:
        test_x = _data_tensor(test_x, "test_x")
        source = "posterior"
        with _evaluating(parts.roots):
            draws = []
            for i in range(0, test_x.shape[0], batch_size):
                xb = test_x[i : i + batch_size]
                q = parts.encode(xb.to(dev) if dev is not None else xb)
                if q.is_gaussian:
                    eps = torch.randn(q.mean.shape, dtype=q.mean.dtype, device=q.mean.device, generator=generator)
                    draws.append(q.mean + torch.exp(0.5 * q.log_var) * eps)
                else:  # torch.distributions draw from torch's global generator
                    draws.append(q.distribution.sample())
            z = torch.cat(draws)
    else:
        source = "prior"
        n_samples = _checks.positive_int(n_samples, "n_samples")
        if parts.prior is None or not hasattr(parts.prior, "sample"):
            raise VAEPriorsError("`model` has no prior to sample latents from: give `z` or `test_x`")
        with _evaluating(parts.roots):
            z = parts.prior.sample((n_samples,))
    nov = novelty_diagnostics(
        model, z, train_x, decoder_mean=decoder_mean, batch_size=batch_size, memory_budget=memory_budget, device=dev
    )
    return NoveltyReport(
        nov,
        source,
        float(nov.perplexity.mean()),
        float(nov.perplexity.median()),
        float(nov.max_weight.mean()),
        float(nov.distance.mean()),
        float(nov.distance.median()),
    )
