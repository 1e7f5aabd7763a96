r"""Per-epoch training time of an MLP VAE under the pseudocoreset prior (ByPE-VAE) versus the
exemplar prior and the Gaussian prior, side by side in one run.

The setting of the ByPE-VAE paper's speed claim ("up to 3x faster per epoch than Exemplar
VAE"): an MLP VAE 784-300-300, 40-d latent, Bernoulli decoder, N = 50000 training points,
batch 100 (500 steps per epoch), Adam.

- ``gaussian``: N(0, I) prior, closed-form KL.
- ``coreset``: PseudocoresetPrior, M = 500 pseudo-inputs re-encoded with gradients at every
  step; its coreset update (one pass over the data, every 10 epochs) timed separately and
  amortised: epoch = 500 steps + update pass / 10.
- ``exemplar``: ExemplarPrior with exemplar subsampling, M = 25000 exemplars re-encoded at
  every step (the row is skipped when this checkout has no ``vaepriors.ExemplarPrior``).

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
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's vaepriors
import vaepriors as vp  # noqa: E402

D_IN = 28 * 28


class Gated(nn.Module):
    """h = (W1 x) * sigmoid(W2 x), the gated dense layer of the papers' MLP VAE."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.h, self.g = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.h(x) * torch.sigmoid(self.g(x))


def mlp(sizes: list[int], gated: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [Gated(a, b)] if gated else [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, d: int, hidden: int, gated: bool) -> None:
        super().__init__()
        self.net = mlp([D_IN, hidden, hidden], gated)
        self.head = nn.Linear(hidden, 2 * d)

    def forward(self, x):
        mean, log_var = self.head(self.net(x)).chunk(2, -1)
        return mean, log_var.clamp(-8, 4)


class Decoder(nn.Module):
    def __init__(self, d: int, hidden: int, gated: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(mlp([d, hidden, hidden], gated), nn.Linear(hidden, D_IN))

    def forward(self, z):
        return torch.distributions.Bernoulli(logits=self.net(z))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--n", type=int, default=50000, help="training-set size N")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--latent", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=300)
    ap.add_argument("--gated", action="store_true", help="gated dense layers (the papers' MLP)")
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

    def model():
        torch.manual_seed(1)
        enc = Encoder(args.latent, args.hidden, args.gated).to(device)
        return enc, Decoder(args.latent, args.hidden, args.gated).to(device)

    configs: dict[str, dict] = {}
    enc, dec = model()
    configs["gaussian"] = dict(prior=vp.GaussianPrior(args.latent), enc=enc, dec=dec, steps=args.steps)
    enc, dec = model()
    coreset = vp.PseudocoresetPrior.from_data(data, n_pseudo=args.n_pseudo).to(device)
    configs["coreset"] = dict(prior=coreset, enc=enc, dec=dec, steps=args.steps)
    if hasattr(vp, "ExemplarPrior"):
        enc, dec = model()
        prior = vp.ExemplarPrior(data, n_subsample=args.n_exemplars).to(device)
        configs["exemplar"] = dict(prior=prior, enc=enc, dec=dec, steps=args.exemplar_steps)
    else:
        print("vaepriors.ExemplarPrior not available in this checkout: exemplar row skipped", file=sys.stderr)
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
        if "exemplar" in by:
            r["exemplar_over_this"] = by["exemplar"]["epoch_amortised_s"] / r["epoch_amortised_s"]

    meta = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        threads=args.threads,
        torch=torch.__version__,
        args={k: v for k, v in vars(args).items() if k != "out"},
        steps_per_epoch=steps_per_epoch,
        coreset_update_step_ms=1e3 * upd_step,
        coreset_update_pass_s=upd_pass,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    (out / f"coreset_{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    arch = "gated MLP" if args.gated else "MLP"
    lines = [
        f"# Per-epoch time: pseudocoreset vs exemplar vs Gaussian prior ({meta['device_name']}, {tag})",
        "",
        f"{arch} VAE {D_IN}-{args.hidden}-{args.hidden}, d = {args.latent}, Bernoulli, N = {args.n}, "
        f"batch {args.batch} ({steps_per_epoch} steps/epoch), Adam; torch {torch.__version__}, "
        f"{args.threads} thread(s), {meta['date']}.",
        f"Coreset: M = {args.n_pseudo}, update = one pass ({steps_per_epoch} steps, S = {args.update_samples}) every "
        f"{args.update_every} epochs: {1e3 * upd_step:.1f} ms/step, {upd_pass:.1f} s/pass, amortised "
        f"{upd_pass / args.update_every:.1f} s/epoch. Exemplar: subsampling M = {args.n_exemplars}.",
        f"Timed: median per-step time over {args.rounds} interleaved rounds, extrapolated to {steps_per_epoch} steps.",
        "",
        "| prior | timed steps | ms / step | s / epoch (train) | s / epoch (amortised) | vs Gaussian "
        "| exemplar / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ex = f"{r['exemplar_over_this']:.2f}x" if "exemplar_over_this" in r else "-"
        lines.append(
            f"| {r['prior']} | {r['timed_steps']} | {r['step_ms']:.1f} | {r['epoch_s']:.1f} "
            f"| {r['epoch_amortised_s']:.1f} "
            f"| {r['vs_gaussian']:.2f}x | {ex} |"
        )
    if "exemplar" not in by:
        lines += ["", "Exemplar row skipped: `vaepriors.ExemplarPrior` not in this checkout."]
    (out / f"coreset_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
