r"""What ``backend="auto"`` picks: the fastest backend whose memory fits the budget.

The rules, first match wins (``cells = B * N``; memory as estimated by each backend's
``memory()``; the figures come from ``benchmarks/bench_engine.py`` on CPU and from the H100
measurements in ``design/anchors.md``):

=====  ===============================================================  ========
device  condition                                                        backend
=====  ===============================================================  ========
any     dense fits the budget and ``cells <= DENSE_CELLS[device]``       dense
cuda    ``B >= KEOPS_ROWS`` and KeOps passes its check                   keops
any     otherwise                                                        chunked
=====  ===============================================================  ========

- CPU: KeOps is never picked; it measured slower than the torch backends at every shape.
  Dense beats chunked only while its few ``B x N`` passes stay cheap; beyond
  ``DENSE_CELLS["cpu"]`` cells, cache-sized blocks win even when dense would fit.
- CUDA: dense torch is fastest for training shapes (B x N up to ~1e8 cells, within the
  budget); beyond the budget, chunked torch keeps dense's speed per cell (its blocks are
  big) while KeOps' 1-D scheme only pays off once many query rows fill the GPU
  (B = 50 000 x N = 60 000: 14 ms vs 71 ms dense, but B = 5 000 x N = 1e6: 173 ms vs 130 ms
  chunked). The same rules serve kNN (torch top-k merged across blocks, or KeOps argKmin).
"""

from __future__ import annotations

import torch

from . import _chunked, _dense, _keops

# Above these B x N the dense backend is not picked even when it fits the budget.
DENSE_CELLS = {"cpu": 1 << 22, "cuda": 1 << 40}
# Queries from which KeOps' 1-D scheme beats chunked torch on a GPU (see the module docstring).
KEOPS_ROWS = 20_000


def dense_memory(b: int, n: int, elem: int, grad: bool) -> int:
    """Estimated peak bytes of the dense backend (its B x N temporaries)."""
    return b * n * (_dense.CELL_BYTES_GRAD if grad else _dense.CELL_BYTES) * elem


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
) -> str:
    """The backend name for one call (``op`` is ``"logsumexp"`` or ``"knn"``)."""
    elem = torch.finfo(dtype).bits // 8
    cells = b * n
    if dense_memory(b, n, elem, grad) <= budget and cells <= DENSE_CELLS.get(device.type, 1 << 40):
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
