"""The pairing of benchmarks/ablate_coreset.py's ``long`` report, on synthetic runs.

The report's differences must be per-test-point differences against the exemplar prior and
RAT trained with the same seed; checked here against float64 sums written out by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from tests._scripts import load_benchmark

A = load_benchmark("ablate_coreset")
N_TEST = 40


def _write_run(out: Path, runs: Path, priors: list[str], seed: int, gen: torch.Generator, **config) -> dict:
    """A reproduce.py output folder with per-point values under ``runs``; returns the values."""
    cfg = {"name": "cpu-long", "n_train": 100, "epochs": 2, "eval_samples": 5, "seed": seed, "components": 500,
           "coreset_components": None, "exemplar_subsample": "half", **config}  # fmt: skip
    values, rows = {}, []
    for i, prior in enumerate(priors):
        v = torch.randn(N_TEST, generator=gen, dtype=torch.float64) - 90 - i
        (runs / prior).mkdir(parents=True, exist_ok=True)
        torch.save(v.float(), runs / prior / "test_log_likelihood.pt")
        values[prior] = v.float().double()
        rows.append({"prior": prior, "label": prior.title(), "log_likelihood": float(v.mean()),
                     "log_likelihood_std_error": 0.5, "seconds_per_epoch": 10.0 * (i + 1)})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    res = {"config": cfg, "command": "python benchmarks/reproduce.py " + shlex.join(["--config", "cpu-long", "--runs", str(runs)]),
           "machine": {}, "date": "2026-12-01", "rows": rows, "dataset": "mnist",
           "sizes": {"train": 100, "valid": N_TEST, "test": N_TEST}}  # fmt: skip
    (out / "results.json").write_text(json.dumps(res))
    return values


def _mean_se(d: list[float]) -> tuple[float, float]:
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def test_long_report_pairs_with_the_same_seed(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = _write_run(tmp_path / "ref", tmp_path / "ref-runs", ["gaussian", "exemplar", "exemplar-rat", "coreset"], 0, g,
                     coreset_components=300)
    m1000 = _write_run(tmp_path / "m1000", tmp_path / "m1000-runs", ["coreset"], 0, g, coreset_components=1000)
    # An exemplar prior with another M is a row of its own, never the baseline.
    sub = _write_run(tmp_path / "sub", tmp_path / "sub-runs", ["exemplar"], 1, g, exemplar_subsample=50)
    seed1 = _write_run(tmp_path / "s1", tmp_path / "s1-runs", ["exemplar", "coreset"], 1, g)
    timing = tmp_path / "timing.txt"
    timing.write_text(json.dumps({"seconds_per_step": {"exemplar": 0.4, "cs-m300-noupdate": 0.06, "cs-m1000-noupdate": 0.1,
                                                       "x": 0.2}}))  # fmt: skip
    args = argparse.Namespace(reference=str(tmp_path / "ref"), timing=str(timing),
                              sweep=[str(tmp_path / "m1000"), str(tmp_path / "sub"), f"{tmp_path / 's1'}=note@x"])  # fmt: skip
    rep = A.long_report(args)
    rows = {r["label"]: r for r in rep["rows"]}
    assert list(rows) == ["Gaussian", "Exemplar", "Exemplar-Rat", "Coreset", "Coreset, M = 1000", "Exemplar, M = 50, seed 1",
                          "Exemplar, seed 1 (note)", "Coreset, M = 500, seed 1 (note)"]  # fmt: skip
    assert rows["Coreset"]["components"] == 300
    cases = [
        ("Coreset", ref["coreset"], ref["exemplar"], ref["exemplar-rat"]),
        ("Coreset, M = 1000", m1000["coreset"], ref["exemplar"], ref["exemplar-rat"]),
        ("Coreset, M = 500, seed 1 (note)", seed1["coreset"], seed1["exemplar"], None),  # no seed-1 RAT
    ]
    for label, v, ex, rat in cases:
        mean, se = _mean_se([a - b for a, b in zip(v.tolist(), ex.tolist())])
        got = rows[label]["vs"]["exemplar"]
        assert math.isclose(got["mean"], mean, abs_tol=1e-9) and math.isclose(got["std_error"], se, rel_tol=1e-9)
        assert ("exemplar-rat" in rows[label]["vs"]) == (rat is not None)
        if rat is not None:
            mean, _ = _mean_se([a - b for a, b in zip(v.tolist(), rat.tolist())])
            assert math.isclose(rows[label]["vs"]["exemplar-rat"]["mean"], mean, abs_tol=1e-9)
    assert "exemplar" not in rows["Exemplar"]["vs"] and "exemplar" not in rows["Exemplar, seed 1 (note)"]["vs"]
    mean, _ = _mean_se([a - b for a, b in zip(sub["exemplar"].tolist(), seed1["exemplar"].tolist())])
    assert math.isclose(rows["Exemplar, M = 50, seed 1"]["vs"]["exemplar"]["mean"], mean, abs_tol=1e-9)
    # Costs: the reference's epochs against its exemplar prior, steps from the timing file.
    assert rows["Gaussian"]["epoch_ratio"] == 10.0 / 20.0 and rows["Coreset, M = 1000"]["epoch_ratio"] is None
    assert math.isclose(rows["Coreset"]["step_ratio"], 0.06 / 0.4) and math.isclose(rows["Coreset, M = 1000"]["step_ratio"], 0.25)
    assert math.isclose(rows["Coreset, M = 500, seed 1 (note)"]["step_ratio"], 0.5)  # its timing name given after @
    text = A.long_markdown(rep)
    assert text.count("\n| ") == len(rows) + 1 and "`cpu-long`" in text


def test_long_report_refuses_what_does_not_pair(tmp_path):
    g = torch.Generator().manual_seed(1)
    _write_run(tmp_path / "ref", tmp_path / "ref-runs", ["exemplar", "coreset"], 0, g)
    _write_run(tmp_path / "lr", tmp_path / "lr-runs", ["coreset"], 0, g, lr=5e-4)
    _write_run(tmp_path / "noex", tmp_path / "noex-runs", ["coreset"], 0, g)

    def report(reference: str, *sweep: str) -> None:
        A.long_report(argparse.Namespace(reference=str(tmp_path / reference), sweep=[str(tmp_path / s) for s in sweep],
                                         timing=None))  # fmt: skip

    with pytest.raises(SystemExit, match="differs in \\['lr'\\]"):
        report("ref", "lr")
    with pytest.raises(SystemExit, match="no exemplar prior"):
        report("noex")
    with pytest.raises(SystemExit, match="no results.json"):
        report("ref", "missing")
    _write_run(tmp_path / "shared", tmp_path / "ref-runs", ["coreset"], 0, g, coreset_components=900)  # overwrites
    with pytest.raises(SystemExit, match="runs folder shared"):  # the reference's coreset values
        report("ref", "shared")
