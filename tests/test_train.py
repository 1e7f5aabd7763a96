"""The training command end to end on a tiny built-in configuration."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

import vaepriors
from vaepriors import VAEPriorsError
from vaepriors import train as T

TINY = ["--n-train", "200", "--n-eval", "60", "--hidden", "24", "--latent-dim", "4", "--components", "6",
        "--batch-size", "50", "--eval-batch-size", "30", "--threads", "1", "--no-progress", "--eval-samples", "0"]  # fmt: skip


def train(tmp_path, *extra: str, name: str = "run") -> dict:
    return T.run(T.parse_args([*TINY, "--out", str(tmp_path / name), *extra]))


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_end_to_end_writes_metrics_and_plots(tmp_path, capsys):
    m = train(tmp_path, "--prior", "vamp", "--epochs", "2", "--warmup", "2")
    out = tmp_path / "run"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    assert (m["prior"], m["dataset"], m["sizes"]) == ("vamp", "builtin", {"train": 200, "valid": 60, "test": 60})
    assert [h["epoch"] for h in m["epochs"]] == [1, 2] and m["epochs_run"] == 2
    assert [h["kl_weight"] for h in m["epochs"]] == [0.5, 1.0]
    for h in m["epochs"]:
        assert h["seconds"] > 0
        for split in ("train", "valid"):
            e = h[split]
            assert all(math.isfinite(v) for v in e.values())
            assert math.isclose(e["elbo"], e["reconstruction"] - e["kl"], rel_tol=1e-6)  # float32 per-example terms
            assert e["reconstruction"] < 0 and e["elbo"] > -2 * 784 * math.log(2)  # better than twice a coin flip
    assert m["best_epoch"] in (1, 2)
    assert m["best_valid_elbo"] == max(h["valid"]["elbo"] for h in m["epochs"])
    assert math.isfinite(m["test"]["elbo"]) and m["test"]["log_likelihood"] is None
    assert m["seconds_per_epoch"] > 0 and m["n_parameters"] > 0
    for name in ("curves.png", "samples.png", "conditioned.png"):
        assert _is_png(out / name), name
    assert (out / "checkpoint.pt").is_file() and (out / "best.pt").is_file()
    printed = capsys.readouterr().out
    assert "summary" in printed and "test ELBO" in printed and "test log p(x)    skipped" in printed


@pytest.mark.parametrize("prior", ["gaussian", "mog"])
def test_other_priors_run(tmp_path, prior):
    m = train(tmp_path, "--prior", prior, "--epochs", "1")
    assert math.isfinite(m["test"]["elbo"]) and _is_png(tmp_path / "run" / "samples.png")


@pytest.mark.parametrize("prior", [["vamp"], ["exemplar", "--exemplar-subsample", "50"]], ids=["vamp", "exemplar-subsample"])
def test_resume_continues_exactly(tmp_path, prior):
    full = train(tmp_path, "--prior", *prior, "--epochs", "2", name="full")
    first = train(tmp_path, "--prior", *prior, "--epochs", "1", name="split")
    assert first["epochs_run"] == 1
    resumed = train(tmp_path, "--prior", *prior, "--epochs", "2", "--resume", name="split")
    assert [h["epoch"] for h in resumed["epochs"]] == [1, 2]
    # Model, optimiser, batch order, binarisation and the prior's own generator (exemplar
    # subsets) all carry over: epoch 2 is the same as in the uninterrupted run.
    for key in ("train", "valid"):
        for k, v in full["epochs"][1][key].items():
            assert math.isclose(resumed["epochs"][1][key][k], v, rel_tol=1e-6), (key, k)
    assert math.isclose(resumed["test"]["elbo"], full["test"]["elbo"], rel_tol=1e-6)


def test_resume_errors(tmp_path):
    with pytest.raises(VAEPriorsError, match="no checkpoint"):
        train(tmp_path, "--resume", "--epochs", "1")
    train(tmp_path, "--prior", "gaussian", "--epochs", "1")
    with pytest.raises(VAEPriorsError, match="--latent-dim 4 -> 5"):
        train(tmp_path, "--prior", "gaussian", "--epochs", "2", "--resume", "--latent-dim", "5")


def test_early_stopping(tmp_path, monkeypatch):
    # Validation ELBOs that only get worse after epoch 1: patience 2 stops after epoch 3.
    calls = iter(range(1000))
    real = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda elbo, x, bs=1000: {**real(elbo, x, bs), "elbo": -float(next(calls))})
    m = train(tmp_path, "--prior", "gaussian", "--epochs", "10", "--patience", "2")
    assert m["stopped_early"] and m["epochs_run"] == 3 and m["best_epoch"] == 1
    # Resuming a stopped run with more patience carries on where it stopped.
    m = train(tmp_path, "--prior", "gaussian", "--epochs", "10", "--patience", "3", "--resume")
    assert m["stopped_early"] and m["epochs_run"] == 4 and m["best_epoch"] == 1


@pytest.mark.parametrize("prior", ["exemplar", "exemplar-rat", "coreset"])
def test_training_based_priors_train_and_save(tmp_path, prior):
    m = train(tmp_path, "--prior", prior, "--epochs", "2", "--exemplar-subsample", "50", "--rat-k", "3",
              "--coreset-every", "1", "--eval-samples", "3")
    assert all(math.isfinite(m["test"][k]) for k in ("elbo", "log_likelihood"))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    if prior == "coreset":  # two coreset updates ran; the weights are still a valid coreset
        assert int(state["prior.adam_step"]) > 0
        w = state["prior.weights"]
        assert bool((w >= 0).all()) and abs(float(w.sum()) - 200) < 1e-3
    if prior == "exemplar-rat":
        assert state["prior.rat.means"].shape == (200, 4)


def test_registries_and_hook(tmp_path, monkeypatch):
    # A new prior is one builder in PRIORS; its conditioned latents one entry in CONDITIONED.
    seen = {}

    def build(args, splits, encoder, decoder):
        seen["exemplars"] = splits.exemplars.shape
        return vaepriors.GaussianPrior(args.latent_dim)

    def condition(elbo, x, n):
        seen["conditioned"] = (x.shape, n)
        return torch.zeros(n, len(x), elbo.prior.latent_dim)

    monkeypatch.setitem(T.PRIORS, "toy", build)
    monkeypatch.setitem(T.CONDITIONED, "toy", condition)
    # The evaluation hook: a stand-in vaepriors.evaluation module.
    fake = types.ModuleType("vaepriors.evaluation")
    def log_likelihood(model, data, n_samples, *, batch_size, generator, progress):
        assert model is not None and isinstance(generator, torch.Generator) and progress is False
        return types.SimpleNamespace(mean=-float(n_samples), std_error=0.5)

    fake.log_likelihood = log_likelihood
    monkeypatch.setitem(sys.modules, "vaepriors.evaluation", fake)
    monkeypatch.setattr(vaepriors, "evaluation", fake, raising=False)

    m = train(tmp_path, "--prior", "toy", "--epochs", "1", "--eval-samples", "7")
    assert seen["exemplars"] == (200, 1, 28, 28)
    assert seen["conditioned"][1] == 7 and seen["conditioned"][0][1:] == (1, 28, 28)
    assert m["test"]["log_likelihood"] == -7.0 and m["test"]["eval_samples"] == 7
    assert m["test"]["log_likelihood_std_error"] == 0.5


def test_kl_weight_schedule():
    assert [T.kl_weight(e, 4) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert T.kl_weight(1, 0) == 1.0


def test_parse_args_presets_and_errors(tmp_path, capsys):
    a = T.parse_args([])
    assert (a.dataset, a.prior, a.epochs, a.components, a.threads) == ("builtin", "vamp", 20, 50, 1)
    b = T.parse_args(["--dataset", "mnist", "--epochs", "3"])
    assert (b.epochs, b.warmup, b.components, b.lr, b.eval_samples) == (3, 100, 500, 5e-4, 5000)
    with pytest.raises(VAEPriorsError, match="--epochs"):
        T.parse_args(["--epochs", "0"])
    with pytest.raises(VAEPriorsError, match="--data-dir"):
        T.parse_args(["--data-dir", "/tmp"])
    # The command line turns library errors into a message and exit code 2.
    code = T.main(["--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "VAEPRIORS_MNIST" in err


def test_coreset_updates_follow_the_every_option(tmp_path):
    # 3 epochs, an update every 2: exactly one, after the 2nd epoch (one pass: 200 / 100 steps).
    train(tmp_path, "--prior", "coreset", "--epochs", "3", "--coreset-every", "2", "--eval-samples", "0")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert int(state["prior.adam_step"]) == 2


def test_no_validate_switches_checks_off_for_the_run_only(tmp_path, monkeypatch):
    from vaepriors import errors

    seen = []
    original = T._run
    monkeypatch.setattr(T, "_run", lambda args: seen.append(errors.validation_enabled()) or original(args))
    train(tmp_path, "--epochs", "1", "--eval-samples", "0", "--no-validate")
    assert seen == [False] and errors.validation_enabled()
