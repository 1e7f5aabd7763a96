r"""What ``backend="auto"`` picks: the fastest backend whose memory fits the budget.

The rules, first match wins (``cells = B * N``; ``grad``: a backward will follow, i.e.
grad mode is on and an input requires grad; memory as estimated by each backend's
``memory()``):

======  =================================================================  ========
device  condition                                                          backend
======  =================================================================  ========
cpu     dense fits the budget and ``cells <= DENSE_CELLS_CPU``             dense
cuda    ``FUSED_MEASURED``, logsumexp, isotropic scales, Triton usable     fused
cuda    dense fits the budget                                              dense
cuda    ``B >= KEOPS_ROWS`` and KeOps passes its check                     keops
any     otherwise                                                          chunked
======  =================================================================  ========

Where the figures come from:

- CPU (``benchmarks/results/engine_cpu.md``, one thread): up to about 2^19 cells dense is
  as fast or faster (its matrix still sits in cache, and with a backward it keeps its
  graph where chunked recomputes); beyond, chunked's cache-sized blocks
  (``_chunked.TILE_CELLS``) win, 2-5x at 1e7-1e8 cells, forward and forward+backward.
  KeOps is never picked on CPU: it measured 10-50x slower than chunked at every shape.
- CUDA (``design/anchors.md``, H100): dense torch is fastest wherever it fits (B = 100 x
  N = 60 000: 0.34 / 1.39 ms vs KeOps 2-D 0.71 / 3.1); beyond the budget, chunked torch
  keeps dense's speed per cell (its blocks hold up to 2^24 cells) while KeOps' 1-D scheme
  pays off only once many query rows fill the GPU (B = 50 000 x N = 60 000: 14 ms vs 71 ms
  dense; B = 5 000 x N = 1e6: 173 ms vs 130 ms chunked). To be confirmed by
  ``bench_engine.py --full --device cuda``.

- The fused Triton backend is not picked until a GPU session has measured it:
  ``FUSED_MEASURED`` is ``False`` until ``bench_engine.py --full --device cuda`` shows where
  it wins (then set it, and narrow the rule to those shapes).

The same rules serve kNN (torch top-k merged across blocks, or KeOps argKmin) with
``grad = False``.
"""

from __future__ import annotations

import torch

from . import _dense, _fused, _keops

# Above this B x N dense is not picked on CPU even when it fits the budget.
DENSE_CELLS_CPU = 1 << 19
# Queries from which KeOps' 1-D scheme beats chunked torch on a GPU (see the module docstring).
KEOPS_ROWS = 20_000
# Set by a GPU session from `python benchmarks/bench_engine.py --full --device cuda`: until
# then auto never runs the (untimed) fused kernels on users' GPUs.
FUSED_MEASURED = False


def choose(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    b: int,
    n: int,
    d: int,
    grad: bool,
    budget: int,
    *,
    keops: bool = True,
    isotropic: bool = True,
) -> str:
    """The backend name for one call (``op`` is ``"logsumexp"`` or ``"knn"``; ``isotropic``:
    the scales are a scalar or ``[N]``, not diagonal ``[N, d]``)."""
    elem = torch.finfo(dtype).bits // 8
    cells = b * n
    if (
        FUSED_MEASURED
        and device.type == "cuda"
        and op == "logsumexp"
        and _fused.usable_shape(d, isotropic)
        and _fused.available(device, dtype, warn=False)
    ):
        return "fused"
    fits = _dense.memory(b, n, d, elem, budget, device, grad) <= budget
    if fits and (device.type != "cpu" or cells <= DENSE_CELLS_CPU):
        return "dense"
    if (
        keops
        and device.type == "cuda"
        and b >= KEOPS_ROWS
        and _keops.usable_shape(n, dtype)
        and _keops.available(device, dtype, warn=False)
    ):
        return "keops"
    return "chunked"
