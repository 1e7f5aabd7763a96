"""The reproduction benchmark (benchmarks/reproduce.py) end to end on a tiny configuration.

Real MNIST (a few hundred images) when it is present, else the built-in dataset.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from tests._scripts import ROOT, load_benchmark
from vaepriors import train
from vaepriors.data import mnist_root

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
R = load_benchmark("reproduce")


def _have_mnist() -> bool:
    root, _ = mnist_root(None)
    return any((root / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz"))


def _tiny_config() -> dict:
    cfg = R.resolve("tiny")
    if _have_mnist():
        cfg.update(dataset="mnist", n_train=300, n_eval=100)
    return cfg


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    cfg = _tiny_config()
    results = R.run_benchmark(cfg, ["gaussian", "exemplar"], tmp / "out", runs=tmp / "runs", docs_static=tmp / "static")
    return cfg, results, tmp


@pytest.mark.slow  # trains and measures two priors (the module's tiny run)
def test_results_json_and_numbers(tiny_run):
    cfg, results, tmp = tiny_run
    on_disk = json.loads((tmp / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert results["dataset"] == cfg["dataset"]
    assert results["sizes"] == {"train": cfg["n_train"], "valid": cfg["n_eval"], "test": cfg["n_eval"]}
    rows = results["rows"]
    assert [r["prior"] for r in rows] == ["gaussian", "exemplar"]
    d = cfg["latent_dim"]
    for r in rows:
        assert r["eval_samples"] == cfg["eval_samples"] == 5
        for key in ("log_likelihood", "log_likelihood_std_error", "elbo", "reconstruction", "kl", "seconds_per_epoch"):
            assert math.isfinite(r[key]), (r["prior"], key)
        # Binary images: log p(x) < 0; the ELBO is its reconstruction minus the KL.
        assert r["log_likelihood"] < 0 and r["elbo"] < 0 and r["kl"] >= -1e-4
        assert math.isclose(r["elbo"], r["reconstruction"] - r["kl"], rel_tol=1e-5, abs_tol=1e-3)
        assert 0 <= r["active_units"] <= d
        acc = {int(k): v for k, v in r["knn_accuracy"].items()}
        assert sorted(acc) == cfg["knn_k"] and all(0 <= v <= 1 for v in acc.values())
        assert r["knn_best"]["accuracy"] == max(acc.values()) and acc[r["knn_best"]["k"]] == r["knn_best"]["accuracy"]
        assert r["seconds_per_epoch"] > 0 and r["epochs_run"] == cfg["epochs"] == 1
        assert r["curves"]["epoch"] == [1] and len(r["curves"]["valid_elbo"]) == 1
        assert r["train_command"].startswith("python -m vaepriors.train --prior " + r["prior"])
    # The paired difference is the difference of the means; the Gaussian row has none to itself.
    g, e = rows
    diff = e["log_likelihood_vs_gaussian"]
    assert math.isclose(diff["mean"], e["log_likelihood"] - g["log_likelihood"], rel_tol=1e-9, abs_tol=1e-9)
    assert diff["std_error"] > 0 and "log_likelihood_vs_gaussian" not in g
    # The per-point values are kept beside each run, for pairing across invocations.
    for r in rows:
        values = torch.load(tmp / "runs" / r["prior"] / "test_log_likelihood.pt")
        assert values.shape == (cfg["n_eval"],)
        assert math.isclose(float(values.double().mean()), r["log_likelihood"], rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.slow  # trains and measures two priors (the module's tiny run)
def test_table_and_plots(tiny_run):
    cfg, results, tmp = tiny_run
    text = (tmp / "out" / "table.md").read_text()
    assert text == R.table(results)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| prior |"))
    assert "S = 5" in lines[header] and lines[header + 1].startswith("|---")
    body = lines[header + 2 : header + 4]
    assert [line.split("|")[1].strip() for line in body] == ["Gaussian", "Exemplar (subsampling)"]
    n_cols = lines[header].count("|")
    assert all(line.count("|") == n_cols for line in body)
    cells = [c.strip() for c in body[0].split("|")[1:-1]]
    ll = results["rows"][0]["log_likelihood"]
    assert cells[1].startswith(f"{ll:.2f}")
    assert cells[2] == ("-84.45" if cfg["dataset"] == "mnist" else "")  # the paper's column
    assert R.DESCRIPTIONS["tiny"] in text
    if not HAVE_MATPLOTLIB:  # the plots are optional (the "plot" extra)
        assert not (tmp / "out" / "curves.png").exists()
        return
    for name in ("curves.png", "loglik.png", "samples.png"):
        assert _is_png(tmp / "out" / name), name
        assert (tmp / "static" / f"reproduce_tiny_{name}").read_bytes() == (tmp / "out" / name).read_bytes()


def test_train_config_per_prior(tmp_path):
    cfg = R.resolve("cpu-short")
    for prior in R.PRIORS:
        config = R.train_config(cfg, prior, tmp_path / prior, device="cpu", data_dir=None, progress=False)
        assert (config.prior, config.n_train, config.n_eval, config.epochs, config.lr) == (prior, 5000, 1000, 10, 2e-3)
        assert config.eval_samples == 0  # the benchmark measures the log-likelihood itself
        assert config.exemplar_subsample == {"exemplar": "half", "exemplar-rat": "all"}.get(prior)
        assert R.training.exemplar_subsample_size(config, 5000) == (2500 if prior == "exemplar" else None)
        # The recorded command line gives the same run.
        assert train.parse_args(train.to_argv(config)) == config


def test_coreset_components_override_only_the_coreset(tmp_path):
    cfg = R.resolve("cpu-long", coreset_components=1500)
    sizes = {p: R.train_config(cfg, p, tmp_path / p, device="cpu", data_dir=None, progress=False).components
             for p in ("mog", "vamp", "coreset")}  # fmt: skip
    assert sizes == {"mog": 500, "vamp": 500, "coreset": 1500}
    assert R.coreset_size(R.resolve("cpu-long")) == 500  # unset: the mixtures' size


@pytest.mark.parametrize("flag, value", [("--coreset-components", "0"), ("--exemplar-subsample", "401")])
def test_size_overrides_are_checked(tmp_path, capsys, flag, value):
    assert R.main(["--config", "tiny", flag, value, "--out", str(tmp_path / "out")]) == 2
    assert f"{flag} must be between 1 and the 400 training images, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_paired_difference_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    d = [x - y for x, y in zip(a.tolist(), b.tolist())]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
    out = R.paired_difference(a.float(), b.float())
    assert math.isclose(out["mean"], mean, abs_tol=1e-6) and math.isclose(out["std_error"], se, rel_tol=1e-5)


def test_missing_mnist_skips_cleanly(tmp_path, capsys):
    assert R.main(["--config", "cpu-short", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "skipped: no MNIST" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_unknown_prior_is_an_error(tmp_path):
    with pytest.raises(R.vp.VAEPriorsError, match="priors"):
        R.run_benchmark(R.resolve("tiny"), ["nope"], tmp_path, runs=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(R.vp.VAEPriorsError, match="CUDA is not available"):
        R.run_benchmark(R.resolve("gpu-full"), ["gaussian"], tmp_path, runs=tmp_path)
