r"""Times the importance-weighted test log-likelihood against 50000 exemplars.

The paper's protocol: S = 5000 samples from q per test point, the prior evaluated exactly over
all N = 50000 exemplars (S x N = 2.5e8 component terms per point), the papers' gated MLP VAE
784-300-300, d = 40, Bernoulli decoder (:func:`vaepriors.models.make_mlp_vae`), under
:class:`vaepriors.ExemplarPrior` (evaluation mode: the exact mixture over all exemplars, through
the engine's ``auto`` backend). Weights are random (timing does not depend on training) and
inputs are random binary "MNIST-sized" vectors.

Target (for a GPU session): 10000 test points x 5000 samples in under 20 s on one H100.
On CPU run a scaled subset and read the per-point time; the extrapolation is linear in the
number of points (each point costs the same S x N work).

    python benchmarks/bench_loglik.py --device cpu --threads 1 --n-test 4 --samples 5000
    python benchmarks/bench_loglik.py --device cuda --n-test 10000 --samples 5000

Writes ``benchmarks/results/loglik_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODEL, machine, model, sync  # noqa: E402  (puts this checkout's vaepriors first)

if "--root" in sys.argv:  # time another checkout's vaepriors (the --base worker)
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--root") + 1]).resolve()))

import torch  # noqa: E402

import vaepriors as vp  # noqa: E402
from vaepriors import evaluation  # noqa: E402
from vaepriors.evaluation import _common, likelihood  # noqa: E402
from vaepriors.engine import BACKENDS  # noqa: E402

INPUT = 784


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
    ap.add_argument("--checkpoint", default=None, help="trained weights (profile_train_step.py --save); MNIST data")
    ap.add_argument("--checkpoint-note", default="", help="what the checkpoint is, for the table")
    ap.add_argument("--data-dir", default=os.environ.get("VAEPRIORS_MNIST"), help="MNIST (with --checkpoint)")
    ap.add_argument("--base", default=None, help="also time this checkout (the code before a change)")
    ap.add_argument("--base-runs", type=int, default=2, help="runs of --base")
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    d = args.latent_dim

    encoder, decoder = model(d, (args.hidden, args.hidden), device=device, seed=args.seed)
    exemplars = (torch.rand(args.n_exemplars, INPUT) < 0.13).float().to(device)
    test_x = (torch.rand(args.n_test, INPUT) < 0.13).float().to(device)
    weights = "random weights"
    if args.checkpoint:  # trained weights and real MNIST: a trained posterior's latents sit near
        # their exemplars (many near pairs) and most terms lie far below each row's maximum
        from vaepriors.data import load_mnist

        ckpt = torch.load(args.checkpoint, weights_only=True)
        encoder.load_state_dict(ckpt["encoder"])
        decoder.load_state_dict(ckpt["decoder"])
        splits = load_mnist(args.data_dir)
        exemplars = splits.train.reshape(-1, INPUT)[: args.n_exemplars].float().to(device)
        test_x = splits.test.reshape(-1, INPUT)[: args.n_test].float().to(device)
        weights = f"trained weights ({args.checkpoint_note or args.checkpoint}), MNIST grey levels"

    prior = vp.ExemplarPrior(exemplars)
    if args.checkpoint:
        with torch.no_grad():
            prior.log_var.copy_(ckpt["prior"]["log_var"])
    label = f"vaepriors.ExemplarPrior over {args.n_exemplars} exemplars (evaluation mode: exact, all exemplars)"
    elbo = vp.ExemplarELBO(encoder, decoder, prior).to(device)
    budget = None if args.memory_budget_mib is None else int(args.memory_budget_mib * 2**20)
    resolved_budget = _common._budget(budget, device)
    row_bytes = 4 * (4 * INPUT + 8 * d)  # log_likelihood's own estimate of one (sample, point) row
    s_chunk, b_chunk = likelihood._plan(args.samples, row_bytes, resolved_budget)

    # Warm-up (kernels, caches such as ExemplarPrior's encoded exemplars): one point, few samples.
    evaluation.log_likelihood(elbo, test_x[:1], n_samples=min(args.samples, 64), memory_budget=budget, progress=False)
    sync(device)

    # Where the time goes: one chunk of decoder and one chunk of prior, side by side.
    rows = s_chunk * min(b_chunk, args.n_test)
    z = torch.randn(rows, 1, d, device=device)
    with _common._evaluating(_common._parts(elbo).roots):
        parts_t = {}
        for name, fn in (("decoder", lambda: elbo.log_likelihood(test_x[:1], z)), ("prior", lambda: prior.log_prob(z))):
            fn()
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            parts_t[name] = time.perf_counter() - t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = evaluation.log_likelihood(elbo, test_x, n_samples=args.samples, memory_budget=budget, progress=False)
    sync(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if args.worker:  # the --base comparison: this checkout's numbers only
        print(json.dumps({"ms_per_point": 1e3 * elapsed / args.n_test, "prior_ms_one_chunk": 1e3 * parts_t["prior"],
                          "mean_log_likelihood": out.mean, "code": vp.__file__}))
        return
    per_point = elapsed / args.n_test
    terms = args.n_test * args.samples * args.n_exemplars

    result = {
        "benchmark": "importance-weighted log-likelihood (vaepriors.log_likelihood)",
        **machine(device),
        "engine_backends": list(BACKENDS),
        "prior": label,
        "model": MODEL.replace("300-300", f"{args.hidden}-{args.hidden}").replace("d = 40", f"d = {d}") + ", " + weights,
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
        "peak_memory_bytes": (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ),
    }
    floor = measure_floor(args.samples, args.n_exemplars, d, device)
    result["floor_seconds_per_point"] = floor
    result["x_floor"] = per_point / floor["total"]
    base = run_base(args) if args.base else []
    if base:
        result["base"] = {"root": args.base, "runs": base}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    tag = device.type + ("_trained" if args.checkpoint else "")
    (outdir / f"loglik_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Test log-likelihood timing ({tag})",
        "",
        f"`python benchmarks/bench_loglik.py --device {args.device} --threads {args.threads} "
        f"--n-test {args.n_test} --samples {args.samples}` on {result['device_name']}, "
        f"{result['date']}, torch {torch.__version__}, {args.threads} thread(s), load average {result['load_average'][0]:.1f} (shared machine).",
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
        f"**Floor** (this machine, this run, {args.threads} thread(s)): the distance GEMM of S x N x d "
        f"({floor['gemm']:.3f} s a point, {2 * args.samples * args.n_exemplars * d / floor['gemm'] / 1e9:.0f} GFLOP/s) "
        f"plus S x N exponentials ({floor['exp']:.3f} s): {floor['total']:.3f} s a point. "
        f"Measured: **{result['x_floor']:.2f}x the floor**.",
        "",
        *(
            [
                f"Side by side with `{args.base}` (the code before, same inputs and seed, run after this "
                f"checkout's in its own process): ms / point " + ", ".join(f"{r['ms_per_point']:.0f}" for r in base)
                + f" against this checkout's {1e3 * per_point:.0f}: "
                f"**{min(r['ms_per_point'] for r in base) / (1e3 * per_point):.2f}x faster** (against the base's best run); "
                f"mean log-likelihoods base " + ", ".join(f"{r['mean_log_likelihood']:.3f}" for r in base)
                + f", this {out.mean:.3f}.",
                "",
            ]
            if base
            else []
        ),
        "Extrapolation is linear in the number of points (every point costs the same S x N terms); "
        "the GPU target is under 20 s for 10000 points x 5000 samples on one H100. On a shared CPU, "
        "process CPU time below wall time x threads means the run waited for cores.",
        "",
    ]
    (outdir / f"loglik_{tag}.md").write_text("\n".join(md))
    print("\n".join(md))


def measure_floor(samples: int, n: int, d: int, device: torch.device) -> dict:
    """Seconds a point for the work no exact evaluation avoids: the cross-term GEMM of S
    samples against N means (tiled so that its output stays in cache) and S N exponentials
    of in-range arguments, each timed alone at its best of three."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(samples, d, generator=g).to(device)
    mu = torch.randn(n, d, generator=g).to(device)
    cols = 1024
    out = torch.empty(min(samples, 256), cols, device=device)
    arg = -torch.rand(out.shape, generator=g).to(device) * 50

    def gemm():
        for r in range(0, samples, out.shape[0]):
            zr = z[r : r + out.shape[0]]
            for c in range(0, n, cols):
                m = mu[c : c + cols]
                torch.mm(zr, m.T, out=out[: zr.shape[0], : m.shape[0]])

    def exps():
        buf = torch.empty_like(arg)
        for _ in range(samples * n // arg.numel()):
            torch.exp(arg, out=buf)

    best = {}
    for name, fn in (("gemm", gemm), ("exp", exps)):
        times = []
        for _ in range(3):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        best[name] = min(times)
    best["total"] = best["gemm"] + best["exp"]
    return best


def run_base(args) -> list[dict]:
    """The same measurement with the code of ``--base`` (a git worktree), in its own process."""
    cmd = [sys.executable, __file__, "--worker", "--root", args.base, "--device", args.device,
           "--threads", str(args.threads), "--n-test", str(args.n_test), "--samples", str(args.samples),
           "--n-exemplars", str(args.n_exemplars), "--seed", str(args.seed)]  # fmt: skip
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint, "--data-dir", str(args.data_dir)]
    runs = []
    for _ in range(args.base_runs):
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": args.base})
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"base: {runs[-1]['ms_per_point']:.0f} ms / point ({runs[-1]['code']})", file=sys.stderr)
    return runs


if __name__ == "__main__":
    main()
