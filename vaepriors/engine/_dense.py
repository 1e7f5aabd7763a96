"""Dense torch backend: the whole B x N exponent matrix at once (fastest for small B x N)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import LogSumExp, centre, safe_shift


def sq_distances(z: Tensor, means: Tensor, log_var: Tensor) -> Tensor:
    r"""``sum_k (z_ik - mu_jk)^2 / s_jk^2``, [B, N], by the expansion on centred data."""
    z, means = centre(z, means)
    if log_var.dim() == 2:  # per-component diagonal
        inv = torch.exp(-log_var)
        d2 = (z * z) @ inv.T - 2 * z @ (means * inv).T + (means * means * inv).sum(-1)
    else:  # shared scalar or per-component isotropic
        inv = torch.exp(-log_var)
        zz = (z * z).sum(-1, keepdim=True)
        mm = (means * means).sum(-1)
        d2 = (zz + mm - 2 * z @ means.T) * inv
    return d2.clamp_min(0)


def exponents(z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, exclude: Tensor | None) -> Tensor:
    arg = a - 0.5 * sq_distances(z, means, log_var)
    if exclude is not None:
        mask = exclude[:, None] == torch.arange(means.shape[0], device=z.device)
        arg = arg.masked_fill(mask, -math.inf)
    return arg


def logsumexp(z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, exclude: Tensor | None) -> LogSumExp:
    arg = exponents(z, means, log_var, a, exclude)
    m = arg.detach().amax(1)
    s = torch.exp(arg - safe_shift(m)[:, None]).sum(1)
    return LogSumExp(m, s)


def knn(queries: Tensor, points: Tensor, k: int, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    zero = torch.zeros((), dtype=queries.dtype, device=queries.device)
    d2 = sq_distances(queries, points, zero)
    if exclude is not None:
        mask = exclude[:, None] == torch.arange(points.shape[0], device=queries.device)
        d2 = d2.masked_fill(mask, math.inf)
    return torch.topk(d2, k, dim=1, largest=False, sorted=True)
