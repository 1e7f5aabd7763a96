r"""What the latent representation holds: active units and kNN classification of encoder means."""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

from .. import _checks
from .. import distributed as dist
from ..engine import knn
from ..errors import VAEPriorsError
from ._common import (
    _batches,
    _budget,
    _data_tensor,
    _device_of,
    _distributed_flag,
    _encode_all,
    _evaluating,
    _location_of,
    _my_rows,
    _parts,
)

__all__ = ["ActiveUnits", "active_units", "knn_accuracy"]


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
