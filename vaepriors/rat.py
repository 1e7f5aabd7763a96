r"""Retrieval-augmented training (RAT): the cache of exemplar means that neighbours are
retrieved from, and the exact nearest-neighbour search over a cache split across ranks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import distributed as dist
from ._state import StateModule
from .engine import get_memory_budget, knn

__all__ = ["RetrievalCache", "exact_knn", "last_writes", "sharded_knn"]


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
    A fill during an epoch (the build at first use, or a refresh by hand) counts as that
    epoch's refresh: a refresh due at the end of the same epoch is skipped, so the first
    epoch encodes the exemplars once, not twice.
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
        self.filled_this_epoch = False
        self.last_neighbours: Tensor | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._norms: tuple | None = None  # (key of the means it was computed from, |mu|^2 [n])

    def built(self, rows: int, d: int | None) -> bool:
        """Whether the cache holds ``rows`` means of size ``d``."""
        return tuple(self.means.shape) == (rows, d)

    def fill(self, means: Tensor, *, scheduled: bool = False) -> None:
        """Replaces the whole cache (a refresh); pending writes are superseded. A fill that is
        not the ``scheduled`` refresh of :meth:`epoch_ended` (the build at first use, or a
        refresh by hand) counts as the refresh of the epoch under way."""
        self.means = means.detach().clone()
        self.epochs_since_refresh = 0
        self.filled_this_epoch = not scheduled
        self._pending.clear()

    def clear(self) -> None:
        """Empties the cache (rebuilt at next use)."""
        self.means = self.means.new_zeros(0, 0)
        self._pending.clear()

    def _key(self) -> tuple:
        m = self.means
        try:
            version = m._version
        except RuntimeError:  # an inference tensor: never edited in place
            version = -1
        return id(m), version, m.data_ptr(), tuple(m.shape), m.dtype

    def norms(self) -> Tensor:
        r"""The squared norms :math:`|\mu_n|^2` of the cached means, ``[n]``: kept in step
        with :meth:`write`, recomputed after any other change to the cache (in-place edits,
        ``.to()``, loading)."""
        key = self._key()
        if self._norms is None or self._norms[0] != key:
            self._norms = (key, self.means.square().sum(-1))
        return self._norms[1]

    @torch.no_grad()
    def write(
        self,
        index: Tensor,
        values: Tensor,
        offset: int = 0,
        *,
        share: bool = False,
        unique: bool = False,
        in_range: bool = False,
    ) -> None:
        """Writes the means ``values`` ``[n, d]`` of exemplars ``index`` ``[n]`` (global
        indices; those outside this cache's rows ``offset:offset + len`` are skipped).
        ``share``: also queue them for the next :meth:`merge` across ranks. ``unique`` and
        ``in_range``: the caller knows the indices distinct and all within this cache's rows
        (no search for repeats, no filter, no host synchronisation)."""
        values = values.detach().to(self.means)
        index = index.to(self.means.device)
        if share:
            self._pending.append((index, values))
        local = index - offset if offset else index
        if not in_range:
            keep = (local >= 0) & (local < self.means.shape[0])
            if not bool(keep.any()):
                return
            local, values = local[keep], values[keep]
        if not unique:
            local, values = last_writes(local, values)
        fresh_norms = self._norms is not None and self._norms[0] == self._key()
        self.means.index_copy_(0, local, values)
        if fresh_norms:
            norms = self._norms[1]
            norms.index_copy_(0, local, values.square().sum(-1))
            self._norms = (self._key(), norms)

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
        """Counts an epoch; whether a full refresh is due now. A refresh due at the end of
        an epoch in which the cache was filled (:meth:`fill`) is skipped: that fill was it."""
        self.epochs_since_refresh += 1
        due = self.epochs_since_refresh >= self.refresh_every
        if due and self.filled_this_epoch:
            self.epochs_since_refresh = 0
            due = False
        self.filled_this_epoch = False
        return due

    def extra_repr(self) -> str:
        return f"k={self.k}, refresh_every={self.refresh_every}, shape={tuple(self.means.shape)}"


_BLOCK = 32  # columns per block of _smallest's first pass


def _smallest(s: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """The ``c`` smallest values of each row of ``s`` ``[B, n]`` and their columns, unsorted:
    ``s.topk(c, largest=False)``, faster for long rows. Each row's minimum over blocks of
    ``_BLOCK`` columns is taken first; the c blocks with the smallest minima hold c values
    at most the c-th of those minima, so every one of the row's c smallest values lies in
    one of them: the exact answer is the top-c of those c blocks (and of the columns left
    over after the last whole block)."""
    b, n = s.shape
    nb = n // _BLOCK
    if nb < 4 * c:
        return s.topk(c, 1, largest=False, sorted=False)
    whole = nb * _BLOCK
    mins = s[:, :whole].view(b, nb, _BLOCK).amin(2)
    blocks = mins.topk(c, 1, largest=False, sorted=False).indices  # [B, c]
    cols = (blocks[:, :, None] * _BLOCK + torch.arange(_BLOCK, device=s.device)).reshape(b, -1)
    if whole < n:
        cols = torch.cat([cols, torch.arange(whole, n, device=s.device).expand(b, -1)], 1)
    v, pos = s.gather(1, cols).topk(c, 1, largest=False, sorted=False)
    return v, cols.gather(1, pos)


def exact_knn(
    queries: Tensor,
    points: Tensor,
    k: int,
    exclude: Tensor | None = None,
    *,
    norms: Tensor | None = None,
    memory_budget: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Exact k nearest neighbours (Euclidean) for retrieval: ``(sq_dist, index)``, ``[B, k]``
    each, nearest first; no gradient, no input checks (the cache is the prior's own state).

    The candidates come from one matrix product per block of points,
    :math:`|\mu_n|^2 - 2 z \cdot \mu_n` (``norms`` are the :math:`|\mu_n|^2`; the per-query
    :math:`|z|^2` does not change the order) and one exact top-``2k`` per block (by block
    minima first, see :func:`_smallest`); the ``2k`` best
    are then re-ranked by their distances computed exactly from the differences
    :math:`z - \mu_n`. A true neighbour could be missed only if more than ``k`` other points
    lay within the product's rounding error (~1e-7 of :math:`|\mu|^2`) of the k-th
    distance: with ties that close, which of them is returned is arbitrary anyway. Blocks
    keep the ``B x block`` scores within ``memory_budget`` bytes.

    Arguments:
        queries: ``[B, d]``.
        points: ``[n, d]``.
        k: neighbours per query (at most ``n``, ``n - 1`` with ``exclude``).
        exclude: a point per query never returned (``-1``: none), ``[B]``.
        norms: :math:`|\mu_n|^2`, ``[n]`` (computed when omitted).
        memory_budget: bytes for the scores (default :func:`~vaepriors.engine.get_memory_budget`).

    Example:
        >>> d2, idx = exact_knn(torch.zeros(1, 2), torch.tensor([[3.0, 0], [1, 0], [2, 0]]), k=2)
        >>> idx, d2
        (tensor([[1, 2]]), tensor([[1., 4.]]))
    """
    with torch.no_grad():
        queries, points = queries.detach(), points.detach()
        b, n = queries.shape[0], points.shape[0]
        c = min(n, 2 * k)
        if norms is None:
            norms = points.square().sum(-1)
        budget = get_memory_budget() if memory_budget is None else memory_budget
        step = max(c, budget // (2 * queries.element_size() * max(b, 1)))
        best_s = best_i = None
        for s0 in range(0, n, step):
            width = min(step, n - s0)
            s = torch.addmm(norms[s0 : s0 + width], queries, points[s0 : s0 + width].T, alpha=-2)
            if exclude is not None:
                col = exclude - s0
                valid = (col >= 0) & (col < width)
                col = col.clamp(0, width - 1)[:, None]
                s.scatter_(1, col, torch.where(valid[:, None], math.inf, s.gather(1, col)))
            v, i = _smallest(s, min(c, width))
            if s0:
                i += s0
                v, i = torch.cat([best_s, v], 1), torch.cat([best_i, i], 1)
                v, pos = v.topk(c, 1, largest=False, sorted=False)
                i = i.gather(1, pos)
            best_s, best_i = v, i
        d2 = (queries[:, None, :] - points[best_i]).square().sum(-1)
        if exclude is not None:
            d2 = d2.masked_fill(best_i == exclude[:, None], math.inf)
        d2, order = d2.sort(dim=1, stable=True)
        return d2[:, :k], best_i.gather(1, order[:, :k])


def sharded_knn(
    queries: Tensor,
    points: Tensor,
    ids: Tensor | None,
    k: int,
    exclude: Tensor,
    comm: dist.Comm | None,
    what: str,
    *,
    norms: Tensor | None = None,
    **engine: object,
) -> Tensor:
    r"""Exact k nearest neighbours of ``queries`` ``[B, d]`` among the points of all ranks.

    Each rank searches its own ``points`` ``[n, d]`` (global ids ``ids`` ``[n]``, or
    ``None`` for ``0..n-1``; the per-query ``exclude`` is a local position or ``-1``) for its
    best ``k``; the candidates of all ranks are gathered and the best ``k`` of them kept.
    Every rank must pass the same queries (gathered ones). With the engine's
    ``backend="auto"`` (the default) the search is :func:`exact_knn` (``norms``: the points'
    squared norms, if known); another backend named in ``engine`` goes through
    :func:`~vaepriors.engine.knn`. Returns global ids ``[B, k]``, nearest first.
    """
    b, n = queries.shape[0], points.shape[0]
    if n > k:
        if engine.get("backend", "auto") == "auto":
            d2, idx = exact_knn(queries, points, k, exclude, norms=norms, memory_budget=engine.get("memory_budget"))
        else:
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
    found = (idx if ids is None else ids[idx]) if n else torch.full_like(idx, -1)
    found = torch.where(torch.isinf(d2), torch.full_like(found, -1), found)
    if comm is None:
        return found
    all_d2, _ = dist.all_gather_rows(d2.unsqueeze(0), comm, what)  # [R, B, k]
    all_ids, _ = dist.all_gather_rows(found.unsqueeze(0), comm, what)
    d2 = all_d2.permute(1, 0, 2).reshape(b, -1)
    found = all_ids.permute(1, 0, 2).reshape(b, -1)
    order = d2.topk(k, dim=1, largest=False).indices
    return found.gather(1, order)
