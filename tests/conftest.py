"""Options --device and --dtype, hypothesis settings sized for a 2-core CI machine, and where MNIST is."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device the tests run on (cpu, cuda, ...)")
    parser.addoption(
        "--dtype", default="float32,float64", help="comma-separated dtypes the contract tests run over"
    )


def pytest_configure(config: pytest.Config) -> None:
    # Triton reads TRITON_INTERPRET once, when it is first imported (torch may import it in
    # any earlier test), so a CPU run turns the interpreter on before any test runs; the fused
    # backend's kernels then run on CPU tensors.
    if torch.device(config.getoption("--device")).type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dtype" in metafunc.fixturenames:
        names = metafunc.config.getoption("--dtype").split(",")
        metafunc.parametrize("dtype", [getattr(torch, n.strip()) for n in names], ids=names)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return dev


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# MNIST for the tests that use it: $VAEPRIORS_MNIST, else the copy the project's checkout keeps
# beside the repository (the library itself looks in ~/.cache/vaepriors/mnist by default).
_SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
if not os.environ.get("VAEPRIORS_MNIST") and _SHARED_MNIST.is_dir():
    os.environ["VAEPRIORS_MNIST"] = str(_SHARED_MNIST)

# Tests that need pykeops installed (the "keops" extra) without being marked `keops` (which
# needs a working KeOps): without the extra they skip instead of failing.
_NEED_PYKEOPS = {"tests/test_engine.py::test_keops_probe_survives_a_crash"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("pykeops") is not None:
        return
    skip = pytest.mark.skip(reason="pykeops is not installed (pip install 'vaepriors[keops]')")
    for item in items:
        if item.nodeid in _NEED_PYKEOPS:
            item.add_marker(skip)
