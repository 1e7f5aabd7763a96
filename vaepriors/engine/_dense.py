"""Dense torch backend: the whole B x N exponent matrix at once, differentiated by autograd.

Fastest for small B x N; its memory is a few B x N tensors (more with autograd). It is the
only backend that supports double backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import LogSumExp, block_sq_dist, centre, exclude, exponents, inverse_variance, safe_shift, sq_norms

# Bytes per (query, component) cell, forward only / with the autograd graph kept.
CELL_BYTES = 4
CELL_BYTES_GRAD = 7


def memory(b: int, n: int, d: int, elem: int, budget: int, device: torch.device, grad: bool = False) -> int:
    """Estimated peak bytes: a few B x N tensors (``memory_budget`` is not used)."""
    return b * n * elem * (CELL_BYTES_GRAD if grad else CELL_BYTES)


def logsumexp(
    z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, exclude_idx: Tensor | None, *, memory_budget: int = 0
) -> LogSumExp:
    zc, mc = centre(z, means)
    inv = inverse_variance(log_var)
    zz, mm = sq_norms(zc, mc, inv)
    d2, _ = block_sq_dist(zc, zz, mc, mm, inv, z, means)
    arg = exponents(d2, inv, a.expand(means.shape[0]))
    if exclude_idx is not None:
        arg = exclude(arg, exclude_idx, -math.inf)
    m = arg.detach().amax(1)
    s = torch.exp(arg - safe_shift(m)[:, None]).sum(1)
    return LogSumExp(m, s)


def knn(
    queries: Tensor, points: Tensor, k: int, exclude_idx: Tensor | None, *, memory_budget: int = 0
) -> tuple[Tensor, Tensor]:
    zc, mc = centre(queries, points)
    one = torch.ones((), dtype=zc.dtype, device=zc.device)
    zz, mm = sq_norms(zc, mc, one)
    d2, _ = block_sq_dist(zc, zz, mc, mm, one, queries, points, inplace=True)
    if exclude_idx is not None:
        d2 = exclude(d2, exclude_idx, math.inf)
    return torch.topk(d2, k, dim=1, largest=False, sorted=True)
