r"""KeOps backend: symbolic ``LazyTensor`` reductions, nothing of size B x N in memory.

pykeops is imported only when this backend runs. Before its first use for a device type and
dtype, a child process compiles and runs a tiny reduction (a KeOps compile can crash the
whole process, see :func:`check`); the verdict is cached for the process, and successes
also on disk. Distances use the difference form inside the kernel, so they are as accurate
as the inputs. The backward is written out as two KeOps reductions (over components for
the queries' gradient, over queries for the components'), and every scale shape uses the
same formulas, so each dtype and d compiles three kernels in all (KeOps compiles per
formula, dtype and dimension); double backward is not supported.

The 1-D scheme (one thread per output row) leaves most of a GPU idle when there are few
output rows; below :data:`ROWS_2D` rows the 2-D scheme (``GPU_2D``) is used instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from ._core import (
    LogSumExp,
    backward_rows,
    root_inverse_variance,
    run_probe,
    safe_shift,
    warn_fallback,
)

# Output rows below which the GPU 2-D scheme is used (10-50x faster at B = 100..1000 on an
# H100, anchors.md); the 1-D scheme needs tens of thousands of rows to fill a GPU.
ROWS_2D = 20_000
# Stands in for -inf (excluded pair, zero weight) inside kernels: exp(SENTINEL - max) is an
# exact 0 without the NaN that -inf - (-inf) would give. Rows whose result stays below
# SENTINEL / 2 are empty and reported as -inf.
SENTINEL = -1e30
# Component indices are compared as floats inside the kernel; float32 is exact below 2^24.
MAX_INDEX = {torch.float32: 1 << 24, torch.float64: 1 << 53}

_VERDICT: dict[tuple[str, str], tuple[bool, str]] = {}
_WARNED: set[tuple[str, str]] = set()

_PROBE = r"""
import sys, torch
from pykeops.torch import LazyTensor
dev, dtype = sys.argv[1], getattr(torch, sys.argv[2])
x = torch.randn(20, 3, dtype=dtype, device=dev)
y = torch.randn(30, 3, dtype=dtype, device=dev)
out = (-LazyTensor(x[:, None, :]).sqdist(LazyTensor(y[None, :, :]))).logsumexp(dim=1).view(-1)
ref = torch.logsumexp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1), 1)
if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4):
    sys.exit("KeOps gave wrong values: max error %g" % (out - ref).abs().max())
print("KEOPS_OK")
"""

FIX = (
    "If a compile crashed, point CXX at the system compiler (CXX=/usr/bin/g++) and remove "
    "~/.cache/keops* before the next run; set VAEPRIORS_KEOPS=0 to skip KeOps altogether."
)


def _cache_file() -> Path:
    root = os.environ.get("VAEPRIORS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vaepriors")
    return Path(root) / "keops_check.json"


def _compiler() -> str:
    """The C++ compiler KeOps will use, as KeOps picks it (``$CXX`` if found, else ``g++``,
    or ``clang++`` first on macOS), resolved to a file with its size and modification time:
    another compiler first on ``PATH``, or one replaced in place, is another verdict."""
    import shutil

    names = [os.environ.get("CXX", "")] + (["clang++", "g++"] if sys.platform == "darwin" else ["g++"])
    for name in names:
        found = shutil.which(name) if name else None
        if found:
            real = os.path.realpath(found)
            try:
                st = os.stat(real)
            except OSError:
                return real
            return f"{real}:{st.st_size}:{st.st_mtime_ns}"
    return "no compiler"


def _disk_key(device: str, dtype: str) -> str:
    try:
        from importlib.metadata import version

        keops = version("pykeops")
    except Exception:  # noqa: BLE001 - no metadata: no disk cache
        keops = "?"
    parts = [keops, torch.__version__, sys.executable, os.environ.get("CXX", ""), _compiler()]
    return "|".join([*parts, os.environ.get("KEOPS_CACHE_FOLDER", ""), device, dtype])


def _probe(device: str, dtype: str) -> tuple[bool, str]:
    timeout = float(os.environ.get("VAEPRIORS_KEOPS_TIMEOUT", "600"))
    res = run_probe(_PROBE, [device, dtype], timeout)
    if res.returncode is None:
        return False, f"a test compile did not finish within {timeout:.0f} s (VAEPRIORS_KEOPS_TIMEOUT)"
    if res.returncode == 0 and "KEOPS_OK" in res.stdout:
        return True, ""
    if res.returncode < 0:
        return False, f"a test compile crashed the process (signal {-res.returncode})"
    notes = _compiler_notes(res.stdout + "\n" + res.stderr)
    if not notes and "pykeops_cpp" in res.error:  # "Compiling ... OK", yet no module
        notes = f"the C++ compiler ({os.environ.get('CXX') or 'g++'}) built no module"
    return False, f"a test reduction failed (exit code {res.returncode}): {res.error}" + (f" (KeOps: {notes})" if notes else "")


def _compiler_notes(text: str) -> str:
    """What KeOps said about the compiler: its warning that none was found, or the first
    line of the compiler's own complaint (its "Compiling ... OK" says nothing)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    notes = []
    for k, line in enumerate(lines):
        if "Warning" in line and "compiler" in line.lower() and not notes:
            notes.append(line.split(":", 1)[-1].strip())
        elif "There were warnings or errors" in line and k + 1 < len(lines):
            notes.append(lines[k + 1])
    return "; ".join(dict.fromkeys(notes[:3]))


def check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    r"""Whether KeOps works for this device type and dtype, and if not, why.

    Checked once per process in a child process (a crashing compile cannot take the caller
    down); successes are remembered on disk (``~/.cache/vaepriors``, or
    ``$VAEPRIORS_CACHE_DIR``) per pykeops/torch version, interpreter, ``CXX``, the compiler
    file KeOps will find and ``KEOPS_CACHE_FOLDER``. A KeOps call that fails later anyway
    (:func:`failed`) turns the verdict and its disk entry back. ``VAEPRIORS_KEOPS=0``
    turns KeOps off.
    """
    key = (device.type, str(dtype).removeprefix("torch."))
    if key in _VERDICT:
        return _VERDICT[key]
    if os.environ.get("VAEPRIORS_KEOPS", "1") == "0":
        verdict = (False, "it is disabled by VAEPRIORS_KEOPS=0")
    elif dtype not in MAX_INDEX:
        verdict = (False, f"the KeOps backend supports float32 and float64, not {dtype}")
    else:
        import importlib.util

        if importlib.util.find_spec("pykeops") is None:
            verdict = (False, "pykeops is not installed (pip install pykeops)")
        else:
            verdict = _check_with_disk_cache(*key)
    _VERDICT[key] = verdict
    return verdict


def _check_with_disk_cache(device: str, dtype: str) -> tuple[bool, str]:
    path, dkey = _cache_file(), _disk_key(device, dtype)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(dkey) is True:
        return True, ""
    verdict = _probe(device, dtype)
    if verdict[0]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            known[dkey] = True
            path.write_text(json.dumps(known, indent=1))
        except OSError:
            pass
    return verdict


def failed(device: torch.device, dtype: torch.dtype, err: BaseException) -> None:
    """Records that a KeOps call failed after its check passed (a compiler that broke since,
    a stale build cache): the process stops using KeOps for this device type and dtype, the
    disk verdict is dropped, and one warning (the fallback's) names the error."""
    key = (device.type, str(dtype).removeprefix("torch."))
    cause = f"a KeOps call failed after its check had passed ({type(err).__name__}: {err})"
    _VERDICT[key] = (False, cause)
    path, dkey = _cache_file(), _disk_key(*key)
    try:
        known = json.loads(path.read_text())
        if known.pop(dkey, None) is not None:
            path.write_text(json.dumps(known, indent=1))
    except (OSError, ValueError):
        pass
    available(device, dtype, warn=True)


def _fallback(op: str, z: Tensor, n: int, isotropic: bool, budget: int):
    """The torch backend that runs in KeOps' place (as ``auto`` would pick it)."""
    from . import _auto, _chunked, _dense

    grad = torch.is_grad_enabled()
    name = _auto.choose(op, z.device, z.dtype, z.shape[0], n, z.shape[1], grad, budget, keops=False, isotropic=isotropic)
    return _dense if name == "dense" else _chunked


def available(device: torch.device, dtype: torch.dtype, *, warn: bool) -> bool:
    """:func:`check`, warning once per device type and dtype when KeOps is unusable."""
    ok, cause = check(device, dtype)
    if not ok and warn:
        warn_fallback(_WARNED, "the KeOps backend", device, dtype, cause, "the torch backends", FIX)
    return ok


def usable_shape(n: int, dtype: torch.dtype) -> bool:
    """Whether component indices are exact in the kernel's float type."""
    return n < MAX_INDEX.get(dtype, 0)


def _scheme(device: torch.device, rows: int) -> str:
    if device.type != "cuda":
        return "CPU"
    return "GPU_2D" if rows < ROWS_2D else "GPU_1D"


class _Vars:
    """The LazyTensors of one call: queries, components, their scales and the exclusion."""

    def __init__(self, z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, ex: Tensor | None) -> None:
        from pykeops.torch import LazyTensor

        b, n = z.shape[0], means.shape[0]
        # One formula for every scale shape (isotropic scales are expanded to [N, d]): three
        # compiled kernels per dtype and d instead of six, at the cost of d extra products.
        # Scales enter as r = exp(-log_var / 2) on the difference before it is squared
        # (exp(-log_var) itself overflows float32 below -88.7).
        r = root_inverse_variance(log_var)
        r = r.expand(n)[:, None].expand(n, z.shape[1]) if r.dim() < 2 else r
        e = ex.to(z.dtype) if ex is not None else z.new_full((b,), -1.0)
        self.zi = LazyTensor(z[:, None, :].contiguous())
        self.mj = LazyTensor(means[None, :, :].contiguous())
        self.rj = LazyTensor(r[None, :, :].contiguous())
        self.aj = LazyTensor(a.clamp_min(SENTINEL)[None, :, None].contiguous())
        self.ei = LazyTensor(e[:, None, None].contiguous())
        self.jj = LazyTensor(torch.arange(n, dtype=z.dtype, device=z.device)[None, :, None])
        self.LazyTensor = LazyTensor

    def diff(self):
        """``(z_i - mu_j) r_j``."""
        return self.rj * (self.zi - self.mj)

    def exponent(self):
        dist = (self.diff() ** 2).sum()
        keep = (self.jj - self.ei).abs() - 0.5  # >= 0 unless j is the excluded index
        return keep.ifelse(self.aj - 0.5 * dist, SENTINEL)


class KeOpsLogSumExp(torch.autograd.Function):
    r"""The partial ``(max, sum)`` of the mixture's exponents as three KeOps reductions
    (forward, backward over components, backward over queries). Not twice differentiable.
    A backward whose KeOps reductions fail (:func:`failed`) is computed by the chunked
    backend instead."""

    @staticmethod
    def forward(ctx, z, means, log_var, a, ex, budget):  # type: ignore[override]
        v = _Vars(z, means, log_var, a, ex)
        red = v.exponent().reduction("Max_SumShiftExp", dim=1, backend=_scheme(z.device, z.shape[0]))
        m, s = red[:, 0].contiguous(), red[:, 1].contiguous()
        empty = m < SENTINEL / 2  # only excluded pairs and zero weights
        m = torch.where(empty, torch.full_like(m, -float("inf")), m)
        s = torch.where(empty, torch.zeros_like(s), s)
        ctx.save_for_backward(z, means, log_var, a, ex, m, s)
        ctx.mark_non_differentiable(m)
        ctx.budget = budget
        return m, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_m, grad_s):  # type: ignore[override]
        z, means, log_var, a, ex, m, s = ctx.saved_tensors
        try:
            grads = _backward(ctx.needs_input_grad[:4], z, means, log_var, a, ex, m, s, grad_s)
        except Exception as err:  # noqa: BLE001 - KeOps' compile and load errors have no common type
            failed(z.device, z.dtype, err)
            grads = _torch_backward(ctx.needs_input_grad[:4], z, means, log_var, a, ex, m, s, grad_s, ctx.budget)
        return (*grads, None, None)


def _backward(needs, z, means, log_var, a, ex, m, s, grad_s):
    need_z, need_m, need_v, need_a = needs
    v = _Vars(z, means, log_var, a, ex)
    LT = v.LazyTensor
    g, shift = backward_rows(grad_s, m, s)  # the forward's max, the gradient of its sum
    prob = (v.exponent() - LT(shift[:, None, None].contiguous())).exp()  # d sum / d arg
    gz = gm = gv = ga = None
    if need_z:  # sum_j P_ij inv_j (mu_j - z_i), inv as r r: no overflow
        red = (prob * (v.rj * v.diff())).sum(dim=1, backend=_scheme(z.device, z.shape[0]))
        gz = -g[:, None] * red
    if need_m or need_v or need_a:
        d = z.shape[1]
        q = LT(g[:, None, None].contiguous()) * prob
        diff = v.diff()
        red = q.concat(q * (v.rj * diff)).concat(q * diff**2).sum(dim=0, backend=_scheme(z.device, means.shape[0]))
        col, qd, qsq = red[:, 0], red[:, 1 : d + 1], red[:, d + 1 :]
        if need_a:
            ga = col
        if need_m:
            gm = qd
        if need_v:
            gv = 0.5 * qsq  # [N, d]; summed to the shape of log_var
            gv = gv.sum() if log_var.dim() == 0 else gv.sum(-1) if log_var.dim() == 1 else gv
    return gz, gm, gv, ga


def _torch_backward(needs, z, means, log_var, a, ex, m, s, grad_s, budget):
    """The same gradients by the chunked backend: its partial ``(m', s')`` relates to this
    one by ``s = s' exp(m' - m)``."""
    from . import _chunked

    leaves = [t.detach().requires_grad_(need) for t, need in zip((z, means, log_var, a), needs)]
    with torch.enable_grad():
        mc, sc = _chunked.ChunkedLogSumExp.apply(*leaves, ex, budget)
        scale = torch.where(s > 0, grad_s * torch.exp(safe_shift(mc) - safe_shift(m)), torch.zeros_like(grad_s))
        wanted = [t for t in leaves if t.requires_grad]
        got = iter(torch.autograd.grad(sc, wanted, scale, allow_unused=True))
    return tuple(next(got) if t.requires_grad else None for t in leaves)


def logsumexp(
    z: Tensor, means: Tensor, log_var: Tensor, a: Tensor, exclude: Tensor | None, *, memory_budget: int
) -> LogSumExp:
    a = a.expand(means.shape[0])
    try:
        return LogSumExp(*KeOpsLogSumExp.apply(z, means, log_var, a, exclude, memory_budget))
    except Exception as err:  # noqa: BLE001 - KeOps' compile and load errors have no common type
        failed(z.device, z.dtype, err)
        impl = _fallback("logsumexp", z, means.shape[0], log_var.dim() < 2, memory_budget)
        return impl.logsumexp(z, means, log_var, a, exclude, memory_budget=memory_budget)


def knn(
    queries: Tensor, points: Tensor, k: int, exclude: Tensor | None, *, memory_budget: int
) -> tuple[Tensor, Tensor]:
    try:
        return _knn(queries, points, k, exclude)
    except Exception as err:  # noqa: BLE001 - as in logsumexp
        failed(queries.device, queries.dtype, err)
        impl = _fallback("knn", queries, points.shape[0], True, memory_budget)
        return impl.knn(queries, points, k, exclude, memory_budget=memory_budget)


def _knn(queries: Tensor, points: Tensor, k: int, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    from pykeops.torch import LazyTensor

    b, n = queries.shape[0], points.shape[0]
    e = exclude.to(queries.dtype) if exclude is not None else queries.new_full((b,), -1.0)
    zi = LazyTensor(queries[:, None, :].contiguous())
    mj = LazyTensor(points[None, :, :].contiguous())
    ei = LazyTensor(e[:, None, None].contiguous())
    jj = LazyTensor(torch.arange(n, dtype=queries.dtype, device=queries.device)[None, :, None])
    dist = ((jj - ei).abs() - 0.5).ifelse(zi.sqdist(mj), -SENTINEL)
    idx = dist.argKmin(k, dim=1, backend=_scheme(queries.device, b)).view(b, k)
    return (queries[:, None, :] - points[idx]).square().sum(-1), idx


def memory(b: int, n: int, d: int, elem: int, budget: int, device: torch.device) -> int:
    """Estimated peak bytes: O((B + N) d) copies and outputs, nothing of size B x N."""
    return (2 * b * (d + 3) + n * (3 * d + 6)) * elem
