"""The training command end to end on a tiny built-in configuration."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import vaepriors
from vaepriors import VAEPriorsError
from vaepriors import train as T
from vaepriors import training
from vaepriors.data import load_builtin

ROOT = Path(__file__).resolve().parents[1]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

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
    assert (out / "checkpoint.pt").is_file() and (out / "best.pt").is_file()
    printed = capsys.readouterr().out
    assert "summary" in printed and "test ELBO" in printed and "test log p(x)    skipped" in printed
    if HAVE_MATPLOTLIB:
        for name in ("curves.png", "samples.png", "conditioned.png"):
            assert _is_png(out / name), name
    else:  # the plots are optional (the "plot" extra): the run says so and writes the rest
        assert "plots skipped: matplotlib is missing" in printed


@pytest.mark.parametrize("prior", ["gaussian", "mog"])
def test_other_priors_run(tmp_path, prior):
    m = train(tmp_path, "--prior", prior, "--epochs", "1")
    assert math.isfinite(m["test"]["elbo"])
    assert _is_png(tmp_path / "run" / "samples.png") or not HAVE_MATPLOTLIB


@pytest.mark.slow  # several training runs
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


@pytest.mark.slow  # several training runs
def test_resume_a_checkpoint_from_before_train_config(tmp_path):
    # Checkpoints used to hold the argparse options ("args"; None for all images, all exemplars).
    train(tmp_path, "--prior", "exemplar-rat", "--epochs", "1", "--n-eval", "all")
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    old = {**state.pop("config"), "n_eval": None, "exemplar_subsample": None, "rat_k": None}
    old["hidden"] = list(old["hidden"])
    torch.save({**state, "args": old}, path)
    argv = [a for a in TINY if a not in ("--n-eval", "60")]
    m = T.run(T.parse_args([*argv, "--n-eval", "all", "--prior", "exemplar-rat", "--epochs", "2", "--resume",
                            "--out", str(tmp_path / "run")]))  # fmt: skip
    assert [h["epoch"] for h in m["epochs"]] == [1, 2]


@pytest.mark.slow  # several training runs
def test_early_stopping(tmp_path, monkeypatch):
    # Validation ELBOs that only get worse after epoch 1: patience 2 stops after epoch 3.
    calls = iter(range(1000))
    real = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda elbo, x, bs=1000, **kw: {**real(elbo, x, bs), "elbo": -float(next(calls))})
    m = train(tmp_path, "--prior", "gaussian", "--epochs", "10", "--patience", "2")
    assert m["stopped_early"] and m["epochs_run"] == 3 and m["best_epoch"] == 1
    # Resuming a stopped run with more patience carries on where it stopped.
    m = train(tmp_path, "--prior", "gaussian", "--epochs", "10", "--patience", "3", "--resume")
    assert m["stopped_early"] and m["epochs_run"] == 4 and m["best_epoch"] == 1


@pytest.mark.slow  # a run per prior, with the log-likelihood
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

    def build(config, splits, encoder, decoder):
        seen["exemplars"] = splits.exemplars.shape
        return vaepriors.GaussianPrior(config.latent_dim)

    def condition(elbo, x, n):
        seen["conditioned"] = (x.shape, n)
        return torch.zeros(n, len(x), elbo.prior.latent_dim)

    monkeypatch.setitem(training.PRIORS, "toy", build)
    monkeypatch.setitem(training.CONDITIONED, "toy", condition)
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
    if HAVE_MATPLOTLIB:  # the conditioned latents are drawn for conditioned.png
        assert seen["conditioned"][1] == 7 and seen["conditioned"][0][1:] == (1, 28, 28)
    assert m["test"]["log_likelihood"] == -7.0 and m["test"]["eval_samples"] == 7
    assert m["test"]["log_likelihood_std_error"] == 0.5


def test_kl_weight_schedule():
    assert [training.kl_weight(e, 4) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert training.kl_weight(1, 0) == 1.0


def test_parse_args_presets_and_errors(tmp_path, capsys):
    a = T.parse_args([])
    assert isinstance(a, training.TrainConfig)
    assert (a.dataset, a.prior, a.preset, a.epochs, a.components, a.threads) == ("builtin", "vamp", "quick", 10, 50, 1)
    # The quick preset on MNIST: a subset, a few epochs and a cheap log-likelihood.
    q = T.parse_args(["--dataset", "mnist", "--epochs", "3"])
    assert (q.epochs, q.n_train, q.n_eval, q.warmup, q.eval_samples) == (3, 10000, 1000, 3, 100)
    # The papers' protocol, with an explicit flag winning over the preset.
    b = T.parse_args(["--dataset", "mnist", "--preset", "paper", "--epochs", "3"])
    assert (b.epochs, b.warmup, b.components, b.lr, b.eval_samples, b.n_train) == (3, 100, 500, 5e-4, 5000, "all")
    assert T.parse_args(["--dataset", "mnist", "--n-train", "all"]).n_train == "all"
    with pytest.raises(VAEPriorsError, match="--epochs"):
        T.parse_args(["--epochs", "0"])
    with pytest.raises(VAEPriorsError, match="--data-dir"):
        T.parse_args(["--data-dir", "/tmp"])
    # The command line turns library errors into a message and exit code 2, naming the flag.
    code = T.main(["--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "VAEPRIORS_MNIST" in err
    assert "--data-dir" in err and "`root`" not in err and "data_dir" not in err


def test_library_errors_name_the_field():
    with pytest.raises(VAEPriorsError, match="`rat_k` must be at least 1"):
        training.TrainConfig(prior="exemplar-rat", rat_k=0)
    with pytest.raises(VAEPriorsError, match="`data_dir`"):
        training.TrainConfig(data_dir="/tmp")


@pytest.mark.parametrize("argv", [["--rat-k", "0"], ["--rat-k", "-3"]])
def test_rat_k_must_be_positive(argv, capsys):
    with pytest.raises(VAEPriorsError, match="--rat-k must be at least 1"):
        T.parse_args(["--prior", "exemplar-rat", *argv])
    assert T.main(["--prior", "exemplar-rat", *argv]) == 2
    assert "--rat-k" in capsys.readouterr().err


def test_exemplar_subsampling_defaults_to_half():
    assert training.TrainConfig(prior="exemplar").exemplar_subsample == "half"
    assert training.TrainConfig(prior="exemplar-rat").exemplar_subsample == "all"
    assert training.TrainConfig(prior="vamp").exemplar_subsample is None
    size = training.exemplar_subsample_size
    assert size(training.TrainConfig(prior="exemplar", dataset="mnist"), 10000) == 5000
    assert size(training.TrainConfig(prior="exemplar", exemplar_subsample="all"), 10000) is None
    assert size(training.TrainConfig(prior="exemplar", exemplar_subsample=20000), 10000) == 9999
    assert T.parse_args(["--prior", "exemplar", "--exemplar-subsample", "300"]).exemplar_subsample == 300


def test_to_argv_round_trips():
    for config in (
        training.TrainConfig(),
        training.TrainConfig(prior="exemplar-rat", dataset="mnist", data_dir="/d", preset="paper", n_eval=50,
                             hidden=(16, 8), lr=1e-4, max_steps=7, progress=False, validate=False, resume=True),
    ):  # fmt: skip
        assert T.parse_args(T.to_argv(config)) == config


@pytest.mark.parametrize("progress", [True, False])
def test_progress_reaches_the_priors(progress):
    splits = load_builtin(60, 10, 10)
    for prior in ("exemplar", "exemplar-rat"):
        config = training.TrainConfig(prior=prior, hidden=(8,), latent_dim=2, progress=progress)
        assert training.build_model(config, splits).prior.progress is progress


@pytest.mark.slow  # several training runs
def test_max_steps_stops_evaluates_and_saves(tmp_path):
    # 200 images in batches of 50: 4 steps per epoch; 6 steps end in the middle of epoch 2.
    m = train(tmp_path, "--prior", "gaussian", "--epochs", "5", "--max-steps", "6")
    assert (m["epochs_run"], m["steps_run"]) == (2, 6)
    assert [h["steps"] for h in m["epochs"]] == [4, 2]
    assert math.isfinite(m["test"]["elbo"]) and (tmp_path / "run" / "best.pt").is_file()
    # A resumed run with a larger limit goes on from there.
    m = train(tmp_path, "--prior", "gaussian", "--epochs", "5", "--max-steps", "10", "--resume")
    assert (m["epochs_run"], m["steps_run"]) == (3, 10)
    with pytest.raises(VAEPriorsError, match="--max-steps"):
        T.parse_args(["--max-steps", "0"])


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_status_lines_turn_redraws_into_lines_every_interval():
    sink, clock = io.StringIO(), _Clock()
    s = training._StatusLines(sink, interval=10, clock=clock)
    for i in range(31):  # a tqdm-like bar: a redraw every second for 30 s
        clock.now = float(i)
        s.write(f"\rwork: {i}/30 [{i:02d}s, 1.00it/s]  ")
    s.write("\r" + " " * 20)
    s.write("\r")  # the bar clears itself (leave=False)
    s.write("a plain line\n")
    lines = sink.getvalue().split("\n")
    assert "\r" not in sink.getvalue()
    assert lines == ["work: 10/30 [10s, 1.00it/s]", "work: 20/30 [20s, 1.00it/s]", "work: 30/30 [30s, 1.00it/s]",
                     "a plain line", ""]  # fmt: skip
    # A short bar between lines prints nothing.
    sink.truncate(0), sink.seek(0)
    s.note_line()
    s.write("\rquick: 1/2")
    s.write("\r" + " " * 10 + "\r")
    assert sink.getvalue() == ""
    # A nested bar (tqdm moves down a line, redraws, moves back up) does not break the outer one.
    s.write("\router: 1/9")
    clock.now += 10
    s.write("\n"), s.write("\rinner: 1/2"), s.write("\x1b[A")
    s.write("\n"), s.write("\r" + " " * 10), s.write("\x1b[A")
    clock.now += 10
    s.write("\router: 2/9")
    assert sink.getvalue() == "outer: 1/9\ninner: 1/2\nouter: 2/9\n"


def test_progress_in_a_log_prints_status_lines(tmp_path, monkeypatch, capsys):
    # Output to a log (pytest's capture is not a terminal), a status line as often as possible.
    monkeypatch.setattr(training, "LOG_INTERVAL", 0.0)
    argv = [a for a in TINY if a != "--no-progress"]
    T.run(T.parse_args([*argv, "--prior", "exemplar", "--exemplar-subsample", "50", "--epochs", "1",
                        "--eval-samples", "2", "--out", str(tmp_path / "run")]))  # fmt: skip
    captured = capsys.readouterr()
    assert "\r" not in captured.err
    status = captured.err.splitlines()
    for what in ("epoch 1/1", "validation", "encoding exemplars", "log-likelihood"):
        assert any(line.startswith(what) for line in status), (what, status)
    assert "epoch    1" in captured.out and sys.stderr is not None and not isinstance(sys.stderr, training._StatusLines)


def test_help_imports_no_torch():
    # The command's modules import neither torch nor the priors: loaded without the package's
    # __init__ (which imports the whole library), --help runs without torch.
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('vaepriors'); pkg.__path__ = [{str(ROOT / 'vaepriors')!r}]\n"
        "sys.modules['vaepriors'] = pkg\n"
        "import vaepriors.train as t\n"
        "try:\n    t.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "t.parse_args(['--prior', 'exemplar', '--dataset', 'mnist'])\n"
        "heavy = sorted(m for m in ('torch', 'tqdm', 'matplotlib', 'pykeops', 'triton') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "exemplar-rat" in done.stdout and "cost per training step" in done.stdout


def test_image_grid():
    images = torch.arange(6.0).reshape(6, 1, 1, 1) / 10
    grid = training.image_grid(images, 2, 4, pad=1)
    assert grid.shape == (3, 7, 1)
    assert grid[0, 0, 0] == 0.0 and grid[2, 2, 0] == pytest.approx(0.5) and grid[2, 4, 0] == 1.0  # white padding
    with pytest.raises(VAEPriorsError, match="rows x cols"):
        training.image_grid(images, 1, 2)


def test_coreset_updates_follow_the_every_option(tmp_path):
    # 3 epochs, an update every 2: exactly one, after the 2nd epoch (one pass: 200 / 100 steps).
    train(tmp_path, "--prior", "coreset", "--epochs", "3", "--coreset-every", "2", "--eval-samples", "0")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert int(state["prior.adam_step"]) == 2


def test_no_validate_switches_checks_off_for_the_run_only(tmp_path, monkeypatch):
    from vaepriors import errors

    seen = []
    original = training._fit
    monkeypatch.setattr(training, "_fit", lambda config, output: seen.append(errors.validation_enabled()) or original(config, output))
    train(tmp_path, "--epochs", "1", "--eval-samples", "0", "--no-validate")
    assert seen == [False] and errors.validation_enabled()
