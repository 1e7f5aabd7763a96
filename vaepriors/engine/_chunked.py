r"""Chunked torch backend: blocks over queries AND components, online max/sum, bounded memory.

Forward and backward both visit the B x N exponent matrix block by block; nothing larger
than one block (a few ``bc x nc`` tensors, ``bc * nc`` set by the memory budget) is ever
held. Blocks have at least :data:`MIN_CELLS` cells (about 64 x 1024): a budget too small
for that is exceeded with one warning, rather than crawling through tiny blocks. The
backward is a custom :class:`torch.autograd.Function` that keeps only the inputs and the
per-query partial (max, sum), and recomputes the probabilities block by block. Double
backward is not supported (use the dense backend for that).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ._core import (
    NEAR_FLOOR,
    Frame,
    LogSumExp,
    backward_rows,
    block_sq_dist,
    caller_level,
    exclude_,
    exponents,
    ieee_fp32,
    near_cap,
    plan_blocks,
    safe_shift,
    scaled_diff,
    shifted_exp_,
)

# Largest block on each device type when the budget allows more: blocks that stay in the
# CPU caches are faster than one big pass over memory; GPUs want big blocks.
TILE_CELLS = {"cpu": 1 << 18, "cuda": 1 << 24}
DEFAULT_TILE = 1 << 22


def cell_bytes(elem: int) -> int:
    """Bytes per block cell at the peak: two float temporaries (distances and exponents,
    or the backward's probabilities), the near-pair mask, and one float's worth of
    workspace for the near pairs (:func:`near_cap`)."""
    return 3 * elem + 1


# The smallest block a call uses, whatever the budget: per block the backend runs ~40 small
# ops (~1-2 ms on a CPU core, measured), which a 64 x 1024 block's own work (~2-3 ms at
# d = 40) still dominates; 1 x 1 blocks made a 200 x 200 000 call take minutes. A budget
# too small for this block (about 0.9 MB of block temporaries in float32, plus its operands
# and the per-query and per-component numbers) is exceeded, with one warning.
MIN_CELLS = 1 << 16

_WARNED: set[tuple] = set()


def blocks(
    b: int, n: int, elem: int, budget: int, device: torch.device, d: int = 0, *, warn: bool = True
) -> tuple[int, int]:
    """The ``(bc, nc)`` block shape used for ``b`` queries and ``n`` components in ``d`` dims:
    the largest whose :func:`memory` fits ``budget``, capped by ``TILE_CELLS``, and at
    least :data:`MIN_CELLS` cells (or the whole problem); warns (``warn``) once per shape
    and budget where even that does not fit."""
    floor = max(1, min(MIN_CELLS, b * n))
    cells = max(min(budget // cell_bytes(elem), TILE_CELLS.get(device.type, DEFAULT_TILE)), floor)
    while True:
        bc, nc = plan_blocks(b, n, cells)
        need = _memory(b, n, d, elem, bc, nc)
        if need <= budget or cells <= floor:
            break
        cells = max(cells * 7 // 8, floor)
    if need > budget and warn:
        _warn_budget(b, n, d, elem, budget, device, bc, nc, need)
    return bc, nc


def _warn_budget(b: int, n: int, d: int, elem: int, budget: int, device: torch.device, bc: int, nc: int, need: int) -> None:
    key = (b, n, d, elem, budget, device.type)
    if key in _WARNED:
        return
    if len(_WARNED) > 1000:  # many shapes: keep the set small, warn again
        _WARNED.clear()
    _WARNED.add(key)
    warnings.warn(
        f"vaepriors: memory_budget={budget} bytes is too small for the chunked backend with "
        f"{b} queries x {n} components (d = {d}, {8 * elem}-bit floats): its smallest block "
        f"({bc} x {nc}; smaller ones make a call crawl), the block's operands and a few numbers "
        f"per query and per component need about {need} bytes. Using that block, above the "
        f"budget; raise memory_budget (or vaepriors.set_memory_budget) to at least {need}, or "
        f"split the queries or components into smaller calls.",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def _memory(b: int, n: int, d: int, elem: int, bc: int, nc: int) -> int:
    # the block; its operands and the backward's GEMM results ([bc or nc, d], a few each);
    # per query and per component: the partial, the upstream gradient, the gradient sums
    return bc * nc * cell_bytes(elem) + NEAR_FLOOR + 6 * (bc + nc) * d * elem + 4 * (b + n) * elem


def memory(b: int, n: int, d: int, elem: int, budget: int, device: torch.device, grad: bool = False) -> int:
    """Estimated peak bytes of temporaries (not counting the gradients it returns): one
    block, the block's operands, and a few numbers per query and per component; above
    ``budget`` only where even the smallest block does not fit it. Measured peaks (torch's
    allocator and the process's resident size, on data where half of all pairs take the
    difference form) stay below it: ``tests/test_engine_memory.py``."""
    return _memory(b, n, d, elem, *blocks(b, n, elem, budget, device, d, warn=False))


def _ranges(total: int, step: int) -> list[slice]:
    step = max(step, 1)  # an empty batch plans blocks of 0 rows
    return [slice(s, min(s + step, total)) for s in range(0, total, step)]


def _forward(
    z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, ex: Tensor | None, budget: int
) -> tuple[Tensor, Tensor]:
    fr = Frame(z, means, log_var)
    b, n = z.shape[0], means.shape[0]
    bc, nc = blocks(b, n, z.element_size(), budget, z.device, z.shape[1])
    cap = near_cap(bc * nc, z.shape[1], z.element_size(), log_var.dim() == 2)
    out_m = torch.empty(b, dtype=z.dtype, device=z.device)
    out_s = torch.empty_like(out_m)
    for rows in _ranges(b, bc):
        rw = fr.rows(rows)
        m = torch.full((rows.stop - rows.start,), -math.inf, dtype=z.dtype, device=z.device)
        s = torch.zeros_like(m)
        for cols in _ranges(n, nc):
            arg = _block_exponents(rw, fr.cols(cols), a, ex, rows, cols, cap)[0]
            m_new = torch.maximum(m, arg.amax(1))
            shift = safe_shift(m_new)
            s = s * torch.exp(m - shift) + shifted_exp_(arg, shift[:, None]).sum(1)
            m = m_new
        out_m[rows], out_s[rows] = m, torch.where(torch.isneginf(m), torch.zeros_like(s), s)
    return out_m, out_s


def _block_exponents(rw, cl, a, ex, rows, cols, cap, keep_dist=False):
    """The exponents of a block, bit for bit the same in the forward and the backward
    (the backward scales ``exp(arg - max)`` by the forward's max); with ``keep_dist`` also
    the scaled distances ``D``."""
    dist, near = block_sq_dist(rw, cl, inplace=True, cap=cap)
    arg = exponents(dist.clone() if keep_dist else dist, a[cols], inplace=True)
    if ex is not None:
        exclude_(arg, ex[rows] - cols.start, -math.inf)
    return arg, (dist if keep_dist else None), near


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
    fr = Frame(z, means, log_var)
    b, n = z.shape[0], means.shape[0]
    bc, nc = blocks(b, n, z.element_size(), ctx.budget, z.device, z.shape[1])
    cap = near_cap(bc * nc, z.shape[1], z.element_size(), log_var.dim() == 2)
    g, shift = backward_rows(grad, m, s)
    gz = torch.zeros_like(z) if need_z else None
    gm = torch.zeros_like(means) if need_m else None
    ga = torch.zeros(n, dtype=z.dtype, device=z.device) if need_a else None
    gv = torch.zeros(log_var.shape if fr.diag else (n,), dtype=z.dtype, device=z.device) if need_v else None
    for rows in _ranges(b, bc):
        rw = fr.rows(rows)
        for cols in _ranges(n, nc):
            cl = fr.cols(cols)
            p, dist, near = _block_exponents(rw, cl, a, ex, rows, cols, cap, keep_dist=gv is not None and not fr.diag)
            # dL/d(exponent) = dL/d(sum) * exp(arg - max): the forward's own max and sum, so
            # that exponents tied to float rounding share the probability as they do there.
            p = shifted_exp_(p, shift[rows, None], drop=True).mul_(g[rows, None])
            if ga is not None:
                ga[cols] += p.sum(0)
            if dist is not None:  # d(-D/2)/d log_var = D/2
                gv[cols] += 0.5 * dist.mul_(p).sum(0)
            del dist
            if not (need_z or need_m or (need_v and fr.diag)):
                continue
            # Near pairs through the difference form (then 0 in p), the rest through GEMMs.
            for i, j in near.chunks(cap):
                w = p[i, j][:, None]
                p.index_put_((i, j), p.new_zeros(()))
                delta = scaled_diff(rw.raw, cl.raw, cl.r, i, j, inplace=True)  # (z - mu) r
                if gv is not None and fr.diag:
                    gv[cols].index_add_(0, j, delta.square().mul_(0.5 * w))
                r = cl.r if cl.r.dim() == 0 else cl.r[j]
                delta.mul_(w * (r[:, None] if r.dim() == 1 else r))  # P inv (z - mu)
                if gz is not None:
                    gz[rows].index_add_(0, i, delta, alpha=-1)
                if gm is not None:
                    gm[cols].index_add_(0, j, delta)
                del delta, w, r, i, j  # not alive into the next block's temporaries
            _gemm_grads(fr, rw, cl, p, gz, gm, gv, rows, cols)
    if gv is not None and log_var.dim() == 0:
        gv = gv.sum()
    return gz, gm, gv, ga, None, None


def _gemm_grads(fr, rw, cl, p, gz, gm, gv, rows, cols) -> None:
    """The gradients of the pairs left in ``p`` (near pairs zeroed), by GEMMs: in terms of
    the centred operands, ``dL/dz_i = sum_j P_ij inv_j (mu_j - z_i)``, and its mirror."""
    zq, mc = rw.q, cl.mc
    if fr.scalar:  # q and mc are already times r: one more r outside
        if gz is not None:
            gz[rows] += cl.r * (p @ mc - zq * p.sum(1, keepdim=True))
        if gm is not None:
            gm[cols] += cl.r * (p.T @ zq - mc * p.sum(0)[:, None])
    elif not fr.diag:
        p = p.mul_(cl.g)  # P inv, inv capped (sharper columns are all near: 0 here)
        if gz is not None:
            gz[rows] += p @ mc - zq * p.sum(1, keepdim=True)
        if gm is not None:
            gm[cols] += p.T @ zq - mc * p.sum(0)[:, None]
    else:
        gi, mi = cl.g, cl.q  # mi = mc * gi
        col = p.sum(0)
        pz = p.T @ zq
        if gz is not None:
            gz[rows] += p @ mi - zq * (p @ gi)
        if gm is not None:
            gm[cols] += gi * pz - mi * col[:, None]
        if gv is not None:
            gv[cols] += 0.5 * gi * (p.T @ zq.square() - 2 * mc * pz + mc.square() * col[:, None])


def logsumexp(
    z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, exclude: Tensor | None, *, memory_budget: int
) -> LogSumExp:
    a = a.expand(means.shape[0])
    return LogSumExp(*ChunkedLogSumExp.apply(z, means, log_var, a, exclude, memory_budget))


def knn(
    queries: Tensor, points: Tensor, k: int, exclude: Tensor | None, *, memory_budget: int
) -> tuple[Tensor, Tensor]:
    fr = Frame(queries, points, torch.zeros((), dtype=queries.dtype, device=queries.device))
    b, n = queries.shape[0], points.shape[0]
    bc, nc = blocks(b, n, queries.element_size(), memory_budget, queries.device, queries.shape[1])
    cap = near_cap(bc * nc, queries.shape[1], queries.element_size())
    vals = [queries.new_empty(0, k)]  # an empty batch gives [0, k]
    idxs = [torch.empty(0, k, dtype=torch.long, device=queries.device)]
    for rows in _ranges(b, bc):
        rw = fr.rows(rows)
        best_v = best_i = None
        for cols in _ranges(n, nc):
            d2, _ = block_sq_dist(rw, fr.cols(cols), inplace=True, cap=cap)
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
