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


def exp_floor(dtype: torch.dtype) -> float | None:
    r"""The exponent below which :func:`shifted_exp_` rounds a term up to ``exp(floor)``, a
    normal number (-86.3 in float32, -707.4 in float64); ``None`` (no floor) for float16,
    whose smallest normal is not far below its precision.

    Why: torch's CPU ``exp`` leaves its vector path for results that are denormal or 0
    (measured on this project's EPYC machine: 1.5 ns an element in range, 22-55 ns below
    -87 in float32), and most terms of a wide mixture lie there. A term so raised adds at
    most ``exp(floor)`` to a sum holding its row's maximum, ``exp(0) = 1``: with N terms a
    relative change below ``N * 2e-38`` in float32, far below one ulp."""
    fi = torch.finfo(dtype)
    floor = math.log(fi.tiny) + 1.0
    return floor if floor < math.log(fi.eps) - 40.0 else None


def shifted_exp_(arg: Tensor, shift: Tensor, *, drop: bool = False) -> Tensor:
    r"""``exp(max(arg - shift, floor))`` in place (:func:`exp_floor`). A row whose shift is
    its max holds its largest term, 1; rows that are empty (``-inf`` max) need their sums
    zeroed by the caller.

    ``drop=True`` (a backward's probabilities) sets the raised terms to exactly 0: gradients
    multiply each probability by its distance, and a raised term's ``exp(floor)`` times a
    distance up to :func:`big` is not negligible, while its true weight is (a term at most
    ``exp(floor + 1/2)`` times its row's largest, whose own factor the gradient holds)."""
    arg.sub_(shift)
    floor = exp_floor(arg.dtype)
    if floor is None:
        return arg.exp_()
    arg.clamp_(min=floor).exp_()
    if drop:
        torch.nn.functional.threshold_(arg, math.exp(floor + 0.5), 0.0)
    return arg


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


# ----------------------------------------------------------------------------- distances
#
# Every backend works with the SCALED squared distance of a pair,
#     D_ij = sum_k (z_ik - mu_jk)^2 / s_jk^2,   exponent a_j - D_ij / 2.
# Scales enter as r = exp(-log_var / 2), which multiplies differences BEFORE they are
# squared: (z - mu)^2 * exp(-log_var) under- and overflows in float32 (exp(88.8) = inf; a
# squared difference of 1e-20 is denormal) where D itself is an ordinary number.

# A pair (i, j) is "near" when the expansion's result is below NEAR times the size of its
# terms (|z_i|^2 + |mu_j|^2, scaled). Its rounding error is then up to ~eps / NEAR of the
# distance itself, so near pairs are recomputed exactly from the difference z_i - mu_j;
# every other pair keeps a relative error below ~8 eps, i.e. about 1e-6 in float32.
NEAR = 0.125


def big(dtype: torch.dtype) -> float:
    """The largest scaled squared norm the expansion takes: with ``|z|^2, |mu|^2 <= big``,
    ``|z|^2 + |mu|^2 - 2 z.mu`` stays finite. Rows and columns beyond it are flagged and all
    their pairs take the difference form."""
    return torch.finfo(dtype).max / 16


def root_inverse_variance(log_var: Tensor) -> Tensor:
    """``r = exp(-log_var / 2)`` (0-d, [N] or [N, d]). Log-variances below
    ``-2 (log(finfo.max) - 1)`` (-175.4 in float32), where ``r`` itself would overflow, are
    clamped there (their gradient is 0): no float32 data resolves such a scale."""
    floor = -2.0 * (math.log(torch.finfo(log_var.dtype).max) - 1.0)
    return torch.exp(-0.5 * log_var.clamp(min=floor))


def gemm_inverse_variance(r: Tensor) -> Tensor:
    """``r^2`` as the GEMMs of per-component and diagonal scales see it: at most
    ``finfo.max ** 0.25`` (1.4e9 in float32, log-variance -20.9), so that ``mu * inv``,
    ``mu^2 * inv`` and the backward's ``P * inv`` stay finite. Sharper components are
    flagged (:class:`Frame`) and go wholly through the difference form, which uses ``r``."""
    return (r * r).clamp(max=torch.finfo(r.dtype).max ** 0.25)


class Rows(NamedTuple):
    """The queries of a block as :func:`block_sq_dist` takes them."""

    raw: Tensor  # [b, d] as given: near pairs subtract these
    q: Tensor  # [b, d] centred (and times r for a scalar scale); 0 on flagged rows
    zz: Tensor  # [b] |q|^2, or [b, d] q * q for diagonal scales
    flag: Tensor  # [b] bool: too large for the expansion, every pair near
    flagged: bool


class Cols(NamedTuple):
    """The components of a block as :func:`block_sq_dist` takes them."""

    raw: Tensor  # [n, d] as given
    mc: Tensor  # [n, d] centred (and times r for a scalar scale); 0 on flagged columns
    q: Tensor  # [n, d] the cross term's operand: mc, or mc * g
    mm: Tensor  # [n] scaled |mu|^2
    r: Tensor  # root inverse variance: 0-d, [n] or [n, d]
    g: Tensor | None  # GEMM inverse variance, [n] or [n, d] (None for a scalar scale)
    flag: Tensor  # [n] bool: too large for the expansion or sharper than the GEMMs take
    flagged: bool


class Frame:
    r"""Centring and scales of one call, applied block by block (no input-sized copies).

    A scalar scale multiplies the centred data (``q = (z - c) r``): the expansion then gives
    ``D`` directly, at any log-variance. Per-component and diagonal scales use
    ``D = |z|^2 g + |mu|^2 g - 2 z.(mu g)`` with the capped ``g`` of
    :func:`gemm_inverse_variance`.
    """

    def __init__(self, z: Tensor, means: Tensor, log_var: Tensor) -> None:
        self.z, self.means, self.log_var = z, means, log_var
        self.c = means.detach().mean(0)
        self.scalar, self.diag = log_var.dim() == 0, log_var.dim() == 2
        self.r = root_inverse_variance(log_var) if self.scalar else None
        # the largest GEMM inverse variance, without an [N, d] temporary (r is monotone)
        lv_min = log_var.detach().amin() if log_var.numel() else log_var.new_zeros(())
        self.gmax = None if self.scalar else gemm_inverse_variance(root_inverse_variance(lv_min))
        self.big = big(z.dtype)

    def rows(self, rows: slice = slice(None)) -> Rows:
        raw = self.z[rows]
        q = raw - self.c
        if self.scalar:
            q = q * self.r
        zz, flag = self._rows(q)
        flagged = bool(flag.any())
        if flagged:  # zeroed: finite terms; their pairs are recomputed
            q = torch.where(flag[:, None], torch.zeros_like(q), q)
            zz, _ = self._rows(q)
        return Rows(raw, q, zz, flag, flagged)

    def _rows(self, q: Tensor) -> tuple[Tensor, Tensor]:
        zz = q * q if self.diag else (q * q).sum(-1)
        with torch.no_grad():
            size = zz.sum(-1) if self.diag else zz
            if self.gmax is not None:
                size = size * self.gmax
            return zz, ~(size <= self.big)  # NaN and inf too

    def cols(self, cols: slice = slice(None)) -> Cols:
        raw = self.means[cols]
        mc = raw - self.c
        r = self.r if self.scalar else root_inverse_variance(self.log_var[cols])  # per block: no [N, d] copy
        g = None if self.scalar else gemm_inverse_variance(r)
        with torch.no_grad():
            sharp = None if g is None else r * r > g  # inf > g too
            if sharp is not None and self.diag:
                sharp = sharp.any(-1)
        mc, q, mm, flag = self._cols(mc, r, g, sharp)
        flagged = bool(flag.any())
        if flagged:
            mc = torch.where(flag[:, None], torch.zeros_like(mc), mc)
            mc, q, mm, _ = self._cols(mc, None, g, None)
        return Cols(raw, mc, q, mm, r, g, flag, flagged)

    def _cols(self, mc: Tensor, r: Tensor | None, g: Tensor | None, sharp: Tensor | None):
        if g is None:
            if r is not None:
                mc = mc * r
            q = mc
        else:
            q = mc * (g[:, None] if g.dim() == 1 else g)
        mm = (mc * q).sum(-1)
        with torch.no_grad():
            flag = ~(mm <= self.big)
            if sharp is not None:
                flag |= sharp
        return mc, q, mm, flag


class Near:
    """The pairs of a block recomputed by the difference form: a boolean mask (1 byte per
    pair of the block) and how many each row holds, handed out in bounded chunks."""

    def __init__(self, mask: Tensor | None, counts: Tensor | None) -> None:
        self.mask, self.counts = mask, counts

    def chunks(self, cap: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(i, j)`` block coordinates of the near pairs, at most ``cap`` pairs at a time;
        ``None``: all at once."""
        if self.mask is None:
            return
        total = int(self.counts.sum())
        if cap is None or total <= cap:
            if total:
                yield _nonzero2d(self.mask)
            return
        # Runs of consecutive rows holding at most ``cap`` pairs in all, found from per-row
        # counts: one nonzero() per run (a view of the mask, no copy) rather than per row.
        n = self.mask.shape[1]
        start, held = 0, 0
        for row, count in enumerate(self.counts.tolist() + [cap + 1]):
            if held + count <= cap:
                held += count
                continue
            if held:
                i, j = _nonzero2d(self.mask[start:row])
                yield i + start, j
            start, held = row, count
            if count > cap and row < self.mask.shape[0]:  # a row wider than cap: column ranges
                for c0 in range(0, n, cap):
                    j = self.mask[row, c0 : c0 + cap].nonzero().view(-1)
                    if j.numel():
                        yield torch.full_like(j, row), j + c0
                start, held = row + 1, 0


def _nonzero2d(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(i, j)`` of the true entries of a contiguous 2-d bool tensor. On CPU, where
    ``nonzero`` reads a bool tensor byte by byte (~2 ns a byte, measured), the sparse near
    pairs are found among 8-byte words first (5x faster at a few per 1000)."""
    n = mask.shape[1]
    flat = mask.reshape(-1)
    if mask.device.type == "cpu" and flat.numel() % 8 == 0 and flat.storage_offset() % 8 == 0:
        words = flat.view(torch.int64).nonzero().view(-1)
        hit = flat.view(-1, 8)[words].nonzero()
        idx = words[hit[:, 0]] * 8 + hit[:, 1]
    else:
        idx = flat.nonzero().view(-1)
    return idx // n, idx % n


# Bytes the near pairs may always use, however small the block: fewer pairs at a time
# only add per-chunk overhead.
NEAR_FLOOR = 1 << 16


def near_cap(cells: int, d: int, elem: int, diag: bool = False) -> int:
    """Near pairs recomputed at a time: their temporaries (indices, the gathered rows and
    scaled differences ``[k, d]``: ``32 + (2 d + 4) elem`` bytes a pair, ``7 d`` with
    diagonal scales, whose backward also gathers ``[k, d]`` scales and products) fit in one
    float per block cell, or :data:`NEAR_FLOOR`. Without this
    bound a block whose pairs are all near held ~50 bytes per cell of indices and
    differences beyond its estimate (a clustered data set: 2.3-9x the budget)."""
    return max(1, max(cells * elem, NEAR_FLOOR) // (32 + ((7 if diag else 2) * d + 4) * elem))


def scaled_diff(z: Tensor, means: Tensor, r: Tensor, i: Tensor, j: Tensor, *, inplace: bool = False) -> Tensor:
    """``(z_i - mu_j) * r_j`` for pairs ``(i, j)``, ``[k, d]``, from the raw inputs (centring
    itself rounds); ``r`` is 0-d, ``[n]`` or ``[n, d]``; ``inplace`` (no autograd) saves
    temporaries. Clamped to ``+-sqrt(big)``: finite, so that a pair of probability 0
    contributes ``0``, not ``0 * inf``, to a gradient (its distance is clamped to ``big``)."""
    rj = _pick(r, j)
    lim = big(z.dtype) ** 0.5
    if inplace:
        return z.index_select(0, i).sub_(means.index_select(0, j)).mul_(rj).clamp_(-lim, lim)
    return ((z[i] - means[j]) * rj).clamp(-lim, lim)


def _pick(r: Tensor, j: Tensor) -> Tensor:
    """The scale of columns ``j``, broadcastable against ``[k, d]``."""
    if r.dim() == 0:
        return r
    return r[j][:, None] if r.dim() == 1 else r[j]


class _NearDistances(torch.autograd.Function):
    """``dist`` with its near pairs overwritten by ``|(z_i - mu_j) r_j|^2``, ``cap`` pairs at a
    time, for autograd. It saves the pair mask (1 byte a pair of the block) and recomputes
    the differences in its backward, where a plain ``index_put`` would keep every near
    pair's ``[d]`` difference in the graph (10x the dense estimate on clustered data).
    Its backward is differentiable (the dense backend's double backward)."""

    @staticmethod
    def forward(ctx, dist, z, means, r, near, cap):  # type: ignore[override]
        limit = big(dist.dtype)
        for i, j in near.chunks(cap):
            dist.index_put_((i, j), scaled_diff(z, means, r, i, j, inplace=True).square_().sum(-1).clamp_(max=limit))
        ctx.mark_dirty(dist)
        ctx.save_for_backward(z, means, r, near.mask, near.counts)
        ctx.cap = cap
        return dist

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, means, r, mask, counts = ctx.saved_tensors
        need_z, need_m, need_r = ctx.needs_input_grad[1:4]
        gz = torch.zeros_like(z) if need_z else None
        gm = torch.zeros_like(means) if need_m else None
        gr = torch.zeros_like(r) if need_r else None
        lim = big(z.dtype)
        for i, j in Near(mask, counts).chunks(ctx.cap):
            diff = z[i] - means[j]
            rj = _pick(r, j)
            delta = diff * rj
            # clamped in the forward (a difference or the sum beyond big): no gradient
            ok = (delta.abs() < lim**0.5) & ((delta * delta).sum(-1, keepdim=True) < lim)
            w = 2 * grad[i, j][:, None] * torch.where(ok, delta, torch.zeros_like(delta))  # dL/d delta
            if gz is not None:
                gz = gz.index_add(0, i, w * rj)
            if gm is not None:
                gm = gm.index_add(0, j, -(w * rj))
            if gr is not None:
                wr = w * diff
                gr = gr + wr.sum() if r.dim() == 0 else gr.index_add(0, j, wr.sum(-1) if r.dim() == 1 else wr)
        return grad.masked_fill(mask, 0), gz, gm, gr, None, None


def block_sq_dist(rows: Rows, cols: Cols, *, inplace: bool = False, cap: int | None = None) -> tuple[Tensor, Near]:
    r"""Scaled squared distances ``D [b, n]`` of a block, accurate to a few ulps even for
    near-coincident points, and the :class:`Near` pairs that took the difference form.

    The bulk comes from the expansion (two GEMMs at most); pairs where it cancels badly,
    and every pair of a flagged row or column, are overwritten with
    ``|(z_i - mu_j) r_j|^2`` (differentiably), ``cap`` pairs at a time.
    ``inplace=True`` (no autograd) saves temporaries.
    """
    b = rows.q.shape[0]
    if cols.g is None:
        t = rows.zz[:, None] + cols.mm
    elif cols.g.dim() == 1:
        t = addmm(cols.mm.expand(b, -1), rows.zz[:, None], cols.g[None, :])
    else:
        t = addmm(cols.mm.expand(b, -1), rows.zz, cols.g.T)
    dist = addmm(t, rows.q, cols.q.T, alpha=-2)
    with torch.no_grad():
        # u > 0 marks near pairs; rows are screened with a cheap max before any mask.
        # t - dist / NEAR: NEAR is a power of two, so this is exactly (t NEAR - dist) / NEAR
        # (same sign) in one pass
        u = t.sub_(dist, alpha=1 / NEAR) if inplace else torch.sub(t.detach(), dist.detach(), alpha=1 / NEAR)
        del t
        if rows.flagged:
            u.masked_fill_(rows.flag[:, None], 1.0)
        if cols.flagged:
            u.masked_fill_(cols.flag[None, :], 1.0)
        # counted in float, in place: a bool sum would cast the block to int64 first
        counts = u.gt_(0).sum(1, dtype=u.dtype).to(torch.int64)
        if not bool(counts.any()):
            return dist, Near(None, None)
        mask = u.bool()
        del u
    near = Near(mask, counts)
    if not inplace and torch.is_grad_enabled():
        return _NearDistances.apply(dist, rows.raw, cols.raw, cols.r, near, cap), near
    limit = big(dist.dtype)
    for i, j in near.chunks(cap):
        dist.index_put_((i, j), scaled_diff(rows.raw, cols.raw, cols.r, i, j, inplace=True).square_().sum(-1).clamp_(max=limit))
    return dist, near


def exponents(dist: Tensor, a: Tensor, *, inplace: bool = False) -> Tensor:
    r"""``a_j - D_ij / 2``, one rounding (halving is exact), the same in place or not (the
    chunked backward must reproduce its forward's exponents bit for bit)."""
    if inplace:
        return torch.add(a, dist, alpha=-0.5, out=dist)
    return torch.add(a, dist, alpha=-0.5)

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
        stacklevel=caller_level(),
    )


def caller_level() -> int:
    """The ``stacklevel`` of the first frame outside vaepriors and torch: a warning names
    the caller's line, whichever entry point and autograd pass got there."""
    import os
    import sys

    skip = tuple(os.path.dirname(m.__file__) for m in (sys.modules["vaepriors"], torch) if getattr(m, "__file__", None))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


# ----------------------------------------------------------------------------- probes


class ProbeResult(NamedTuple):
    """What a check in a child interpreter gave: its exit code (negative: killed by that
    signal; ``None``: timed out), its output, and the error worth showing."""

    returncode: int | None
    stdout: str
    stderr: str
    error: str


def run_probe(code: str, args: Sequence[str], timeout: float, path: Sequence[str] = ()) -> ProbeResult:
    """Runs ``python -c code args`` in a child interpreter that imports nothing from the
    caller's working directory: it runs in an empty temporary directory, with ``-P`` where
    Python has it, and a ``PYTHONPATH`` of ``path`` and the caller's own entries made
    absolute, less those that name the working directory (empty, a trailing ``:``, ``.``):
    a ``./pykeops`` or ``./triton`` folder there was imported and executed. On timeout
    the child's whole process group (a compiler it started) is killed."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    here = os.path.realpath(os.getcwd())
    entries = [os.path.abspath(e) for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    entries = [*path, *(e for e in entries if os.path.realpath(e) != here)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(entries))
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    posix = hasattr(os, "killpg")
    with tempfile.TemporaryDirectory(prefix="vaepriors-probe-") as cwd:
        proc = subprocess.Popen(
            [sys.executable, *flags, "-c", code, *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=posix,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if posix:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's compiler too
            else:
                proc.kill()
            out, err = proc.communicate()
            return ProbeResult(None, out, err, _real_error(err, out))
    return ProbeResult(proc.returncode, out, err, _real_error(err, out))


def _real_error(stderr: str, stdout: str) -> str:
    """The line that says what went wrong: the exception a traceback ends with (KeOps
    prints "Compiling ... OK" on stdout even when the compiler produced nothing), else
    the last lines of stderr, else of stdout."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.replace(".", "").replace("_", "").isalnum() and (head.endswith(("Error", "Exception", "Exit", "Interrupt")) or head == "Killed"):
            return line
    if not lines:
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    return " | ".join(lines[-3:])
