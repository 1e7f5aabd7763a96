r"""The truncated backward of the exemplar prior (``truncate_backward``) on a trained model:
the error it introduces in the encoder gradient, the share of exemplars it back-propagates
through, and the step time it saves, per tolerance.

For each objective (exemplar subsampling with M = N/2, leave-one-out over N) and each of
``--batches`` training batches, the ELBO's loss is differentiated twice on the same batch, the
same latent noise and the same subset: exactly, and with the tolerance, after a few calls that
let the truncated prior see the exemplars (it predicts which matter from their last means). Reported:
the relative error :math:`\|g_\tau - g\| / \|g\|` of the gradient of all encoder parameters
(the batch's own path is exact in both; only the exemplars' path is truncated), its largest
value over the batches, the fraction of the call's exemplars that were re-encoded with
gradients, and the median time of a whole training step (forward, backward), exact and
truncated, interleaved.

    python benchmarks/bench_truncation.py --checkpoint /tmp/rat10k.pt --n 10000 --batches 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402

D_IN = 28 * 28
TOLERANCES = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)


def load(args):
    import vaepriors as vp
    from vaepriors.data import load_mnist

    try:
        data, source = load_mnist(args.data_dir).train.reshape(-1, D_IN)[: args.n].contiguous(), "dynamic MNIST"
    except Exception as err:  # noqa: BLE001
        print(f"MNIST not found ({err}): random grey-level images (responsibilities are then meaningless)", file=sys.stderr)
        data, source = torch.rand(args.n, D_IN, generator=torch.Generator().manual_seed(0)), "random grey-level images"
    enc, dec = _common.model(40, seed=0)
    log_var = 0.0
    if args.checkpoint:
        ck = torch.load(args.checkpoint, weights_only=True)
        enc.load_state_dict(ck["encoder"])
        dec.load_state_dict(ck["decoder"])
        log_var = float(ck["prior"]["log_var"])
    return vp, data, source, enc, dec, log_var


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--checkpoint-note", default="")
    ap.add_argument("--data-dir", default=os.environ.get("VAEPRIORS_MNIST"))
    ap.add_argument("--n", type=int, default=10_000, help="exemplars (the first N training images)")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="subsample,loo")
    ap.add_argument("--warm-calls", type=int, default=4, help="calls before the measured one (subsampling)")
    ap.add_argument("--tolerances", default=",".join(f"{t:g}" for t in TOLERANCES))
    ap.add_argument("--timing-steps", type=int, default=3, help="timed steps per tolerance (0: no timing)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vp, data, source, enc, dec, log_var = load(args)
    n = data.shape[0]
    taus = [float(t) for t in args.tolerances.split(",")]
    modes = {"subsample": dict(n_subsample=n // 2), "loo": dict()}
    warm = {"subsample": args.warm_calls, "loo": 1}
    params = list(enc.parameters())

    def make(mode: str, tol: float | None, seed: int):
        prior = vp.ExemplarPrior(data, generator=seed, progress=False, init_log_var=log_var,
                                 truncate_backward=tol, **modes[mode])  # fmt: skip
        return vp.ExemplarELBO(enc, dec, prior)

    def step(elbo, x, idx, seed: int, backward: bool = True):
        torch.manual_seed(seed)
        for p in params:
            p.grad = None
        loss = elbo(x, idx).loss
        if backward:
            loss.backward()

    def warm_up(elbo, mode: str, seed: int) -> None:
        """Calls that let the truncated prior see (predict from) the exemplars' means, as in
        training; the exact prior makes the same calls, so that both draw the same subsets."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(warm[mode]):
            idx = torch.randint(n, (100,), generator=g)
            step(elbo, torch.bernoulli(data[idx], generator=g), idx, seed, backward=False)

    def grad(mode: str, tol: float | None, x, idx, seed: int):
        elbo = make(mode, tol, seed)
        warm_up(elbo, mode, seed)
        step(elbo, x, idx, seed)
        return torch.cat([p.grad.reshape(-1) for p in params]), elbo.prior.last_truncation

    results = []
    gen = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(args.batches):
        idx = torch.randint(n, (100,), generator=gen)
        batches.append((torch.bernoulli(data[idx], generator=gen), idx))
    for mode in args.modes.split(","):
        per_tau = {t: dict(err=[], kept=[]) for t in taus}
        for b, (x, idx) in enumerate(batches):
            g0, _ = grad(mode, None, x, idx, seed=100 + b)
            for t in taus:
                g, (kept, total) = grad(mode, t, x, idx, seed=100 + b)
                per_tau[t]["err"].append(float((g - g0).norm() / g0.norm()))
                per_tau[t]["kept"].append(kept / total)
            print(f"{mode} batch {b}: " + ", ".join(f"{t:g}: {per_tau[t]['err'][-1]:.1e} ({100 * per_tau[t]['kept'][-1]:.1f}%)"
                                                     for t in taus), flush=True)  # fmt: skip
        timing = {}
        if args.timing_steps:
            elbos = {t: make(mode, t, seed=100) for t in [None, *taus]}
            for elbo in elbos.values():
                warm_up(elbo, mode, seed=100)
            for i in range(args.timing_steps):
                x, idx = batches[i % len(batches)]
                for t, elbo in elbos.items():
                    c0 = time.thread_time()
                    step(elbo, x, idx, seed=100)
                    timing.setdefault(t, []).append(time.thread_time() - c0)
        for t in taus:
            r = dict(mode=mode, tolerance=t, rel_error_median=statistics.median(per_tau[t]["err"]),
                     rel_error_max=max(per_tau[t]["err"]), kept_median=statistics.median(per_tau[t]["kept"]))  # fmt: skip
            if timing:
                r["step_cpu_s"] = statistics.median(timing[t])
                r["exact_step_cpu_s"] = statistics.median(timing[None])
                r["speedup"] = r["exact_step_cpu_s"] / r["step_cpu_s"]
            results.append(r)
    meta = dict(**_common.machine("cpu"), n=n, data=source, checkpoint=args.checkpoint, note=args.checkpoint_note,
                log_var=log_var, batches=args.batches, command=" ".join(["python benchmarks/bench_truncation.py", *sys.argv[1:]]))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    (out / f"truncation_cpu{tag}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    lines = [
        f"# Truncated backward on a trained model ({meta['cpu']}, {args.threads} thread(s))",
        "",
        f"{_common.MODEL}; {source}, N = {n} exemplars; {meta['note'] or args.checkpoint}; sigma^2 = "
        f"{torch.tensor(log_var).exp().item():.3f}; {args.batches} batches of 100. Error: relative error of the "
        "gradient of all encoder parameters of the ELBO loss, truncated vs exact (same batch, noise and subset). "
        "Kept: exemplars re-encoded with gradients / exemplars of the call. Time: a whole step's forward and "
        f"backward (thread CPU, median of {args.timing_steps}), truncated vs exact, interleaved. {meta['date']}, "
        f"load average {', '.join(f'{v:.1f}' for v in meta['load_average'])}.",
        "",
        "| objective | tolerance | rel. error (median) | rel. error (max) | kept | step (s) | exact step (s) | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['tolerance']:g} | {r['rel_error_median']:.2e} | {r['rel_error_max']:.2e} | "
            f"{100 * r['kept_median']:.1f}% | {r.get('step_cpu_s', float('nan')):.3f} | "
            f"{r.get('exact_step_cpu_s', float('nan')):.3f} | {r.get('speedup', float('nan')):.2f}x |"
        )
    lines += ["", f"Command: `{meta['command']}`", ""]
    (out / f"truncation_cpu{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
