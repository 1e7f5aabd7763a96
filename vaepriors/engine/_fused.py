r"""Fused Triton backend: one kernel per pass, FlashAttention-style, nothing of size B x N.

For isotropic scales (``log_var`` a scalar or ``[N]``) the forward kernel tiles queries
(``BLOCK_M``) and components (``BLOCK_N``): per tile it computes the cross term ``z . mu``
with ``tl.dot`` on centred data (in :data:`PRECISION`, which keeps float32 accuracy), adds
the squared norms, and updates a per-row online max and shifted sum. Pairs where that
expansion cancels (a query near a mean, as :func:`._core.block_sq_dist` defines it) are
recomputed inside the kernel from the raw difference ``z - mu``, only in tiles that hold
such a pair. Leave-one-out exclusion (query ``i`` skips column ``exclude[i]``) and zero
weights (``a_j = -inf``) happen inside the kernel.

The backward (:class:`FusedPartial`) saves only the inputs and the per-row max and sum
and recomputes the probabilities tile by tile in two kernels: one over query tiles (the
gradient of ``z``) and one over component tiles (``means``, ``log_var``, ``a``). Two passes
instead of atomics: every output is written by one program, so the gradients are
deterministic and need no zero-initialised float atomics, at the price of computing the
exponentials twice (FlashAttention-2 makes the opposite choice; a GPU session may compare).

Each kernel tiles one dimension and loops over the other; where the tiles alone are too
few to fill the GPU (B = 100 queries are two tiles of 64), the loop is split into parts run
by separate programs, whose partial results (max and sum, or gradient sums) are combined on
the host: O((B + N) d) extra memory, never B x N. Launch configurations are per kernel
(:data:`CONFIG`); :func:`compile_for` compiles a kernel for a GPU without one, which the
tests use and ``benchmarks/tune_fused.py --static`` reports registers and spills from.

Triton is imported only when this backend runs. On CUDA it is checked once per process in
a child process (a compile failure cannot take the caller down); on CPU it runs only under
Triton's interpreter (``TRITON_INTERPRET=1``, for tests). Where it cannot run,
``backend="fused"`` falls back to ``chunked`` with one warning. Diagonal ``[N, d]`` scales
and kNN are delegated to the chunked backend. Not twice differentiable.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from . import _chunked
from ._core import (
    NEAR,
    LogSumExp,
    backward_rows,
    root_inverse_variance,
    run_probe,
    warn_fallback,
)

# Launch configuration of each kernel on a GPU: (BLOCK_M queries, BLOCK_N components,
# num_warps, num_stages). Not yet timed on a GPU (benchmarks/tune_fused.py does that); until
# then, configurations that compile for sm_90 without register spills (tune_fused.py
# --static; the backward kernels at 64 x 64 spill 0.5-1.4 KB per thread).
CONFIG = {
    "fwd": (64, 64, 8, 3),
    "bwd_rows": (32, 32, 8, 2),
    "bwd_cols": (32, 64, 8, 2),
}
# Tiles under the interpreter, where small tiles keep the tests fast.
BLOCK_INTERPRET = 16
# Programs a launch aims for per streaming multiprocessor (GPU), and in all under the
# interpreter: kernels split the dimension they loop over into that many parts where the
# one they tile is too short to fill the GPU (B = 100 is two query tiles).
PROGRAMS_PER_SM = 4
PROGRAMS_INTERPRET = 6
# Precision of the tl.dot cross term on a GPU: "ieee" (fp32 FMA, exact) or "tf32x3" (three
# TF32 passes on tensor cores, about fp32 accuracy, several times faster). The interpreter
# and float64 always use "ieee".
PRECISION = "tf32x3"
# Latent dimensions above this go to the chunked backend (one [BLOCK, d] tile per operand
# must fit in registers).
MAX_D = 256

_VERDICT: dict[tuple[str, str], tuple[bool, str]] = {}
_WARNED: set[tuple[str, str]] = set()

_PROBE = r"""
import sys, torch
from vaepriors.engine import _fused
torch.set_default_dtype(getattr(torch, sys.argv[1]))
z, mu = torch.randn(37, 5, device="cuda"), torch.randn(53, 5, device="cuda")
a, lv = torch.randn(53, device="cuda"), torch.tensor(0.3, device="cuda")
ex = torch.randint(-1, 53, (37,), device="cuda")
for t in (z, mu, a, lv):
    t.requires_grad_()
out = _fused.logsumexp(z, mu, lv, a, ex, memory_budget=1 << 20).log()
arg = a - 0.5 * torch.exp(-lv) * ((z[:, None] - mu[None]) ** 2).sum(-1)
arg[torch.arange(37, device="cuda")[ex >= 0], ex[ex >= 0]] = -float("inf")
ref = torch.logsumexp(arg, 1)
if not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
    sys.exit("the fused kernel gave wrong values: max error %g" % (out - ref).abs().max())
g = torch.autograd.grad(out.sum(), (z, mu, a, lv))
r = torch.autograd.grad(ref.sum(), (z, mu, a, lv))
if not all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(g, r)):
    sys.exit("the fused kernel gave wrong gradients")
print("FUSED_OK")
"""

FIX = (
    "The fused backend needs a CUDA GPU and Triton >= 3.0 (it ships with PyTorch's CUDA wheels); "
    "backend='auto' never needs it."
)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe(dtype: str) -> tuple[bool, str]:
    # this checkout's vaepriors, explicitly: the child imports nothing from the working directory
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = run_probe(_PROBE, [dtype], 600, path=[root])
    if res.returncode is None:
        return False, "a test compile did not finish within 600 s"
    if res.returncode == 0 and "FUSED_OK" in res.stdout:
        return True, ""
    if res.returncode < 0:
        return False, f"a test run crashed the process (signal {-res.returncode})"
    return False, f"a test run failed (exit code {res.returncode}): {res.error}"


def check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    r"""Whether the fused kernels can run on this device type and dtype, and if not, why.

    CPU: only under Triton's interpreter (``TRITON_INTERPRET=1``). CUDA: Triton installed
    and a tiny reduction and its gradients, run once per process and dtype in a child
    process, match torch.
    ``VAEPRIORS_FUSED=0`` turns the backend off.
    """
    if dtype not in (torch.float32, torch.float64):
        return False, f"the fused backend supports float32 and float64, not {dtype}"
    if os.environ.get("VAEPRIORS_FUSED", "1") == "0":
        return False, "it is disabled by VAEPRIORS_FUSED=0"
    if device.type == "cpu":
        if not _interpret():
            return False, "it runs on CPU only under Triton's interpreter (TRITON_INTERPRET=1)"
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        return True, ""
    if device.type != "cuda":
        return False, f"it needs a CUDA device, got {device.type}"
    key = (device.type, str(dtype).removeprefix("torch."))
    if key not in _VERDICT:
        if importlib.util.find_spec("triton") is None:
            _VERDICT[key] = (False, "triton is not installed")
        elif _interpret():
            _VERDICT[key] = (True, "")
        else:
            _VERDICT[key] = _probe(key[1])
    return _VERDICT[key]


def available(device: torch.device, dtype: torch.dtype, *, warn: bool) -> bool:
    """:func:`check`, warning once per device type and dtype when the backend is unusable."""
    ok, cause = check(device, dtype)
    if not ok and warn:
        warn_fallback(_WARNED, "the fused backend", device, dtype, cause, "the chunked backend", FIX)
    return ok


def usable_shape(d: int, isotropic: bool) -> bool:
    """Whether the kernels handle this latent dimension and scale shape."""
    return isotropic and d <= MAX_D


def memory(b: int, n: int, d: int, elem: int, budget: int, device: torch.device, grad: bool = False) -> int:
    """Estimated peak bytes: a few numbers per query and per component, and the partial
    results of the parts a launch is split into (see :meth:`_Launch.splits`): O((B + N) d),
    nothing B x N."""
    programs = _programs(device) if device.type == "cuda" else PROGRAMS_PER_SM * 132  # an H100's 132 SMs
    partial = [_split(b, CONFIG["fwd"][0], n, CONFIG["fwd"][1], programs)[1] * b * 2]
    if grad:  # one part writes the gradient itself (not counted: the caller gets it)
        parts = _split(b, CONFIG["bwd_rows"][0], n, CONFIG["bwd_rows"][1], programs)[1]
        partial.append((parts > 1) * parts * b * d)
        parts = _split(n, CONFIG["bwd_cols"][1], b, CONFIG["bwd_cols"][0], programs)[1]
        partial.append((parts > 1) * parts * n * (d + 2))
    # inputs made contiguous, scales, constants, exclusions (int64); the partial, the
    # upstream gradient and their combination per query
    return (10 * b + 4 * n + d + max(partial)) * elem


def _split(outer: int, tile: int, inner: int, step: int, programs: int) -> tuple[int, int, int]:
    """``(tiles, parts, chunk)``: ``outer`` cut into tiles, ``inner`` (looped over in steps)
    into parts of ``chunk`` elements, a whole number of steps each, so that tiles x parts
    reaches about ``programs`` where the tiles alone do not."""
    tiles = -(-outer // tile)
    steps = max(1, -(-inner // step))
    want = max(1, min(steps, -(-programs // max(tiles, 1))))
    per = -(-steps // want)
    return tiles, -(-steps // per), per * step


@functools.lru_cache(maxsize=1)
def _kernels():
    """The jitted kernels, built on first use. ``triton.jit`` reads ``TRITON_INTERPRET`` when
    it decorates, so one process uses one mode (CPU needs the interpreter, see :func:`check`).
    Kernels find the functions they call in their module's globals (the interpreter ignores
    closures), hence the helpers are published there."""
    import triton
    import triton.language as tl

    return _define(triton, tl)


def _define(triton, tl):
    @triton.jit
    def _sq_dist(Z, M, rows, cols, ks, zc, zz, mc, mm, r, gi, rmask, cmask, D, near_frac, big, PREC: tl.constexpr):
        # Scaled squared distances |z - mu|^2 r^2: the expansion on centred data times the
        # inverse variance gi; from the raw difference times r where the expansion cancels
        # (near pairs), where its terms are too large, and for columns the GEMM cannot take
        # (gi = 0, see _Launch).
        cross = tl.dot(zc, tl.trans(mc), input_precision=PREC)
        t = zz[:, None] + mm[None, :]
        d2 = t - 2.0 * cross
        near = (d2 < near_frac * t) | ~(t * gi[None, :] < big) | (gi == 0.0)[None, :]
        near = near & rmask[:, None] & cmask[None, :]
        dist = d2 * gi[None, :]
        if tl.max(near.to(tl.int32)) > 0:
            exact = tl.zeros_like(d2)
            for k in range(D):
                zk = tl.load(Z + rows * D + k, mask=rmask, other=0.0)
                mk = tl.load(M + cols * D + k, mask=cmask, other=0.0)
                diff = (zk[:, None] - mk[None, :]) * r[None, :]
                exact += diff * diff
            dist = tl.where(near, tl.minimum(exact, big), dist)
        return dist, near

    @triton.jit
    def _load_rows(Z, C, rows, ks, B, D):
        rmask = rows < B
        kmask = ks < D
        c = tl.load(C + ks, mask=kmask, other=0.0)
        z = tl.load(Z + rows[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        zc = tl.where(kmask[None, :], z - c[None, :], 0.0)
        return zc, tl.sum(zc * zc, 1), rmask

    @triton.jit
    def _load_cols(M, C, R, GI, A, cols, ks, N, D):
        cmask = cols < N
        kmask = ks < D
        c = tl.load(C + ks, mask=kmask, other=0.0)
        m = tl.load(M + cols[:, None] * D + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        mc = tl.where(cmask[:, None] & kmask[None, :], m - c[None, :], 0.0)
        r = tl.load(R + cols, mask=cmask, other=0.0)
        gi = tl.load(GI + cols, mask=cmask, other=0.0)
        a = tl.load(A + cols, mask=cmask, other=0.0)
        return mc, tl.sum(mc * mc, 1), r, gi, a, cmask

    globals().update(_sq_dist=_sq_dist, _load_rows=_load_rows, _load_cols=_load_cols)

    @triton.jit
    def _fwd(Z, M, C, R, GI, A, EX, OUT_M, OUT_S, B, N, D, near_frac, big, CHUNK,
             BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
        # Program (i, k): query tile i against components [k CHUNK, (k + 1) CHUNK); its
        # partial (max, sum) goes to row k of the outputs, combined on the host.
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        lo = tl.program_id(1) * CHUNK
        ks = tl.arange(0, DP)
        zc, zz, rmask = _load_rows(Z, C, rows, ks, B, D)
        ex = tl.load(EX + rows, mask=rmask, other=-1)
        m_i = tl.full([BM], float("-inf"), zc.dtype)
        s_i = tl.zeros([BM], zc.dtype)
        for start in range(lo, tl.minimum(lo + CHUNK, N), BN):
            cols = start + tl.arange(0, BN)
            mc, mm, r, gi, a, cmask = _load_cols(M, C, R, GI, A, cols, ks, N, D)
            keep = cmask[None, :] & (cols[None, :] != ex[:, None]) & rmask[:, None]
            dist, near = _sq_dist(Z, M, rows, cols, ks, zc, zz, mc, mm, r, gi, rmask, cmask, D, near_frac, big, PREC)
            arg = tl.where(keep, a[None, :] - 0.5 * dist, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(arg, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty rows: exp(-inf) = 0
            s_i = s_i * tl.exp(m_i - shift) + tl.sum(tl.exp(arg - shift[:, None]), 1)
            m_i = m_new
        tl.store(OUT_M + tl.program_id(1) * B + rows, m_i, mask=rmask)
        tl.store(OUT_S + tl.program_id(1) * B + rows, s_i, mask=rmask)

    @triton.jit
    def _bwd_rows(Z, M, C, R, GI, A, EX, LSE, G, GZ, B, N, D, near_frac, big, CHUNK,
                  BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
        # dL/dz_i = sum_j P_ij g_i inv_j (mu_j - z_i), over the component tiles of chunk k
        # (program (i, k)); the chunks' partial gradients are summed on the host. P_ij g_i
        # is exp(arg - LSE_i) G_i (the forward's max, the gradient of its sum).
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        lo = tl.program_id(1) * CHUNK
        ks = tl.arange(0, DP)
        zc, zz, rmask = _load_rows(Z, C, rows, ks, B, D)
        ex = tl.load(EX + rows, mask=rmask, other=-1)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        g = tl.load(G + rows, mask=rmask, other=0.0)
        acc = tl.zeros([BM, DP], zc.dtype)
        for start in range(lo, tl.minimum(lo + CHUNK, N), BN):
            cols = start + tl.arange(0, BN)
            mc, mm, r, gi, a, cmask = _load_cols(M, C, R, GI, A, cols, ks, N, D)
            keep = cmask[None, :] & (cols[None, :] != ex[:, None]) & rmask[:, None]
            dist, near = _sq_dist(Z, M, rows, cols, ks, zc, zz, mc, mm, r, gi, rmask, cmask, D, near_frac, big, PREC)
            arg = a[None, :] - 0.5 * dist - lse[:, None]
            p = tl.where(keep, tl.exp(tl.where(keep, arg, 0.0)) * g[:, None], 0.0)
            far = tl.where(near, 0.0, p * gi[None, :])
            acc += tl.dot(far, mc, input_precision=PREC) - zc * tl.sum(far, 1)[:, None]
            if tl.max(near.to(tl.int32)) > 0:  # near pairs: sum_j P_ij r_j (mu_j - z_i) r_j from the raw difference
                wn = tl.where(near, p * r[None, :], 0.0)
                for k in range(D):
                    zk = tl.load(Z + rows * D + k, mask=rmask, other=0.0)
                    mk = tl.load(M + cols * D + k, mask=cmask, other=0.0)
                    colk = tl.sum(wn * ((mk[None, :] - zk[:, None]) * r[None, :]), 1)
                    acc += tl.where(ks[None, :] == k, colk[:, None], 0.0)
        out = GZ + tl.program_id(1) * B * D
        tl.store(out + rows[:, None] * D + ks[None, :], acc, mask=rmask[:, None] & (ks[None, :] < D))

    @triton.jit
    def _bwd_cols(Z, M, C, R, GI, A, EX, LSE, G, GM, GV, GA, B, N, D, near_frac, big, CHUNK,
                  BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
        # Over the query tiles of chunk k (program (j, k)): dL/da_j = sum_i P_ij g_i,
        # dL/dlog_var_j = 1/2 sum_i P_ij g_i D_ij, dL/dmu_j = sum_i P_ij g_i inv_j (z_i - mu_j);
        # the chunks' partial sums are added on the host.
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        lo = tl.program_id(1) * CHUNK
        ks = tl.arange(0, DP)
        mc, mm, r, gi, a, cmask = _load_cols(M, C, R, GI, A, cols, ks, N, D)
        ga = tl.zeros([BN], mc.dtype)
        gv = tl.zeros([BN], mc.dtype)
        acc = tl.zeros([BN, DP], mc.dtype)
        for start in range(lo, tl.minimum(lo + CHUNK, B), BM):
            rows = start + tl.arange(0, BM)
            zc, zz, rmask = _load_rows(Z, C, rows, ks, B, D)
            ex = tl.load(EX + rows, mask=rmask, other=-1)
            lse = tl.load(LSE + rows, mask=rmask, other=0.0)
            g = tl.load(G + rows, mask=rmask, other=0.0)
            keep = cmask[None, :] & (cols[None, :] != ex[:, None]) & rmask[:, None]
            dist, near = _sq_dist(Z, M, rows, cols, ks, zc, zz, mc, mm, r, gi, rmask, cmask, D, near_frac, big, PREC)
            arg = a[None, :] - 0.5 * dist - lse[:, None]
            p = tl.where(keep, tl.exp(tl.where(keep, arg, 0.0)) * g[:, None], 0.0)
            ga += tl.sum(p, 0)
            gv += tl.sum(p * dist, 0)
            far = tl.where(near, 0.0, p * gi[None, :])
            acc += tl.dot(tl.trans(far), zc, input_precision=PREC) - mc * tl.sum(far, 0)[:, None]
            if tl.max(near.to(tl.int32)) > 0:
                wn = tl.where(near, p * r[None, :], 0.0)
                for k in range(D):
                    zk = tl.load(Z + rows * D + k, mask=rmask, other=0.0)
                    mk = tl.load(M + cols * D + k, mask=cmask, other=0.0)
                    colk = tl.sum(wn * ((zk[:, None] - mk[None, :]) * r[None, :]), 0)
                    acc += tl.where(ks[None, :] == k, colk[:, None], 0.0)
        part = tl.program_id(1)
        tl.store(GM + part * N * D + cols[:, None] * D + ks[None, :], acc, mask=cmask[:, None] & (ks[None, :] < D))
        tl.store(GA + part * N + cols, ga, mask=cmask)
        tl.store(GV + part * N + cols, 0.5 * gv, mask=cmask)

    return triton, _fwd, _bwd_rows, _bwd_cols


# Kinds of each kernel's own outputs and inputs (pointers to the float dtype), between the
# seven shared leading arguments (z, means, centre, root and capped inverse variances,
# constants, exclusions) and the shared trailing ones (B, N, D, near_frac, big, CHUNK).
_ARGS = {"fwd": 2, "bwd_rows": 3, "bwd_cols": 5}
_TRAILING = ("i32", "i32", "i32", "fp32", "fp32", "i32")
# Bound on the expansion's scaled terms (_core.big), float32's in both dtypes: a float
# argument, and smaller only sends more (astronomically far) pairs to the difference form.
BIG = torch.finfo(torch.float32).max / 16


def compile_for(
    name: str,
    capability: int = 90,
    dtype: torch.dtype = torch.float32,
    d: int = 40,
    config: tuple[int, int, int, int] | None = None,
):
    """Compiles kernel ``name`` (``"fwd"``, ``"bwd_rows"`` or ``"bwd_cols"``) to machine
    code for an NVIDIA GPU of compute ``capability`` (90: H100) without a GPU, through
    Triton's own ``ptxas``; ``config`` is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``
    (default :data:`CONFIG`). Returns Triton's compiled kernel (``.asm["cubin"]``,
    ``.metadata.shared``). This catches what the interpreter never checks (tile shapes
    ``tl.dot`` rejects, types, shared memory) and reports registers and spills.
    """
    if _interpret():
        raise RuntimeError("compile_for needs TRITON_INTERPRET unset (the kernels are jitted for the interpreter)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = dict(zip(("fwd", "bwd_rows", "bwd_cols"), _kernels()[1:]))[name]
    bm, bn, warps, stages = config or CONFIG[name]
    ptr = "*fp64" if dtype == torch.float64 else "*fp32"
    kinds = [ptr] * 6 + ["*i64"] + [ptr] * _ARGS[name] + list(_TRAILING)
    meta = dict(BM=bm, BN=bn, DP=max(16, triton.next_power_of_2(d)), PREC="ieee" if dtype == torch.float64 else PRECISION)
    names = kernel.arg_names
    signature = dict(zip(names, kinds + ["constexpr"] * len(meta)))
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in meta.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=warps, num_stages=stages))


class _Launch:
    """Everything the kernels of one call take besides the per-pass buffers."""

    def __init__(self, z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, ex: Tensor | None) -> None:
        self.triton, self.fwd, self.bwd_rows, self.bwd_cols = _kernels()
        b, n = z.shape[0], means.shape[0]
        self.b, self.n, self.d = b, n, z.shape[1]
        self.z, self.means = z.contiguous(), means.contiguous()
        self.c = means.mean(0).contiguous()
        self.r = root_inverse_variance(log_var).expand(n).contiguous()
        # Inverse variances the tl.dot path takes; 0 marks columns sharper than that (all
        # their pairs take the difference form, which uses r).
        gi = self.r * self.r
        self.gi = gi.masked_fill_(~(gi <= torch.finfo(gi.dtype).max ** 0.25), 0.0)  # the cap of _core.gemm_inverse_variance
        self.a = a.expand(n).contiguous()
        self.ex = ex.contiguous() if ex is not None else torch.full((b,), -1, dtype=torch.long, device=z.device)
        self.interpret = _interpret()
        self.dp = max(16, self.triton.next_power_of_2(self.d))
        self.prec = "ieee" if self.interpret or z.dtype == torch.float64 else PRECISION
        self.programs = _programs(z.device)

    def config(self, name: str) -> tuple[int, int, int, int]:
        return (BLOCK_INTERPRET, BLOCK_INTERPRET, 4, 1) if self.interpret else CONFIG[name]

    def splits(self, name: str) -> tuple[int, int, int]:
        """``(tiles, parts, chunk)`` of kernel ``name``: its grid is ``tiles`` programs along
        the dimension it tiles, times ``parts`` along the one it loops over, each covering
        ``chunk`` elements of that loop (a whole number of its tiles): enough programs to
        fill the GPU also when B (or N, for ``bwd_cols``) is small."""
        bm, bn = self.config(name)[:2]
        if name == "bwd_cols":
            return _split(self.n, bn, self.b, bm, self.programs)
        return _split(self.b, bm, self.n, bn, self.programs)

    def launch(self, name: str, *rest) -> int:
        """Runs kernel ``name`` (its outputs, sized by :meth:`splits`, lead ``rest``);
        returns the number of parts."""
        bm, bn, warps, stages = self.config(name)
        tiles, parts, chunk = self.splits(name)
        kernel = getattr(self, name)
        kernel[(tiles, parts)](
            self.z, self.means, self.c, self.r, self.gi, self.a, self.ex, *rest, self.b, self.n, self.d, NEAR, BIG, chunk,
            BM=bm, BN=bn, DP=self.dp, PREC=self.prec, num_warps=warps, num_stages=stages,
        )
        return parts


@functools.lru_cache(maxsize=None)
def _device_programs(index: int) -> int:
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device) -> int:
    """Programs a launch aims for: a few per streaming multiprocessor on a GPU; under the
    interpreter a small number, so that the tests' small shapes are split too."""
    if device.type != "cuda":
        return PROGRAMS_INTERPRET
    return _device_programs(device.index if device.index is not None else torch.cuda.current_device())


class FusedPartial(torch.autograd.Function):
    r"""The partial ``(max_i, sum_i)`` of ``arg_ij = a_j - inv_j |z_i - mu_j|^2 / 2`` over
    ``j != e_i``, by the fused kernels.

    Saves the inputs and the partial; the backward recomputes ``exp(arg_ij - max_i)`` tile
    by tile, times the gradient of ``sum_i`` (gradients of ``z``, ``means``, ``log_var``
    (0-d or ``[N]``) and ``a``). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, z, means, log_var, a, ex):  # type: ignore[override]
        k = _Launch(z, means, log_var, a, ex)
        if k.b == 0:  # a CUDA launch needs a non-empty grid
            part = LogSumExp(z.new_empty(0), z.new_empty(0))
        else:
            parts = k.splits("fwd")[1]
            m = z.new_empty(parts, k.b)
            s = torch.empty_like(m)
            k.launch("fwd", m, s)
            part = LogSumExp.reduce(m, s, 0)
        ctx.save_for_backward(z, means, log_var, a, ex, *part)
        ctx.mark_non_differentiable(part.max)
        return part.max, part.sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_m, grad_s):  # type: ignore[override]
        z, means, log_var, a, ex, m, s = ctx.saved_tensors
        need_z, need_m, need_v, need_a = ctx.needs_input_grad[:4]
        k = _Launch(z, means, log_var, a, ex)
        # The kernels take exp(arg - LSE) * G: the forward's max and the gradient of its sum
        # (see _core.backward_rows).
        g, lse = (t.contiguous() for t in backward_rows(grad_s, m, s))
        gz = gm = gv = ga = None
        if need_z:
            gz = torch.zeros_like(k.z)
            if k.b:
                parts = k.splits("bwd_rows")[1]
                gz = z.new_empty(parts, k.b, k.d)
                k.launch("bwd_rows", lse, g, gz)
                gz = gz[0] if parts == 1 else gz.sum(0)
        if need_m or need_v or need_a:
            parts = k.splits("bwd_cols")[1]
            gm = z.new_empty(parts, k.n, k.d)
            gv = z.new_empty(parts, k.n)
            ga = torch.empty_like(gv)
            k.launch("bwd_cols", lse, g, gm, gv, ga)
            gm, gv, ga = (t[0] if parts == 1 else t.sum(0) for t in (gm, gv, ga))
            if log_var.dim() == 0:
                gv = gv.sum()
            gm, gv, ga = (t if need else None for t, need in ((gm, need_m), (gv, need_v), (ga, need_a)))
        return gz, gm, gv, ga, None


class FusedLogSumExp:
    """``FusedLogSumExp.apply(z, means, log_var, a, exclude)``: the log-sum-exp itself (what
    ``benchmarks/tune_fused.py`` times), through :class:`FusedPartial`."""

    @staticmethod
    def apply(z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, ex: Tensor | None) -> Tensor:
        return LogSumExp(*FusedPartial.apply(z, means, log_var, a, ex)).log()


def logsumexp(
    z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, exclude: Tensor | None, *, memory_budget: int
) -> LogSumExp:
    if not usable_shape(z.shape[1], log_var.dim() < 2):  # diagonal scales, very wide d
        return _chunked.logsumexp(z, means, log_var, a, exclude, memory_budget=memory_budget)
    a = a.expand(means.shape[0])
    return LogSumExp(*FusedPartial.apply(z, means, log_var, a, exclude))


def knn(
    queries: Tensor, points: Tensor, k: int, exclude: Tensor | None, *, memory_budget: int
) -> tuple[Tensor, Tensor]:
    # No fused top-k kernel yet: the chunked search (same result, bounded memory).
    return _chunked.knn(queries, points, k, exclude, memory_budget=memory_budget)
