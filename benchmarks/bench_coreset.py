r"""Per-epoch training time of the papers' VAE under the pseudocoreset prior (ByPE-VAE) versus the
exemplar prior and the Gaussian prior, side by side in one run.

The setting of the ByPE-VAE paper's speed claim ("up to 3x faster per epoch than Exemplar
VAE"): the gated MLP VAE 784-300-300, 40-d latent, Bernoulli decoder
(:func:`vaepriors.models.make_mlp_vae`), N = 50000 training points, batch 100 (500 steps per
epoch), Adam.

- ``gaussian``: N(0, I) prior, closed-form KL.
- ``coreset``: PseudocoresetPrior, M = 500 pseudo-inputs re-encoded with gradients at every
  step; its coreset update (one pass over the data, every 10 epochs) timed separately and
  amortised: epoch = 500 steps + update pass / 10.
- ``exemplar``: ExemplarPrior with exemplar subsampling, M = 25000 exemplars re-encoded at
  every step.

Random binary data stands in for MNIST (the cost does not depend on the pixels). A "scaled
epoch" is timed: ``--steps`` training steps per prior (``--exemplar-steps`` for the costly
exemplar prior) and ``--update-steps`` steps of the coreset update, in interleaved rounds so
that machine noise hits every configuration alike; per-step medians are extrapolated to the
full 500-step epoch and 500-step update pass.

    python benchmarks/bench_coreset.py --device cpu --threads 1 --steps 40 --exemplar-steps 4
    python benchmarks/bench_coreset.py --device cuda --steps 200 --exemplar-steps 50
"""

from __future__ import annotations

import argparse
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--n", type=int, default=50000, help="training-set size N")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--latent", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=300)
    ap.add_argument("--n-pseudo", type=int, default=500)
    ap.add_argument("--n-exemplars", type=int, default=25000)
    ap.add_argument("--update-every", type=int, default=10, help="epochs between coreset updates")
    ap.add_argument("--update-samples", type=int, default=100, help="latent samples S per update step")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per prior")
    ap.add_argument("--exemplar-steps", type=int, default=4, help="timed training steps, exemplar prior")
    ap.add_argument("--update-steps", type=int, default=40, help="timed coreset-update steps")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds the steps are split into")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = (torch.rand(args.n, D_IN, device=device) > 0.5).float()
    steps_per_epoch = args.n // args.batch

    def vae():
        return model(args.latent, (args.hidden, args.hidden), device=device, seed=1)

    configs: dict[str, dict] = {}
    enc, dec = vae()
    configs["gaussian"] = dict(prior=vp.GaussianPrior(args.latent), enc=enc, dec=dec, steps=args.steps)
    enc, dec = vae()
    coreset = vp.PseudocoresetPrior.from_data(data, n_pseudo=args.n_pseudo).to(device)
    configs["coreset"] = dict(prior=coreset, enc=enc, dec=dec, steps=args.steps)
    enc, dec = vae()
    prior = vp.ExemplarPrior(data, n_subsample=args.n_exemplars, generator=0).to(device)
    configs["exemplar"] = dict(prior=prior, enc=enc, dec=dec, steps=args.exemplar_steps)
    for c in configs.values():
        c["elbo"] = vp.ExemplarELBO(c["enc"], c["dec"], c["prior"]).to(device)
        c["opt"] = torch.optim.Adam(c["elbo"].parameters(), lr=5e-4)
        c["times"] = []

    def train_step(c):
        idx = torch.randint(args.n, (args.batch,), device=device)
        loss = c["elbo"](data[idx], idx).loss
        c["opt"].zero_grad(set_to_none=True)
        loss.backward()
        c["opt"].step()

    update_times: list[float] = []

    def update_step(n):
        cz = configs["coreset"]
        coreset.update_coreset(
            cz["dec"], data, n_steps=n, batch_size=args.batch, n_samples=args.update_samples, progress=False
        )

    # Warm-up (allocations, first-call costs), then interleaved timed rounds.
    for c in configs.values():
        train_step(c)
    update_step(1)
    for r in range(args.rounds):
        for name, c in configs.items():
            n = max(1, c["steps"] // args.rounds)
            sync(device)
            t = time.perf_counter()
            for _ in range(n):
                train_step(c)
            sync(device)
            c["times"].append((time.perf_counter() - t) / n)
        n = max(1, args.update_steps // args.rounds)
        sync(device)
        t = time.perf_counter()
        update_step(n)
        sync(device)
        update_times.append((time.perf_counter() - t) / n)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    rows = []
    upd_step = statistics.median(update_times)
    upd_pass = upd_step * steps_per_epoch
    for name, c in configs.items():
        step = statistics.median(c["times"])
        epoch = step * steps_per_epoch
        amortised = epoch + (upd_pass / args.update_every if name == "coreset" else 0.0)
        rows.append(
            dict(prior=name, step_ms=1e3 * step, timed_steps=c["steps"], epoch_s=epoch, epoch_amortised_s=amortised)
        )
    by = {r["prior"]: r for r in rows}
    for r in rows:
        r["vs_gaussian"] = r["epoch_amortised_s"] / by["gaussian"]["epoch_amortised_s"]
        r["exemplar_over_this"] = by["exemplar"]["epoch_amortised_s"] / r["epoch_amortised_s"]

    meta = dict(
        **machine(device),
        model=MODEL,
        args={k: v for k, v in vars(args).items() if k != "out"},
        steps_per_epoch=steps_per_epoch,
        coreset_update_step_ms=1e3 * upd_step,
        coreset_update_pass_s=upd_pass,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    (out / f"coreset_{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [
        f"# Per-epoch time: pseudocoreset vs exemplar vs Gaussian prior ({meta['device_name']}, {tag})",
        "",
        f"Gated MLP VAE {D_IN}-{args.hidden}-{args.hidden}, d = {args.latent}, Bernoulli (make_mlp_vae), N = {args.n}, "
        f"batch {args.batch} ({steps_per_epoch} steps/epoch), Adam; torch {torch.__version__}, "
        f"{args.threads} thread(s), {meta['date']}.",
        f"Coreset: M = {args.n_pseudo}, update = one pass ({steps_per_epoch} steps, S = {args.update_samples}) every "
        f"{args.update_every} epochs: {1e3 * upd_step:.1f} ms/step, {upd_pass:.1f} s/pass, amortised "
        f"{upd_pass / args.update_every:.1f} s/epoch. Exemplar: subsampling M = {args.n_exemplars}.",
        f"Timed: median per-step time over {args.rounds} interleaved rounds, extrapolated to {steps_per_epoch} steps.",
        "",
        "| prior | timed steps | ms / step | s / epoch (train) | s / epoch (amortised) | vs Gaussian "
        "| exemplar / this (x faster per epoch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ex = f"{r['exemplar_over_this']:.2f}x"
        lines.append(
            f"| {r['prior']} | {r['timed_steps']} | {r['step_ms']:.1f} | {r['epoch_s']:.1f} "
            f"| {r['epoch_amortised_s']:.1f} "
            f"| {r['vs_gaussian']:.2f}x | {ex} |"
        )
    (out / f"coreset_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
