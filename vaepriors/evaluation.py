r"""Evaluation and diagnostics of a trained VAE with any prior.

One call each, on the user's own model (an :class:`~vaepriors.ExemplarELBO`, or the triple
``(encoder, decoder, prior)``):

- :func:`log_likelihood`: the importance-weighted estimate of :math:`\log p(x)` (and
  :func:`bits_per_dim`), batched over data points and samples under a memory budget;
- :func:`active_units`: latent dimensions whose encoder mean varies over the data;
- :func:`knn_accuracy`: k-nearest-neighbour classification of encoder means;
- :func:`novelty_weights`, :func:`novelty_diagnostics`, :func:`novelty_report`: how close
  the decoder is to the optimal "weighted average of training inputs" decoder, i.e. how much
  the model memorises its training set.

Every function runs without gradients and with the model in evaluation mode (priors built
on the training set then use their exact density: every exemplar, no leave-one-out); the
modules' previous train/eval modes are restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from tqdm.auto import tqdm

from . import _checks
from . import distributed as dist
from .elbo import ExemplarELBO
from .encoder import Posterior, read_posterior
from .engine import LogSumExp, knn, mixture_logsumexp
from .errors import VAEPriorsError

__all__ = [
    "ActiveUnits",
    "LogLikelihood",
    "Novelty",
    "NoveltyReport",
    "active_units",
    "bits_per_dim",
    "knn_accuracy",
    "log_likelihood",
    "novelty_diagnostics",
    "novelty_report",
    "novelty_weights",
]

# On CPU, chunks whose temporaries stay below glibc's 32 MB mmap threshold reuse heap memory;
# larger ones are page-faulted afresh every chunk (measured: 3x more system time at 256 MiB).
DEFAULT_MEMORY_BUDGET = 64 * 2**20
"""Bytes of temporaries a chunk of work may use by default on CPU (64 MiB); on a CUDA
device the default is a quarter of its free memory."""

_LOG_2PI = math.log(2 * math.pi)


# -- plumbing -----------------------------------------------------------------------------


class _Parts(NamedTuple):
    encode: Callable[[Tensor], Posterior]
    decoder: Callable[[Tensor], Any] | None
    prior: Any
    roots: list[nn.Module]


def _parts(model: Any) -> _Parts:
    """Reads an ExemplarELBO-like object, an ``(encoder, decoder, prior)`` triple, or an encoder."""
    if isinstance(model, (tuple, list)):
        if len(model) != 3:
            raise VAEPriorsError(f"`model` as a sequence must be (encoder, decoder, prior), got {len(model)} items")
        encoder, decoder, prior = model
        if not callable(encoder):
            raise VAEPriorsError(f"`model` encoder must be callable, got {type(encoder).__name__}")
        roots = [m for m in model if isinstance(m, nn.Module)]
        return _Parts(lambda x: read_posterior(encoder(x), "encoder"), decoder, prior, roots)
    if hasattr(model, "encode"):
        roots = [model] if isinstance(model, nn.Module) else []
        prior = getattr(model, "prior", None)
        roots += [prior] if isinstance(prior, nn.Module) else []
        return _Parts(
            lambda x: read_posterior(model.encode(x), "encoder"), getattr(model, "decoder", None), prior, roots
        )
    if callable(model):
        roots = [model] if isinstance(model, nn.Module) else []
        return _Parts(lambda x: read_posterior(model(x), "encoder"), None, None, roots)
    raise VAEPriorsError(
        "`model` must be an ExemplarELBO (or any object with encode), a triple (encoder, decoder, prior) "
        f"or an encoder callable; got {type(model).__name__}"
    )


def _elbo_model(model: Any) -> Any:
    """An object with ``encode``, ``log_likelihood`` and ``prior`` (wrapping a triple)."""
    if isinstance(model, (tuple, list)):
        if len(model) != 3:
            raise VAEPriorsError(f"`model` as a sequence must be (encoder, decoder, prior), got {len(model)} items")
        return ExemplarELBO(*model)
    if not all(hasattr(model, a) for a in ("encode", "log_likelihood", "prior")):
        raise VAEPriorsError(
            "`model` must be an ExemplarELBO (or any object with encode, log_likelihood and prior) or a "
            f"triple (encoder, decoder, prior); got {type(model).__name__}"
        )
    return model


@contextmanager
def _evaluating(roots: Sequence[nn.Module]) -> Iterator[None]:
    """Evaluation mode and no gradients inside; every module's own mode restored after."""
    saved: dict[nn.Module, bool] = {}
    for root in roots:
        for m in root.modules():
            saved.setdefault(m, m.training)
    try:
        for root in roots:
            root.eval()  # through eval(), so that modules overriding train() see the switch
        with torch.no_grad():
            yield
    finally:
        for root in roots:
            root.train(saved[root])
        for m, mode in saved.items():
            m.training = mode


def _device_of(roots: Sequence[nn.Module], device: torch.device | str | None = None) -> torch.device | None:
    """The caller's ``device`` if given, else the model's (its first tensor), else ``None``."""
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise VAEPriorsError(f"`device` must be a torch.device or a device name like 'cpu', got {device!r}")
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise VAEPriorsError(f"`device` is not a device name: {device!r} ({err})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise VAEPriorsError(f"`device` is {device!r} but this torch has no usable CUDA")
        return dev
    for root in roots:
        for t in (*root.parameters(), *root.buffers()):
            return t.device
    return None


def _budget(memory_budget: object, device: torch.device | None) -> int:
    if memory_budget is None:
        if device is not None and device.type == "cuda":
            return max(DEFAULT_MEMORY_BUDGET, torch.cuda.mem_get_info(device)[0] // 4)
        return DEFAULT_MEMORY_BUDGET
    return _checks.positive_int(memory_budget, "memory_budget")


def _data_tensor(x: object, name: str) -> Tensor:
    x = _checks.tensor(x, name)
    if x.dim() < 1 or x.shape[0] == 0:
        raise VAEPriorsError(f"`{name}` must have shape [N, ...] with N >= 1, got {tuple(x.shape)}")
    return x


def _batches(data: object, batch_size: int) -> tuple[Iterator[Tensor], int | None]:
    """Batches of x from a tensor, or from an iterable of x or (x, y, ...); and the count if known."""
    if isinstance(data, Tensor):
        data = _data_tensor(data, "data")
        return (data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)), data.shape[0]
    if not isinstance(data, Iterable):
        raise VAEPriorsError(
            f"`data` must be a tensor [N, ...] or an iterable (e.g. a DataLoader) of x or (x, y) batches; "
            f"got {type(data).__name__}"
        )
    total = None
    try:
        total = len(data.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        pass

    def gen() -> Iterator[Tensor]:
        for item in data:
            x = item[0] if isinstance(item, (tuple, list)) and len(item) > 0 else item
            if not isinstance(x, Tensor) or x.dim() < 1:
                raise VAEPriorsError(
                    "`data` must yield tensors [B, ...] or tuples whose first item is such a tensor; "
                    f"got {type(x).__name__}"
                )
            yield x

    return gen(), total


def _eval_comm(prior: Any, distributed: bool | None) -> dist.Comm | None:
    """The process group an evaluation splits its work over, or ``None`` (one process).

    ``None`` splits only when the prior is sharded (its every call is collective); ``True``
    whenever torch.distributed is initialised with more than one process."""
    sharded = bool(getattr(prior, "sharded", False))
    if distributed is None:
        distributed = sharded
    if not isinstance(distributed, bool):
        raise VAEPriorsError(f"`distributed` must be True, False or None, got {distributed!r}")
    if sharded and not distributed:
        raise VAEPriorsError(
            "`distributed=False` with a sharded prior: every rank holds only its block of the exemplars, so "
            "every rank must evaluate together (distributed=True or None)"
        )
    return dist.comm() if distributed else None


def _my_rows(data: Any, comm: dist.Comm | None, name: str = "data") -> tuple[Any, int]:
    """This rank's contiguous block of a tensor ``data`` and its first row (all of it alone)."""
    if comm is None:
        return data, 0
    if not isinstance(data, Tensor):
        raise VAEPriorsError(
            f"`{name}` must be a tensor to split the evaluation over ranks (distributed=True); got "
            f"{type(data).__name__}"
        )
    start, stop = dist.shard_range(data.shape[0], comm.rank, comm.world_size)
    return data[start:stop], start


def _location_of(parts: _Parts) -> Callable | None:
    """The point function of the model's prior (``location``), where it has one."""
    return getattr(parts.prior, "location", None)


def _encode_all(
    parts: _Parts, x: Tensor, batch_size: int, device: torch.device | None, comm: dist.Comm | None = None
) -> Tensor:
    """The posteriors' points (means) of ``x``, ``[N, d]``, batch by batch (a block per rank,
    gathered, under ``comm``)."""
    mine, _ = _my_rows(x, comm)
    means = []
    for i in range(0, mine.shape[0], batch_size):
        xb = mine[i : i + batch_size]
        xb = xb.to(device) if device is not None else xb
        means.append(parts.encode(xb).location(_location_of(parts)))
    if comm is None:
        return torch.cat(means)
    if not means:  # a rank with no rows still learns d and dtype from one encoding
        means.append(parts.encode(x[:1].to(device) if device is not None else x[:1]).location(_location_of(parts))[:0])
    return dist.all_gather_rows(torch.cat(means), comm, "evaluation: gathering the encoded points")[0]


# -- log-likelihood -----------------------------------------------------------------------


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


# -- active units -------------------------------------------------------------------------


class ActiveUnits(NamedTuple):
    r"""What :func:`active_units` returns.

    Attributes:
        count: the number of active latent dimensions.
        variances: the variance over the data of the encoder mean per dimension, ``[d]`` float64.
        active: which dimensions are active, ``[d]`` bool.
    """

    count: int
    variances: Tensor
    active: Tensor


def active_units(
    model: Any,
    data: Tensor | Iterable,
    threshold: float = 0.01,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    distributed: bool = False,
) -> ActiveUnits:
    r"""Counts the latent dimensions the encoder uses.

    A dimension u is active if :math:`\mathrm{Var}_x\big(\mathbb E_{q(z|x)}[z_u]\big) >`
    ``threshold``. The variance is the population variance (divided by N) over the data,
    accumulated batch by batch in float64 (Chan's pairwise update: memory O(d)).

    Arguments:
        model: an :class:`~vaepriors.ExemplarELBO`, a triple ``(encoder, decoder, prior)``,
            or an encoder alone (``x -> (mean, log_var)`` or a Normal).
        data: a tensor ``[N, ...]`` or an iterable of ``x`` or ``(x, y, ...)`` batches, N >= 2.
        threshold: the variance above which a dimension counts as active (>= 0).
        batch_size: points encoded at once when ``data`` is a tensor.
        device: where to compute (default: the model's device, else the data's).
        distributed: split a tensor ``data`` over the ranks of torch.distributed (a block
            each) and combine their statistics exactly; every rank must call.

    Returns:
        An :class:`ActiveUnits` (count, per-dimension variances, mask).

    Example:
        >>> encoder = lambda x: (x * torch.tensor([1.0, 0.0, 0.01]), torch.zeros_like(x))
        >>> active_units(encoder, torch.randn(1000, 3)).count
        1

    References:
        Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders" (ICLR 2016);
        Norouzi et al., "Exemplar VAE" (NeurIPS 2020), supplementary table of active units.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
        math.isfinite(threshold) and threshold >= 0
    ):
        raise VAEPriorsError(f"`threshold` must be a finite number >= 0, got {threshold!r}")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    parts = _parts(model)
    dev = _device_of(parts.roots, device)
    comm = dist.comm() if _distributed_flag(distributed) else None
    batches, _ = _batches(_my_rows(data, comm)[0], batch_size)
    count, mu, m2 = 0, None, None
    with _evaluating(parts.roots):
        for x in batches:
            x = x.to(dev) if dev is not None else x
            mean = parts.encode(x).location(_location_of(parts)).double()
            if mean.dim() != 2:
                raise VAEPriorsError(f"`model` encoder must return means [B, d], got {tuple(mean.shape)}")
            _checks.finite(mean, "encoder mean")
            nb = mean.shape[0]
            if nb == 0:
                continue
            mb = mean.mean(0)
            m2b = (mean - mb).pow(2).sum(0)
            if mu is None:
                count, mu, m2 = nb, mb, m2b
            else:
                delta = mb - mu
                total = count + nb
                mu = mu + delta * (nb / total)
                m2 = m2 + m2b + delta.pow(2) * (count * nb / total)
                count = total
    if comm is not None:
        count, mu, m2 = _combine_moments(count, mu, m2, comm)
    if count < 2:
        raise VAEPriorsError(f"`data` must hold at least 2 points to measure a variance, got {count}")
    variances = m2 / count
    active = variances > threshold
    return ActiveUnits(int(active.sum()), variances, active)


def _distributed_flag(distributed: object) -> bool:
    if not isinstance(distributed, bool):
        raise VAEPriorsError(f"`distributed` must be True or False, got {distributed!r}")
    return distributed


def _combine_moments(count: int, mu: Tensor | None, m2: Tensor | None, comm: dist.Comm) -> tuple[int, Tensor, Tensor]:
    """Chan's pairwise update over the ranks' (count, mean, M2), in rank order."""
    if mu is None:
        raise VAEPriorsError(f"active_units: rank {comm.rank} holds no data points; give at least one per rank")
    row = torch.cat([torch.tensor([float(count)], dtype=mu.dtype, device=mu.device), mu, m2])[None]
    rows = dist.all_gather_rows(row, comm, "active_units: combining the ranks' statistics")[0]
    d = mu.shape[0]
    count, mu, m2 = 0, None, None
    for r in rows:
        nb, mb, m2b = int(r[0]), r[1 : 1 + d], r[1 + d :]
        if mu is None:
            count, mu, m2 = nb, mb, m2b
            continue
        total = count + nb
        delta = mb - mu
        mu = mu + delta * (nb / total)
        m2 = m2 + m2b + delta.pow(2) * (count * nb / total)
        count = total
    return count, mu, m2


# -- kNN classification -------------------------------------------------------------------


def _labels(y: object, n: int, name: str) -> Tensor:
    y = _checks.tensor(y, name)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise VAEPriorsError(f"`{name}` must be an integer tensor of class labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise VAEPriorsError(f"`{name}` must have shape [{n}] (one label per point), got {tuple(y.shape)}")
    return y


def _majority(neighbour_labels: Tensor, k: int, n_classes: int) -> Tensor:
    """Majority class among the first k neighbours (sorted nearest first), ``[B]``.

    Ties between classes go to the class whose nearest member comes first in the list.
    """
    nb = neighbour_labels[:, :k]
    b = nb.shape[0]
    votes = torch.zeros(b, n_classes, dtype=torch.long, device=nb.device).scatter_add_(1, nb, torch.ones_like(nb))
    rank = torch.arange(k, device=nb.device).expand(b, k)
    first = torch.full((b, n_classes), k, dtype=torch.long, device=nb.device).scatter_reduce_(
        1, nb, rank, reduce="amin"
    )
    # Votes dominate (first < k + 1); among equal votes the earliest first member wins.
    return (votes * (k + 1) - first).argmax(1)


def knn_accuracy(
    model: Any,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int | Sequence[int] = (3, 5, 7, 9, 11, 13, 15),
    *,
    batch_size: int = 256,
    memory_budget: int | None = None,
    device: torch.device | str | None = None,
    distributed: bool = False,
) -> dict[int, float]:
    r"""Accuracy of k-nearest-neighbour classification in latent space.

    Each test point's encoder mean is matched against the training points' encoder means
    (Euclidean distance, exact, through :func:`vaepriors.engine.knn`) and takes the
    majority label of its k nearest. Ties between classes are broken deterministically in
    favour of the tied class whose nearest member is closest (for k = 1 this is 1-NN);
    neighbours at exactly equal distance keep the engine's order.

    Arguments:
        model: an :class:`~vaepriors.ExemplarELBO`, a triple ``(encoder, decoder, prior)``,
            or an encoder alone.
        train_x: training inputs ``[N, ...]``; train_y: their integer labels ``[N]``.
        test_x: test inputs ``[M, ...]``; test_y: their integer labels ``[M]``.
        k: one or several numbers of neighbours, each in ``[1, N]`` (3..15 in the paper).
        batch_size: points encoded at once.
        memory_budget: bytes the distance computation of one chunk of test points may use
            (default as in :func:`log_likelihood`).
        device: where to compute (default: the model's device, else the data's).
        distributed: encode the training and test points a block per rank of
            torch.distributed and gather them; every rank must call.

    Returns:
        ``{k: accuracy}`` (fractions in [0, 1]) for each requested k, in increasing k.

    Example:
        >>> encoder = lambda x: (x, torch.zeros_like(x))
        >>> x, y = torch.tensor([[0.0], [0.1], [5.0], [5.1]]), torch.tensor([0, 0, 1, 1])
        >>> knn_accuracy(encoder, x, y, torch.tensor([[0.05], [4.9]]), torch.tensor([0, 1]), k=1)
        {1: 1.0}

    References:
        Norouzi et al., "Exemplar VAE" (NeurIPS 2020), representation learning experiments.
    """
    train_x = _data_tensor(train_x, "train_x")
    test_x = _data_tensor(test_x, "test_x")
    n, m = train_x.shape[0], test_x.shape[0]
    train_y = _labels(train_y, n, "train_y")
    test_y = _labels(test_y, m, "test_y")
    ks = [k] if isinstance(k, int) and not isinstance(k, bool) else k
    if not isinstance(ks, Iterable):
        raise VAEPriorsError(f"`k` must be an int or a sequence of ints, got {k!r}")
    ks = sorted({_checks.positive_int(kk, "k") for kk in ks})
    if not ks:
        raise VAEPriorsError("`k` must name at least one number of neighbours")
    if ks[-1] > n:
        raise VAEPriorsError(f"`k` must be at most the number of training points {n}, got {ks[-1]}")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    parts = _parts(model)
    dev = _device_of(parts.roots, device)
    budget = _budget(memory_budget, dev)

    with _evaluating(parts.roots):
        comm = dist.comm() if _distributed_flag(distributed) else None
        train_mean = _encode_all(parts, train_x, batch_size, dev, comm)
        test_mean = _encode_all(parts, test_x, batch_size, dev, comm)
        classes, train_class = torch.unique(train_y.to(train_mean.device), return_inverse=True)
        test_y = test_y.to(train_mean.device)
        # A chunk of test points costs ~4 [chunk, N] temporaries in a dense backend.
        chunk = max(1, budget // (train_mean.element_size() * 4 * n))
        correct = {kk: 0 for kk in ks}
        for i in range(0, m, chunk):
            _, idx = knn(test_mean[i : i + chunk], train_mean, ks[-1])
            nb = train_class[idx]
            for kk in ks:
                pred = classes[_majority(nb, kk, classes.shape[0])]
                correct[kk] += int((pred == test_y[i : i + chunk]).sum())
    return {kk: correct[kk] / m for kk in ks}


# -- novelty / memorisation ---------------------------------------------------------------


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
