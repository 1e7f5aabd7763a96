r"""Communication across ranks under :mod:`torch.distributed` (DDP, ``torchrun``).

The priors call these inside ``log_prob``, cache updates and evaluation. Everything is built on
the three collectives that gloo (CPU) and NCCL (CUDA) both support: ``all_gather``,
``all_reduce`` and ``broadcast``. Tensors stay on their device (NCCL needs CUDA tensors).

Every collective is issued asynchronously and waited for at most :func:`get_timeout` seconds:
a rank that exited, crashed or never reached the same call gives a :class:`VAEPriorsError`
that names the operation, instead of a hang. After such an error the process group is out of
step (the collective may still be pending in the backend): end the job.

A process outside a distributed run (or in a world of one) gets ``comm() is None``; every
function here then does the single-process thing.

Example:
    >>> from vaepriors.distributed import comm, shard_range
    >>> comm() is None  # no process group in this process
    True
    >>> [shard_range(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks
from .engine._core import LogSumExp, safe_shift
from .errors import VAEPriorsError

__all__ = [
    "Comm", "all_gather_rows", "all_reduce_max", "all_reduce_sum", "broadcast", "comm", "gather_rows",
    "get_timeout", "logsumexp_across", "set_timeout", "shard_range", "shard_sizes", "sync_generator",
]  # fmt: skip


@dataclass(frozen=True)
class Comm:
    r"""A process group as the priors use it: ``group`` (``None`` is torch's default group),
    this process's ``rank`` in it and its ``world_size`` (at least 2). Get one from :func:`comm`."""

    group: Any
    rank: int
    world_size: int


def comm(process_group: Any = None, enabled: bool = True) -> Comm | None:
    r"""The :class:`Comm` of ``process_group`` (``None``: the default group, as in torch).

    Arguments:
        process_group: A :class:`torch.distributed.ProcessGroup`, or ``None``.
        enabled: ``False`` turns communication off (every rank works alone).

    Returns:
        ``None`` when ``enabled`` is false, :mod:`torch.distributed` is unavailable or not
        initialised, or the group holds one process; otherwise the :class:`Comm`.

    Example:
        >>> comm(enabled=False) is None
        True
    """
    if not enabled or not dist.is_available() or not dist.is_initialized():
        return None
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise VAEPriorsError("`process_group` does not contain this process")
    world_size = dist.get_world_size(process_group)
    return None if world_size == 1 else Comm(process_group, rank, world_size)


_TIMEOUT = 300.0


def set_timeout(seconds: float) -> None:
    r"""Sets how long any collective of this module may wait (300 s unless set), process-wide.

    Arguments:
        seconds: A positive, finite number of seconds.

    Example:
        >>> from vaepriors.distributed import get_timeout, set_timeout
        >>> set_timeout(60); get_timeout()
        60.0
        >>> set_timeout(300)
    """
    global _TIMEOUT
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise VAEPriorsError(f"`seconds` must be a positive finite number, got {seconds!r}")
    _TIMEOUT = float(seconds)


def get_timeout() -> float:
    r"""The timeout of every collective, in seconds (see :func:`set_timeout`)."""
    return _TIMEOUT


def _run(c: Comm, what: str, op: str, issue: Callable[[], Any]) -> None:
    """Issues one collective (``async_op=True``) and waits for it, at most the timeout."""
    seconds = _TIMEOUT
    try:
        # At least 1 ms: a zero timeout means "wait forever" to the backends.
        if not issue().wait(timeout=timedelta(milliseconds=max(1, math.ceil(seconds * 1000)))):
            raise RuntimeError("Work.wait returned False")
    except Exception as err:  # RuntimeError, DistBackendError, ...: whatever the backend raises
        raise VAEPriorsError(
            f"{what}: {op} failed on rank {c.rank} of {c.world_size} (timeout {seconds:g} s, "
            f"see vaepriors.distributed.set_timeout): {err}. Likely cause: a rank exited or did not "
            f"reach the same call. The process group is out of step now; end the job."
        ) from err


def _copy(t: Tensor) -> Tensor:
    """A contiguous copy the backend may write into (never autograd's own gradient buffer)."""
    return t.clone(memory_format=torch.contiguous_format)


def _staging(c: Comm, t: Tensor) -> torch.device | None:
    """Where a CPU tensor must go for the backend: NCCL moves CUDA tensors only."""
    if t.device.type == "cpu" and dist.get_backend(c.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _all_reduce(t: Tensor, c: Comm, what: str, op: str, kind: Any) -> Tensor:
    stage = _staging(c, t)
    buf = t if stage is None else t.to(stage)
    _run(c, what, op, lambda: dist.all_reduce(buf, kind, group=c.group, async_op=True))
    if stage is not None:
        t.copy_(buf)
    return t


def _all_gather(x: Tensor, c: Comm, what: str, op: str) -> Tensor:
    """``[world_size, *x.shape]``: every rank's ``x`` (same shape on all ranks)."""
    stage = _staging(c, x)
    home = x.device
    x = x.contiguous() if stage is None else x.to(stage)
    buf = x.new_empty((c.world_size, *x.shape))  # outputs are views of one buffer: no stack afterwards
    _run(c, what, op, lambda: dist.all_gather(list(buf.unbind(0)), x, group=c.group, async_op=True))
    return buf if stage is None else buf.to(home)


# Row counts travel with what the ranks must agree on (dtype, trailing shape): one collective
# finds a mismatch, every rank sees it and raises alike, and the group stays in step.
_DTYPES = tuple(sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str))
_DIMS = 6  # trailing sizes sent in full; a checksum covers longer shapes


def _header(t: Tensor) -> Tensor:
    trail = list(t.shape[1:])
    check = 0
    for s in trail:
        check = (check * 1000003 + s + 1) % (2**61 - 1)
    sizes = (trail + [-1] * _DIMS)[:_DIMS]
    return torch.tensor([t.shape[0], _DTYPES.index(t.dtype), len(trail), check, *sizes], device=t.device)


def _describe(head: list[int]) -> str:
    dims = [str(s) for s in head[4 : 4 + min(head[2], _DIMS)]] + ["..."] * (head[2] > _DIMS)
    return f"[{', '.join(['*', *dims])}] {_DTYPES[head[1]]}"


def _rows(t: Tensor, what: str) -> Tensor:
    t = _checks.tensor(t, "t")
    if t.dim() == 0:
        raise VAEPriorsError(f"{what}: `t` must have a first dimension of rows, got a scalar")
    return t


def all_gather_rows(t: Tensor, comm: Comm | None, what: str) -> tuple[Tensor, list[int]]:
    r"""Every rank's ``t`` concatenated along dim 0, in rank order; no gradient.

    Ranks may hold different numbers of rows (zero too); trailing shape and dtype must agree.
    Two collectives: row counts (with shapes and dtypes) first, then the rows, padded to the
    largest count.

    Arguments:
        t: A tensor of shape ``[n_r, *shape]`` on rank ``r``.
        comm: From :func:`comm`; ``None`` returns ``t`` itself.
        what: Who asks, for error messages (e.g. ``"ExemplarPrior.log_prob: gathering queries"``).

    Returns:
        The concatenation ``[sum_r n_r, *shape]`` (detached) and the row counts ``[n_0, ...]``.

    Example:
        >>> all_gather_rows(torch.zeros(2, 3), None, "example")[1]
        [2]
    """
    t = _rows(t, what).detach()
    if comm is None:
        return t, [t.shape[0]]
    heads = _all_gather(_header(t), comm, what, "all_gather of row counts").tolist()
    if any(h[1:] != heads[0][1:] for h in heads):
        shapes = ", ".join(f"rank {r}: {_describe(h)}" for r, h in enumerate(heads))
        raise VAEPriorsError(
            f"{what}: all_gather_rows needs the same trailing shape and dtype on every rank; got {shapes}"
        )
    rows = [h[0] for h in heads]
    n = max(rows)
    if n == 0:
        return t, rows
    if t.shape[0] < n:
        t = torch.cat([t, t.new_zeros((n - t.shape[0], *t.shape[1:]))])
    buf = _all_gather(t, comm, what, "all_gather of rows")
    if min(rows) == n:
        return buf.flatten(0, 1), rows
    return torch.cat([buf[r, :k] for r, k in enumerate(rows)]), rows


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, c: Comm, what: str, rows: list) -> Tensor:  # type: ignore[override]
        out, counts = all_gather_rows(t, c, what)
        rows.extend(counts)
        ctx.c, ctx.what, ctx.start, ctx.n = c, what, sum(counts[: c.rank]), counts[c.rank]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        # Every rank's loss may use every row: this rank's rows get the sum over ranks.
        g = _all_reduce(_copy(grad), ctx.c, ctx.what, "all_reduce of gathered rows' gradient", dist.ReduceOp.SUM)
        return g[ctx.start : ctx.start + ctx.n], None, None, None


def gather_rows(t: Tensor, comm: Comm | None, what: str) -> tuple[Tensor, list[int]]:
    r""":func:`all_gather_rows`, differentiable with respect to ``t``.

    The backward sums the gradient of the whole concatenation over ranks (one ``all_reduce``)
    and keeps this rank's rows: right whether each rank's loss uses every gathered row or
    only its own. Every rank must backpropagate through its result (a rank whose loss does not
    use it would leave the others waiting).

    Arguments:
        t: A tensor of shape ``[n_r, *shape]`` on rank ``r``.
        comm: From :func:`comm`; ``None`` returns ``t`` itself.
        what: Who asks, for error messages.

    Returns:
        The concatenation ``[sum_r n_r, *shape]`` and the row counts ``[n_0, ...]``.
    """
    t = _rows(t, what)
    if comm is None:
        return t, [t.shape[0]]
    rows: list[int] = []
    return _GatherRows.apply(t, comm, what, rows), rows


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, c: Comm, what: str) -> Tensor:  # type: ignore[override]
        ctx.c, ctx.what = c, what
        return _all_reduce(_copy(t.detach()), c, what, "all_reduce (sum)", dist.ReduceOp.SUM)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        # Every rank's loss sees the sum: the gradient of each input is the sum over ranks.
        return _all_reduce(_copy(grad), ctx.c, ctx.what, "all_reduce of a sum's gradient", dist.ReduceOp.SUM), None, None


def all_reduce_sum(t: Tensor, comm: Comm | None, what: str) -> Tensor:
    r"""The sum of ``t`` over ranks, as a new tensor; differentiable (the backward sums the
    gradient over ranks). ``comm=None`` returns ``t``.

    Example:
        >>> all_reduce_sum(torch.ones(2), None, "example")
        tensor([1., 1.])
    """
    t = _checks.tensor(t, "t")
    return t if comm is None else _AllReduceSum.apply(t, comm, what)


def all_reduce_max(t: Tensor, comm: Comm | None, what: str) -> Tensor:
    r"""The elementwise maximum of ``t`` over ranks, as a new tensor, without gradient."""
    t = _checks.tensor(t, "t").detach()
    if comm is None:
        return t
    return _all_reduce(_copy(t), comm, what, "all_reduce (max)", dist.ReduceOp.MAX)


def broadcast(t: Tensor, comm: Comm | None, what: str, src: int = 0) -> Tensor:
    r"""Overwrites ``t`` on every rank, in place, with rank ``src``'s (a rank of ``comm``'s
    group); returns ``t``. Shapes and dtypes must agree: ranks cannot check that cheaply here.
    """
    t = _checks.tensor(t, "t")
    if comm is None:
        return t
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < comm.world_size:
        raise VAEPriorsError(f"{what}: `src` must be a rank in [0, {comm.world_size}), got {src!r}")
    root = src if comm.group is None else dist.get_global_rank(comm.group, src)
    stage = _staging(comm, t)
    buf = t.detach() if t.is_contiguous() else t.detach().contiguous()  # the backends need contiguous
    buf = buf if stage is None else buf.to(stage)
    _run(comm, what, f"broadcast from rank {src}", lambda: dist.broadcast(buf, root, comm.group, async_op=True))
    if stage is not None or not t.is_contiguous():
        with torch.no_grad():
            t.copy_(buf)
    return t


def sync_generator(generator: torch.Generator, comm: Comm | None, what: str) -> torch.Generator:
    r"""Sets ``generator``'s state on every rank to rank 0's; returns ``generator``.

    The states are gathered (a few kB each) rather than broadcast, so that generators of
    different kinds (CPU and CUDA states differ in size) give an error, not a hang.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sync_generator(g, None, "example") is g
        True
    """
    if not isinstance(generator, torch.Generator):
        raise VAEPriorsError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
    if comm is None:
        return generator
    state = generator.get_state()  # a CPU uint8 tensor, staged for NCCL by the collectives
    states, sizes = all_gather_rows(state, comm, what)
    if len(set(sizes)) > 1:
        raise VAEPriorsError(
            f"{what}: generator states differ in size across ranks ({sizes}): use one kind of generator on every rank"
        )
    generator.set_state(states[: sizes[0]].cpu())
    return generator


def shard_sizes(n: int, world_size: int) -> list[int]:
    r"""The sizes of :func:`shard_range`'s blocks, in rank order (they differ by at most 1).

    Example:
        >>> shard_sizes(10, 4)
        [3, 3, 2, 2]
    """
    return [stop - start for start, stop in (shard_range(n, r, world_size) for r in range(world_size))]


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    r"""Rank ``rank``'s block ``[start, stop)`` of ``n`` items split in ``world_size`` contiguous
    blocks, in rank order, whose sizes differ by at most 1 (the first ``n % world_size`` one more).

    Example:
        >>> shard_range(10, 1, 4)
        (3, 6)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise VAEPriorsError(f"`n` must be a non-negative int, got {n!r}")
    _checks.positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise VAEPriorsError(f"`rank` must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def logsumexp_across(max: Tensor, sum: Tensor, comm: Comm | None, what: str) -> Tensor:
    r"""The log-sum-exp over every rank's shard of components, from this rank's partial.

    ``max`` and ``sum`` are as in :class:`~vaepriors.engine.LogSumExp`: the largest exponent of
    this rank's shard (no gradient; ``-inf`` where the shard is empty) and the sum of
    ``exp(exponent - max)`` (``0`` there). The result is ``M + log(sum_r sum_r exp(max_r - M))``
    with ``M`` the maximum over ranks: exact, no overflow, ``-inf`` where every shard is
    empty, and differentiable through ``sum`` (the backward sums the gradient over ranks).

    Arguments:
        max: This rank's maxima, shape ``[B]``.
        sum: This rank's shifted sums, shape ``[B]``.
        comm: From :func:`comm`; ``None``: this rank holds every component.
        what: Who asks, for error messages.

    Returns:
        The log-sum-exp, shape ``[B]``, equal on every rank.

    Example:
        >>> logsumexp_across(torch.tensor([0.0, -math.inf]), torch.tensor([2.0, 0.0]), None, "example")
        tensor([0.6931,   -inf])
    """
    max, sum = _checks.floating(max, "max"), _checks.floating(sum, "sum")
    if max.shape != sum.shape:
        raise VAEPriorsError(
            f"{what}: `max` and `sum` must have one shape, got {tuple(max.shape)} and {tuple(sum.shape)}"
        )
    if comm is None:
        return LogSumExp(max.detach(), sum).log()
    top = all_reduce_max(max, comm, what)
    # max_r - M <= 0: no overflow; an empty shard (-inf, 0) adds exactly 0, even where M = -inf.
    total = all_reduce_sum(sum * torch.exp(max.detach() - safe_shift(top)), comm, what)
    return LogSumExp(top, total).log()
