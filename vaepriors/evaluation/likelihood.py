r"""The importance-weighted log-likelihood and bits per dimension."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import _checks
from .. import distributed as dist
from ..encoder import Posterior, read_posterior
from ..engine import LogSumExp
from ..errors import VAEPriorsError
from ._common import (
    _LOG_2PI,
    _batches,
    _budget,
    _device_of,
    _elbo_model,
    _eval_comm,
    _evaluating,
    _my_rows,
    _Parts,
    _parts,
)

__all__ = ["LogLikelihood", "bits_per_dim", "log_likelihood"]


class LogLikelihood(NamedTuple):
    r"""What :func:`log_likelihood` returns.

    Attributes:
        values: the per-point estimates of :math:`\log p(x)`, ``[N]``, float64, in data order.
        mean: their mean (nats).
        std_error: the standard error of the mean over data points (``nan`` for one point).
        bits_per_dim: :math:`-\text{mean} / (D \log 2)`, with D the number of entries of one x.
        n_samples: the number of importance samples S per point.
        n_dims: D.
    """

    values: Tensor
    mean: float
    std_error: float
    bits_per_dim: float
    n_samples: int
    n_dims: int


def bits_per_dim(log_px: Tensor | float, n_dims: int) -> Tensor | float:
    r"""Converts log-likelihoods in nats to bits per dimension, :math:`-\log p(x) / (D \log 2)`.

    For discrete data modelled by a density on a rescaled range (e.g. 8-bit images mapped to
    [0, 1] and dequantised), add the change of variables yourself first
    (:math:`\log p(x) - D \log 256`).

    Arguments:
        log_px: log-likelihood(s) in nats, a float or a tensor of any shape.
        n_dims: D, the number of entries of one data point.

    Returns:
        Bits per dimension, same type and shape as ``log_px``.

    Example:
        >>> bits_per_dim(-784 * math.log(2), 784)
        1.0
    """
    n = _checks.positive_int(n_dims, "n_dims")
    if isinstance(log_px, Tensor):
        _checks.floating(log_px, "log_px")
        if _checks.validation_enabled() and bool(torch.isnan(log_px).any()):
            raise VAEPriorsError("`log_px` contains NaN")
    else:
        log_px = _checks.number(log_px, "log_px", finite=False)
        if math.isnan(log_px):
            raise VAEPriorsError("`log_px` is NaN")
    return -log_px / (n * math.log(2))


def _plan(n_samples: int, row_bytes: int, budget: int) -> tuple[int, int]:
    """(samples per chunk, points per chunk) so that one chunk's rows fit the budget."""
    rows = max(1, budget // max(1, row_bytes))
    if rows <= n_samples:
        return rows, 1
    return n_samples, rows // n_samples


def log_likelihood(
    model: Any,
    data: Tensor | Iterable,
    n_samples: int = 5000,
    *,
    memory_budget: int | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> LogLikelihood:
    r"""Importance-weighted estimate of the marginal log-likelihood of every data point.

    .. math:: \log p(x) \approx \log \frac1S \sum_{s=1}^S
        \frac{p(x \mid z_s)\, p(z_s)}{q(z_s \mid x)}, \qquad z_s \sim q(z \mid x)

    The estimate is a lower bound in expectation that tightens as S grows (S = 1 is the
    ELBO with a Monte Carlo KL). The work is cut into chunks of ``S_c`` samples for ``B_c``
    points, each a latent tensor ``[S_c, B_c, d]`` passed whole to the decoder and to the
    prior's ``log_prob`` (the mixture priors reduce it with the exact, memory-bounded engine:
    every component, no truncation). Chunks of samples are combined exactly by a running
    (max, sum) in float64, and point ``i`` of ``data`` draws its S noise vectors from its
    own stream, seeded with ``s0 + i`` where ``s0`` is one draw from ``generator``, so the
    result does not depend on the chunking: the same generator state gives the same values
    whatever ``memory_budget`` and ``batch_size``.

    The chunk size comes from ``memory_budget``: one (sample, point) row is counted as
    ``4 D + 8 d`` numbers of the model's dtype, with D the size of one x and d the latent
    size: an estimate of the decoder's temporaries and the latents, not a guarantee for a
    large decoder's hidden layers (the prior's reduction is bounded by the engine's own
    budget). A chunk's points draw all their S noise vectors at once (``S x d`` numbers each).

    Arguments:
        model: an :class:`~vaepriors.ExemplarELBO` (or any object with ``encode``,
            ``log_likelihood`` and ``prior`` alike), or a triple ``(encoder, decoder, prior)``.
        data: a tensor ``[N, ...]``, or an iterable (e.g. a DataLoader) of batches ``x`` or
            ``(x, y, ...)``.
        n_samples: S, importance samples per point (5000 in the papers).
        memory_budget: bytes of the chunk's own temporaries (latents, decoder outputs;
            default: 64 MiB on CPU, a quarter of the free memory on a CUDA device). The
            prior's reduction over its components stays within the engine's budget
            (:func:`vaepriors.set_memory_budget`), whatever the chunk size.
        batch_size: points encoded at once when ``data`` is a tensor.
        device: where to compute (default: the model's device, else the data's).
        generator: a :class:`torch.Generator` (any device) for reproducible samples; one
            number is drawn from it (from torch's global generator when ``None``).
        progress: show a progress bar (tqdm) over data points (rank 0's only).
        distributed: split the points over the ranks of torch.distributed (a tensor
            ``data``: a contiguous block each, with the same per-point seeds as one process)
            and gather the values on every rank; every rank must call. ``None``: only for a
            sharded prior, whose every call is collective anyway.

    Returns:
        A :class:`LogLikelihood`: per-point values ``[N]`` (float64), their mean, standard
        error and bits per dimension.

    Example:
        >>> from vaepriors import ExemplarELBO, GaussianPrior
        >>> encoder = lambda x: (x[:, :2], torch.zeros(len(x), 2))
        >>> decoder = lambda z: torch.distributions.Normal(z.repeat(1, 2), 1.0)
        >>> model = ExemplarELBO(encoder, decoder, GaussianPrior(2))
        >>> out = log_likelihood(model, torch.randn(10, 4), n_samples=100, progress=False)
        >>> out.values.shape, out.values.dtype
        (torch.Size([10]), torch.float64)

    References:
        Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders" (ICLR 2016);
        Norouzi et al., "Exemplar VAE" (NeurIPS 2020), section 5 (S = 5000).
    """
    model = _elbo_model(model)
    n_samples = _checks.positive_int(n_samples, "n_samples")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise VAEPriorsError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    parts = _parts(model)
    dev = _device_of(parts.roots, device)
    budget = _budget(memory_budget, dev)
    comm = _eval_comm(parts.prior, distributed)
    mine, first = _my_rows(data, comm)
    batches, total = _batches(mine, batch_size)

    results: list[Tensor] = []
    n_dims = None
    # One draw from the caller's generator (rank 0's) seeds every point's own noise stream.
    gen_device = generator.device if generator is not None else "cpu"
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).cpu()
    if comm is not None:
        dist.broadcast(seed, comm, "log_likelihood: sharing the seed")
    base_seed = int(seed)
    seen = first
    calls = 0  # prior calls: a sharded prior's ranks must make as many
    most = _most_calls(parts, mine, n_samples, batch_size, budget, comm)
    bar = tqdm(total=total, unit="pt", desc="log-likelihood", disable=not progress or (comm is not None and comm.rank))
    try:
        with _evaluating(parts.roots):
            for x in batches:
                x = x.to(dev) if dev is not None else x
                dims = x[0].numel()
                if n_dims is None:
                    n_dims = dims
                elif dims != n_dims:
                    raise VAEPriorsError(f"`data` batches must share one point shape, got {x.shape[1:]} after {n_dims} entries")
                q = read_posterior(model.encode(x), "encoder")
                if q.is_gaussian:
                    _checks.finite(q.mean, "encoder mean")
                    _checks.finite(q.log_var, "encoder log_var")
                d = q.shape[-1]
                # The chunk's own temporaries (decoder outputs, latents); the prior's reduction
                # over its components is bounded by the engine's memory budget.
                row_bytes = x.element_size() * (4 * dims + 8 * d)
                s_chunk, b_chunk = _plan(n_samples, row_bytes, budget)
                for p in range(0, x.shape[0], b_chunk):
                    seeds = range(base_seed + seen + p, base_seed + seen + min(p + b_chunk, x.shape[0]))
                    xc = x[p : p + b_chunk]
                    # Other families are encoded chunk by chunk: their posteriors cannot be sliced.
                    qc = q[p : p + b_chunk] if q.is_gaussian else (q if b_chunk >= x.shape[0] else read_posterior(model.encode(xc)))
                    results.append(_log_mean_exp_weights(model, xc, qc, n_samples, s_chunk, seeds))
                    calls += -(-n_samples // s_chunk)
                    bar.update(min(b_chunk, x.shape[0] - p))
                seen += x.shape[0]
            if comm is not None:
                values = _gather_values(results, most - calls, comm, parts)
    finally:
        bar.close()
    if comm is None:
        if not results:
            raise VAEPriorsError("`data` holds no data points")
        values = torch.cat(results)
    elif values.numel() == 0:
        raise VAEPriorsError("`data` holds no data points")
    if bool(torch.isnan(values).any()):
        raise VAEPriorsError("the log-likelihood is NaN for some points (a NaN or +inf importance weight): check the "
            "decoder's, the prior's and the encoder's outputs")
    n = values.shape[0]
    mean_ll = float(values.mean())
    se = float(values.std() / math.sqrt(n)) if n > 1 else math.nan
    return LogLikelihood(values, mean_ll, se, bits_per_dim(mean_ll, n_dims), n_samples, n_dims)


def _most_calls(parts: _Parts, mine: Tensor, n_samples: int, batch_size: int, budget: int, comm: dist.Comm | None) -> int:
    """For a sharded prior (every call collective): the most prior calls any rank will
    make, planned before any is made, so that the ranks with fewer can make up the rest."""
    if comm is None or not getattr(parts.prior, "sharded", False):
        return 0
    n, dims, d = mine.shape[0], mine[0].numel() if mine.shape[0] else 0, parts.prior.latent_dim
    calls = 0
    if n:
        s_chunk, b_chunk = _plan(n_samples, mine.element_size() * (4 * dims + 8 * d), budget)
        per_batch = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        calls = sum(-(-b // b_chunk) for b in per_batch) * -(-n_samples // s_chunk)
    return int(dist.all_reduce_max(torch.tensor([float(calls)]), comm, "log_likelihood: planning the prior calls"))


def _gather_values(results: list[Tensor], missing: int, comm: dist.Comm, parts: _Parts) -> Tensor:
    """Every rank's values in rank (= data) order, once this rank has made up the
    ``missing`` collective calls of a sharded prior, with no queries of its own."""
    if missing > 0:
        ref = next(iter(parts.prior.parameters()))
        empty = torch.zeros(0, parts.prior.latent_dim, dtype=ref.dtype, device=ref.device)
        for _ in range(missing):
            parts.prior.log_prob(empty)
    local = torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)
    return dist.all_gather_rows(local, comm, "log_likelihood: gathering the values")[0]


def _log_mean_exp_weights(model: Any, x: Tensor, q: Posterior, n_samples: int, s_chunk: int, seeds: range) -> Tensor:
    """log (1/S) sum_s w_s for the points of one chunk, ``[B_c]`` float64. For a Gaussian
    posterior point ``i`` of the chunk draws its S noise vectors from a generator seeded with
    ``seeds[i]``; other families draw from torch's generator seeded with ``seeds[0]``
    (restored afterwards)."""
    with contextlib.ExitStack() as stack:
        if q.is_gaussian:
            mean, log_var = q.mean, q.log_var
            std = torch.exp(0.5 * log_var)
            gen = torch.Generator(device=mean.device)
            noise = torch.stack(
                [torch.randn(n_samples, mean.shape[-1], dtype=mean.dtype, device=mean.device, generator=gen.manual_seed(k)) for k in seeds],
                1,
            )  # [S, B_c, d]

            def draw(s0: int) -> tuple[Tensor, Tensor]:
                eps = noise[s0 : s0 + s_chunk]
                # log q(z|x) from the noise directly, as the ELBO does.
                return mean + std * eps, -0.5 * (_LOG_2PI + log_var + eps.pow(2)).sum(-1)
        else:
            stack.enter_context(torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []))
            torch.manual_seed(seeds[0])

            def draw(s0: int) -> tuple[Tensor, Tensor]:
                z, log_q = q.rsample(min(s_chunk, n_samples - s0))
                return _checks.finite(z, "encoder sample"), log_q

        acc: LogSumExp | None = None
        bad: Tensor | None = None
        for s0 in range(0, n_samples, s_chunk):
            z, log_q = draw(s0)
            log_w = (model.log_likelihood(x, z) + model.prior.log_prob(z) - log_q).double()
            # NaN / +inf weights flagged here: LogSumExp.log would report such a point as -inf.
            invalid = torch.isnan(log_w) | torch.isposinf(log_w)
            bad = invalid.any(0) if bad is None else bad | invalid.any(0)
            part = LogSumExp.reduce(log_w, torch.ones_like(log_w), 0)
            acc = part if acc is None else LogSumExp.combine([acc, part])
    value = acc.log() - math.log(n_samples)
    return torch.where(bad, math.nan, value)
