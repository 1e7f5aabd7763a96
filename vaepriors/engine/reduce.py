r"""Public entry points of the engine: :func:`mixture_log_prob`, :func:`mixture_logsumexp`, :func:`knn`.

Backends (the ``backend`` argument; all give the same numbers to float rounding):

- ``"dense"``: the whole B x N matrix, autograd; fastest for small B x N; twice differentiable.
- ``"chunked"``: blocks over queries and components with an online max/sum and a
  block-wise custom backward; memory bounded by ``memory_budget`` in forward AND backward
  (measured, near pairs included), with blocks of at least 64 x 1024 cells: a budget too
  small for one is exceeded with a warning naming the bytes needed.
- ``"keops"``: KeOps LazyTensor kernels (1-D or 2-D GPU scheme by shape), nothing B x N in
  memory; optional: checked once in a child process, and if it cannot run, the call falls
  back to the torch backends with one warning naming the cause and the fix.
- ``"fused"``: Triton kernels (FlashAttention-style tiles, online max/sum, a backward that
  recomputes the probabilities), nothing B x N in memory; isotropic scales only (diagonal
  ones and kNN go to ``chunked``); optional: needs Triton and CUDA (or Triton's interpreter,
  ``TRITON_INTERPRET=1``, for tests); where it cannot run, ``chunked`` with one warning.
- ``"auto"`` (default): the fastest backend that fits the memory budget for the device,
  dtype and shape; never needs KeOps (rule table in ``vaepriors/engine/_auto.py``).

Precision: the bulk of the squared distances comes from one GEMM on centred data; pairs
where that expansion cancels (a query within ~1/3 of its norm of a mean) are recomputed
from the difference ``z - mu`` of the raw inputs, so float32 results stay within ~1e-6
(relative) of float64 even for near-coincident points and tiny variances. Scales enter as
``exp(-log_var / 2)`` on differences before they are squared, so log-variances far below
float32's ``exp`` range (-88.7) still give float64's values and gradients wherever float32
can represent the data (down to -175; below, the log-variance is clamped). Every backend
normalises its backward by the forward's own max and sum, so exponents tied by rounding
share their probability. The engine's GEMMs run in IEEE float32 even where the caller
enabled TF32 (``_core.ieee_fp32``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .. import _checks
from ..errors import VAEPriorsError
from . import _auto, _chunked, _dense, _fused, _keops
from ._core import LogSumExp, component_constants

__all__ = [
    "BACKENDS",
    "LogSumExp",
    "get_memory_budget",
    "knn",
    "mixture_log_prob",
    "mixture_logsumexp",
    "set_memory_budget",
]

Backend = Literal["auto", "dense", "chunked", "keops", "fused"]

# name -> module with logsumexp(z, means, log_var, a, exclude, *, memory_budget) -> LogSumExp,
# knn(queries, points, k, exclude, *, memory_budget) -> (d2, idx) and memory(...) -> bytes.
_IMPLS = {"dense": _dense, "chunked": _chunked, "keops": _keops, "fused": _fused}
BACKENDS: tuple[str, ...] = ("auto", *_IMPLS)
"""Names accepted by the ``backend`` argument."""

_BUDGET = 256 * 2**20


def set_memory_budget(nbytes: int) -> None:
    r"""Sets the default memory budget (bytes of temporaries per call) of the engine.

    ``auto`` picks only backends whose estimated peak memory fits it, and ``chunked``
    sizes its blocks by it. The default is 256 MiB; a ``memory_budget=`` argument
    overrides it for one call.

    Example:
        >>> set_memory_budget(512 * 2**20)
        >>> get_memory_budget()
        536870912
        >>> set_memory_budget(256 * 2**20)
    """
    global _BUDGET
    _BUDGET = _budget(nbytes)


def get_memory_budget() -> int:
    r"""The default memory budget in bytes (see :func:`set_memory_budget`)."""
    return _BUDGET


def _budget(nbytes: object) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise VAEPriorsError(f"`memory_budget` must be a positive int (bytes), got {nbytes!r}")
    return nbytes


def _resolve(
    backend: str, op: str, b: int, n: int, d: int, z: Tensor, grad: bool, budget: int, isotropic: bool = True
) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise VAEPriorsError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "fused":
        # _fused itself hands diagonal scales, wide d and kNN to chunked
        return "fused" if _fused.available(z.device, z.dtype, warn=True) else "chunked"
    if backend == "keops":
        if _keops.usable_shape(n, z.dtype) and _keops.available(z.device, z.dtype, warn=True):
            return "keops"
        return _auto.choose(op, z.device, z.dtype, b, n, d, grad, budget, keops=False, isotropic=isotropic)
    if backend == "auto":
        return _auto.choose(op, z.device, z.dtype, b, n, d, grad, budget, isotropic=isotropic)
    return backend


def _prepare(z: Tensor, means: Tensor, exclude: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    z = _checks.floating(z, "z")
    if z.dim() < 1:
        raise VAEPriorsError("`z` must have shape [*batch, d], got a scalar")
    _checks.finite(z, "z")
    means = _checks.floating(means, "means")
    if means.dim() != 2 or means.shape[-1] != z.shape[-1]:
        raise VAEPriorsError(
            f"`means` must have shape [N, d] with d = z.shape[-1] = {z.shape[-1]}, got {tuple(means.shape)}"
        )
    if means.shape[0] == 0:
        raise VAEPriorsError("`means` must hold at least one component, got N = 0")
    if means.dtype != z.dtype or means.device != z.device:
        raise VAEPriorsError(
            f"`means` must have the dtype and device of `z` ({z.dtype}, {z.device}), "
            f"got {means.dtype}, {means.device}"
        )
    _checks.finite(means, "means")
    if exclude is not None:
        exclude = _checks.index(exclude, z.shape[:-1], means.shape[0], "exclude")
    return z, means, exclude


def _check_log_var(log_var: Tensor | float, z: Tensor, n: int, d: int) -> Tensor:
    if not isinstance(log_var, Tensor):
        log_var = torch.tensor(_checks.number(log_var, "log_var", finite=False), dtype=z.dtype, device=z.device)
    _checks.floating(log_var, "log_var")
    if log_var.shape not in (torch.Size([]), torch.Size([n]), torch.Size([n, d])):
        raise VAEPriorsError(
            f"`log_var` must be a scalar (shared isotropic), [N] (isotropic per component) or "
            f"[N, d] (diagonal per component) with N = {n}, d = {d}; got {tuple(log_var.shape)}"
        )
    return _checks.finite(log_var.to(torch.promote_types(z.dtype, torch.float32)), "log_var")


def _check_log_weights(log_weights: Tensor | None, z: Tensor, n: int) -> Tensor | None:
    if log_weights is None:
        return None
    _checks.floating(log_weights, "log_weights")
    if log_weights.shape != (n,):
        raise VAEPriorsError(f"`log_weights` must have shape [N] = [{n}], got {tuple(log_weights.shape)}")
    if _checks.validation_enabled() and bool(torch.isnan(log_weights).any() | torch.isposinf(log_weights).any()):
        raise VAEPriorsError("`log_weights` must not hold NaN or +inf (-inf, a zero weight, is allowed)")
    return log_weights.to(torch.promote_types(z.dtype, torch.float32))


def mixture_logsumexp(
    z: Tensor,
    means: Tensor,
    log_var: Tensor | float,
    log_weights: Tensor | None = None,
    exclude: Tensor | None = None,
    *,
    backend: str = "auto",
    memory_budget: int | None = None,
) -> LogSumExp:
    r"""The partial log-sum-exp of a Gaussian mixture over a shard of components.

    For each query :math:`z_i` it reduces :math:`\log \sum_{j \ne e_i} w_j \mathcal N(z_i;
    \mu_j, \mathrm{diag}(s_j^2))` and returns it as a :class:`LogSumExp` (``max``, ``sum``),
    so that shards of components, computed anywhere, combine exactly with
    :meth:`LogSumExp.combine`. The weights are used as given (``None``: every :math:`w_j = 1`).

    Arguments:
        z: queries, shape ``[*batch, d]``.
        means: component means, ``[N, d]``.
        log_var: log-variances: a scalar (shared isotropic), ``[N]`` or ``[N, d]``.
        log_weights: log-weights ``[N]``; ``-inf`` (zero weight) is allowed.
        exclude: component excluded per query, ``[*batch]`` integers in ``[0, N)``, or ``-1``
            for none. The exclusion happens inside the reduction (exact leave-one-out).
        backend: one of :data:`BACKENDS` (see the module docstring for what ``auto`` picks).
        memory_budget: bytes of temporaries the backend may use (``auto`` picks a backend
            that fits; ``chunked`` sizes its blocks by it); default :func:`get_memory_budget`.

    Returns:
        A :class:`LogSumExp` whose fields have shape ``[*batch]``.
    """
    z, means, exclude = _prepare(z, means, exclude)
    n, d = means.shape
    log_var = _check_log_var(log_var, z, n, d)
    log_weights = _check_log_weights(log_weights, z, n)
    budget = _BUDGET if memory_budget is None else _budget(memory_budget)
    batch, dtype = z.shape[:-1], z.dtype
    work = torch.promote_types(dtype, torch.float32)  # half precision is reduced in float32
    flat, means, log_var = z.reshape(-1, d).to(work), means.to(work), log_var.to(work)
    ex = exclude.reshape(-1) if exclude is not None else None
    a = component_constants(log_var, None if log_weights is None else log_weights.to(work), n, d)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (flat, means, log_var, a))
    name = _resolve(backend, "logsumexp", flat.shape[0], n, d, flat, grad, budget, log_var.dim() < 2)
    part = _IMPLS[name].logsumexp(flat, means, log_var, a, ex, memory_budget=budget)
    if dtype != work:  # half precision: the sum (up to N) may not fit, its log does
        part = LogSumExp.from_log(part.log().to(dtype))
    return LogSumExp(part.max.reshape(batch), part.sum.reshape(batch))


def mixture_log_prob(
    z: Tensor,
    means: Tensor,
    log_var: Tensor | float,
    log_weights: Tensor | None = None,
    exclude: Tensor | None = None,
    *,
    backend: str = "auto",
    memory_budget: int | None = None,
) -> Tensor:
    r"""Log-density of a Gaussian mixture, exact over every component.

    .. math:: \log p(z_i) = \log \sum_{j \ne e_i} w_j\, \mathcal N(z_i; \mu_j, \mathrm{diag}(s_j^2))

    With ``log_weights=None`` the weights are uniform over the components each query sees:
    :math:`1/N`, or :math:`1/(N-1)` for a query with an excluded component (leave-one-out).
    Given ``log_weights`` are used as they are (normalise them yourself). Differentiable
    w.r.t. ``z``, ``means``, ``log_var`` and ``log_weights``.

    Arguments:
        z: queries, shape ``[*batch, d]``.
        means: component means, ``[N, d]``.
        log_var: log-variances: a scalar (shared isotropic), ``[N]`` or ``[N, d]``.
        log_weights: log-weights ``[N]``, or ``None`` for uniform.
        exclude: component excluded per query, ``[*batch]`` integers (``-1``: none).
        backend: one of :data:`BACKENDS`; ``"auto"`` picks by device, dtype and shape.
        memory_budget: bytes the backend may use for temporaries.

    Returns:
        The log-densities, shape ``[*batch]``.

    Example:
        >>> z, mu = torch.zeros(3, 2), torch.randn(5, 2)
        >>> mixture_log_prob(z, mu, torch.tensor(0.0)).shape
        torch.Size([3])
    """
    if log_weights is None and exclude is not None and means.shape[0] == 1:
        if bool((torch.as_tensor(exclude) >= 0).any()):
            raise VAEPriorsError(
                "`exclude` removes the only component (N = 1) for some queries: a uniform mixture "
                "over no component is undefined"
            )
    part = mixture_logsumexp(
        z, means, log_var, log_weights, exclude, backend=backend, memory_budget=memory_budget
    )
    value = part.log()
    if log_weights is None:
        n = means.shape[0]
        if exclude is None:
            value = value - math.log(n)
        else:
            kept = n - (torch.as_tensor(exclude, device=value.device).expand(value.shape) >= 0).to(value.dtype)
            value = value - kept.log()
    return value


def knn(
    queries: Tensor,
    points: Tensor,
    k: int,
    exclude: Tensor | None = None,
    *,
    backend: str = "auto",
    memory_budget: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Exact k nearest neighbours (Euclidean) of each query among ``points``.

    Arguments:
        queries: shape ``[*batch, d]``.
        points: ``[N, d]``.
        k: neighbours per query, ``1 <= k <= N`` (``N - 1`` with ``exclude``).
        exclude: a point index per query never returned (``-1``: none), ``[*batch]``.
        backend: one of :data:`BACKENDS`.
        memory_budget: bytes the backend may use for temporaries.

    Returns:
        ``(sq_dist, index)``, both ``[*batch, k]``, sorted by increasing distance; the
        squared distances are recomputed exactly from the differences. No gradient flows.

    Example:
        >>> d2, idx = knn(torch.zeros(1, 2), torch.tensor([[3.0, 0], [1, 0], [2, 0]]), k=2)
        >>> idx
        tensor([[1, 2]])
    """
    queries, points, exclude = _prepare(queries, points, exclude)
    n, d = points.shape
    k = _checks.positive_int(k, "k")
    limit = n - 1 if exclude is not None else n
    if k > limit:
        raise VAEPriorsError(f"`k` must be at most {limit} (the number of candidate points), got {k}")
    budget = _BUDGET if memory_budget is None else _budget(memory_budget)
    batch = queries.shape[:-1]
    with torch.no_grad():
        work = torch.promote_types(queries.dtype, torch.float32)
        flat = queries.detach().reshape(-1, d).to(work)
        pts = points.detach().to(work)
        ex = exclude.reshape(-1) if exclude is not None else None
        name = _resolve(backend, "knn", flat.shape[0], n, d, flat, False, budget)
        _, idx = _IMPLS[name].knn(flat, pts, k, ex, memory_budget=budget)
        d2 = (queries.detach().reshape(-1, d)[:, None, :] - points.detach()[idx]).pow(2).sum(-1)
        d2, order = d2.sort(dim=1)
        idx = idx.gather(1, order)
    return d2.reshape(*batch, k), idx.reshape(*batch, k)
