"""Peak memory of ``auto`` at the largest shape of the engine issue, B = 5000 x N = 1e6.

The timing grid (``bench_engine.py``) skips this shape on a CPU: its float64 reference alone
takes too long. Memory needs no reference: this script runs ``mixture_log_prob`` with the
default backend (``auto``) forward and backward once and reports the process's peak resident
memory above the inputs, next to the budget. Writes ``results/engine_memory_<device>.{json,md}``.

    python benchmarks/bench_engine_memory.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import _common  # noqa: F401  (puts this checkout's vaepriors first on sys.path)
import torch

import vaepriors as vp
from vaepriors.engine import _auto


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="5000,1000000,40", help="B,N,d")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    device = torch.device(a.device)
    b, n, d = (int(v) for v in a.shape.split(","))
    torch.manual_seed(0)
    z = torch.randn(b, d, device=device, requires_grad=True)
    mu = torch.randn(n, d, device=device, requires_grad=True)
    lv = torch.zeros((), device=device, requires_grad=True)
    budget = vp.get_memory_budget()
    pick = _auto.choose("logsumexp", device, z.dtype, b, n, d, True, budget)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_mib(device)  # the inputs are the high-water mark so far
    t0 = time.perf_counter()
    out = vp.mixture_log_prob(z, mu, lv)
    _common.sync(device)
    fwd_s, fwd_peak = time.perf_counter() - t0, peak_mib(device)
    out.sum().backward()
    _common.sync(device)
    all_s, all_peak = time.perf_counter() - t0, peak_mib(device)
    grads = (z.numel() + mu.numel()) * z.element_size() / 2**20
    row = {
        "B": b, "N": n, "d": d, "backend": pick, "budget_mib": budget / 2**20,
        "forward_s": fwd_s, "forward_backward_s": all_s,
        "forward_extra_mib": fwd_peak - base, "forward_backward_extra_mib": all_peak - base,
        "returned_gradients_mib": grads, "finite": bool(torch.isfinite(out).all()),
    }
    report = {"machine": _common.machine(device), "command": "python benchmarks/bench_engine_memory.py --device " + a.device, "row": row}
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"engine_memory_{device.type}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = (
        f"# Engine peak memory at B = {b} x N = {n}, d = {d} ({_common.device_name(device)})\n\n"
        f"Command: `{report['command']}`. `auto` picked **{pick}** within the default budget of "
        f"{budget / 2**20:.0f} MiB. Peak extra memory above the inputs (process peak resident size on "
        f"CPU, `max_memory_allocated` on CUDA):\n\n"
        "| pass | seconds | peak extra MiB | of which returned gradients MiB |\n|---|---|---|---|\n"
        f"| forward | {fwd_s:.1f} | {fwd_peak - base:.0f} | 0 |\n"
        f"| forward + backward | {all_s:.1f} | {all_peak - base:.0f} | {grads:.0f} |\n\n"
        f"A dense B x N float32 matrix alone would be {b * n * 4 / 2**30:.1f} GiB.\n"
    )
    (out_dir / f"engine_memory_{device.type}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
