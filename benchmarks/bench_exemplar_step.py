r"""Time one training step (forward + backward + Adam) of the papers' VAE (gated MLP
784-300-300, d = 40, Bernoulli decoder: :func:`vaepriors.models.make_mlp_vae`) under three
priors, side by side in one run: ExemplarPrior with full exemplar subsampling (M exemplars
re-encoded per step), ExemplarPrior with RAT (k neighbours), and the Gaussian prior.

Random grey-level data stands in for MNIST (the step cost does not depend on the pixels);
the batch is binarised, the exemplars are not, as in the paper. The configurations run in
interleaved rounds so that machine noise hits them alike; the table gives median step times
and their ratio to the Gaussian prior's.

    python benchmarks/bench_exemplar_step.py --device cpu --threads 1 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODEL, machine, model, sync  # noqa: E402  (puts this checkout's vaepriors first)

import torch  # noqa: E402

import vaepriors as vp  # noqa: E402

D_IN = 28 * 28


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--full-steps", type=int, default=None, help="steps for full subsampling (default: --steps // 3, >= 1)")
    ap.add_argument("--n-exemplars", type=int, default=50_000)
    ap.add_argument("--subsample", type=int, default=25_000)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--latent", type=int, default=40)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, b, d = args.n_exemplars, args.batch, args.latent
    data = torch.rand(n, D_IN, device=device)  # grey-level exemplars (and training set)
    enc0, dec0 = model(d, device=device, seed=0)
    full_steps = args.full_steps or max(1, args.steps // 3)

    configs = {
        "gaussian": (lambda: vp.GaussianPrior(d), args.steps),
        f"subsample M={args.subsample}": (lambda: vp.ExemplarPrior(data, n_subsample=args.subsample, generator=0), full_steps),
        f"RAT k={args.k}": (lambda: vp.ExemplarPrior(data, k=args.k, generator=0), args.steps),
    }
    runs = {}
    for name, (make, steps) in configs.items():
        enc, dec = copy.deepcopy(enc0), copy.deepcopy(dec0)
        prior = make().to(device)
        elbo = vp.ExemplarELBO(enc, dec, prior)
        opt = torch.optim.Adam(elbo.parameters(), lr=5e-4)
        runs[name] = dict(elbo=elbo, opt=opt, steps=steps, times=[])

    gen = torch.Generator().manual_seed(1)

    def step(run) -> float:
        idx = torch.randint(n, (b,), generator=gen).to(device)
        x = torch.bernoulli(data[idx])
        sync(device)
        t0 = time.perf_counter()
        out = run["elbo"](x, idx)
        run["opt"].zero_grad(set_to_none=True)
        out.loss.backward()
        run["opt"].step()
        sync(device)
        t = time.perf_counter() - t0
        nb = getattr(run["elbo"].prior, "last_neighbours", None)
        if getattr(run["elbo"].prior, "k", None) is not None and nb is not None:
            run.setdefault("encoded", []).append(int(torch.unique(nb).numel()))  # rows RAT re-encoded
        return t

    # Warm-up: one step each (this builds the RAT cache: timed separately).
    for name, run in runs.items():
        prior = run["elbo"].prior
        if getattr(prior, "k", None) is not None:
            sync(device)
            t0 = time.perf_counter()
            prior.refresh_cache()
            sync(device)
            run["cache_build_s"] = time.perf_counter() - t0
        step(run)
    # The RAT step's retrieval alone: the engine's exact kNN of the batch in the N cached means.
    rat = next(run for name, run in runs.items() if name.startswith("RAT"))
    knn_run = dict(steps=args.steps, times=[])

    def knn_only() -> float:
        prior = rat["elbo"].prior
        idx = torch.randint(n, (b,), generator=gen).to(device)
        q = prior.rat_cache[idx] + 0.1 * torch.randn(b, d, device=device)
        sync(device)
        t0 = time.perf_counter()
        vp.knn(q, prior.rat_cache, args.k, exclude=idx)
        sync(device)
        return time.perf_counter() - t0

    # ... and its re-encoding alone: as many exemplars as RAT's steps re-encode (the distinct
    # ones among the b * k retrieved), through the encoder, fwd + bwd.
    enc_run = dict(steps=args.steps, times=[])

    def encode_only() -> float:
        enc = rat["elbo"].encoder
        rows = round(statistics.mean(rat.get("encoded") or [b * args.k]))  # as many as RAT re-encodes
        idx = torch.randperm(n, generator=gen)[:rows].to(device)
        sync(device)
        t0 = time.perf_counter()
        mean, log_var = enc(data[idx])
        (mean.square().sum() + log_var.sum()).backward()
        sync(device)
        enc.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    knn_only(), encode_only()  # warm-up
    for r in range(args.rounds):
        for name, run in runs.items():
            run["times"] += [step(run) for _ in range(run["steps"])]
            print(f"round {r} {name}: median {1e3 * statistics.median(run['times']):.1f} ms", flush=True)
        knn_run["times"] += [knn_only() for _ in range(args.steps)]
        enc_run["times"] += [encode_only() for _ in range(args.steps)]
    runs[f"(RAT part: engine knn, {b} x {n})"] = knn_run
    runs["(RAT part: re-encode the retrieved exemplars, fwd + bwd)"] = enc_run

    base = statistics.median(runs["gaussian"]["times"])
    rows = []
    for name, run in runs.items():
        t = run["times"]
        rows.append(
            dict(
                prior=name,
                median_ms=1e3 * statistics.median(t),
                min_ms=1e3 * min(t),
                max_ms=1e3 * max(t),
                steps=len(t),
                ratio_to_gaussian=statistics.median(t) / base,
                cache_build_s=run.get("cache_build_s"),
                mean_rows_reencoded=statistics.mean(run["encoded"]) if run.get("encoded") else None,
            )
        )
    tag = device.type
    meta = dict(
        **machine(device),
        n_exemplars=n,
        batch=b,
        latent_dim=d,
        subsample=args.subsample,
        k=args.k,
        rounds=args.rounds,
        model=MODEL + ", Adam lr 5e-4",
        data="random grey-level exemplars, binarised batches",
        command=" ".join(["python benchmarks/bench_exemplar_step.py", *sys.argv[1:]]),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"exemplar_step_{tag}.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    lines = [
        f"# Exemplar prior: one training step ({meta['device']}, {meta['device_name']}, torch {meta['torch']}, {args.threads} thread(s))",
        "",
        f"{MODEL}; batch {b}, d = {d}, N = {n} exemplars; fwd + bwd + Adam; median over interleaved rounds. "
        f"{meta['date']}; load average at the end {', '.join(f'{v:.1f}' for v in meta['load_average'])} "
        "(shared machine: compare ratios within this table only).",
        "",
        "| prior | median ms / step | min | max | steps timed | x Gaussian | cache build (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cb = "-" if r["cache_build_s"] is None else f"{r['cache_build_s']:.2f}"
        lines.append(
            f"| {r['prior']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} | {r['steps']} | "
            f"{r['ratio_to_gaussian']:.2f} | {cb} |"
        )
    enc_rows = next((r["mean_rows_reencoded"] for r in rows if r["mean_rows_reencoded"] is not None), None)
    if enc_rows is not None:
        lines += [
            "",
            f"RAT re-encodes the distinct retrieved exemplars only: {enc_rows:.0f} rows per step on average here "
            f"(of {b} x {args.k} retrieved; random weights make neighbourhoods overlap); the re-encoding row "
            "times that many rows.",
        ]
    lines += ["", f"Command: `{meta['command']}`", ""]
    (out / f"exemplar_step_{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
