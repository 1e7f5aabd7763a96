r"""Retrieval-augmented training (RAT): the cache of exemplar means that neighbours are
retrieved from, and the exact nearest-neighbour search over a cache split across ranks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import distributed as dist
from ._state import StateModule
from .engine import knn

__all__ = ["RetrievalCache", "last_writes", "sharded_knn"]


def last_writes(index: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    r"""The (index, value) pairs that a sequence of writes leaves: for an index written
    several times, its last value. Deterministic, unlike ``t[index] = values`` with repeats.

    Example:
        >>> last_writes(torch.tensor([3, 1, 3]), torch.tensor([[0.0], [1.0], [2.0]]))
        (tensor([1, 3]), tensor([[1.],
                [2.]]))
    """
    uniq, inv = torch.unique(index, return_inverse=True)
    pos = torch.arange(index.numel(), device=index.device)
    last = torch.full_like(uniq, -1).scatter_reduce(0, inv, pos, "amax")
    return uniq, values[last]


class RetrievalCache(StateModule):
    r"""The latest encoder means of the exemplars a prior holds, ``[n, d]``, for retrieval.

    It is built at first use (:meth:`fill`), updated with every mean computed
    (:meth:`write`: the retrieved exemplars' and, through the prior's ``observe``, the
    training batch's) and refreshed whole every ``refresh_every`` epochs (:meth:`epoch_ended`).
    Under torch.distributed every rank applies the writes of all ranks in rank order
    (:meth:`merge`), so the caches of replicated priors stay identical and each shard of a
    sharded prior receives the writes that fall in its rows. The cache is prior state, not a
    buffer (see :class:`~vaepriors._state.StateModule`): it is saved in ``state_dict``.

    Arguments:
        k: neighbours retrieved per query.
        refresh_every: epochs between full refreshes.
    """

    def __init__(self, k: int, refresh_every: int = 1) -> None:
        super().__init__()
        self.k = k
        self.refresh_every = refresh_every
        self.register_state("means", torch.zeros(0, 0), resizable=True)
        self.epochs_since_refresh = 0
        self.last_neighbours: Tensor | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []

    def built(self, rows: int, d: int | None) -> bool:
        """Whether the cache holds ``rows`` means of size ``d``."""
        return tuple(self.means.shape) == (rows, d)

    def fill(self, means: Tensor) -> None:
        """Replaces the whole cache (a refresh); pending writes are superseded."""
        self.means = means.detach().clone()
        self.epochs_since_refresh = 0
        self._pending.clear()

    def clear(self) -> None:
        """Empties the cache (rebuilt at next use)."""
        self.means = self.means.new_zeros(0, 0)
        self._pending.clear()

    @torch.no_grad()
    def write(self, index: Tensor, values: Tensor, offset: int = 0, *, share: bool = False) -> None:
        """Writes the means ``values`` ``[n, d]`` of exemplars ``index`` ``[n]`` (global
        indices; those outside this cache's rows ``offset:offset + len`` are skipped).
        ``share``: also queue them for the next :meth:`merge` across ranks."""
        values = values.detach().to(self.means)
        index = index.to(self.means.device)
        if share:
            self._pending.append((index, values))
        local = index - offset
        keep = (local >= 0) & (local < self.means.shape[0])
        if bool(keep.any()):
            i, v = last_writes(local[keep], values[keep])
            self.means[i] = v

    @torch.no_grad()
    def merge(self, comm: dist.Comm | None, offset: int, what: str) -> None:
        """Applies the queued writes of every rank, in rank order, on every rank."""
        if comm is None:
            self._pending.clear()
            return
        d = self.means.shape[1]
        if self._pending:
            index = torch.cat([i for i, _ in self._pending])
            values = torch.cat([v for _, v in self._pending])
        else:
            index = torch.zeros(0, dtype=torch.long, device=self.means.device)
            values = self.means.new_zeros(0, d)
        self._pending.clear()
        all_index, _ = dist.all_gather_rows(index, comm, what)
        all_values, _ = dist.all_gather_rows(values, comm, what)
        self.write(all_index, all_values, offset)

    def epoch_ended(self) -> bool:
        """Counts an epoch; whether a full refresh is due now."""
        self.epochs_since_refresh += 1
        return self.epochs_since_refresh >= self.refresh_every

    def extra_repr(self) -> str:
        return f"k={self.k}, refresh_every={self.refresh_every}, shape={tuple(self.means.shape)}"


def sharded_knn(
    queries: Tensor,
    points: Tensor,
    ids: Tensor,
    k: int,
    exclude: Tensor,
    comm: dist.Comm | None,
    what: str,
    **engine: object,
) -> Tensor:
    r"""Exact k nearest neighbours of ``queries`` ``[B, d]`` among the points of all ranks.

    Each rank searches its own ``points`` ``[n, d]`` (global ids ``ids`` ``[n]``; the
    per-query ``exclude`` is a local position or ``-1``) for its best ``k``; the candidates of
    all ranks are gathered and the best ``k`` of them kept. Every rank must pass the same
    queries (gathered ones). Returns global ids ``[B, k]``, nearest first.
    """
    b, n = queries.shape[0], points.shape[0]
    if n > k:
        d2, idx = knn(queries, points, k, exclude, **engine)
    else:
        # A shard with at most k candidates sends all of them (no search needed).
        d2 = (queries[:, None, :] - points[None, :, :]).pow(2).sum(-1)
        idx = torch.arange(n, device=points.device).expand(b, n)
        hit = exclude[:, None] == idx
        d2 = d2.masked_fill(hit, math.inf)
        pad = k - n
        d2 = torch.cat([d2, d2.new_full((b, pad), math.inf)], 1)
        idx = torch.cat([idx, idx.new_zeros(b, pad)], 1)
    found = ids[idx] if n else torch.full_like(idx, -1)
    found = torch.where(torch.isinf(d2), torch.full_like(found, -1), found)
    if comm is None:
        return found
    all_d2, _ = dist.all_gather_rows(d2.unsqueeze(0), comm, what)  # [R, B, k]
    all_ids, _ = dist.all_gather_rows(found.unsqueeze(0), comm, what)
    d2 = all_d2.permute(1, 0, 2).reshape(b, -1)
    found = all_ids.permute(1, 0, 2).reshape(b, -1)
    order = d2.topk(k, dim=1, largest=False).indices
    return found.gather(1, order)
