r"""The papers on real MNIST: every prior, the same model and schedule, one table.

Trains the papers' gated MLP VAE (784-300-300, d = 40, Bernoulli decoder) on dynamic MNIST
with each prior through the training loop of the command (:func:`vaepriors.training.fit`, the
same code ``vaepriors-train`` runs), then reloads each run's best weights (``best.pt``, best validation ELBO) and
measures on the test set, with the public API:

- test log-likelihood, importance sampled with S samples from q per point
  (:func:`vaepriors.log_likelihood`; the papers use S = 5000), and its paired difference from
  the Gaussian prior's (same test points, same importance noise);
- test ELBO and its KL term (one sample from q, exact prior density);
- active units (of d = 40): dimensions whose encoder mean varies by more than 0.01 over
  the test set (:func:`vaepriors.active_units`);
- kNN accuracy of test encoder means against training encoder means (training images
  binarised once, with a fixed seed), k = 3, 5, ..., 15 (:func:`vaepriors.knn_accuracy`);
- seconds per training epoch (mean over the epochs run; the coreset update is included).

It writes into ``--out`` (default ``benchmarks/results/reproduce_<config>``):
``results.json`` (everything, with the configuration, command and machine), ``table.md``
(one table beside the papers' numbers), ``curves.png`` (validation ELBO and KL per epoch of
every prior), ``loglik.png`` (test log-likelihood bars with the papers' values) and
``samples.png`` (a grid of random samples per prior). The training runs themselves
(checkpoints, per-run plots) go to ``--runs`` (default ``runs/reproduce_<config>``);
``--resume`` continues them.

Configurations (``--config``):

- ``cpu-short``: 5000 training / 1000 validation / 1000 test images, 10 epochs, KL warm-up
  over 3, learning rate 2e-3, S = 500, exemplar subsample M = N / 2, one CPU thread. Runs
  in about 5 minutes on one thread of a server CPU; NOT comparable to the papers' numbers.
- ``cpu-long``: 10000 / 2000 / 2000 images, 40 epochs, KL warm-up over 10, learning rate
  1e-3, S = 500, one CPU thread; about 40 minutes. Also NOT comparable to the papers.
- ``gpu-full``: the papers' protocol shortened to 100 epochs (50000 / 10000 / 10000 images,
  M = 25000, S = 5000, KL warm-up over 10 epochs, learning rate 5e-4), ``--device cuda``.
- ``paper``: the papers' full protocol: up to 2000 epochs with early stopping after 50
  epochs without a better validation ELBO, KL warm-up over 100 epochs.
- ``tiny``: the built-in dataset (no download), a smoke test of the whole pipeline.

Examples::

    python benchmarks/reproduce.py --config cpu-short
    python benchmarks/reproduce.py --config gpu-full --device cuda
    python benchmarks/reproduce.py --config cpu-short --priors gaussian vamp --out /tmp/repro

MNIST comes from ``--data-dir``, else ``$VAEPRIORS_MNIST``, else ``../shared/data/mnist``
next to this checkout where that exists, else the library's default folder
(:func:`vaepriors.data.default_mnist_dir`); when it is absent the script says so and exits
with status 0.
"""

from __future__ import annotations

import argparse
import datetime
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
from _common import ROOT, machine, sync  # noqa: E402  (puts this checkout's vaepriors first)

import vaepriors as vp  # noqa: E402
from vaepriors import train, training  # noqa: E402
from vaepriors.data import MNIST_ENV, binarize, load_dataset, mnist_root  # noqa: E402
from vaepriors.training import TrainConfig, image_grid  # noqa: E402

PRIORS = ["gaussian", "mog", "vamp", "exemplar", "exemplar-rat", "coreset"]
"""The priors, in table order (names of :data:`vaepriors.training.PRIORS`)."""

# The project's checkout keeps a shared copy of MNIST beside the repository.
_SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"

LABELS = {
    "gaussian": "Gaussian",
    "mog": "MoG",
    "vamp": "VampPrior",
    "exemplar": "Exemplar (subsampling)",
    "exemplar-rat": "Exemplar (RAT)",
    "coreset": "Pseudocoreset (ByPE)",
}

_BASE = {
    "dataset": "mnist", "n_train": None, "n_eval": None, "hidden": [300, 300], "latent_dim": 40,
    "batch_size": 100, "components": 500, "coreset_components": None, "exemplar_subsample": "half", "rat_k": 10,
    "coreset_every": 10, "patience": 50, "seed": 0, "knn_k": [3, 5, 7, 9, 11, 13, 15],
}  # fmt: skip

CONFIGS: dict[str, dict] = {
    # About 5 minutes for all six priors on one CPU thread: every prior's training and
    # evaluation path on real data. A larger learning rate than the papers' (few steps);
    # coreset updates after epochs 3, 6 and 9 (counted from 1; see PseudocoresetPrior.schedule_updates).
    "cpu-short": {**_BASE, "n_train": 5000, "n_eval": 1000, "epochs": 10, "warmup": 3, "lr": 2e-3,
                  "eval_samples": 500, "coreset_every": 3, "device": "cpu", "threads": 1},
    # 36-55 minutes on one CPU thread (machines differ): a fifth of the training set for 40 epochs, long
    # enough for the priors to part (unused latent units switch off over tens of epochs).
    "cpu-long": {**_BASE, "n_train": 10000, "n_eval": 2000, "epochs": 40, "warmup": 10, "lr": 1e-3,
                 "eval_samples": 500, "device": "cpu", "threads": 1},
    # The papers' protocol cut to 100 epochs: a warm-up of 10 (not 100) epochs, so that 90
    # of them train the bound the test numbers measure.
    "gpu-full": {**_BASE, "epochs": 100, "warmup": 10, "lr": 5e-4, "eval_samples": 5000, "device": "cuda", "threads": 0},
    # The papers' protocol (Exemplar VAE supplementary L.2; VampPrior): early stopping ends
    # the runs at about 1000 epochs.
    "paper": {**_BASE, "epochs": 2000, "warmup": 100, "lr": 5e-4, "eval_samples": 5000, "device": "cuda", "threads": 0},
    # The built-in dataset, seconds on a CPU: the pipeline's smoke test.
    "tiny": {**_BASE, "dataset": "builtin", "n_train": 400, "n_eval": 100, "hidden": [64, 64], "latent_dim": 8,
             "components": 20, "epochs": 1, "warmup": 1, "lr": 2e-3, "eval_samples": 5, "coreset_every": 1,
             "knn_k": [3, 5], "device": "cpu", "threads": 1},
}  # fmt: skip
"""Named configurations; ``exemplar_subsample="half"`` means M = N / 2."""

DESCRIPTIONS = {
    "cpu-short": "Short CPU configuration (`cpu-short`): a subset of dynamic MNIST and a few epochs, "
    "for CI-sized time. Its numbers are NOT comparable to the papers' full protocol (50000 training "
    "images, ~1000 epochs, S = 5000); the papers' values are shown for reference only.",
    "cpu-long": "Longer CPU configuration (`cpu-long`): a fifth of dynamic MNIST for 40 epochs. NOT "
    "comparable to the papers' full protocol (50000 training images, ~1000 epochs, S = 5000); the "
    "papers' values are shown for reference only.",
    "gpu-full": "The papers' protocol shortened to 100 epochs (`gpu-full`), full dynamic MNIST.",
    "paper": "The papers' full protocol (`paper`): early stopping, up to 2000 epochs, full dynamic MNIST.",
    "tiny": "Smoke test (`tiny`) on the built-in dataset: NOT MNIST, not comparable to the papers.",
}

PAPER = {
    # Dynamic MNIST, VAE with the gated MLP 300-300, d = 40: the Exemplar VAE paper's
    # density-estimation table (log-likelihood, S = 5000) and supplementary tables 1 (active
    # units) and 3 (KL and negative reconstruction, one sample from q, test average);
    # ELBO = -(KL + negative reconstruction).
    "gaussian": {"log_likelihood": -84.45, "active_units": 24.0, "kl": 25.54, "elbo": -(25.54 + 63.06)},
    "vamp": {"log_likelihood": -82.43, "active_units": 27.6, "kl": 25.14, "elbo": -(25.14 + 60.79)},
    "exemplar": {"log_likelihood": -82.09, "active_units": 29.4, "kl": 24.82, "elbo": -(24.82 + 61.00)},
}
"""The papers' numbers per prior (the ByPE-VAE text at hand stops before its results, and the
papers give no MoG, RAT-only or kNN-accuracy number for this model: those cells are empty)."""


# -- configuration -----------------------------------------------------------------------
def resolve(config: str | dict, **overrides) -> dict:
    r"""A configuration dict: a name of :data:`CONFIGS` (or a dict) with ``overrides``
    applied where they are not ``None``."""
    cfg = dict(CONFIGS[config] if isinstance(config, str) else config)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["name"] = config if isinstance(config, str) else cfg.get("name", "custom")
    return cfg


def coreset_size(cfg: dict) -> int:
    r"""The pseudocoreset's M under ``cfg``: ``coreset_components``, else ``components``."""
    m = cfg.get("coreset_components")
    return cfg["components"] if m is None else m


def data_dir_for(data_dir: str | None) -> str | None:
    r"""The MNIST folder to use: ``data_dir``, else ``None`` where ``$VAEPRIORS_MNIST`` is set
    (the library reads it), else the checkout's shared copy where it exists, else ``None`` (the
    library's default folder)."""
    if data_dir is not None or os.environ.get(MNIST_ENV) or not _SHARED_MNIST.is_dir():
        return data_dir
    return str(_SHARED_MNIST)


def load_splits(cfg: dict, data_dir: str | None = None) -> vp.data.Splits:
    r"""The dataset of ``cfg``, cut to its sizes (the same images the training runs use)."""
    root = data_dir_for(data_dir) if cfg["dataset"] == "mnist" else None
    return load_dataset(cfg["dataset"], root).subset(cfg["n_train"], cfg["n_eval"])


def train_config(cfg: dict, prior: str, run_dir: Path, *, device: str, data_dir: str | None, progress: bool,
                 resume: bool = False) -> TrainConfig:  # fmt: skip
    r"""The training run of one prior under ``cfg``.

    The exemplar prior trains with exemplar subsampling (``M``, default N / 2) and leave-one-out;
    the RAT row with ``rat_k`` nearest exemplars among all N - 1 (no subsampling), the bound
    whose cost the RAT speed-up is about. Every option is given: no preset value is used.
    """
    size = lambda v: "all" if v is None else v  # noqa: E731
    return TrainConfig(
        prior=prior, dataset=cfg["dataset"], out=str(run_dir),
        data_dir=data_dir_for(data_dir) if cfg["dataset"] == "mnist" else None,
        n_train=size(cfg["n_train"]), n_eval=size(cfg["n_eval"]),
        epochs=cfg["epochs"], warmup=cfg["warmup"], lr=cfg["lr"], patience=cfg["patience"],
        batch_size=cfg["batch_size"], latent_dim=cfg["latent_dim"], hidden=tuple(cfg["hidden"]),
        components=coreset_size(cfg) if prior == "coreset" else cfg["components"], coreset_every=cfg["coreset_every"],
        exemplar_subsample=cfg["exemplar_subsample"] if prior == "exemplar" else ("all" if prior == "exemplar-rat" else None),
        rat_k=cfg["rat_k"], eval_samples=0,  # measured after, see measure()
        seed=cfg["seed"], device=device, threads=cfg["threads"], progress=progress, resume=resume,
    )  # fmt: skip


def load_trained(config: TrainConfig, splits: vp.data.Splits, device: torch.device) -> vp.ExemplarELBO:
    r"""Rebuilds a run's model (as the training loop does) and loads its ``best.pt``."""
    elbo = training.build_model(config, splits, device)
    state = torch.load(Path(config.out) / "best.pt", map_location=device, weights_only=True)
    elbo.load_state_dict(state["model"])
    return elbo.eval()


# -- measurements ------------------------------------------------------------------------
def measure(elbo: vp.ExemplarELBO, splits: vp.data.Splits, cfg: dict, device: torch.device, *,
            progress: bool = False) -> tuple[dict, torch.Tensor | None]:  # fmt: skip
    r"""Test log-likelihood (S = ``cfg["eval_samples"]``, 0 to skip), active units on the
    test set and latent kNN accuracy; returns ``(numbers, per-point log-likelihoods or None)``.

    The importance samples come from a generator seeded with ``cfg["seed"]``: every prior sees
    the same noise, so differences between priors are paired.
    """
    splits = splits.to(device)
    out: dict = {"log_likelihood": None, "log_likelihood_std_error": None, "eval_samples": 0, "loglik_seconds": None}
    values = None
    if cfg["eval_samples"]:
        gen = torch.Generator(device=device).manual_seed(cfg["seed"])
        sync(device)
        t0 = time.perf_counter()
        ll = vp.log_likelihood(elbo, splits.test, cfg["eval_samples"], batch_size=1000, generator=gen, progress=progress)
        sync(device)
        out.update(log_likelihood=ll.mean, log_likelihood_std_error=ll.std_error, eval_samples=ll.n_samples,
                   loglik_seconds=time.perf_counter() - t0)  # fmt: skip
        values = ll.values.cpu()
    with torch.no_grad():
        au = vp.active_units(elbo, splits.test, batch_size=1000)
        # Reference images in the test set's form: binary, drawn once with a fixed seed.
        g = torch.Generator(device=splits.train.device).manual_seed(splits.binarize_seed + 1)
        train_bin = binarize(splits.train, g)
    ks = [k for k in cfg["knn_k"] if k <= len(splits.train)]
    acc = vp.knn_accuracy(elbo, train_bin, splits.train_labels, splits.test, splits.test_labels, k=ks, batch_size=1000)
    best_k = max(acc, key=lambda k: (acc[k], -k))
    out.update(
        active_units=au.count,
        knn_accuracy={str(k): v for k, v in acc.items()},
        knn_best={"k": best_k, "accuracy": acc[best_k]},
    )
    return out, values


def paired_difference(values: torch.Tensor, reference: torch.Tensor) -> dict:
    r"""Mean and standard error of the per-point differences ``values - reference`` (the
    same test points and importance noise for both)."""
    d = values.double() - reference.double()
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return {"mean": float(d.mean()), "std_error": se}


@torch.no_grad()
def sample_images(elbo: vp.ExemplarELBO, n: int, seed: int) -> torch.Tensor:
    r"""``n`` random samples from the prior, decoded to their mean images, ``[n, 1, H, W]`` on CPU."""
    torch.manual_seed(seed)
    gen = getattr(elbo.prior, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    images = elbo.decoder(elbo.prior.sample((n,))).mean.float().cpu()
    side = math.isqrt(images[0].numel())
    return images.reshape(n, 1, side, side)


def _sizes_used(prior: object) -> dict:
    r"""The sizes a trained prior actually has: ``coreset_components`` (pseudocoreset M) or
    ``exemplar_subsample`` (exemplars per training step; ``None``: all)."""
    if isinstance(prior, vp.PseudocoresetPrior):
        return {"coreset_components": prior.n_pseudo}
    if isinstance(prior, vp.ExemplarPrior):
        return {"exemplar_subsample": prior.n_subsample}
    return {}


def run_prior(prior: str, cfg: dict, splits: vp.data.Splits, runs: Path, *, device: str, data_dir: str | None,
              progress: bool = False, resume: bool = False, n_samples: int = 36) -> tuple[dict, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    r"""Trains one prior through the training loop of the command and measures it; returns
    ``(row, sample images, per-point test log-likelihoods or None)``."""
    config = train_config(cfg, prior, runs / prior, device=device, data_dir=data_dir, progress=progress, resume=resume)
    t0 = time.perf_counter()
    metrics = training.fit(config)
    train_wall = time.perf_counter() - t0
    dev = torch.device(metrics["device"])
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])  # the measurements under the training's setting
    try:
        elbo = load_trained(config, splits, dev)
        t1 = time.perf_counter()
        extra, values = measure(elbo, splits, cfg, dev, progress=progress)
        images = sample_images(elbo, n_samples, cfg["seed"])
    finally:
        torch.set_num_threads(threads)
    test = metrics["test"]
    row = {
        "prior": prior,
        "label": LABELS.get(prior, prior),
        "elbo": test["elbo"],
        "reconstruction": test["reconstruction"],
        "kl": test["kl"],
        **extra,
        **_sizes_used(elbo.prior),
        "seconds_per_epoch": metrics["seconds_per_epoch"],
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics["best_epoch"],
        "stopped_early": metrics["stopped_early"],
        "n_parameters": metrics["n_parameters"],
        "wall_seconds": {"train": train_wall, "measures": time.perf_counter() - t1},
        "curves": {
            "epoch": [h["epoch"] for h in metrics["epochs"]],
            "valid_elbo": [h["valid"]["elbo"] for h in metrics["epochs"]],
            "valid_kl": [h["valid"]["kl"] for h in metrics["epochs"]],
            "train_elbo": [h["train"]["elbo"] for h in metrics["epochs"]],
        },
        "train_command": "python -m vaepriors.train " + shlex.join(train.to_argv(config)),
        "device": metrics["device"],
    }
    return row, images, values


def run_benchmark(cfg: dict, priors: list[str], out: Path, *, runs: Path, device: str | None = None,
                  data_dir: str | None = None, progress: bool = False, resume: bool = False,
                  command: str | None = None, docs_static: Path | None = None) -> dict:  # fmt: skip
    r"""Trains and measures ``priors`` under ``cfg``; writes ``results.json``, ``table.md``
    and the PNGs into ``out`` and returns the results.

    Raises:
        VAEPriorsError: when the dataset cannot be loaded (e.g. MNIST is absent).
    """
    device = device or cfg["device"]
    unknown = [p for p in priors if p not in training.PRIORS]
    if unknown:
        raise vp.VAEPriorsError(f"`priors` must be among {PRIORS}, got {unknown}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise vp.VAEPriorsError(f"`device` {device!r}: CUDA is not available on this machine (try --device cpu)")
    splits = load_splits(cfg, data_dir)  # fails early, before any training
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, grids, lls = [], {}, {}
    for prior in priors:
        print(f"\n== {prior} ==", flush=True)
        row, images, values = run_prior(prior, cfg, splits, runs, device=device, data_dir=data_dir,
                                        progress=progress, resume=resume)  # fmt: skip
        rows.append(row)
        grids[prior], lls[prior] = images, values
        # Per test point, for paired comparisons across invocations (never a stale file).
        (runs / prior / "test_log_likelihood.pt").unlink(missing_ok=True)
        if values is not None:
            torch.save(values, runs / prior / "test_log_likelihood.pt")
    for row in rows:
        ref = lls.get("gaussian")
        if ref is not None and lls[row["prior"]] is not None and row["prior"] != "gaussian":
            row["log_likelihood_vs_gaussian"] = paired_difference(lls[row["prior"]], ref)
    results = {
        "config": cfg,
        "description": DESCRIPTIONS.get(cfg["name"], ""),
        "command": command,
        "runs": str(runs.resolve()),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {**machine(rows[0]["device"] if rows else device), "threads": cfg["threads"] or torch.get_num_threads()},
        "sizes": {"train": len(splits.train), "valid": len(splits.valid), "test": len(splits.test)},
        "dataset": splits.name,
        "wall_seconds": time.perf_counter() - started,
        "paper": PAPER,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table(results))
    written = _plots(results, grids, out)
    if docs_static is not None:
        docs_static.mkdir(parents=True, exist_ok=True)
        for name in written:
            shutil.copyfile(out / name, docs_static / f"reproduce_{cfg['name']}_{name}")
    return results


# -- the table ---------------------------------------------------------------------------
def _f(v: float | None, fmt: str = ".2f") -> str:
    return "" if v is None else format(v, fmt)


def _paper(results: dict) -> dict:
    # The papers' numbers are for MNIST; other datasets get empty paper cells.
    return PAPER if results["dataset"] == "mnist" else {}


def table(results: dict) -> str:
    r"""The markdown table of ``results`` beside the papers' numbers."""
    cfg, sizes, rows = results["config"], results["sizes"], results["rows"]
    s = sorted({r["eval_samples"] for r in rows if r["log_likelihood"] is not None})
    s_text = "/".join(map(str, s)) or "none (not computed)"
    paper = _paper(results)
    m = results["machine"]
    on_gpu = str(m.get("device", "")).startswith("cuda")
    where = m["device_name"] if on_gpu else f"{m['cpu']} CPU, {cfg['threads'] or 'all'} thread(s) of {m['cpu_count']}"
    if "load_average" in m:
        where += f", load average {m['load_average'][0]} at the end (shared machine)"
    ks = cfg["knn_k"]
    k5 = 5 if 5 in ks else ks[0]
    lines = [
        f"**{results['description']}**" if results["description"] else "",
        "",
        f"Dataset {results['dataset']}: {sizes['train']} training / {sizes['valid']} validation / {sizes['test']} test "
        f"images; {cfg['epochs']} epochs at most (KL warm-up {cfg['warmup']}, learning rate {cfg['lr']}, batch "
        f"{cfg['batch_size']}, patience {cfg['patience']}); MLP VAE {'-'.join(map(str, cfg['hidden']))}, d = "
        f"{cfg['latent_dim']}; {cfg['components']} mixture components / pseudo-inputs"
        f"{'' if coreset_size(cfg) == cfg['components'] else f' ({coreset_size(cfg)} for the pseudocoreset)'}; exemplar subsample M = "
        f"{sizes['train'] // 2 if cfg['exemplar_subsample'] == 'half' else cfg['exemplar_subsample']}; RAT k = "
        f"{cfg['rat_k']}; coreset update every {cfg['coreset_every']} epoch(s). Test log-likelihood: importance "
        f"sampling with S = {s_text} samples per test point (papers: S = 5000). Machine: {where}; "
        f"{results['date'][:10]}; total {results['wall_seconds'] / 60:.1f} min.",
        "",
        f"| prior | test log p(x) (S = {s_text}) | paper | vs Gaussian (paired) | test ELBO | paper | KL | paper "
        f"| active units (of {cfg['latent_dim']}) | paper | kNN acc. k = {k5} | best kNN acc. (k) | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = paper.get(r["prior"], {})
        ll = r["log_likelihood"]
        ll_text = "n/a" if ll is None else f"{ll:.2f} ± {r['log_likelihood_std_error']:.2f}"
        best = r["knn_best"]
        d = r.get("log_likelihood_vs_gaussian")
        d_text = "" if d is None or r["prior"] == "gaussian" else f"{d['mean']:+.2f} ± {d['std_error']:.2f}"
        lines.append(
            f"| {r['label']} | {ll_text} | {_f(p.get('log_likelihood'))} | {d_text} | {r['elbo']:.2f} | {_f(p.get('elbo'))} "
            f"| {r['kl']:.2f} | {_f(p.get('kl'))} | {r['active_units']} | {_f(p.get('active_units'), '.1f')} "
            f"| {100 * r['knn_accuracy'][str(k5)]:.1f}% | {100 * best['accuracy']:.1f}% ({best['k']}) "
            f"| {r['seconds_per_epoch']:.2f} |"
        )
    lines += [
        "",
        "Nats per test image (higher is better; ± is the standard error over test points). vs Gaussian: the "
        "mean per-point difference from the Gaussian prior's log-likelihood, on the same test points with the "
        "same importance-sampling noise, and its standard error. Paper: the "
        "Exemplar VAE paper's dynamic-MNIST numbers for this model, full protocol (log-likelihood from its "
        "density-estimation table, S = 5000; active units from supplementary table 1; KL and ELBO = -(KL + "
        "negative reconstruction) from supplementary table 3). Empty: the papers give no number for this row (the ByPE-VAE text at hand "
        "stops before its results). kNN: test encoder means against the training means "
        f"(training images binarised once), k in {ks}. s / epoch: the training pass (coreset updates and RAT cache refreshes included, validation not), mean over the epochs run.",
        "",
    ]
    if results.get("command"):
        lines += [f"Produced by `{results['command']}`.", ""]
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------
def _plots(results: dict, grids: dict[str, torch.Tensor], out: Path) -> list[str]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("plots skipped: matplotlib is missing (pip install 'vaepriors[plot]')")
        return []
    rows = results["rows"]
    if not rows:
        return []
    name = results["config"]["name"]
    written = []

    # Validation curves of every prior on one figure.
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for r in rows:
        c = r["curves"]
        marker = "o" if len(c["epoch"]) < 30 else None
        axes[0].plot(c["epoch"], c["valid_elbo"], marker=marker, ms=3, label=r["label"])
        axes[1].plot(c["epoch"], c["valid_kl"], marker=marker, ms=3, label=r["label"])
    axes[0].set(title="validation ELBO (nats)", xlabel="epoch")
    axes[1].set(title="validation KL (nats)", xlabel="epoch")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"reproduce ({name})", fontsize=10)
    fig.savefig(out / "curves.png", dpi=90)
    written.append("curves.png")

    # Negative test log-likelihood per prior, with the papers' values.
    have = [r for r in rows if r["log_likelihood"] is not None]
    if have:
        fig = Figure(figsize=(7, 3.6), layout="constrained")
        ax = fig.subplots()
        nll = [-r["log_likelihood"] for r in have]
        err = [r["log_likelihood_std_error"] or 0.0 for r in have]
        paper = _paper(results)
        papers = [-paper[r["prior"]]["log_likelihood"] if r["prior"] in paper else math.nan for r in have]
        low = min([*nll, *[p for p in papers if math.isfinite(p)]])
        high = max([*nll, *[p for p in papers if math.isfinite(p)]])
        bottom = math.floor(low - 0.15 * (high - low + 1))
        x = range(len(have))
        ax.bar(x, [v - bottom for v in nll], bottom=bottom, yerr=err, color="tab:blue", label=f"this run ({name})")
        if paper:
            ax.scatter(x, papers, marker="D", color="black", zorder=3, label="paper (full protocol)")
        ax.set_xticks(list(x), [r["label"] for r in have], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(bottom, high + 0.3 * (high - low + 1))  # room for the legend
        ax.set_ylabel(f"-log p(x), nats (axis from {bottom})")
        s = "/".join(str(v) for v in sorted({r["eval_samples"] for r in have}))
        ax.set_title(f"test negative log-likelihood, S = {s} (lower is better)", fontsize=10)
        ax.legend(fontsize=8, loc="upper right", ncols=2)
        fig.savefig(out / "loglik.png", dpi=90)
        written.append("loglik.png")

    # A grid of random samples per prior.
    if grids:
        cols = min(3, len(grids))
        nrows = -(-len(grids) // cols)
        fig = Figure(figsize=(2.6 * cols, 2.8 * nrows), layout="constrained")
        axes = fig.subplots(nrows, cols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, r in zip(axes.flat, rows):
            images = grids[r["prior"]]
            side = math.isqrt(len(images))
            grid = image_grid(images[: side * side], side, side).squeeze(-1)
            ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(r["label"], fontsize=9)
        fig.suptitle(f"random samples from each prior (decoder means), {name}", fontsize=10)
        fig.savefig(out / "samples.png", dpi=90)
        written.append("samples.png")
    return written


# -- the command line ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu-short", help="named configuration")
    p.add_argument("--priors", nargs="+", choices=PRIORS, default=PRIORS, help="a subset of the priors")
    p.add_argument("--device", default=None, help="'cpu', 'cuda', ... (default: the configuration's)")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default $VAEPRIORS_MNIST, else ../shared/data/mnist "
                   "beside the checkout, else ~/.cache/vaepriors/mnist)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/reproduce_<config>)")
    p.add_argument("--runs", default=None, help="training runs folder (default runs/reproduce_<config>)")
    p.add_argument("--resume", action="store_true", help="continue the training runs from their checkpoints")
    p.add_argument("--docs-static", default=None, help="also copy the PNGs here as reproduce_<config>_<name>.png")
    g = p.add_argument_group("overrides of the configuration")
    for flag, kind in (("--epochs", int), ("--warmup", int), ("--lr", float), ("--n-train", int), ("--n-eval", int),
                       ("--eval-samples", int), ("--threads", int), ("--seed", int), ("--coreset-components", int),
                       ("--exemplar-subsample", int)):  # fmt: skip
        g.add_argument(flag, type=kind, default=None)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars on a terminal, status lines in a log")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    cfg = resolve(a.config, epochs=a.epochs, warmup=a.warmup, lr=a.lr, n_train=a.n_train, n_eval=a.n_eval,
                  eval_samples=a.eval_samples, threads=a.threads, seed=a.seed,
                  coreset_components=a.coreset_components, exemplar_subsample=a.exemplar_subsample)  # fmt: skip
    for flag, value in (("--coreset-components", a.coreset_components), ("--exemplar-subsample", a.exemplar_subsample)):
        if value is not None and not 1 <= value <= (cfg["n_train"] or value):
            print(f"reproduce: error: {flag} must be between 1 and the {cfg['n_train']} training images, got {value}",
                  file=sys.stderr)  # fmt: skip
            return 2
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"reproduce_{a.config}")
    # Runs with overrides train elsewhere than the configuration's own (their checkpoints and
    # per-point values must not overwrite each other's).
    tag = "".join(f"_{k}{v}" for k, v in (("seed", a.seed), ("coreset", a.coreset_components),
                                           ("subsample", a.exemplar_subsample)) if v is not None)  # fmt: skip
    runs = Path(a.runs or Path("runs") / f"reproduce_{a.config}{tag}")
    if cfg["dataset"] == "mnist":
        root, source = mnist_root(data_dir_for(a.data_dir), root_name="--data-dir")
        if not (root / "train-images-idx3-ubyte.gz").is_file() and not (root / "train-images-idx3-ubyte").is_file():
            print(f"reproduce: skipped: no MNIST in '{root}' (path from {source}); pass --data-dir or set "
                  f"{vp.data.MNIST_ENV} to the folder with the four IDX files")  # fmt: skip
            return 0
    progress = a.progress
    command = "python benchmarks/reproduce.py " + shlex.join(argv)
    try:
        with training.status_lines(progress):
            results = run_benchmark(cfg, a.priors, out, runs=runs, device=a.device, data_dir=a.data_dir,
                                    progress=progress, resume=a.resume, command=command,
                                    docs_static=None if a.docs_static is None else Path(a.docs_static))  # fmt: skip
    except vp.VAEPriorsError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    print("\n" + table(results))
    print(f"wrote {out}/: results.json, table.md, curves.png, loglik.png, samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
