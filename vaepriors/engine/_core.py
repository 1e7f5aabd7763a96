"""Pieces every backend shares: the partial result and the per-component constants."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor


class LogSumExp(NamedTuple):
    r"""A partial log-sum-exp over a shard of components, per query.

    ``max`` is the largest exponent of the shard (no gradient; ``-inf`` where the shard holds
    no component for that query) and ``sum`` the sum of ``exp(exponent - max)`` (``0`` where
    empty). Partials of disjoint shards combine exactly with :meth:`combine`; :meth:`log`
    gives the value.

    Example:
        >>> a = LogSumExp(torch.tensor([0.0]), torch.tensor([2.0]))
        >>> b = LogSumExp(torch.tensor([1.0]), torch.tensor([1.0]))
        >>> LogSumExp.combine([a, b]).log()  # log(2 e^0 + 1 e^1)
        tensor([1.5514])
    """

    max: Tensor
    sum: Tensor

    @staticmethod
    def from_log(value: Tensor) -> "LogSumExp":
        """The partial whose :meth:`log` is ``value`` (gradients flow through ``sum``)."""
        m = value.detach()
        s = torch.exp(value - safe_shift(m))
        return LogSumExp(m, torch.where(torch.isneginf(m), torch.zeros_like(s), s))

    def log(self) -> Tensor:
        """``max + log(sum)``, and ``-inf`` where the shard is empty."""
        tiny = torch.finfo(self.sum.dtype).tiny
        value = safe_shift(self.max) + self.sum.clamp_min(tiny).log()
        return torch.where(self.sum > 0, value, torch.full_like(value, -math.inf))

    @staticmethod
    def combine(parts: Sequence["LogSumExp"]) -> "LogSumExp":
        """The partial over the union of disjoint shards, exactly."""
        if len(parts) == 0:
            raise ValueError("combine needs at least one partial")
        m = torch.stack([p.max for p in parts]).amax(0)
        shift = safe_shift(m)
        s = sum(p.sum * torch.exp(p.max - shift) for p in parts)
        return LogSumExp(m, s)


def safe_shift(m: Tensor) -> Tensor:
    """The max used as a shift: 0 where it is -inf, so that empty rows give exp(-inf) = 0."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def component_constants(log_var: Tensor, log_weights: Tensor | None, n: int, d: int) -> Tensor:
    r"""``a_j = log w_j - (1/2) sum_k log(2 pi s_jk^2)``, shape [N]."""
    if log_var.dim() == 2:
        log_det = log_var.sum(-1)
    else:
        log_det = d * log_var
    a = -0.5 * (d * math.log(2 * math.pi) + log_det)
    a = a.expand(n)
    if log_weights is not None:
        a = a + log_weights
    return a


def centre(z: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    """Shifts queries and means by the means' average: distances are unchanged, and the
    expansion |z|^2 + |mu|^2 - 2 z.mu loses far less to cancellation on centred data."""
    c = means.detach().mean(0)
    return z - c, means - c
