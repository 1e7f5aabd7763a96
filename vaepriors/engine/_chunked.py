r"""Chunked torch backend: blocks over queries AND components, online max/sum, bounded memory.

Forward and backward both visit the B x N exponent matrix block by block; nothing larger
than one block (a few ``bc x nc`` tensors, ``bc * nc`` set by the memory budget) is ever
held. The backward is a custom :class:`torch.autograd.Function` that keeps only the inputs
and the per-query partial (max, sum), and recomputes the probabilities block by block. Double
backward is not supported (use the dense backend for that).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import (
    LogSumExp,
    backward_rows,
    block_sq_dist,
    exclude_,
    exponents,
    gemm_inverse_variance,
    ieee_fp32,
    inverse_variance,
    pieces,
    plan_blocks,
    safe_shift,
    sq_norms,
)

# Largest block on each device type when the budget allows more: blocks that stay in the
# CPU caches are faster than one big pass over memory; GPUs want big blocks.
TILE_CELLS = {"cpu": 1 << 18, "cuda": 1 << 24}
DEFAULT_TILE = 1 << 22


def cell_bytes(elem: int) -> int:
    """Bytes per block cell at the peak of the backward (three float temporaries and a mask)."""
    return 3 * elem + 1


def blocks(b: int, n: int, elem: int, budget: int, device: torch.device, d: int = 0) -> tuple[int, int]:
    """The ``(bc, nc)`` block shape used for ``b`` queries and ``n`` components in ``d`` dims:
    the largest whose :func:`memory` fits ``budget`` (at least 1 x 1), capped by ``TILE_CELLS``."""
    cells = min(budget // cell_bytes(elem), TILE_CELLS.get(device.type, DEFAULT_TILE))
    while True:
        bc, nc = plan_blocks(b, n, cells)
        if cells <= 1 or _memory(b, n, d, elem, bc, nc) <= budget:
            return bc, nc
        cells = cells * 7 // 8


def _memory(b: int, n: int, d: int, elem: int, bc: int, nc: int) -> int:
    return bc * nc * cell_bytes(elem) + 4 * (bc + nc) * d * elem + 4 * (b + n) * elem


def memory(b: int, n: int, d: int, elem: int, budget: int, device: torch.device, grad: bool = False) -> int:
    """Estimated peak bytes of temporaries (not counting the gradients it returns): one
    block, the block's centred copies, and a few numbers per query and per component."""
    return _memory(b, n, d, elem, *blocks(b, n, elem, budget, device, d))


def _slice(x: Tensor, s: slice) -> Tensor:
    return x if x.dim() == 0 else x[s]


class _Setup:
    """Centring and scales, applied block by block so that no input-sized copy is made."""

    def __init__(self, z: Tensor, means: Tensor, log_var: Tensor) -> None:
        self.z, self.means, self.log_var = z, means, log_var
        self.c = means.mean(0)
        self.diag = log_var.dim() == 2

    def rows(self, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        """Raw and centred queries of a block, and their squared norms (per coordinate if diagonal)."""
        z = self.z[rows]
        zc = z - self.c
        return z, zc, zc * zc if self.diag else (zc * zc).sum(-1)

    def cols(self, cols: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw and centred means of a block, their inverse variances and squared (scaled) norms."""
        m = self.means[cols]
        mc = m - self.c
        inv = inverse_variance(_slice(self.log_var, cols))
        return m, mc, inv, sq_norms(mc, mc, inv)[1]


def _ranges(total: int, step: int) -> list[slice]:
    step = max(step, 1)  # an empty batch plans blocks of 0 rows
    return [slice(s, min(s + step, total)) for s in range(0, total, step)]


def _forward(
    z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, ex: Tensor | None, budget: int
) -> tuple[Tensor, Tensor]:
    st = _Setup(z, means, log_var)
    b, n = z.shape[0], means.shape[0]
    bc, nc = blocks(b, n, z.element_size(), budget, z.device, z.shape[1])
    out_m = torch.empty(b, dtype=z.dtype, device=z.device)
    out_s = torch.empty_like(out_m)
    for rows in _ranges(b, bc):
        zr, zc, zz = st.rows(rows)
        m = torch.full((rows.stop - rows.start,), -math.inf, dtype=z.dtype, device=z.device)
        s = torch.zeros_like(m)
        for cols in _ranges(n, nc):
            mr, mc, inv, mm = st.cols(cols)
            d2, _ = block_sq_dist(zc, zz, mc, mm, inv, zr, mr, inplace=True)
            arg = exponents(d2, inv, a[cols])
            del d2
            if ex is not None:
                exclude_(arg, ex[rows] - cols.start, -math.inf)
            m_new = torch.maximum(m, arg.amax(1))
            shift = safe_shift(m_new)
            s = s * torch.exp(m - shift) + arg.sub_(shift[:, None]).exp_().sum(1)
            m = m_new
        out_m[rows], out_s[rows] = m, s
    return out_m, out_s


class ChunkedLogSumExp(torch.autograd.Function):
    r"""The partial ``(max_i, sum_i)`` of ``arg_ij = a_j - |z_i - mu_j|^2_{s_j} / 2`` over
    ``j != e_i``, with a block-wise backward.

    Saves only its inputs and the partial; the backward recomputes each block's
    ``exp(arg_ij - max_i)`` (``d sum_i / d arg_ij``) and accumulates the gradients of ``z``,
    ``means``, ``log_var`` (0-d, ``[N]`` or ``[N, d]``) and ``a``. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, z, means, log_var, a, ex, budget):  # type: ignore[override]
        m, s = _forward(z, means, log_var, a, ex, budget)
        ctx.save_for_backward(z, means, log_var, a, ex, m, s)
        ctx.budget = budget
        ctx.mark_non_differentiable(m)
        return m, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_m, grad_s):  # type: ignore[override]
        with ieee_fp32():  # its GEMMs, like the forward's, in IEEE float32
            return _backward(ctx, grad_s)


def _backward(ctx, grad):
    z, means, log_var, a, ex, m, s = ctx.saved_tensors
    need_z, need_m, need_v, need_a = ctx.needs_input_grad[:4]
    st = _Setup(z, means, log_var)
    b, n = z.shape[0], means.shape[0]
    bc, nc = blocks(b, n, z.element_size(), ctx.budget, z.device, z.shape[1])
    g, shift = backward_rows(grad, m, s)
    gz = torch.zeros_like(z) if need_z else None
    gm = torch.zeros_like(means) if need_m else None
    ga = torch.zeros(n, dtype=z.dtype, device=z.device) if need_a else None
    gv = torch.zeros(log_var.shape if st.diag else (n,), dtype=z.dtype, device=z.device) if need_v else None
    for rows in _ranges(b, bc):
        zraw, zr, zz = st.rows(rows)
        for cols in _ranges(n, nc):
            mraw, mc, inv, mm = st.cols(cols)
            d2, near = block_sq_dist(zr, zz, mc, mm, inv, zraw, mraw, inplace=True)
            p = exponents(d2, inv, a[cols])
            if ex is not None:
                exclude_(p, ex[rows] - cols.start, -math.inf)
            # dL/d(exponent) = dL/d(sum) * exp(arg - max): the forward's own max and sum, so
            # that exponents tied to float rounding share the probability as they do there.
            p = p.sub_(shift[rows, None]).exp_().mul_(g[rows, None])
            if ga is not None:
                ga[cols] += p.sum(0)
            if gv is not None and not st.diag:
                gv[cols] += 0.5 * inv * (p * d2).sum(0)
            del d2
            if not (need_z or need_m or (need_v and st.diag)):
                continue
            if not st.diag:
                p = p.mul_(inv)  # now dL/d(-|z - mu|^2 / 2) per pair
            # Near pairs go through the difference form, the rest through GEMMs.
            pn = p[near.i, near.j]
            p[near.i, near.j] = 0
            if st.diag:
                gi = gemm_inverse_variance(inv)  # = inv, but where every pair is near (p = 0)
                mi = mc * gi
                col = p.sum(0)
                pz = p.T @ zr
                if gz is not None:
                    gz[rows] += p @ mi - zr * (p @ gi)
                if gm is not None:
                    gm[cols] += gi * pz - mi * col[:, None]
                if gv is not None:
                    gv[cols] += 0.5 * gi * (p.T @ zr.square() - 2 * mc * pz + mc.square() * col[:, None])
            else:
                if gz is not None:
                    gz[rows] += p @ mc - zr * p.sum(1, keepdim=True)
                if gm is not None:
                    gm[cols] += p.T @ zr - mc * p.sum(0)[:, None]
            del p
            step = pieces(pn.shape[0], z.shape[1], bc * nc).step
            for s in range(0, pn.shape[0], step):
                i, j, w = near.i[s : s + step], near.j[s : s + step], pn[s : s + step, None]
                diff = zraw[i] - mraw[j]  # z - mu, from the raw inputs
                if st.diag:
                    w = w * inv[j]
                if gz is not None:
                    gz[rows].index_add_(0, i, -w * diff)
                if gm is not None:
                    gm[cols].index_add_(0, j, w * diff)
                if gv is not None and st.diag:
                    gv[cols].index_add_(0, j, 0.5 * w * diff.square())
    if gv is not None and log_var.dim() == 0:
        gv = gv.sum()
    return gz, gm, gv, ga, None, None


def logsumexp(
    z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, exclude: Tensor | None, *, memory_budget: int
) -> LogSumExp:
    a = a.expand(means.shape[0])
    return LogSumExp(*ChunkedLogSumExp.apply(z, means, log_var, a, exclude, memory_budget))


def knn(
    queries: Tensor, points: Tensor, k: int, exclude: Tensor | None, *, memory_budget: int
) -> tuple[Tensor, Tensor]:
    st = _Setup(queries, points, torch.zeros((), dtype=queries.dtype, device=queries.device))
    b, n = queries.shape[0], points.shape[0]
    bc, nc = blocks(b, n, queries.element_size(), memory_budget, queries.device, queries.shape[1])
    vals = [queries.new_empty(0, k)]  # an empty batch gives [0, k]
    idxs = [torch.empty(0, k, dtype=torch.long, device=queries.device)]
    for rows in _ranges(b, bc):
        zr, zc, zz = st.rows(rows)
        best_v = best_i = None
        for cols in _ranges(n, nc):
            mr, mc, inv, mm = st.cols(cols)
            d2, _ = block_sq_dist(zc, zz, mc, mm, inv, zr, mr, inplace=True)
            if exclude is not None:
                exclude_(d2, exclude[rows] - cols.start, math.inf)
            v, i = torch.topk(d2, min(k, d2.shape[1]), dim=1, largest=False, sorted=False)
            i += cols.start
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                if v.shape[1] > k:
                    v, pos = torch.topk(v, k, dim=1, largest=False, sorted=False)
                    i = i.gather(1, pos)
            best_v, best_i = v, i
        v, order = best_v.sort(dim=1)
        vals.append(v)
        idxs.append(best_i.gather(1, order))
    return torch.cat(vals), torch.cat(idxs)
