r"""Times every engine backend and ``auto``: forward, forward+backward, peak memory, error.

The reduction is the exemplar-prior one, ``log sum_j exp(-|z_i - mu_j|^2 / 2)`` (unit
isotropic scale, z and mu standard normal, grads w.r.t. z and mu), as in
``design/anchors.md``. Each shape runs every backend in interleaved rounds, in a shuffled
order (side by side, so machine noise hits all alike), and keeps the fastest round; cases
under 50 ms run three times back to back per round (the fastest counts), so that no case
pays for the caches its predecessor evicted. Writes
``benchmarks/results/engine_<device>.{json,md,png}``.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the process's
peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident
memory before the call, measured in a separate untimed call after ``malloc_trim`` and with
glibc serving every block over 128 KiB by mmap (``mallopt``), so that no freed memory
hides in its heap. Both
exclude the gradients a backward must return (``(B + N) d`` numbers). Next to it, the
backend's own estimate (``memory()``). Timed calls run with glibc's usual 32 MiB threshold.

Errors: on up to 64 queries, the float32 value and its gradient w.r.t. z against a float64
brute-force difference-form reference (max relative error of the value, normwise relative
error of each query's gradient, max over queries).

Usage::

    python benchmarks/bench_engine.py --quick --device cpu --threads 1   # a few minutes
    python benchmarks/bench_engine.py --full --device cuda              # a GPU session
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--threads" in sys.argv and "OMP_NUM_THREADS" not in os.environ:
    # KeOps' CPU kernels use OpenMP: give them the same thread count as torch.
    env = dict(os.environ, OMP_NUM_THREADS=sys.argv[sys.argv.index("--threads") + 1])
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vaepriors.engine import _auto, _chunked, _dense, _fused, _keops, get_memory_budget, mixture_logsumexp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ["dense", "chunked", "keops", "fused", "auto"]
SINGLE = [be for be in BACKENDS if be != "auto"]
QUICK = [(b, n, 40) for n in (10_000, 60_000) for b in (100, 1000, 10_000)] + [
    (100, 1000, 40),  # training-sized shapes, where dense wins
    (500, 1000, 40),
    (100, 60_000, 128),
    (1000, 60_000, 128),
    (100, 1_000_000, 40),
]
FULL = [(b, n, d) for d in (40, 128) for n in (10_000, 60_000, 1_000_000) for b in (100, 1000, 10_000, 50_000)] + [
    (5000, 1_000_000, 40)
]


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def mmap_threshold(nbytes: int) -> None:
    """glibc: serve allocations above ``nbytes`` by mmap (returned to the system on free)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak bytes allocated during the block, above what was allocated before it."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            mmap_threshold(128 * 2**10)
            malloc_trim()  # free heap pages back to the system, so that reusing them counts
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _status("VmHWM") - self.base
            mmap_threshold(32 * 2**20)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024


def run_once(backend: str, z: torch.Tensor, mu: torch.Tensor, lv: torch.Tensor, grad: bool):
    if not grad:
        with torch.no_grad():
            return mixture_logsumexp(z, mu, lv, backend=backend).log(), None
    zg, mg = z.detach().requires_grad_(True), mu.detach().requires_grad_(True)
    value = mixture_logsumexp(zg, mg, lv, backend=backend).log()
    value.sum().backward()
    return value.detach(), zg.grad


def reference64(z: torch.Tensor, mu: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 difference-form value and z-gradient of the first ``rows`` queries."""
    z = z[:rows].double()
    n, d = mu.shape
    step = max(1, (2**27) // (rows * d * 8))
    parts = []
    for s in range(0, n, step):
        m = mu[s : s + step].double()
        parts.append(-0.5 * ((z[:, None, :] - m[None]) ** 2).sum(-1))
        parts = [torch.logsumexp(torch.cat(parts, 1), 1, keepdim=True)]
    lse = parts[0][:, 0] - 0.5 * d * math.log(2 * math.pi)  # unit variance normaliser
    grad = torch.zeros_like(z)
    for s in range(0, n, step):
        m = mu[s : s + step].double()
        diff = m[None] - z[:, None, :]
        p = torch.exp(-0.5 * (diff**2).sum(-1) - 0.5 * d * math.log(2 * math.pi) - lse[:, None])
        grad += (p[:, :, None] * diff).sum(1)
    return lse, grad


def errors(value, gz, ref_value, ref_grad) -> tuple[float, float | None]:
    r = ref_value.shape[0]
    err_v = ((value[:r].double().cpu() - ref_value) / ref_value.abs()).abs().max().item()
    if gz is None:
        return err_v, None
    num = (gz[:r].double().cpu() - ref_grad).norm(dim=1)
    err_g = (num / ref_grad.norm(dim=1).clamp_min(1e-300)).max().item()
    return err_v, err_g


def estimate(backend: str, b: int, n: int, d: int, grad: bool, device: torch.device) -> int:
    budget = get_memory_budget()
    if backend == "dense":
        return _dense.memory(b, n, d, 4, budget, device, grad)
    if backend == "chunked":
        return _chunked.memory(b, n, d, 4, budget, device, grad)
    if backend == "fused":
        return _fused.memory(b, n, d, 4, budget, device, grad)
    return _keops.memory(b, n, d, 4, budget, device)


# ----------------------------------------------------------------------------- the grid


def bench_shape(b, n, d, device, rounds, max_seconds, rates, usable, log, case_seconds=10.0):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(b, d, generator=gen).to(device)
    mu = torch.randn(n, d, generator=gen).to(device)
    lv = torch.zeros((), device=device)
    rows = min(b, 64, max(8, int(2e8) // (n * d)))
    ref_value, ref_grad = (t.cpu() for t in reference64(z, mu, rows))
    ram = available_memory(device)
    out = {"B": b, "N": n, "d": d, "cells": b * n, "rows_checked": rows, "results": {}}
    picks = {g: _auto.choose("logsumexp", device, torch.float32, b, n, d, g, get_memory_budget()) for g in (False, True)}
    out["auto_picks"] = {"fwd": picks[False], "fwd+bwd": picks[True]}
    cases = [(be, g) for be in BACKENDS for g in (False, True)]
    todo = []
    for be, g in cases:
        mode = "fwd+bwd" if g else "fwd"
        res = out["results"].setdefault(be, {})
        real = picks[g] if be == "auto" else be
        if not usable.get(real, True):
            res[mode] = {"skipped": f"{real} unavailable"}
            continue
        est = estimate(real, b, n, d, g, device)
        predicted = rates.get((real, g), 0.0) * b * n * d
        limit = ram * 0.5
        if est > limit:
            res[mode] = {"skipped": f"needs ~{est / 2**30:.1f} GiB"}
        elif predicted > max_seconds:
            res[mode] = {"skipped": f"predicted {predicted:.0f} s > {max_seconds:.0f} s"}
        else:
            res[mode] = {"times": [], "est_mb": est / 2**20}
            todo.append((be, real, g, mode))
    order = random.Random(0)
    for r in range(rounds + 1):  # round 0 warms up (KeOps compiles, caches) and measures the rest
        if r > 0:
            order.shuffle(todo)  # no case always runs right after the same (cache-evicting) one
        for be, real, g, mode in todo:
            res = out["results"][be][mode]
            if len(res["times"]) >= 2 and sum(res["times"]) > case_seconds:
                continue  # slow case: two timed rounds are enough
            sync(device)
            if r == 0:
                with PeakMemory(device) as pm:
                    value, gz = run_once(be, z, mu, lv, g)
                grads = (b + n) * d * 4 if g else 0
                res["peak_mb"] = max(pm.peak - grads, 0) / 2**20
                res["err_value"], res["err_grad_z"] = errors(value, gz, ref_value, ref_grad)
                del value, gz
                continue
            # quick cases run back to back a few times (the first one refills the caches)
            repeat = 3 if res["times"] and min(res["times"]) < 0.05 else 1
            best = math.inf
            for _ in range(repeat):
                t0 = time.perf_counter()
                run_once(be, z, mu, lv, g)
                sync(device)
                best = min(best, time.perf_counter() - t0)
            res["times"].append(best)
    for be, real, g, mode in todo:
        res = out["results"][be][mode]
        res["ms"] = 1e3 * min(res["times"])
        if be != "auto":
            rates[(real, g)] = max(rates.get((real, g), 0.0), res["ms"] / 1e3 / (b * n * d))
    log(summary_line(out))
    return out


def summary_line(row) -> str:
    parts = [f"B={row['B']:>6} N={row['N']:>8} d={row['d']:>4}"]
    for be in BACKENDS:
        cell = []
        for mode in ("fwd", "fwd+bwd"):
            r = row["results"][be][mode]
            cell.append(f"{r['ms']:.1f}" if "ms" in r else "-")
        parts.append(f"{be} {' / '.join(cell)}")
    parts.append(f"auto->{row['auto_picks']['fwd']}/{row['auto_picks']['fwd+bwd']}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- reporting


def ratios(row, mode, within_budget, pick=False):
    """auto's time over the fastest single backend's (optionally among those within budget);
    ``pick``: the time of the backend auto picked, as measured under its own name."""
    budget_mb = get_memory_budget() / 2**20
    best = None
    for be in SINGLE:
        r = row["results"][be][mode]
        if "ms" not in r or (within_budget and r.get("est_mb", 0) > budget_mb):
            continue
        best = r["ms"] if best is None else min(best, r["ms"])
    auto = row["results"][row["auto_picks"][mode] if pick else "auto"][mode]
    if best is None or "ms" not in auto:
        return None
    return auto["ms"] / best


def markdown(report) -> str:
    meta = report["machine"]
    lines = [
        f"# Engine benchmark ({meta['device_name']})",
        "",
        f"{meta['platform']}; torch {meta['torch']}; {meta['threads']} thread(s); memory budget "
        f"{meta['budget_mb']:.0f} MiB; command `{meta['command']}`; {meta['date']}.",
        "",
        "Times in ms (fastest of the rounds), forward / forward+backward (grads w.r.t. z and mu); "
        "`-` skipped (time or memory). auto/best: auto's time over the fastest backend's, fwd / "
        "fwd+bwd; pick/best: the same for the backend auto picked, timed under its own name (auto "
        "only adds its dispatch, so auto/best - pick/best is noise between rounds). Peak: measured "
        "extra memory of forward+backward in MiB, the returned gradients excluded (the backend's "
        "estimate in brackets). Errors of float32 vs float64, max over backends: relative value "
        "error / normwise relative z-gradient error per query.",
        "",
        f"| B | N | d | {' | '.join(SINGLE)} | auto (pick) | auto/best | pick/best | peak MiB {' / '.join(BACKENDS)} | err value / grad |",
        "|---|---|---|" + "---|" * (len(BACKENDS) + 4),
    ]
    for row in report["rows"]:
        cells = []
        for be in BACKENDS:
            t = []
            for mode in ("fwd", "fwd+bwd"):
                r = row["results"][be][mode]
                t.append(f"{r['ms']:.3g}" if "ms" in r else "-")
            cells.append(" / ".join(t))
        picks = row["auto_picks"]
        cells[-1] += f" ({picks['fwd']}" + ("" if picks["fwd"] == picks["fwd+bwd"] else f"/{picks['fwd+bwd']}") + ")"
        for pick in (False, True):
            rat = [ratios(row, mode, False, pick) for mode in ("fwd", "fwd+bwd")]
            cells.append(" / ".join("-" if x is None else f"{x:.2f}" for x in rat))
        mem = []
        for be in BACKENDS:
            r = row["results"][be]["fwd+bwd"]
            mem.append(f"{r['peak_mb']:.0f} ({r['est_mb']:.0f})" if "peak_mb" in r else "-")
        cells.append(" / ".join(mem))
        res = [row["results"][be][m] for be in BACKENDS for m in ("fwd", "fwd+bwd")]
        ev = [r["err_value"] for r in res if r.get("err_value") is not None]
        eg = [r["err_grad_z"] for r in res if r.get("err_grad_z") is not None]
        cells.append(" / ".join(f"{max(e):.1e}" if e else "-" for e in (ev, eg)))
        lines.append(f"| {row['B']} | {row['N']} | {row['d']} | " + " | ".join(cells) + " |")
    s = report["summary"]
    lines += [
        "",
        f"auto within 1.1x of the fastest backend: {s['auto_within_1.1']} of {s['compared']} measured cases "
        f"(worst {s['worst_ratio']:.2f}); within the budget: {s['auto_within_1.1_budget']} of {s['compared_budget']} "
        f"(worst {s['worst_ratio_budget']:.2f}). The backend auto picks, timed under its own name, is within "
        f"1.1x of the fastest in {s['pick_within_1.1']} of {s['compared']} (worst {s['worst_pick_ratio']:.2f}): "
        f"the rest of auto's spread is machine noise between rounds. Max relative error vs float64: value {s['max_err_value']:.2e}, "
        f"z-gradient {s['max_err_grad']:.2e}.",
    ]
    return "\n".join(lines) + "\n"


def summarise(rows):
    all_r = [r for row in rows for m in ("fwd", "fwd+bwd") for r in [ratios(row, m, False)] if r is not None]
    bud_r = [r for row in rows for m in ("fwd", "fwd+bwd") for r in [ratios(row, m, True)] if r is not None]
    pick_r = [r for row in rows for m in ("fwd", "fwd+bwd") for r in [ratios(row, m, False, True)] if r is not None]
    res = [row["results"][be][m] for row in rows for be in BACKENDS for m in ("fwd", "fwd+bwd")]
    return {
        "compared": len(all_r),
        "auto_within_1.1": sum(r <= 1.1 for r in all_r),
        "worst_ratio": max(all_r, default=float("nan")),
        "compared_budget": len(bud_r),
        "auto_within_1.1_budget": sum(r <= 1.1 for r in bud_r),
        "worst_ratio_budget": max(bud_r, default=float("nan")),
        "pick_within_1.1": sum(r <= 1.1 for r in pick_r),
        "worst_pick_ratio": max(pick_r, default=float("nan")),
        "max_err_value": max((r.get("err_value") or 0 for r in res), default=0.0),
        "max_err_grad": max((r.get("err_grad_z") or 0 for r in res), default=0.0),
    }


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = {"dense": "tab:blue", "chunked": "tab:orange", "keops": "tab:green", "fused": "tab:red"}
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for d, style in ((40, "-"), (128, "--")):
            rows = sorted((r for r in report["rows"] if r["d"] == d), key=lambda r: r["cells"])
            for be, c in colours.items():
                pts = [(r["cells"], r["results"][be][mode]["ms"]) for r in rows if "ms" in r["results"][be][mode]]
                if pts:
                    ax.plot(*zip(*pts), style, color=c, marker=".", label=f"{be} d={d}")
            pts = [(r["cells"], r["results"]["auto"][mode]["ms"]) for r in rows if "ms" in r["results"]["auto"][mode]]
            if pts:
                ax.scatter(*zip(*pts), s=80, facecolors="none", edgecolors="k", label=f"auto d={d}" if d == 40 else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("B x N")
        ax.set_title(f"{mode} ({report['machine']['device_name']})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid = ap.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="small CPU grid (default)")
    grid.add_argument("--full", action="store_true", help="the whole grid, for a GPU session")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default 5; 2 for cases over 10 s)")
    ap.add_argument("--max-seconds", type=float, default=None, help="skip a case predicted to take longer")
    ap.add_argument("--shapes", default=None, help='instead of a grid: "B,N,d;B,N,d;..."')
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mmap_threshold(32 * 2**20)  # glibc's dynamic maximum, fixed for every timed call
    device = torch.device(args.device)
    shapes = FULL if args.full else QUICK
    if args.shapes:
        shapes = [tuple(int(float(x)) for x in s.split(",")) for s in args.shapes.split(";")]
    rounds = args.rounds or 5
    max_seconds = args.max_seconds or (30.0 if args.full else 10.0)
    keops_ok = _keops.available(device, torch.float32, warn=True)
    # the fused kernels are timed on GPUs only (on CPU they run only in Triton's interpreter)
    fused_ok = device.type == "cuda" and _fused.available(device, torch.float32, warn=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    if device.type == "cpu":
        try:
            name = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
        except (OSError, AttributeError):
            pass
    meta = {
        "device": device.type,
        "device_name": name,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "budget_mb": get_memory_budget() / 2**20,
        "keops": keops_ok,
        "fused": fused_ok,
        "command": " ".join(["python", "benchmarks/bench_engine.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
    }
    rates: dict = {}
    rows = []
    t0 = time.time()
    for b, n, d in sorted(shapes, key=lambda s: s[0] * s[1] * s[2]):
        usable = {"keops": keops_ok, "fused": fused_ok}
        rows.append(bench_shape(b, n, d, device, rounds, max_seconds, rates, usable, lambda s: print(s, flush=True)))
    rows.sort(key=lambda r: (r["d"], r["N"], r["B"]))
    for row in rows:
        for be in BACKENDS:
            for r in row["results"][be].values():
                r.pop("times", None)
    report = {"machine": meta, "rows": rows, "summary": summarise(rows), "seconds": time.time() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"engine_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {stem}.json/.md/.png in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
