r"""Where a training step's time goes, per prior, and how concentrated the exemplar prior's
responsibilities are.

**Step profile.** One training step (ELBO forward, backward, Adam) of the papers' VAE (gated
MLP 784-300-300, d = 40, Bernoulli decoder), batch 100, dynamic MNIST (random grey-level
images where MNIST is absent), under each prior, run under :mod:`torch.profiler`. The
library's functions are wrapped in named scopes (``record_function``): the batch's encoding,
the decoder, the prior's ``log_prob`` and inside it the engine, the kNN, the re-encoding of
exemplars (or pseudo-inputs), the RAT cache writes, the argument checks, and the optimiser.
Each scope's time is *exclusive* (its children's scopes subtracted). The backward pass is
attributed to the scope whose forward operation created each autograd node (matched by the
profiler's sequence numbers), so "re-encode exemplars (bwd)" is the encoder's backward
through the re-encoded exemplars. The profiler adds a few microseconds per operation: the
shares of scopes made of many tiny operations (checks) are inflated; the unprofiled median
step time is given beside them.

**Responsibility profile** (``--responsibilities``): a short RAT training run on real MNIST
(``--rat-train`` exemplars = training points, k = 10, leave-one-out), and at a few epochs the
posterior weights :math:`w_{in} = \mathcal N(z_i; \mu_n, \sigma^2 I) / \sum_{m \ne i}
\mathcal N(z_i; \mu_m, \sigma^2 I)` of every exemplar n for the queries z_i of a training
batch (exact, over all N, own index left out): the fraction of exemplars whose largest
weight over the batch exceeds 1e-8, 1e-6, 1e-4. The trained model is saved (``--save``) for
the truncated-backward error measurement (``bench_truncation.py``).

    python benchmarks/profile_train_step.py --threads 1 --steps 6
    python benchmarks/profile_train_step.py --root ../wt-perf-base --tag before   # another checkout
    python benchmarks/profile_train_step.py --responsibilities --rat-epochs 20 --save /tmp/rat.pt
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts this checkout first; --root may put another one before it)

import torch  # noqa: E402

D_IN = 28 * 28

SCOPES = [
    # (scope, dotted path of the function or method to wrap)
    ("ELBO glue (sampling, loss, inline checks)", "vaepriors.elbo.ExemplarELBO.forward"),
    ("encode batch", "vaepriors.elbo.ExemplarELBO.encode"),
    ("decoder + log p(x|z)", "vaepriors.elbo.ExemplarELBO.log_likelihood"),
    ("decoder + log p(x|z)", "vaepriors.elbo.ExemplarELBO._log_likelihood"),
    ("analytic KL", "vaepriors.gaussian.GaussianPrior.analytic_kl"),
    ("prior log_prob (glue: gathers, unique, distances)", "vaepriors.prior.BasePrior.log_prob"),
    ("observe (RAT cache write of the batch)", "vaepriors.exemplar.ExemplarPrior.observe"),
    ("re-encode exemplars / pseudo-inputs", "vaepriors.exemplar.ExemplarPrior.exemplar_means"),
    ("re-encode exemplars / pseudo-inputs", "vaepriors.vamp.VampPrior.posteriors"),
    ("re-encode exemplars / pseudo-inputs", "vaepriors.coreset.PseudocoresetPrior.components"),
    ("engine (mixture log-sum-exp)", "vaepriors.engine.reduce.mixture_logsumexp"),
    ("engine (mixture log-sum-exp)", "vaepriors.exemplar.mixture_logsumexp"),
    ("engine (mixture log-sum-exp)", "vaepriors.mixture.mixture_log_prob"),
    ("engine (mixture log-sum-exp)", "vaepriors.vamp.mixture_log_prob"),
    ("engine (mixture log-sum-exp)", "vaepriors.coreset.mixture_log_prob"),
    ("kNN", "vaepriors.exemplar.sharded_knn"),
    ("RAT cache writes and merge", "vaepriors.rat.RetrievalCache.write"),
    ("RAT cache writes and merge", "vaepriors.rat.RetrievalCache.merge"),
    ("RAT cache build / refresh", "vaepriors.exemplar.ExemplarPrior.refresh_cache"),
    ("input checks", "vaepriors._checks.finite"),
    ("input checks", "vaepriors._checks.index"),
    ("input checks", "vaepriors._checks.latent"),
    ("input checks", "vaepriors._checks.tensor"),
    ("optimiser (Adam step, zero_grad)", "torch.optim.Adam.step"),
    ("optimiser (Adam step, zero_grad)", "torch.optim.Optimizer.zero_grad"),
]
BACKWARD_OTHER = "backward: gradient accumulation and autograd engine"


def _resolve(path: str):
    import importlib

    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        owner = obj
        for name in parts[cut:-1]:
            owner = getattr(owner, name, None)
            if owner is None:
                return None, None
        return owner, parts[-1]
    return None, None


def install_scopes() -> list:
    """Wraps every function of :data:`SCOPES` that exists in this checkout in a profiler scope;
    returns what to undo."""
    from torch.profiler import record_function

    undo = []
    for label, path in SCOPES:
        owner, name = _resolve(path)
        if owner is None or name not in vars(owner):
            continue
        fn = vars(owner)[name]
        inner = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn

        def wrap(f, label=label):
            @functools.wraps(f)
            def scoped(*a, **k):
                with record_function("S|" + label):
                    return f(*a, **k)

            return scoped

        new = wrap(inner)
        if isinstance(fn, staticmethod):
            new = staticmethod(new)
        elif isinstance(fn, classmethod):
            new = classmethod(new)
        setattr(owner, name, new)
        undo.append((owner, name, fn))
    return undo


def attribute(events) -> dict[str, float]:
    """Exclusive microseconds per scope (forward) and per scope's backward."""
    out: dict[str, float] = {}
    scope_of_seq: dict[int, str] = {}

    def is_scope(e) -> bool:
        return e.name.startswith("S|")

    def nearest_scope(e):
        p = e.cpu_parent
        while p is not None and not is_scope(p):
            p = p.cpu_parent
        return p

    for e in events:
        if is_scope(e):
            label = e.name[2:]
            child = 0.0
            stack = list(e.cpu_children)
            while stack:
                c = stack.pop()
                if is_scope(c):
                    child += c.cpu_time_total
                else:
                    stack.extend(c.cpu_children)
            out[label] = out.get(label, 0.0) + e.cpu_time_total - child
        elif e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            s = nearest_scope(e)
            if s is not None and e.sequence_nr not in scope_of_seq:
                scope_of_seq[e.sequence_nr] = s.name[2:]
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function:") and e.cpu_parent is None:
            seq = e.sequence_nr
            label = f"backward: {scope_of_seq[seq]}" if seq >= 0 and seq in scope_of_seq else BACKWARD_OTHER
            out[label] = out.get(label, 0.0) + e.cpu_time_total
    return out


# -- the model and the priors ----------------------------------------------------------
def load_data(data_dir: str | None, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    from vaepriors.data import load_mnist

    try:
        splits = load_mnist(data_dir)
        return splits.train.reshape(-1, D_IN)[:n].contiguous(), "dynamic MNIST (grey-level training images)"
    except Exception as err:  # no MNIST here: random grey levels
        print(f"MNIST not found ({err}); random grey-level data instead", file=sys.stderr)
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, D_IN, generator=g), "random grey-level images (MNIST not found)"


def make_prior(name: str, data: torch.Tensor, d: int = 40):
    import vaepriors as vp

    n = data.shape[0]
    g = torch.Generator().manual_seed(0)
    if name == "gaussian":
        return vp.GaussianPrior(d)
    if name == "mog":
        torch.manual_seed(0)
        return vp.MixturePrior(d, 500)
    if name == "vamp":
        return vp.VampPrior.from_data(data, 500, generator=g)
    if name == "coreset":
        return vp.PseudocoresetPrior.from_data(data, 500, generator=g)
    if name == "subsample":
        return vp.ExemplarPrior(data, n_subsample=n // 2, generator=0)
    if name == "loo":
        return vp.ExemplarPrior(data, generator=0)
    if name == "rat":
        return vp.ExemplarPrior(data, k=10, generator=0)
    if name == "rat-subsample":
        return vp.ExemplarPrior(data, n_subsample=n // 2, k=10, generator=0)
    raise SystemExit(f"unknown prior {name!r}")


PRIOR_NAMES = {
    "gaussian": "Gaussian",
    "mog": "MoG K=500",
    "vamp": "VampPrior K=500",
    "coreset": "pseudocoreset M=500",
    "subsample": "exemplar subsampling M=N/2",
    "loo": "exemplar leave-one-out (all N)",
    "rat": "RAT k=10 (among N-1)",
    "rat-subsample": "RAT k=10 within M=N/2",
}


def build(name: str, data: torch.Tensor, seed: int = 0):
    import vaepriors as vp

    enc, dec = _common.model(40, seed=seed)
    prior = make_prior(name, data)
    elbo = vp.ExemplarELBO(enc, dec, prior)
    opt = torch.optim.Adam(elbo.parameters(), lr=5e-4)
    return elbo, opt


def step(elbo, opt, data: torch.Tensor, gen: torch.Generator, b: int = 100) -> None:
    idx = torch.randint(data.shape[0], (b,), generator=gen)
    x = torch.bernoulli(data[idx], generator=gen)
    out = elbo(x, idx)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()


def profile_prior(name: str, data: torch.Tensor, steps: int, warmup: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    elbo, opt = build(name, data)
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    step(elbo, opt, data, gen)  # builds caches (RAT) and warms up
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step(elbo, opt, data, gen)
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        step(elbo, opt, data, gen)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    undo = install_scopes()
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(elbo, opt, data, gen)
    finally:
        for owner, attr, fn in undo:
            setattr(owner, attr, fn)
    parts = {k: v / steps / 1e3 for k, v in attribute(prof.events()).items()}  # ms per step
    total = sum(parts.values())
    extra = {}
    prior = elbo.prior
    if getattr(prior, "k", None) is not None and getattr(prior, "last_neighbours", None) is not None:
        extra["distinct_retrieved"] = int(torch.unique(prior.last_neighbours).numel())
    return dict(
        prior=name,
        label=PRIOR_NAMES[name],
        first_step_s=first,
        median_wall_ms=1e3 * statistics.median(wall),
        median_cpu_ms=1e3 * statistics.median(cpu),
        profiled_ms=total,
        parts_ms=dict(sorted(parts.items(), key=lambda kv: -kv[1])),
        **extra,
    )


# -- responsibilities ------------------------------------------------------------------
@torch.no_grad()
def responsibility_profile(elbo, data: torch.Tensor, gen: torch.Generator, batches: int, taus) -> dict:
    """Fractions of exemplars whose largest posterior weight over a batch's queries exceeds
    each tolerance (exact over all N, leave-one-out), averaged over ``batches`` batches."""
    prior = elbo.prior
    was = prior.training
    means = prior.eval().exemplar_means()
    prior.train(was)
    sigma2 = float(prior.log_var.exp())
    n = means.shape[0]
    fracs = {t: [] for t in taus}
    top = []
    for _ in range(batches):
        idx = torch.randint(n, (100,), generator=gen)
        x = torch.bernoulli(data[idx], generator=gen)
        m, lv = elbo.encoder(x)
        z = m + torch.exp(0.5 * lv) * torch.randn(m.shape, generator=gen)
        logits = -0.5 * torch.cdist(z.double(), means.double()).pow(2) / sigma2
        logits[torch.arange(100), idx] = -float("inf")
        w = torch.softmax(logits, 1).amax(0)  # [N]: max over the batch's queries
        for t in taus:
            fracs[t].append(float((w > t).double().mean()))
        top.append(float(torch.softmax(logits, 1).amax(1).mean()))
    return dict(
        sigma2=sigma2,
        fractions={f"{t:g}": statistics.mean(v) for t, v in fracs.items()},
        mean_top_weight=statistics.mean(top),
    )


def rat_run(data: torch.Tensor, epochs: int, checkpoints: list[int], warmup: int, save: str | None) -> dict:
    import vaepriors as vp

    n = data.shape[0]
    enc, dec = _common.model(40, seed=0)
    prior = vp.ExemplarPrior(data, k=10, generator=0)
    elbo = vp.ExemplarELBO(enc, dec, prior)
    opt = torch.optim.Adam(elbo.parameters(), lr=5e-4)
    gen = torch.Generator().manual_seed(2)
    probe = torch.Generator().manual_seed(3)
    taus = (1e-8, 1e-6, 1e-4)
    out = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        beta = min(1.0, (epoch + 1) / warmup) if warmup else 1.0
        losses = []
        for idx in torch.randperm(n, generator=gen).split(100):
            x = torch.bernoulli(data[idx], generator=gen)
            res = elbo(x, idx, kl_weight=beta)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            opt.step()
            losses.append(float(res.elbo.mean()))
        elbo.on_epoch_end(epoch)
        if epoch + 1 in checkpoints:
            r = responsibility_profile(elbo, data, probe, 10, taus)
            r.update(epoch=epoch + 1, train_elbo=statistics.mean(losses), seconds=time.perf_counter() - t0)
            out.append(r)
            print(f"epoch {epoch + 1}: {r}", flush=True)
    if save:
        torch.save(dict(encoder=enc.state_dict(), decoder=dec.state_dict(), prior=prior.state_dict(),
                        n=n, epochs=epochs), save)  # fmt: skip
    return dict(n_exemplars=n, epochs=epochs, kl_warmup_epochs=warmup, checkpoints=out)


# -- output ----------------------------------------------------------------------------
def table(results: list[dict]) -> list[str]:
    labels: list[str] = []
    for r in results:
        for k in r["parts_ms"]:
            if k not in labels:
                labels.append(k)

    def order(k: str) -> tuple:
        return (k.startswith("backward"), -max(r["parts_ms"].get(k, 0) for r in results))

    labels.sort(key=order)
    head = "| part (ms / step, profiled; share) | " + " | ".join(r["label"] for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for k in labels:
        cells = []
        for r in results:
            v = r["parts_ms"].get(k)
            cells.append("-" if v is None or v < 0.005 else f"{v:.2f} ({100 * v / r['profiled_ms']:.0f}%)")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| **total, profiled** | " + " | ".join(f"**{r['profiled_ms']:.1f}**" for r in results) + " |")
    lines.append("| median step, unprofiled: wall / thread CPU | " + " | ".join(
        f"{r['median_wall_ms']:.1f} / {r['median_cpu_ms']:.1f}" for r in results) + " |")  # fmt: skip
    lines.append("| first step (s; builds caches) | " + " | ".join(f"{r['first_step_s']:.2f}" for r in results) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="profile the vaepriors of this checkout (default: this one)")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--data-dir", default=os.environ.get("VAEPRIORS_MNIST"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="profiled (and timed) steps per prior")
    ap.add_argument("--slow-steps", type=int, default=2, help="steps for the exemplar priors that re-encode M or N rows")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--priors", default="gaussian,mog,vamp,coreset,rat,rat-subsample,subsample,loo")
    ap.add_argument("--n", type=int, default=50_000, help="exemplars / training images")
    ap.add_argument("--responsibilities", action="store_true", help="run the RAT responsibility profile instead")
    ap.add_argument("--rat-train", type=int, default=10_000)
    ap.add_argument("--rat-epochs", type=int, default=20)
    ap.add_argument("--rat-checkpoints", default="1,5,10,20")
    ap.add_argument("--rat-warmup", type=int, default=5, help="KL warm-up epochs of the RAT run")
    ap.add_argument("--save", default=None, help="save the RAT run's model here (not in the repository)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    if args.root:
        sys.path.insert(0, str(Path(args.root).resolve()))
    import vaepriors

    torch.set_num_threads(args.threads)
    data, source = load_data(args.data_dir, args.n if not args.responsibilities else args.rat_train)
    meta = dict(**_common.machine("cpu"), vaepriors=str(Path(vaepriors.__file__).parent), data=source,
                model=_common.MODEL + ", Adam lr 5e-4, batch 100", command=" ".join(["python", *sys.argv]))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    if args.responsibilities:
        cps = [int(c) for c in args.rat_checkpoints.split(",")]
        res = rat_run(data, args.rat_epochs, cps, args.rat_warmup, args.save)
        meta["load_average_end"] = list(os.getloadavg())
        (out / f"responsibilities_cpu{tag}.json").write_text(json.dumps(dict(meta=meta, **res), indent=2) + "\n")
        print(json.dumps(res, indent=2))
        return
    results = []
    for name in args.priors.split(","):
        slow = name in ("subsample", "loo")
        r = profile_prior(name, data, args.slow_steps if slow else args.steps, 1 if slow else args.warmup)
        results.append(r)
        print(f"{r['label']}: {r['median_wall_ms']:.1f} ms wall, {r['median_cpu_ms']:.1f} ms CPU; profiled "
              f"{r['profiled_ms']:.1f} ms: " + ", ".join(f"{k} {v:.2f}" for k, v in list(r['parts_ms'].items())[:6]),
              flush=True)  # fmt: skip
    meta["load_average_end"] = list(os.getloadavg())
    (out / f"profile_train_step_cpu{tag}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2) + "\n")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
