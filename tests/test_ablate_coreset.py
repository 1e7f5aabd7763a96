"""The pairing of benchmarks/ablate_coreset.py's ``long`` report, on synthetic runs.

The report's differences must be per-test-point differences against the exemplar prior and
RAT trained with the same seed; checked here against float64 sums written out by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("ablate_coreset", ROOT / "benchmarks" / "ablate_coreset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ablate_coreset", module)
    spec.loader.exec_module(module)
    return module


A = _load_script()
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
    res = {"config": cfg, "command": f"python benchmarks/reproduce.py --config cpu-long --runs {runs}",
           "machine": {}, "date": "2026-12-01", "rows": rows}  # fmt: skip
    (out / "results.json").write_text(json.dumps(res))
    return values


def _mean_se(d: list[float]) -> tuple[float, float]:
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def test_long_report_pairs_with_the_same_seed(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = _write_run(tmp_path / "ref", tmp_path / "ref-runs", ["gaussian", "exemplar", "exemplar-rat", "coreset"], 0, g)
    m1000 = _write_run(tmp_path / "m1000", tmp_path / "m1000-runs", ["coreset"], 0, g, coreset_components=1000)
    seed1 = _write_run(tmp_path / "s1", tmp_path / "s1-runs", ["exemplar", "coreset"], 1, g)
    timing = tmp_path / "timing.txt"
    timing.write_text(json.dumps({"seconds_per_step": {"exemplar": 0.4, "cs-default": 0.06, "cs-m1000-noupdate": 0.1}}))
    args = argparse.Namespace(reference=str(tmp_path / "ref"), sweep=[str(tmp_path / "m1000"), f"{tmp_path / 's1'}=note"],
                              timing=str(timing))  # fmt: skip
    rep = A.long_report(args)
    rows = {r["label"]: r for r in rep["rows"]}
    assert list(rows) == ["Gaussian", "Exemplar", "Exemplar-Rat", "Coreset", "Coreset, M = 1000",
                          "Exemplar, seed 1 (note)", "Coreset, M = 500, seed 1 (note)"]  # fmt: skip
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
    # Costs: the reference's epochs against its exemplar prior, steps from the timing file.
    assert rows["Gaussian"]["epoch_ratio"] == 10.0 / 20.0 and rows["Coreset, M = 1000"]["epoch_ratio"] is None
    assert math.isclose(rows["Coreset"]["step_ratio"], 0.06 / 0.4) and math.isclose(rows["Coreset, M = 1000"]["step_ratio"], 0.25)
    text = A.long_markdown(rep)
    assert text.count("\n| ") == len(rows) + 1 and "`cpu-long`" in text
