r"""Times the importance-weighted test log-likelihood against 50000 exemplars.

The paper's protocol: S = 5000 samples from q per test point, the prior evaluated exactly over
all N = 50000 exemplars (S x N = 2.5e8 component terms per point), MLP VAE 784-300-300, d = 40.
Weights are random (timing does not depend on training) and inputs are random binary
"MNIST-sized" vectors. The prior is :class:`vaepriors.ExemplarPrior` when it can be imported,
else a labelled stand-in with the same evaluation-time math: a uniform mixture of N isotropic
Gaussians with one shared variance, centred on the encoder means of N random exemplars, reduced
by :func:`vaepriors.engine.mixture_log_prob`.

Target (for a GPU session): 10000 test points x 5000 samples in under 20 s on one H100.
On CPU run a scaled subset and read the per-point time; the extrapolation is linear in the
number of points (each point costs the same S x N work).

    python benchmarks/bench_loglik.py --device cpu --threads 1 --n-test 4 --samples 5000
    python benchmarks/bench_loglik.py --device cuda --n-test 10000 --samples 5000

Writes ``benchmarks/results/loglik_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's vaepriors

import torch
from torch import Tensor, nn

import vaepriors as vp
from vaepriors import evaluation
from vaepriors.engine import BACKENDS, mixture_log_prob
from vaepriors.mixture import sample_mixture
from vaepriors.prior import BasePrior

INPUT = 784


class MLPEncoder(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(INPUT, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2 * d)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.head(self.net(x)).chunk(2, -1)
        return mean, torch.tanh(raw) * 3 - 2  # log-variance in [-5, 1]


class MLPDecoder(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, INPUT)
        )

    def forward(self, z: Tensor) -> torch.distributions.Bernoulli:
        return torch.distributions.Bernoulli(logits=self.net(z), validate_args=False)


class ParzenStandIn(BasePrior):
    """Stand-in for ExemplarPrior at evaluation: (1/N) sum_n N(z; means_n, sigma^2 I)."""

    def __init__(self, means: Tensor, log_var: float = 0.0) -> None:
        super().__init__(means.shape[1])
        self.register_buffer("means", means)
        self.register_buffer("log_var", torch.tensor(float(log_var), dtype=means.dtype))

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def _log_prob(self, z: Tensor, index: Tensor | None) -> Tensor:
        return mixture_log_prob(z, self.means, self.log_var)

    def _rsample(self, shape: torch.Size) -> Tensor:
        return sample_mixture(self.means, self.log_var, shape)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--n-test", type=int, default=20, help="test points timed")
    ap.add_argument("--samples", type=int, default=5000, help="S, importance samples per point")
    ap.add_argument("--n-exemplars", type=int, default=50_000)
    ap.add_argument("--latent-dim", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=300)
    ap.add_argument("--memory-budget-mib", type=float, default=None, help="default: the library's")
    ap.add_argument("--target-points", type=int, default=10_000, help="extrapolate to this many points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    d = args.latent_dim

    encoder = MLPEncoder(d, args.hidden).to(device)
    decoder = MLPDecoder(d, args.hidden).to(device)
    exemplars = (torch.rand(args.n_exemplars, INPUT) < 0.13).float().to(device)
    test_x = (torch.rand(args.n_test, INPUT) < 0.13).float().to(device)

    if hasattr(vp, "ExemplarPrior"):
        prior = vp.ExemplarPrior(exemplars)
        label = f"vaepriors.ExemplarPrior over {args.n_exemplars} exemplars (evaluation mode: exact, all exemplars)"
    else:
        with torch.no_grad():
            means = torch.cat([encoder(exemplars[i : i + 4096])[0] for i in range(0, args.n_exemplars, 4096)])
        prior = ParzenStandIn(means)
        label = (
            f"STAND-IN (ExemplarPrior not importable on this branch): uniform mixture of {args.n_exemplars} "
            "isotropic Gaussians, shared variance, at the encoder means of random exemplars, through "
            "vaepriors.engine.mixture_log_prob"
        )
    model = vp.ExemplarELBO(encoder, decoder, prior).to(device)
    budget = None if args.memory_budget_mib is None else int(args.memory_budget_mib * 2**20)
    resolved_budget = evaluation._budget(budget, device)
    row_bytes = 4 * (4 * INPUT + 8 * d + 4 * evaluation._n_components(prior))
    s_chunk, b_chunk = evaluation._plan(args.samples, row_bytes, resolved_budget)

    # Warm-up (kernels, caches such as ExemplarPrior's encoded exemplars): one point, few samples.
    evaluation.log_likelihood(model, test_x[:1], n_samples=min(args.samples, 64), memory_budget=budget, progress=False)
    sync(device)

    # Where the time goes: one chunk of decoder and one chunk of prior, side by side.
    rows = s_chunk * min(b_chunk, args.n_test)
    z = torch.randn(rows, 1, d, device=device)
    with evaluation._evaluating(evaluation._parts(model).roots):
        parts_t = {}
        for name, fn in (("decoder", lambda: model.log_likelihood(test_x[:1], z)), ("prior", lambda: prior.log_prob(z))):
            fn()
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            parts_t[name] = time.perf_counter() - t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    load = os.getloadavg()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = evaluation.log_likelihood(model, test_x, n_samples=args.samples, memory_budget=budget, progress=False)
    sync(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_point = elapsed / args.n_test
    terms = args.n_test * args.samples * args.n_exemplars

    result = {
        "benchmark": "importance-weighted log-likelihood (vaepriors.log_likelihood)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "engine_backends": list(BACKENDS),
        "prior": label,
        "model": f"MLP VAE {INPUT}-{args.hidden}-{args.hidden}, d={d}, Bernoulli decoder, random weights",
        "n_test": args.n_test,
        "samples": args.samples,
        "n_exemplars": args.n_exemplars,
        "memory_budget_bytes": resolved_budget,
        "chunk_samples": s_chunk,
        "chunk_points": b_chunk,
        "seconds": elapsed,
        "process_cpu_seconds": cpu,
        "ms_per_point": 1e3 * per_point,
        "component_terms_per_second": terms / elapsed,
        "one_chunk_seconds": {**parts_t, "rows": rows},
        "prior_share_of_one_chunk": parts_t["prior"] / (parts_t["prior"] + parts_t["decoder"]),
        "extrapolated_points": args.target_points,
        "extrapolated_seconds": per_point * args.target_points,
        "mean_log_likelihood": out.mean,
        "load_average_1_5_15": load,
        "peak_memory_bytes": (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ),
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    tag = device.type
    (outdir / f"loglik_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Test log-likelihood timing ({tag})",
        "",
        f"`python benchmarks/bench_loglik.py --device {args.device} --threads {args.threads} "
        f"--n-test {args.n_test} --samples {args.samples}` on {result['device_name']}, "
        f"{result['date']}, torch {torch.__version__}, load average {load[0]:.1f} (shared machine).",
        "",
        f"Prior: {label}.",
        f"Model: {result['model']}.",
        "",
        "| points | S | exemplars | chunk (samples x points) | wall s | process CPU s | ms / point (wall) "
        f"| component terms / s | extrapolated to {args.target_points} points |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.n_test} | {args.samples} | {args.n_exemplars} | {s_chunk} x {b_chunk} | {elapsed:.1f} | {cpu:.1f} "
        f"| {1e3 * per_point:.0f} | {terms / elapsed:.3g} | {per_point * args.target_points:.0f} s |",
        "",
        f"One chunk of {rows} latents, side by side: decoder {parts_t['decoder'] * 1e3:.0f} ms, prior "
        f"{parts_t['prior'] * 1e3:.0f} ms (prior {100 * result['prior_share_of_one_chunk']:.0f}% of the work).",
        "",
        "Extrapolation is linear in the number of points (every point costs the same S x N terms); "
        "the GPU target is under 20 s for 10000 points x 5000 samples on one H100. On a shared CPU, "
        "process CPU time below wall time x threads means the run waited for cores.",
        "",
    ]
    (outdir / f"loglik_{tag}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
