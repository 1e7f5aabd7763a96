"""Dense torch backend: the whole B x N exponent matrix at once, differentiated by autograd.

Fastest for small B x N; its memory is a few B x N tensors (more with autograd). It is the
only backend that supports double backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import (
    NEAR_FLOOR,
    Frame,
    LogSumExp,
    block_sq_dist,
    exclude,
    exclude_,
    exponents,
    near_cap,
    safe_shift,
    shifted_exp_,
)

# Floats per (query, component) cell at the peak, without / with the autograd graph (about
# 2.5 and 4 measured on CPU with VmHWM, benchmarks/bench_engine.py).
CELL_FLOATS = 3
CELL_FLOATS_GRAD = 5


def memory(b: int, n: int, d: int, elem: int, budget: int, device: torch.device, grad: bool = False) -> int:
    """Estimated peak bytes: a few B x N tensors (``memory_budget`` is not used), the near
    pairs' mask and workspace included (``tests/test_engine_memory.py`` measures it on data
    where half of all pairs are near)."""
    return b * n * elem * (CELL_FLOATS_GRAD if grad else CELL_FLOATS) + NEAR_FLOOR


def logsumexp(
    z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, exclude_idx: Tensor | None, *, memory_budget: int = 0
) -> LogSumExp:
    # Without autograd the B x N temporaries are reused in place.
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (z, means, log_var, a)))
    fr = Frame(z, means, log_var)
    cap = near_cap(z.shape[0] * means.shape[0], z.shape[1], z.element_size(), log_var.dim() == 2)
    dist, _ = block_sq_dist(fr.rows(), fr.cols(), inplace=inplace, cap=cap)
    arg = exponents(dist, a.expand(means.shape[0]), inplace=inplace)
    del dist
    if exclude_idx is not None:
        arg = exclude_(arg, exclude_idx, -math.inf) if inplace else exclude(arg, exclude_idx, -math.inf)
    m = arg.detach().amax(1)
    shift = safe_shift(m)[:, None]
    # without autograd, the exp floor (its slow path); with it, plain exp: a clamp and its
    # backward cost more than they save on the small problems this backend gets
    s = shifted_exp_(arg, shift).sum(1) if inplace else torch.exp(arg - shift).sum(1)
    return LogSumExp(m, torch.where(torch.isneginf(m), torch.zeros_like(s), s))


def knn(
    queries: Tensor, points: Tensor, k: int, exclude_idx: Tensor | None, *, memory_budget: int = 0
) -> tuple[Tensor, Tensor]:
    fr = Frame(queries, points, torch.zeros((), dtype=queries.dtype, device=queries.device))
    cap = near_cap(queries.shape[0] * points.shape[0], queries.shape[1], queries.element_size())
    d2, _ = block_sq_dist(fr.rows(), fr.cols(), inplace=True, cap=cap)
    if exclude_idx is not None:
        d2 = exclude(d2, exclude_idx, math.inf)
    return torch.topk(d2, k, dim=1, largest=False, sorted=True)
