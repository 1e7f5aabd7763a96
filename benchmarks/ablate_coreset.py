r"""Ablation of the pseudocoreset (ByPE-VAE) prior against the exemplar prior (issue #17).

Each configuration trains the gated MLP VAE (300-300, d = 40) on the first ``--n-train``
MNIST training images for ``--epochs`` epochs (KL warm-up ``--warmup``, Adam 1e-3, batch
100, normalised gradients: the cpu-long settings, shorter), with one torch thread, then
estimates the test log-likelihood of the first ``--n-test`` test images with S importance
samples and a fixed generator (same test points, same noise seed for every configuration),
so per-point differences against the exemplar prior are paired.

Run one configuration per process (two or three at a time on the shared 2-vCPU machine)::

    python benchmarks/ablate_coreset.py run exemplar --data-dir /work/shared/data/mnist --runs /tmp/abl
    python benchmarks/ablate_coreset.py run cs-default --data-dir /work/shared/data/mnist --runs /tmp/abl
    ...
    python benchmarks/ablate_coreset.py table --runs /tmp/abl --out benchmarks/results/coreset_ablation

``run all`` lists the configurations. The table gives, per configuration, the test
log-likelihood, its paired difference from the exemplar prior (mean and standard error over
test points), the test ELBO, seconds per epoch (training pass, coreset updates included)
and the update's diagnostics. ``timing NAME ...`` times their training steps interleaved.

At the reproduction's scale, ``long`` pairs ``reproduce.py`` runs of the pseudocoreset at
other M (``--coreset-components``), of the exemplar prior at other M
(``--exemplar-subsample``) or with component means without gradients (``reproduce-detached``,
which takes reproduce.py's arguments) with a full reproduction's exemplar prior and RAT::

    python benchmarks/reproduce.py --config cpu-long --out /tmp/cl/ref --runs /tmp/cl/runs-ref
    python benchmarks/reproduce.py --config cpu-long --priors coreset --coreset-components 1500 --out /tmp/cl/m1500
    python benchmarks/ablate_coreset.py reproduce-detached --config cpu-long --priors coreset --coreset-components 2500 --out /tmp/cl/d2500
    python benchmarks/ablate_coreset.py long --reference /tmp/cl/ref --sweep /tmp/cl/m1500 \
        "/tmp/cl/d2500=means without gradients@cs-m2500-detach-noupdate" --timing T/timing.txt --docs-static docs/_static
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts this checkout's vaepriors first: not an installed copy)

# Overrides of the pseudocoreset defaults (the library's builder: M = 500 random training
# images with weights N/M, grey-level data in the update, input box = the data's range,
# update every 10 epochs, one pass of batch 100, S = 100 latents from the mixture prior,
# lr_weights 1e-2, lr_inputs 1e-3).
CONFIGS: dict[str, dict] = {
    "exemplar": {"prior": "exemplar"},
    "cs-default": {},
    "cs-noupdate": {"update": False},
    "cs-every5": {"every": 5},
    "cs-every2": {"every": 2},
    "cs-lr10x": {"lr_weights": 1e-1, "lr_inputs": 1e-2},
    "cs-lr10x-every2": {"lr_weights": 1e-1, "lr_inputs": 1e-2, "every": 2},
    "cs-steps5": {"passes": 5},
    "cs-S500": {"n_samples": 500},
    "cs-post-ir": {"sampler": "ir"},
    "cs-bin-data": {"binary_update": True},
    "cs-norange": {"input_range": None},
    "cs-m1000": {"components": 1000},
    "cs-m1000-noupdate": {"components": 1000, "update": False},
    "cs-m2000-noupdate": {"components": 2000, "update": False},
    "cs-weights-only": {"lr_inputs": 1e-12},
    "exemplar-seed1": {"prior": "exemplar", "seed": 1},
    "exemplar-sub500": {"prior": "exemplar", "exemplar_subsample": 500},
    "exemplar-sub1000": {"prior": "exemplar", "exemplar_subsample": 1000},
    "cs-m2000-sub500-noupdate": {"components": 2000, "subsample": 500, "update": False},
    "cs-m5000-sub500-noupdate": {"components": 5000, "subsample": 500, "update": False},
    "cs-loo-noupdate": {"loo": True, "update": False},
    "cs-loo": {"loo": True},
    "cs-m1000-loo-noupdate": {"components": 1000, "loo": True, "update": False},
    "cs-m2000-loo-noupdate": {"components": 2000, "loo": True, "update": False},
    "cs-m2000-sub500-loo-noupdate": {"components": 2000, "subsample": 500, "loo": True, "update": False},
    "cs-noupdate-seed1": {"update": False, "seed": 1},
    "cs-m2000-noupdate-seed1": {"components": 2000, "update": False, "seed": 1},
    "cs-m1000-noupdate-seed1": {"components": 1000, "update": False, "seed": 1},
    "cs-m1000-every2": {"components": 1000, "every": 2},
    "cs-em-every2": {"em": True, "every": 2},
    "cs-em-every5": {"em": True, "every": 5},
    "cs-m1000-em-every2": {"components": 1000, "em": True, "every": 2},
    "cs-inputs-only": {"lr_weights": 1e-12},
    "cs-kmeanspp": {"init": "kmeans++"},
    "cs-bin-inputs": {"init": "binary"},
    "cs-m2000-detach-noupdate": {"components": 2000, "detach": True, "update": False},
    "cs-m5000-detach-noupdate": {"components": 5000, "detach": True, "update": False},
    "cs-every2-S500": {"every": 2, "n_samples": 500},
    "cs-every2-bin-data": {"every": 2, "binary_update": True},
    "cs-m1500-noupdate": {"components": 1500, "update": False},
    "cs-m4000-noupdate": {"components": 4000, "update": False},
    "cs-m2500-detach-noupdate": {"components": 2500, "detach": True, "update": False},
    "cs-m2000-cache10-noupdate": {"components": 2000, "refresh": 10, "update": False},
    "cs-m2000-cache50-noupdate": {"components": 2000, "refresh": 50, "update": False},
}


def _ir_sampler(prior, decoder, stats: dict, factor: int = 10):
    """Latents from the pseudocoreset posterior pi(z) ∝ exp(sum_m w_m f(u_m, z)) N(z; 0, I),
    importance-resampled from ``factor * S`` draws of the mixture prior; records the ESS."""
    from vaepriors.coreset import pairwise_log_likelihood

    def draw(s: int) -> torch.Tensor:
        with torch.no_grad():
            z = prior.sample((factor * s,))
            fu = pairwise_log_likelihood(decoder(z), prior.pseudo_inputs).double()  # [M, K]
            log_p0 = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1).double()
            logt = prior.weights.double() @ fu + log_p0 - prior.log_prob(z).double()
            p = torch.softmax(logt, 0)
            stats.setdefault("ess", []).append(float(1.0 / (p * p).sum()))
            idx = torch.multinomial(p.float(), s, replacement=True)
            return z[idx]

    return draw


@torch.no_grad()
def em_weights(prior, elbo, data: torch.Tensor, n_draws: int = 4, batch: int = 500) -> None:
    """One EM step for the mixture weights with the components fixed: w_m = N * mean over the
    training points x_n and draws z ~ q(z|x_n) of the responsibility of component m for z
    (the maximiser over w of sum_n E_q[log p(z|U, w)], the ELBO's prior term)."""
    means, log_var = prior.components()
    logw = prior.log_weights()
    counts = torch.zeros_like(prior.weights, dtype=torch.float64)
    for i in range(0, len(data), batch):
        z, _ = elbo.encode(data[i : i + batch]).rsample(n_draws)  # [n, B, d]
        z = z.reshape(-1, z.shape[-1])
        logits = logw - 0.5 * torch.cdist(z, means).pow(2) / log_var.exp()
        counts += torch.softmax(logits, -1).double().sum(0)
    prior.weights.copy_((counts * prior.n_total / counts.sum()).to(prior.weights.dtype))


def _detached_means_class():
    """A PseudocoresetPrior whose component means carry no gradient (the ``detach`` rows)."""
    from vaepriors.coreset import PseudocoresetPrior

    class DetachedMeans(PseudocoresetPrior):
        """Component means computed without gradients: the ELBO trains the encoder through
        its own posteriors only (a forward pass over the M pseudo-inputs per step, no backward)."""

        def components(self):
            with torch.no_grad():
                means = self.encode(self.pseudo_inputs).location(self.location)
            return means, self.log_var

    return DetachedMeans


def _cached_means_class(refresh: int):
    """A PseudocoresetPrior whose component means are recomputed (without gradients) only
    every ``refresh`` training calls (the ``refresh`` rows)."""
    from vaepriors.coreset import PseudocoresetPrior

    class CachedMeans(PseudocoresetPrior):
        """Component means computed without gradients once every ``refresh`` training calls
        and reused in between (evaluation mode: always fresh)."""

        _calls, _cache = 0, None

        def components(self):
            if not self.training or self._cache is None or self._calls % refresh == 0:
                with torch.no_grad():
                    means = self.encode(self.pseudo_inputs).location(self.location)
                if not self.training:
                    return means, self.log_var
                self._cache = means
            self._calls += 1
            return self._cache, self.log_var

    return CachedMeans


def _initial_inputs(data: torch.Tensor, m: int, how: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial pseudo-inputs other than the default's uniform draw: ``"kmeans++"`` (D^2
    seeding in pixel space: rows spread over the data) or ``"binary"`` (the default's rows,
    binarised once)."""
    g = torch.Generator().manual_seed(seed)
    flat = data.reshape(len(data), -1).double()
    if how == "binary":
        idx = torch.randperm(len(data), generator=g)[:m]
        return torch.bernoulli(data[idx], generator=g), idx
    assert how == "kmeans++", how
    idx = [int(torch.randint(len(data), (1,), generator=g))]
    d2 = (flat - flat[idx[0]]).pow(2).sum(1)
    for _ in range(m - 1):
        j = int(torch.multinomial(d2 / d2.sum(), 1, generator=g))
        idx.append(j)
        d2 = torch.minimum(d2, (flat - flat[j]).pow(2).sum(1))
    idx = torch.tensor(idx)
    return data[idx].clone(), idx


def _make_prior(name: str, splits, encoder, decoder, args: argparse.Namespace):
    """The configuration's prior: the library's ExemplarPrior (through the training builder)
    or PseudocoresetPrior.from_data with the configuration's options."""
    from vaepriors.coreset import PseudocoresetPrior
    from vaepriors.training import PRIORS, TrainConfig

    spec = CONFIGS[name]
    if spec.get("prior") == "exemplar":
        cfg = TrainConfig(prior="exemplar", dataset="mnist", data_dir=args.data_dir, progress=False, seed=args.seed,
                          exemplar_subsample=spec.get("exemplar_subsample", "half"))  # fmt: skip
        return PRIORS["exemplar"](cfg, splits, encoder, decoder)
    kw = {"input_range": spec["input_range"]} if "input_range" in spec else {}
    cls = _detached_means_class() if spec.get("detach") else PseudocoresetPrior
    if spec.get("refresh"):
        cls = _cached_means_class(spec["refresh"])
    if spec.get("init"):
        u, idx = _initial_inputs(splits.train, spec.get("components", 500), spec["init"], args.seed)
        return cls(u, n_total=len(splits.train), input_range=(0.0, 1.0), source_index=idx,
                   leave_one_out=spec.get("loo", False), n_subsample=spec.get("subsample"))  # fmt: skip
    return cls.from_data(
        splits.train, spec.get("components", 500), generator=torch.Generator().manual_seed(args.seed),
        lr_weights=spec.get("lr_weights", 1e-2), lr_inputs=spec.get("lr_inputs", 1e-3),
        leave_one_out=spec.get("loo", False), n_subsample=spec.get("subsample"), **kw,
    )  # fmt: skip


def run(name: str, args: argparse.Namespace) -> None:
    from vaepriors.data import load_dataset
    from vaepriors.elbo import ExemplarELBO
    from vaepriors.evaluation import log_likelihood
    from vaepriors.models import make_mlp_vae
    from vaepriors.training import evaluate, kl_weight

    torch.set_num_threads(1)
    spec = dict(CONFIGS[name])
    if "seed" in spec:  # a training seed of its own (same test points and evaluation noise)
        args = argparse.Namespace(**{**vars(args), "seed": spec["seed"]})
    prior_name = spec.pop("prior", "coreset")
    torch.manual_seed(args.seed)
    splits = load_dataset("mnist", args.data_dir).subset(args.n_train, args.n_test)
    encoder, decoder = make_mlp_vae(splits.input_shape, 40, (300, 300))
    stats: dict = {}
    prior = _make_prior(name, splits, encoder, decoder, args)
    elbo = ExemplarELBO(encoder, decoder, prior)
    params = [p for p in elbo.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    loader = splits.train_loader(100, seed=args.seed)
    update_data = splits.train
    if spec.get("binary_update"):
        update_data = torch.bernoulli(splits.train, generator=torch.Generator().manual_seed(args.seed + 1))
    sampler = _ir_sampler(prior, decoder, stats) if spec.get("sampler") == "ir" else None
    every = spec.get("every", 10)
    history = []
    for epoch in range(1, args.epochs + 1):
        beta = kl_weight(epoch, args.warmup)
        elbo.train()
        t0 = time.perf_counter()
        tot, seen = 0.0, 0
        for x, _, index in loader:
            res = elbo(x, index, kl_weight=beta)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, 1e-7)
            torch._foreach_div_(grads, norms)
            opt.step()
            tot += float(res.elbo.detach().sum())
            seen += len(x)
        t_train = time.perf_counter() - t0
        t_up = 0.0
        if prior_name == "coreset" and spec.get("update", True) and epoch % every == 0:
            t1 = time.perf_counter()
            elbo.eval()
            w0 = prior.weights.clone()
            u0 = prior.pseudo_inputs.clone()
            if spec.get("em"):
                em_weights(prior, elbo, update_data)
            else:
                steps = spec.get("passes", 1) * math.ceil(len(update_data) / 100)
                prior.update_coreset(
                    decoder, update_data, n_steps=steps, batch_size=100, n_samples=spec.get("n_samples", 100),
                    sampler=sampler, progress=False, generator=torch.Generator().manual_seed(args.seed + epoch),
                )  # fmt: skip
            t_up = time.perf_counter() - t1
            w = prior.weights
            stats.setdefault("updates", []).append({
                "epoch": epoch,
                "weight_change_l1_over_N": float((w - w0).abs().sum() / prior.n_total),
                "weight_ess": float(w.sum() ** 2 / (w * w).sum()),
                "zero_weights": int((w == 0).sum()),
                "input_change_rms": float((prior.pseudo_inputs - u0).pow(2).mean().sqrt()),
            })  # fmt: skip
        history.append({"epoch": epoch, "train_elbo": tot / seen, "seconds": t_train + t_up, "update_seconds": t_up})
        print(f"{name} epoch {epoch} train ELBO {tot / seen:.2f} {t_train:.1f}+{t_up:.1f} s", flush=True)
    elbo.eval()
    test = evaluate(elbo, splits.test, 1000)
    ll = log_likelihood(elbo, splits.test, args.eval_samples, batch_size=500,
                        generator=torch.Generator().manual_seed(1234), progress=False)  # fmt: skip
    out = Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(ll.values, out / f"{name}.ll.pt")
    if "ess" in stats:
        e = torch.tensor(stats.pop("ess"))
        stats["ir_ess"] = {"mean": float(e.mean()), "median": float(e.median()), "max": float(e.max())}
    result = {
        "name": name, "spec": CONFIGS[name], "test_ll": ll.mean, "test_ll_se": ll.std_error, "test_elbo": test["elbo"],
        "test_kl": test["kl"], "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history),
        "history": history, "stats": stats,
        "setup": {"n_train": args.n_train, "n_test": args.n_test, "epochs": args.epochs, "warmup": args.warmup,
                  "eval_samples": args.eval_samples, "seed": args.seed},
    }  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"{name}: test log p(x) {ll.mean:.3f} ± {ll.std_error:.3f}  {result['seconds_per_epoch']:.2f} s/epoch", flush=True)


def timing(names: list[str], args: argparse.Namespace, steps: int = 10, rounds: int = 3) -> None:
    """Seconds per training step (ELBO forward + backward + Adam), the configurations
    interleaved in one process, ``rounds`` rounds of ``steps`` steps, median of rounds: a
    fairer cost comparison on a shared machine than the runs' own epoch times."""
    from vaepriors.data import load_dataset
    from vaepriors.elbo import ExemplarELBO
    from vaepriors.models import make_mlp_vae

    torch.set_num_threads(1)
    splits = load_dataset("mnist", args.data_dir).subset(args.n_train, args.n_test)
    models = {}
    for name in names:
        torch.manual_seed(args.seed)
        encoder, decoder = make_mlp_vae(splits.input_shape, 40, (300, 300))
        elbo = ExemplarELBO(encoder, decoder, _make_prior(name, splits, encoder, decoder, args)).train()
        models[name] = (elbo, torch.optim.Adam([p for p in elbo.parameters() if p.requires_grad], lr=1e-3))
    loader = splits.train_loader(100, seed=args.seed)
    batches = [b for _, b in zip(range(steps), loader)]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for name, (elbo, opt) in models.items():
            t0 = time.perf_counter()
            for x, _, index in batches:
                loss = elbo(x, index).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times[name].append((time.perf_counter() - t0) / steps)
    out = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    setup = f"{args.n_train} training images, batch 100"
    (Path(args.runs) / "timing.txt").write_text(json.dumps({"seconds_per_step": out, "all": times, "setup": setup}, indent=1))
    for n, t in out.items():
        print(f"{n}: {t * 1000:.0f} ms / step ({t / out.get('exemplar', t):.2f} x exemplar)")


def table(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    res = {p.stem: json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))}
    if "exemplar" not in res:
        sys.exit("no exemplar run to pair against")
    ref = torch.load(runs / "exemplar.ll.pt")
    order = [n for n in CONFIGS if n in res]
    rows = []
    for n in order:
        r = res[n]
        v = torch.load(runs / f"{n}.ll.pt")
        # Paired with the exemplar prior trained with the same seed where there is one.
        seed = r["setup"]["seed"]
        ref_name = "exemplar" if seed == 0 or f"exemplar-seed{seed}" not in res else f"exemplar-seed{seed}"
        d = v.double() - (ref if ref_name == "exemplar" else torch.load(runs / f"{ref_name}.ll.pt")).double()
        r["paired_with"] = ref_name
        r["diff_vs_exemplar"] = float(d.mean())
        r["diff_vs_exemplar_se"] = float(d.std() / math.sqrt(len(d))) if n != ref_name else 0.0
        if "cs-noupdate" in res and n.startswith("cs-") and n != "cs-noupdate":
            d0 = v.double() - torch.load(runs / "cs-noupdate.ll.pt").double()
            r["diff_vs_noupdate"] = float(d0.mean())
            r["diff_vs_noupdate_se"] = float(d0.std() / math.sqrt(len(d0)))
        rows.append(r)
    s = res["exemplar"]["setup"]
    lines = [
        "# Pseudocoreset ablation (issue #17)", "",
        f"MNIST, first {s['n_train']} training images, {s['epochs']} epochs (KL warm-up {s['warmup']}), MLP VAE 300-300, "
        f"d = 40, Adam 1e-3, batch 100, normalised gradients; final weights (no early stopping). Test log-likelihood of the "
        f"first {s['n_test']} test images, importance sampling with S = {s['eval_samples']}, one fixed generator for every "
        "configuration: the differences from the exemplar prior (M = N/2 exemplars per step) are paired per test point "
        "(± standard error over test points). s / epoch: training pass plus coreset updates (averaged over epochs), one "
        f"torch thread. Machine: {_common.device_name('cpu')}, {os.cpu_count()} vCPUs shared with other "
        f"jobs (two or three runs at a time, over two sessions), torch {torch.__version__}.", "",
        "Findings. (1) The coreset update is nearly inert (cs-default vs cs-noupdate -0.02 ± 0.01) and none of its "
        "settings moves the likelihood by more than noise: S = 500 latent samples instead of 100 (+0.01 ± 0.00 vs "
        "cs-default after one update; cs-every2-S500 vs cs-every2, five updates: +0.12 ± 0.12), binarised instead of "
        "grey-level data in the update (-0.00 ± 0.00 after one and after five updates), no input box (-0.07 ± 0.02), "
        "latents from the pseudocoreset posterior by importance resampling (effective sample size 1, zero steps), "
        "larger or more frequent steps and an EM weight refit (-0.15 to -0.36 vs no update, also at M = 1000). "
        "(2) Initialisation: k-means++ seeding in pixel space +0.18 ± 0.14 vs cs-default, pseudo-inputs binarised "
        "once -0.05 ± 0.06: within noise. (3) The gap follows the number of components M (against the exemplar prior "
        "of the same training seed, seeds 0 / 1: M = 500: -2.28 / -1.67, 1000: -1.14 / -0.88, 2000: +0.01 / -0.09), "
        "and M costs time (per-step tables below). (4) The encoder must learn through the component means: at M = 2000, "
        "means computed without gradients -0.28 ± 0.17 vs with them, means cached and refreshed every 10 or 50 steps "
        "-1.70 ± 0.19 and -3.37 ± 0.25 (and at the cpu-long scale, M = 2500 without gradients ends 3.95 ± 0.12 nats "
        "behind the exemplar prior: coreset_cpu-long.md); all M = N = 5000 training images as components without gradients or leave-one-out: "
        "-1.46 ± 0.26. (5) Leave-one-out for pseudo-inputs copied from training images and training-time component "
        "subsampling do not help. The training seed moves every prior alike (exemplar: 0.69 nat between seeds 0 and "
        "1), so compare rows of one seed: the paired ± covers test points and importance-sampling noise, not training "
        "seeds. The s / epoch column is wall time on a loaded shared machine (other jobs came and went): use the "
        "interleaved per-step tables for cost ratios.", "",
        "| configuration | change from the default | test log p(x) | vs exemplar, same seed (paired) | vs cs-noupdate (paired) | test ELBO | s / epoch | update diagnostics |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        spec = ", ".join(f"{k}={v}" for k, v in r["spec"].items()) or "(library default)"
        ups = r["stats"].get("updates", [])
        diag = ""
        if ups:
            last = ups[-1]
            diag = (f"{len(ups)} updates; last: sum abs Δw / N {last['weight_change_l1_over_N']:.3f}, weight ESS "
                    f"{last['weight_ess']:.0f}, zero w {last['zero_weights']}, rms Δu {last['input_change_rms']:.3f}")  # fmt: skip
        if "ir_ess" in r["stats"]:
            diag += f"; IR ESS median {r['stats']['ir_ess']['median']:.2f} of 1000"
        pair = "" if r["name"] == r["paired_with"] else f"{r['diff_vs_exemplar']:+.2f} ± {r['diff_vs_exemplar_se']:.2f}"
        if pair and r["paired_with"] != "exemplar":
            pair += f" ({r['paired_with']})"
        pair0 = f"{r['diff_vs_noupdate']:+.2f} ± {r['diff_vs_noupdate_se']:.2f}" if "diff_vs_noupdate" in r else ""
        lines.append(f"| {r['name']} | {spec} | {r['test_ll']:.2f} ± {r['test_ll_se']:.2f} | {pair} | {pair0} | {r['test_elbo']:.2f} | "
                     f"{r['seconds_per_epoch']:.2f} | {diag} |")  # fmt: skip
    lines += ["", f"Produced by `python benchmarks/ablate_coreset.py run NAME --data-dir $MNIST --runs {args.runs}` for each "
              f"row, then `python benchmarks/ablate_coreset.py table --runs {args.runs} --out {args.out}`."]  # fmt: skip
    timings = {}
    for t in sorted(runs.glob("timing*/timing.txt")):
        info = json.loads(t.read_text())
        timings[t.parent.name] = info
        sec = info["seconds_per_step"]
        ref_t = sec.get("exemplar")
        lines += ["", f"Per-step cost ({info.get('setup', t.parent.name)}): ELBO forward, backward and Adam step, the "
                  "configurations interleaved in one process (10 steps, median of 3 rounds), one thread; the coreset "
                  "update's own cost is not included (one pass over the data every `every` epochs; see s / epoch).", "",
                  "| configuration | ms / step | x exemplar |", "|---|---|---|"]  # fmt: skip
        for n, v in sec.items():
            lines.append(f"| {n} | {v * 1000:.0f} | {v / ref_t:.2f} |" if ref_t else f"| {n} | {v * 1000:.0f} | |")
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    slim = [{k: v for k, v in r.items() if k != "history"} | {"epoch_seconds": [h["seconds"] for h in r["history"]]} for r in rows]
    out.with_suffix(".json").write_text(json.dumps({"runs": slim, "timing": timings}, indent=1))
    print("\n".join(lines))


# -- the reproduction's scale ----------------------------------------------------------------
# Keys in which a run may differ from the reference and still pair with it.
_MAY_DIFFER = {"seed", "coreset_components", "exemplar_subsample", "threads", "device"}


def _reproduction(out: Path) -> tuple[dict, Path]:
    """A ``reproduce.py`` output folder's results and its training runs folder."""
    path = out / "results.json"
    if not path.is_file():
        sys.exit(f"ablate_coreset: no results.json in '{out}' (expected a reproduce.py --out folder)")
    res = json.loads(path.read_text())
    if "runs" in res:  # recorded by reproduce.py since the runs were first paired
        return res, Path(res["runs"])
    argv = shlex.split(res.get("command") or "")
    for i, arg in enumerate(argv):
        if arg == "--runs" and i + 1 < len(argv):
            return res, Path(argv[i + 1])
        if arg.startswith("--runs="):
            return res, Path(arg.split("=", 1)[1])
    return res, Path("runs") / f"reproduce_{res['config']['name']}"


def _values(runs: Path, row: dict, n_test: int) -> torch.Tensor:
    """A row's per-point test log-likelihoods, checked against the row (a shared runs folder
    would otherwise pair another run's values)."""
    path = runs / row["prior"] / "test_log_likelihood.pt"
    if not path.is_file() or row.get("log_likelihood") is None:
        sys.exit(f"ablate_coreset: no per-point test log-likelihoods for {row['prior']} in '{path.parent}'")
    v = torch.load(path).double()
    if v.shape != (n_test,) or abs(float(v.mean()) - row["log_likelihood"]) > 1e-3:
        sys.exit(f"ablate_coreset: '{path}' does not hold the values of this run's {row['prior']} row "
                 "(mean or size differ): was its runs folder shared with another run?")  # fmt: skip
    return v


def long_report(args: argparse.Namespace) -> dict:
    """The pseudocoreset at other M (or seeds) in a reproduction, paired per test point with
    the exemplar prior (subsampling, M = N/2) and RAT trained with the same seed.

    ``args.reference``: a full ``reproduce.py`` output folder; ``args.sweep``: further output
    folders of the same configuration (``OUT``, ``OUT=NOTE`` or ``OUT=NOTE@TIMING_NAME``, the
    name of the row's configuration in the timing file); ``args.timing``: a ``timing.txt``.
    """
    import reproduce  # the configuration's own rule for the pseudocoreset's M

    ref, ref_runs = _reproduction(Path(args.reference))
    base = {k: v for k, v in ref["config"].items() if k not in _MAY_DIFFER}

    def entries(res: dict, runs: Path, source: str, note: str, timing_name: str | None) -> list[dict]:
        cfg = res["config"]
        if res["dataset"] != ref["dataset"] or {k: v for k, v in cfg.items() if k not in _MAY_DIFFER} != base:
            diff = sorted(k for k in set(cfg) | set(base) if k not in _MAY_DIFFER and cfg.get(k) != base.get(k))
            sys.exit(f"ablate_coreset: '{source}' is not the reference's configuration (differs in {diff})")
        out = []
        for r in res["rows"]:
            m = None
            if r["prior"] == "coreset":
                m = r.get("coreset_components", reproduce.coreset_size(cfg))
            elif r["prior"] in ("mog", "vamp"):
                m = cfg["components"]
            elif r["prior"] == "exemplar" and cfg["exemplar_subsample"] != "half":
                m = r.get("exemplar_subsample", cfg["exemplar_subsample"])
            label = r["label"]
            if source != "reference run":
                label += (f", M = {m}" if m else "") + (f", seed {cfg['seed']}" if cfg["seed"] else "")
                label += f" ({note})" if note else ""
            baseline = r["prior"] == "exemplar-rat" or (r["prior"] == "exemplar" and cfg["exemplar_subsample"] == "half")
            out.append({"prior": r["prior"], "label": label, "row": r, "components": m, "seed": cfg["seed"],
                        "note": note, "source": source, "baseline": baseline, "timing_name": timing_name,
                        "values": _values(runs, r, res["sizes"]["test"])})  # fmt: skip
        return out

    rows = entries(ref, ref_runs, "reference run", "", None)
    for item in args.sweep:
        out, _, rest = item.partition("=")
        note, _, timing_name = rest.partition("@")
        res, runs = _reproduction(Path(out))
        rows += entries(res, runs, out, note, timing_name or None)
    pairs: dict = {}
    for r in rows:
        if r["baseline"]:
            pairs.setdefault((r["prior"], r["seed"]), r)
    ref_seed = ref["config"]["seed"]
    if ("exemplar", ref_seed) not in pairs:
        sys.exit("ablate_coreset: the reference run has no exemplar prior (subsampling, M = N/2) to pair with")
    t_ex = pairs[("exemplar", ref_seed)]["row"]["seconds_per_epoch"]
    timing = json.loads(Path(args.timing).read_text()) if args.timing else None
    step = timing["seconds_per_step"] if timing else {}
    if step and "exemplar" not in step:
        sys.exit(f"ablate_coreset: the timing file '{args.timing}' has no 'exemplar' configuration to divide by")
    out_rows = []
    for r in rows:
        vs = {}
        for other in ("exemplar", "exemplar-rat"):
            o = pairs.get((other, r["seed"]))
            if o is not None and o is not r:
                d = r["values"] - o["values"]
                vs[other] = {"mean": float(d.mean()), "std_error": float(d.std() / math.sqrt(len(d)))}
        name = r["timing_name"]
        if name is None and r["prior"] == "exemplar":
            name = "exemplar" if r["components"] is None else f"exemplar-sub{r['components']}"
        elif name is None and r["prior"] == "coreset":
            name = "cs-default" if r["components"] == 500 else f"cs-m{r['components']}-noupdate"
        ms = step.get(name)
        out_rows.append({
            "prior": r["prior"], "label": r["label"], "components": r["components"], "seed": r["seed"], "note": r["note"],
            "source": r["source"], "log_likelihood": r["row"]["log_likelihood"],
            "log_likelihood_std_error": r["row"]["log_likelihood_std_error"], "vs": vs,
            "seconds_per_epoch": r["row"]["seconds_per_epoch"],
            "epoch_ratio": r["row"]["seconds_per_epoch"] / t_ex if r["source"] == "reference run" else None,
            "ms_per_step": None if ms is None else 1000 * ms, "timing_name": name if ms is not None else None,
            "step_ratio": None if ms is None else ms / step["exemplar"],
        })  # fmt: skip
    return {"reference": {"path": args.reference, "command": ref["command"], "machine": ref["machine"],
                          "date": ref["date"], "config": ref["config"], "dataset": ref["dataset"],
                          "sizes": ref["sizes"]},
            "timing": timing, "rows": out_rows, "machine": _common.machine("cpu")}  # fmt: skip


def _pair_text(r: dict, key: str) -> str:
    return f"{r['vs'][key]['mean']:+.2f} ± {r['vs'][key]['std_error']:.2f}" if key in r["vs"] else ""


def long_markdown(rep: dict) -> str:
    """The report of :func:`long_report` as a markdown table with its protocol."""
    cfg = rep["reference"]["config"]
    name = cfg.get("name", "custom")
    sizes = rep["reference"]["sizes"]
    seeds = sorted({r["seed"] for r in rep["rows"]})
    timing = rep["timing"] or {}
    lines = [
        f"# The pseudocoreset in the `{name}` reproduction (issue #17)", "",
        f"The `{name}` reproduction ({rep['reference']['dataset']}, {sizes['train']} training images, {cfg['epochs']} "
        f"epochs, {sizes['test']} test points, S = {cfg['eval_samples']} importance samples, training seed {cfg['seed']}; "
        f"`{rep['reference']['command']}`) and further runs of the same configuration with other sizes "
        "(`--coreset-components M`, `--exemplar-subsample M`)"
        + (f" or training seeds ({', '.join(map(str, seeds))})" if len(seeds) > 1 else "") + ". Differences are paired "
        "per test point against the exemplar prior (subsampling, M = N/2 exemplars per step) and RAT trained with the "
        "same seed (same test points, same importance-sampling noise), ± their standard error over test points; they "
        "do not include how far another training seed would move them.", "",
        "Cost: *x exemplar, epoch* is the reference run's seconds per epoch over its exemplar prior's (the priors "
        "trained in turn, coreset updates included); *x exemplar, step* is a training step (ELBO, backward, Adam; the "
        "coreset update excluded) timed interleaved with the exemplar prior's step in one process (`ablate_coreset.py "
        f"timing`, {timing.get('setup', 'no timing file')}). Runs marked *shared* trained beside other jobs: their own "
        "s / epoch is not a cost.", "",
        "| prior | test log p(x) | vs exemplar (paired) | vs RAT (paired) | s / epoch | x exemplar, epoch | ms / step | x exemplar, step |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    for r in rep["rows"]:
        shared = "" if r["source"] == "reference run" else " (shared)"
        lines.append(f"| {r['label']} | {r['log_likelihood']:.2f} ± {r['log_likelihood_std_error']:.2f} | "
                     f"{_pair_text(r, 'exemplar')} | {_pair_text(r, 'exemplar-rat')} | {r['seconds_per_epoch']:.2f}{shared} | "
                     f"{f(r['epoch_ratio'], '.2f')} | {f(r['ms_per_step'], '.0f')} | {f(r['step_ratio'], '.2f')} |")  # fmt: skip
    lines += ["", "Produced by `python benchmarks/ablate_coreset.py long --reference OUT --sweep OUT_1 OUT_2=NOTE ... "
              "--timing TIMING.txt`; the runs by `python benchmarks/reproduce.py --config "
              f"{name}` (reference) and the same with `--priors ... --coreset-components M`, `--exemplar-subsample M` or "
              "`--seed S` (the others); `ablate_coreset.py reproduce-detached` for component means without gradients.", ""]  # fmt: skip
    return "\n".join(lines)


def long_plot(rep: dict, path: Path) -> None:
    """The gap to the exemplar prior against the training cost, one point per row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.4, 4.8))
    ax = fig.subplots()
    ax.plot([1.0], [0.0], "s", color="C1", label="exemplar prior (M = N/2)")
    ax.annotate("exemplar", (1.0, 0.0), textcoords="offset points", xytext=(-20, 8), fontsize=8)
    seen = set()
    for r in rep["rows"]:
        cost = r["step_ratio"] if r["step_ratio"] is not None else r["epoch_ratio"]
        if cost is None or "exemplar" not in r["vs"]:
            continue
        d = r["vs"]["exemplar"]
        kind = "pseudocoreset" if r["prior"] == "coreset" else "exemplar prior, other M or RAT" if r["prior"].startswith("exemplar") else "other priors"
        style = {"pseudocoreset": ("o", "C0"), "other priors": ("D", "grey")}.get(kind, ("s", "C1"))
        ax.errorbar(cost, d["mean"], yerr=d["std_error"], fmt=style[0], color=style[1], capsize=3,
                    label=None if kind in seen else kind)  # fmt: skip
        seen.add(kind)
        label = r["label"].replace("Pseudocoreset (ByPE), ", "").replace("Pseudocoreset (ByPE)", f"M = {r['components']}")
        below = kind == "other priors"  # clear of the pseudocoreset's labels at the same cost
        ax.annotate(label, (cost, d["mean"]), textcoords="offset points", xytext=(6, -12) if below else (4, 6), fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(-0.5, color="grey", ls="--", lw=0.8, label="within 0.5 nats ...")
    ax.axvline(1 / 3, color="grey", ls=":", lw=0.8, label="... at a third of the cost")
    ax.set_xlabel("training cost, x the exemplar prior's (interleaved steps where timed, else epochs)")
    ax.set_ylabel("test log p(x) - exemplar prior's (nats, paired)")
    name = rep["reference"]["config"].get("name", "")
    ax.set_title(f"{name}: gap to the exemplar prior against training cost", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def reproduce_detached(argv: list[str]) -> int:
    """``reproduce.py`` with the pseudocoreset's component means computed without gradients
    while training (the ablation's ``detach``), for runs at the reproduction's scale."""
    import reproduce
    from vaepriors.coreset import PseudocoresetPrior

    encode_means = PseudocoresetPrior.components

    def components(self):  # noqa: ANN001, ANN202
        if not self.training:
            return encode_means(self)
        with torch.no_grad():
            return encode_means(self)[0], self.log_var

    PseudocoresetPrior.components = components
    try:
        return reproduce.main(argv)
    finally:
        PseudocoresetPrior.components = encode_means


def main() -> None:
    if sys.argv[1:2] == ["reproduce-detached"]:  # every further argument is reproduce.py's
        sys.exit(reproduce_detached(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["run", "table", "timing", "long", "reproduce-detached"])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--data-dir", default=os.environ.get("VAEPRIORS_MNIST"))
    ap.add_argument("--runs", default="/tmp/coreset_ablation")
    ap.add_argument("--out", default=None, help="table: the results' path stem (default "
                    "benchmarks/results/coreset_ablation); long: a folder (default benchmarks/results)")  # fmt: skip
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", help="long: a full reproduce.py output folder (the exemplar prior and RAT to pair with)")
    ap.add_argument("--sweep", nargs="*", default=[], help="long: further reproduce.py output folders of the same "
                    "configuration, each OUT, OUT=NOTE or OUT=NOTE@TIMING_NAME")  # fmt: skip
    ap.add_argument("--timing", help="long: a timing.txt written by the timing mode")
    ap.add_argument("--docs-static", help="long: also copy the plot here as coreset_<config>.png")
    args = ap.parse_args()
    if args.mode == "long":
        if not args.reference:
            ap.error("long needs --reference")
        rep = long_report(args)
        stem = f"coreset_{rep['reference']['config'].get('name', 'custom')}"
        out = Path(args.out or "benchmarks/results")
        print(_common.write_results(out, stem, rep, long_markdown, long_plot))
        if args.docs_static and (out / f"{stem}.png").is_file():
            Path(args.docs_static).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / f"{stem}.png", Path(args.docs_static) / f"{stem}.png")
        return
    args.out = args.out or "benchmarks/results/coreset_ablation"
    if args.mode == "table":
        return table(args)
    if args.mode == "timing":
        return timing(args.names, args)
    if args.names == ["all"] or not args.names:
        print("\n".join(f"{k}: {v}" for k, v in CONFIGS.items()))
        return
    for n in args.names:
        run(n, args)


if __name__ == "__main__":
    main()
