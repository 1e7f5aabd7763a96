r"""Chooses the fused Triton kernels' launch configurations: statically on any machine, by
timing on a GPU.

Each of the three kernels (``fwd``; ``bwd_rows``, the z-gradient over query tiles;
``bwd_cols``, the means/scale/weight gradients over component tiles) has its own
``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` in ``vaepriors.engine._fused.CONFIG``.

``--static`` (no GPU needed) compiles every candidate for an NVIDIA compute capability
(default 90, the H100) with Triton's own ``ptxas`` and reports registers per thread, spilled
bytes and shared memory. A configuration that spills, or needs more shared memory than the
chip has, is no candidate.

``--device cuda`` times every candidate that passes the static check (read from the
committed ``fused_static_sm<capability>.json`` unless ``--recompile``), each kernel
alone (forward; backward for the z-gradient only; backward for the means only), at a few
shapes (d = 40, float32, unit-scale normal data), checks the chosen configuration against
a float64 reference, and prints the ``CONFIG`` to put into ``_fused.py``.

    python benchmarks/tune_fused.py --static                 # CPU: writes fused_static_sm90.*
    python benchmarks/tune_fused.py --device cuda            # GPU: writes fused_tune_cuda.*

Writes JSON and a markdown table into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, sync  # noqa: E402  (puts this checkout's vaepriors first)

import torch  # noqa: E402

from vaepriors.engine import _fused  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KERNELS = ("fwd", "bwd_rows", "bwd_cols")
TILES = [(32, 32), (32, 64), (64, 32), (64, 64), (128, 32), (128, 64), (64, 128), (128, 128)]
CANDIDATES = [(bm, bn, w, s) for (bm, bn), w, s in itertools.product(TILES, (4, 8), (2, 3))]
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SHAPES = [(10_000, 60_000), (1000, 60_000), (100, 1_000_000), (100, 60_000)]


def resources(name: str, config, capability: int, dtype: torch.dtype) -> dict:
    """Registers, spills and shared memory of one compiled configuration (ptxas -v)."""
    from triton.backends.nvidia.compiler import get_ptxas

    t0 = time.perf_counter()
    try:
        compiled = _fused.compile_for(name, capability, dtype, config=config)
    except Exception as exc:  # a configuration Triton rejects is reported, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    seconds = time.perf_counter() - t0
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        res = subprocess.run(
            [get_ptxas(capability).path, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
        )
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    shared = compiled.metadata.shared
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "shared": shared,
        "fits": shared <= SHARED_LIMIT.get(capability, 99 * 1024),
        "compile_s": seconds,
    }


def clean(r: dict) -> bool:
    return "error" not in r and r["fits"] and r["spill_stores"] == 0


def static_table(capability: int, dtype: torch.dtype, log) -> list[dict]:
    rows = []
    for name in KERNELS:
        for config in CANDIDATES:
            r = resources(name, config, capability, dtype)
            rows.append({"kernel": name, "config": list(config), **r})
            log(f"{name:9s} {config} {r}")
    return rows


def inputs(b: int, n: int, d: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    z, mu = (torch.randn(k, d, generator=g).to(device) for k in (b, n))
    return z, mu, torch.zeros((), device=device), torch.zeros(n, device=device)


def time_kernel(name: str, config, b: int, n: int, device: torch.device, reps: int = 10) -> float:
    """Milliseconds of one kernel alone (the backward kernels through the Function's
    backward with only their inputs requiring grad)."""
    from triton.testing import do_bench

    _fused.CONFIG[name] = tuple(config)
    z, mu, lv, a = inputs(b, n, 40, device)
    if name == "fwd":
        fn = lambda: _fused.FusedLogSumExp.apply(z, mu, lv, a, None)  # noqa: E731
    else:
        z, mu = z.requires_grad_(name == "bwd_rows"), mu.requires_grad_(name == "bwd_cols")
        out = _fused.FusedLogSumExp.apply(z, mu, lv, a, None)
        g = torch.ones_like(out)
        fn = lambda: torch.autograd.grad(out, z if name == "bwd_rows" else mu, g, retain_graph=True)  # noqa: E731
    return do_bench(fn, warmup=3, rep=reps * 10)


def check(device: torch.device) -> float:
    """Max relative error of the value (float32, chosen configuration) vs float64."""
    z, mu, lv, a = inputs(500, 3000, 40, device)
    out = _fused.FusedLogSumExp.apply(z, mu, lv, a, None)
    ref = torch.logsumexp(-0.5 * torch.cdist(z.double(), mu.double()).square(), 1)
    return ((out.double() - ref).abs() / ref.abs()).max().item()


def markdown(report: dict) -> str:
    where = report["machine"].get("device_name", "")
    where = f"timed on {where}" if report.get("timed") else f"compiled on {where}, no GPU"
    lines = [f"# Fused kernels: launch configurations ({where})", ""]
    lines += [f"Command `{report['command']}`; {report['machine'].get('date', '')}.", ""]
    static = report["static"]
    cap = report["capability"]
    lines += [
        f"## Static: compiled for sm_{cap} ({report['dtype']}, d = 40), no GPU needed",
        "",
        "Registers per thread, spilled bytes (stores) and shared memory per program, from "
        "Triton's compile and `ptxas -v`. A configuration is a candidate (✓) when it spills "
        f"nothing and its shared memory fits the chip ({SHARED_LIMIT.get(cap, 0) // 1024} KiB).",
        "",
        "| kernel | BLOCK_M | BLOCK_N | warps | stages | registers | spill bytes | shared KiB | candidate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in static:
        bm, bn, w, s = r["config"]
        if "error" in r:
            lines.append(f"| {r['kernel']} | {bm} | {bn} | {w} | {s} | - | - | - | {r['error']} |")
            continue
        ok = "✓" if clean(r) else ""
        lines.append(
            f"| {r['kernel']} | {bm} | {bn} | {w} | {s} | {r['registers']} | {r['spill_stores']} | "
            f"{r['shared'] / 1024:.0f} | {ok} |"
        )
    counts = {k: sum(clean(r) for r in static if r["kernel"] == k) for k in KERNELS}
    lines += ["", "Candidates per kernel: " + ", ".join(f"{k} {v} of {len(CANDIDATES)}" for k, v in counts.items()) + "."]
    if report.get("timed"):
        lines += ["", "## Timed (ms, d = 40, float32; median of Triton's do_bench)", ""]
        shapes = [tuple(s) for s in report["shapes"]]
        lines += [
            "| kernel | config | " + " | ".join(f"B={b} N={n}" for b, n in shapes) + " | geo-mean |",
            "|---|---|" + "---|" * (len(shapes) + 1),
        ]
        for r in report["timed"]:
            lines.append(
                f"| {r['kernel']} | {tuple(r['config'])} | " + " | ".join(f"{t:.3g}" for t in r["ms"]) + f" | {r['geo']:.3g} |"
            )
        lines += ["", f"Chosen: `CONFIG = {report['chosen']}`; max relative error vs float64 {report['error']:.1e}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--static", action="store_true", help="compile only (no GPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--capability", type=int, default=None, help="compute capability (default: the GPU's, else 90)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--recompile", action="store_true", help="redo the static check before timing (default: read it from the committed results)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    device = torch.device(args.device)
    timed = not args.static
    if timed and not torch.cuda.is_available():
        sys.exit("timing needs a CUDA GPU; use --static to compile only")
    cap = args.capability
    if cap is None:
        cap = (lambda m: m[0] * 10 + m[1])(torch.cuda.get_device_capability(device)) if timed else 90
    dtype = getattr(torch, args.dtype)
    log = lambda s: print(s, flush=True)  # noqa: E731
    report = {
        "machine": machine(device if timed else "cpu"),
        "command": " ".join(["python", "benchmarks/tune_fused.py", *sys.argv[1:]]),
        "capability": cap,
        "dtype": args.dtype,
    }
    committed = Path(args.out) / f"fused_static_sm{cap}.json"
    if timed and not args.recompile and committed.exists() and json.loads(committed.read_text())["dtype"] == args.dtype:
        report["static"] = json.loads(committed.read_text())["static"]  # the committed static check
        log(f"candidates from {committed}")
    else:
        report["static"] = static_table(cap, dtype, log)
    if timed:
        report["shapes"] = SHAPES
        report["timed"], chosen = [], {}
        for name in KERNELS:
            rows = []
            for r in report["static"]:
                if r["kernel"] == name and clean(r):
                    ms = [time_kernel(name, r["config"], b, n, device) for b, n in SHAPES]
                    geo = math.exp(sum(map(math.log, ms)) / len(ms))
                    rows.append({"kernel": name, "config": r["config"], "ms": ms, "geo": geo})
                    log(f"{name} {r['config']} {ms}")
            rows.sort(key=lambda r: r["geo"])
            report["timed"] += rows
            chosen[name] = tuple(rows[0]["config"]) if rows else _fused.CONFIG[name]
            _fused.CONFIG[name] = chosen[name]
        report["chosen"] = chosen
        report["error"] = check(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"fused_tune_{device.type}" if timed else f"fused_static_sm{cap}")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
