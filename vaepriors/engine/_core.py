"""Pieces every backend shares: the partial result, the per-component constants, and the
accurate squared distances of one block of queries x components."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, NamedTuple, Sequence

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
        # Only an exact zero is an empty shard; a NaN sum stays NaN rather than pass as -inf.
        return torch.where(self.sum == 0, torch.full_like(value, -math.inf), value)

    @staticmethod
    def combine(parts: Sequence["LogSumExp"]) -> "LogSumExp":
        """The partial over the union of disjoint shards, exactly."""
        if len(parts) == 0:
            raise ValueError("combine needs at least one partial")
        return LogSumExp.reduce(torch.stack([p.max for p in parts]), torch.stack([p.sum for p in parts]), 0)

    @staticmethod
    def reduce(max: Tensor, sum: Tensor, dim: int) -> "LogSumExp":
        """:meth:`combine` of partials stacked along ``dim`` (``max`` and ``sum`` alike);
        ``sum = 1`` makes it the partial of the exponents ``max`` themselves."""
        m = max.amax(dim)
        return LogSumExp(m, (sum * torch.exp(max - safe_shift(m).unsqueeze(dim))).sum(dim))


def backward_rows(grad_sum: Tensor, max: Tensor, sum: Tensor) -> tuple[Tensor, Tensor]:
    """What a custom backward of a partial ``(max, sum)`` multiplies ``exp(arg - shift)``
    by, and the shift: ``dL/d arg_ij = dL/d sum_i * exp(arg_ij - max_i)``. Empty rows
    (``sum = 0``) get no gradient and a finite shift.

    The backward must shift by the forward's max and scale by the gradient of its sum, not
    normalise by the log-sum-exp ``L = max + log(sum)``: where ``|max|`` is large, ``L``
    rounds to ``max`` (``log 2`` is below an ulp of 1e8 in float32), and ``exp(arg - L)``
    would then give each of k tied components probability 1 instead of 1/k."""
    keep = sum > 0
    return torch.where(keep, grad_sum, torch.zeros_like(grad_sum)), torch.where(keep, safe_shift(max), torch.zeros_like(max))


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


# A pair (i, j) is "near" when the expansion's result is below NEAR times the size of its
# terms (|z_i|^2 + |mu_j|^2, scaled). Its rounding error is then up to ~eps / NEAR of the
# distance itself, so near pairs are recomputed exactly from the difference z_i - mu_j;
# every other pair keeps a relative error below ~8 eps, i.e. about 1e-6 in float32.
NEAR = 0.125


class Near(NamedTuple):
    """Pairs recomputed by the difference form, in block coordinates."""

    i: Tensor  # [K] row in the block
    j: Tensor  # [K] column in the block


def pieces(count: int, d: int, cells: int) -> range:
    """Starts of slices of ``count`` near pairs whose ``[piece, d]`` temporaries fit ``cells``."""
    return range(0, count, max(1, cells // max(d, 1)))


def inverse_variance(log_var: Tensor) -> Tensor:
    """``exp(-log_var)`` (0-d, [N] or [N, d]), at most the dtype's largest finite value / e:
    a log-variance below about -88.7 would give ``inf`` in float32, and ``inf * 0`` NaN
    for a query on its mean."""
    floor = 1.0 - math.log(torch.finfo(log_var.dtype).max)  # clamped before exp: no inf * 0 in its gradient
    return torch.exp(-log_var.clamp(min=floor))


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Float32 GEMMs in IEEE precision inside the block, whatever the caller's TF32 setting.

    With TF32 on (``torch.set_float32_matmul_precision("high")``, ``allow_tf32 = True`` or
    ``fp32_precision = "tf32"``), cuBLAS rounds GEMM inputs to 10 mantissa bits, and the
    cross term ``z . mu`` of a squared distance with it: errors of ~1e-3 relative, times
    ``1 / sigma^2`` in the exponent. The engine's GEMMs run under this block. It sets the
    flag through the API the caller used (torch refuses to mix the legacy and the newer
    one) and restores it on exit. The flag is process-wide, as torch keeps it.
    """
    flags = torch.backends.cuda.matmul
    try:
        legacy = flags.allow_tf32  # raises once the newer fp32_precision API has been used
    except RuntimeError:
        legacy = None
    if legacy is not None:
        name, saved, exact = "allow_tf32", legacy, False
    else:
        name, saved, exact = "fp32_precision", flags.fp32_precision, "ieee"
    if saved == exact:
        yield
        return
    setattr(flags, name, exact)
    try:
        yield
    finally:
        setattr(flags, name, saved)


class _IEEEMatmul(torch.autograd.Function):
    """``a @ b`` under :func:`ieee_fp32`, its backward too (and twice differentiable)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        with ieee_fp32():
            return a @ b

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        ga = _IEEEMatmul.apply(grad, b.mT) if ctx.needs_input_grad[0] else None
        gb = _IEEEMatmul.apply(a.mT, grad) if ctx.needs_input_grad[1] else None
        return ga, gb


def tf32_capable(t: Tensor) -> bool:
    """Whether a GEMM on ``t``'s device may run in TF32 (the flags govern cuBLAS only)."""
    return t.device.type == "cuda"


def addmm(bias: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``bias + alpha * a @ b`` with the GEMM in IEEE float32 (:func:`ieee_fp32`), on CUDA
    also in the backward that autograd runs later, outside any block of ours."""
    if not tf32_capable(a):
        return torch.addmm(bias, a, b, alpha=alpha)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return torch.add(bias, _IEEEMatmul.apply(a, b), alpha=alpha)
    with ieee_fp32():
        return torch.addmm(bias, a, b, alpha=alpha)


def block_sq_dist(
    zc: Tensor,
    zz: Tensor,
    mc: Tensor,
    mm: Tensor,
    inv: Tensor,
    z: Tensor,
    means: Tensor,
    *,
    inplace: bool = False,
) -> tuple[Tensor, Near]:
    r"""Squared distances of a block, accurate to a few ulps even for near-coincident points.

    ``zc [b, d]`` and ``mc [n, d]`` are the centred queries and means, ``z`` and ``means``
    the raw ones (near pairs subtract those: centring itself rounds). For isotropic scales (``inv`` 0-d or
    ``[n]``) the result is the plain ``|z_i - mu_j|^2`` (scale it with :func:`exponents`),
    with ``zz = |z|^2 [b]`` and ``mm = |mu|^2 [n]``; for diagonal scales (``inv [n, d]``) it
    is already scaled, ``sum_k (z_ik - mu_jk)^2 inv_jk``, with ``zz = z*z [b, d]`` and
    ``mm = sum_k mu_jk^2 inv_jk [n]``.

    The bulk comes from the expansion (one GEMM); pairs where it cancels badly are
    overwritten with the difference form (differentiably), and returned as :class:`Near`.
    ``inplace=True`` (no autograd) saves a temporary.
    """
    if inv.dim() == 2:
        g = gemm_inverse_variance(inv)
        t = addmm(mm.expand(zc.shape[0], -1), zz, g.T)
        d2 = addmm(t, zc, (mc * g).T, alpha=-2)
    else:
        t = zz[:, None] + mm
        d2 = addmm(t, zc, mc.T, alpha=-2)
    with torch.no_grad():
        # u > 0 marks near pairs; rows are screened with a cheap max before any nonzero().
        # An expansion that overflowed (huge inverse variances) gives u = NaN (inf - inf):
        # such pairs take the difference form too (amax propagates NaN to its row).
        u = t.mul_(NEAR).sub_(d2) if inplace else t.detach() * NEAR - d2.detach()
        del t
        top = u.amax(1) if u.numel() else u.new_zeros(0)
        rows = torch.nonzero(~(top <= 0)).view(-1)  # NaN fails every comparison
        if rows.numel() == 0:
            empty = rows.new_zeros(0)
            return d2, Near(empty, empty)
        idx = torch.nonzero(~(u[rows] <= 0))
        del u
    i, j = rows[idx[:, 0]], idx[:, 1]
    exact = []
    step = pieces(i.shape[0], z.shape[1], d2.numel()).step  # [step, d] temporaries: a block's worth
    for s in range(0, i.shape[0], step):
        ii, jj = i[s : s + step], j[s : s + step]
        sq = (z[ii] - means[jj]).square()
        if inv.dim() == 2:
            sq = sq * inv[jj]
        exact.append(sq.sum(-1))
    d2 = d2.index_put((i, j), torch.cat(exact) if len(exact) > 1 else exact[0])
    return d2, Near(i, j)


def exponents(d2: Tensor, inv: Tensor, a: Tensor) -> Tensor:
    r"""``a_j - d2_ij * inv_j / 2`` (isotropic) or ``a_j - d2_ij / 2`` (diagonal: already scaled)."""
    if inv.dim() == 2:
        return torch.add(a, d2, alpha=-0.5)
    return torch.addcmul(a, d2, (-0.5 * inv).expand(a.shape))


def exclude_(arg: Tensor, local: Tensor, value: float) -> Tensor:
    r"""Sets ``arg[r, local[r]] = value`` for rows whose ``local`` lies in ``[0, n)``, in place,
    without a device synchronisation (out-of-range rows write their own value back)."""
    n = arg.shape[1]
    valid = (local >= 0) & (local < n)
    col = local.clamp(0, n - 1)[:, None]
    cur = arg.gather(1, col)
    return arg.scatter_(1, col, torch.where(valid[:, None], torch.full_like(cur, value), cur))


def exclude(arg: Tensor, local: Tensor, value: float) -> Tensor:
    """Out-of-place :func:`exclude_`, for tensors autograd needs."""
    n = arg.shape[1]
    valid = (local >= 0) & (local < n)
    col = local.clamp(0, n - 1)[:, None]
    cur = arg.gather(1, col)
    return arg.scatter(1, col, torch.where(valid[:, None], torch.full_like(cur, value), cur))


def gemm_inverse_variance(inv: Tensor) -> Tensor:
    """Diagonal inverse variances as the GEMMs see them: at most ``finfo.max ** 0.25``
    (1.4e9 in float32), so that ``mu * inv`` and ``mu^2 * inv`` stay finite, forward and
    backward. Components sharper than that go wholly through the difference form
    (:func:`sq_norms` gives them ``mm = inf``), which uses the true ``inv``."""
    return inv.clamp(max=torch.finfo(inv.dtype).max ** 0.25)


def sq_norms(z: Tensor, means: Tensor, inv: Tensor) -> tuple[Tensor, Tensor]:
    """The ``zz`` and ``mm`` that :func:`block_sq_dist` takes, for centred inputs."""
    if inv.dim() == 2:
        g = gemm_inverse_variance(inv)
        mm = (means * means * g).sum(-1)
        sharp = (inv > g).any(-1)
        return z * z, torch.where(sharp, torch.full_like(mm, math.inf), mm)
    return (z * z).sum(-1), (means * means).sum(-1)


def plan_blocks(b: int, n: int, cells: int, rows: int = 256) -> tuple[int, int]:
    r"""Block sizes ``(bc, nc)`` with ``bc * nc <= cells`` (at least 1 x 1), preferring whole
    rows of components and about ``rows`` queries per block."""
    cells = max(1, int(cells))
    if b * n <= cells:
        return b, n
    nc = min(n, max(1, cells // min(b, rows)))
    bc = min(b, max(1, cells // nc))
    return bc, nc


def warn_fallback(warned: set, what: str, device: torch.device, dtype: torch.dtype, cause: str, fallback: str, fix: str) -> None:
    """One RuntimeWarning per device type and dtype when an optional backend cannot run."""
    key = (device.type, str(dtype))
    if key in warned:
        return
    warned.add(key)
    warnings.warn(
        f"vaepriors: {what} is unavailable on {device.type} for {dtype} because {cause}; "
        f"falling back to {fallback}. {fix}",
        RuntimeWarning,
        stacklevel=5,
    )
