"""The optional backends' checks and fallbacks: KeOps compile faults (missing, failing,
hanging, crashing compiler; an uncreatable cache; KeOps disabled; a compiler that breaks
after a cached success) each end in one clear warning and correct values from torch, and
no check runs code from the caller's working directory.

The real-compiler cases run KeOps' own probe in a child process against a fresh, empty
KeOps cache (``KEOPS_CACHE_FOLDER``), so that a compile actually happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from vaepriors.engine import _fused, _keops, knn, mixture_log_prob, mixture_logsumexp

ROOT = Path(__file__).resolve().parents[1]
HAS_KEOPS = __import__("importlib").util.find_spec("pykeops") is not None
keops_installed = pytest.mark.skipif(not HAS_KEOPS, reason="pykeops is not installed")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process without KeOps verdicts or warnings, with its own verdict cache; checks run
    here against an empty KeOps cache (a compile must happen)."""
    monkeypatch.setattr(_keops, "_VERDICT", {})
    monkeypatch.setattr(_keops, "_WARNED", set())
    monkeypatch.setenv("VAEPRIORS_CACHE_DIR", str(tmp_path / "vaepriors-cache"))
    monkeypatch.delenv("VAEPRIORS_KEOPS", raising=False)
    return tmp_path


@pytest.fixture
def empty_keops_cache(monkeypatch, tmp_path):
    """KeOps' cache for the checks' child processes: empty, so their formula compiles."""
    monkeypatch.setenv("KEOPS_CACHE_FOLDER", str(tmp_path / "keops-cache"))


def poison(folder: Path, name: str) -> Path:
    """A package ``name`` in ``folder`` whose import leaves a marker file and fails."""
    pkg = folder / name
    pkg.mkdir(parents=True)
    marker = folder / f"{name}-was-imported"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('poisoned {name} imported')\n")
    return marker


# where the child finds a package, without importing it
_RESOLVES = "import importlib.util as u; s = u.find_spec({name!r}); print({ok!r} if s is None or {cwd!r} not in (s.origin or '') else 'FROM_CWD')"


@pytest.mark.parametrize("pythonpath", ["", os.pathsep, "."], ids=["unset", "trailing-separator", "dot"])
def test_probes_import_nothing_from_the_working_directory(pythonpath, monkeypatch, tmp_path):
    """A ``./pykeops`` or ``./triton`` folder where the caller runs was imported and executed
    by the checks (``python -c`` puts the working directory first; the fused check's
    PYTHONPATH ended in a separator, which means the working directory too)."""
    cwd = tmp_path / "work"
    markers = [poison(cwd, "pykeops"), poison(cwd, "triton")]
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    monkeypatch.setattr(_fused, "_PROBE", _RESOLVES.format(name="triton", ok="FUSED_OK", cwd=str(cwd)))
    assert _fused._probe("float32") == (True, "")
    monkeypatch.setattr(_keops, "_PROBE", _RESOLVES.format(name="pykeops", ok="KEOPS_OK", cwd=str(cwd)))
    assert _keops._probe("cpu", "float32") == (True, "")
    assert not any(m.exists() for m in markers)


@keops_installed
@pytest.mark.slow
def test_real_keops_probe_in_a_poisoned_working_directory(monkeypatch, tmp_path):
    """KeOps' own check, run where a ``./pykeops`` would stop it: it passes, untouched."""
    cwd = tmp_path / "work"
    marker = poison(cwd, "pykeops")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PYTHONPATH", os.pathsep)
    ok, cause = _keops._probe("cpu", "float32")
    assert ok, cause
    assert not marker.exists()


@keops_installed
@pytest.mark.slow
def test_failing_compiler_shows_its_real_error(fresh, empty_keops_cache, monkeypatch):
    """``CXX=/bin/false``: KeOps prints "Compiling ... OK" on stdout and then cannot import
    the module that was never built; the cause must be that error, not KeOps' stdout."""
    monkeypatch.setenv("CXX", "/bin/false")
    ok, cause = _keops.check(torch.device("cpu"), torch.float32)
    assert not ok
    assert "ModuleNotFoundError: No module named 'pykeops_cpp_" in cause and "/bin/false" in cause, cause
    assert "Compiling" not in cause, cause
    z, mu = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.warns(RuntimeWarning, match="KeOps backend is unavailable") as seen:
        out = mixture_log_prob(z, mu, 0.0, backend="keops")
    assert sum("KeOps" in str(w.message) for w in seen) == 1
    torch.testing.assert_close(out, mixture_log_prob(z, mu, 0.0, backend="dense"))


@keops_installed
@pytest.mark.slow
def test_missing_compiler(fresh, empty_keops_cache, monkeypatch, tmp_path):
    """No ``CXX`` and no ``g++`` on ``PATH``."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    ok, cause = _keops.check(torch.device("cpu"), torch.float32)
    assert not ok and "No C++ compiler found" in cause, cause


@keops_installed
@pytest.mark.slow
def test_hanging_compiler_times_out_and_is_killed(fresh, empty_keops_cache, monkeypatch, tmp_path):
    """A compiler that never returns: the check gives up after ``VAEPRIORS_KEOPS_TIMEOUT``
    and kills the compiler with the child."""
    flag = tmp_path / "compiler-started"
    cxx = tmp_path / "sleepy-g++"
    cxx.write_text(f"#!/bin/sh\ntouch {flag}\nsleep 300\n")  # (no exec: its command line names it)
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("VAEPRIORS_KEOPS_TIMEOUT", "8")
    t0 = time.monotonic()
    ok, cause = _keops.check(torch.device("cpu"), torch.float32)
    assert not ok and "did not finish within 8 s" in cause, cause
    assert time.monotonic() - t0 < 60
    if flag.exists():  # the compiler ran: it must be gone with the child
        time.sleep(0.5)
        assert not any(str(cxx) in _cmdline(pid) for pid in os.listdir("/proc") if pid.isdigit())


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_verdict_cache_dir_cannot_be_created(fresh, monkeypatch, tmp_path):
    """The verdict cannot be saved (its folder would sit under a file): the check answers."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VAEPRIORS_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(_keops, "_probe", lambda device, dtype: (True, ""))
    assert _keops.check(torch.device("cpu"), torch.float32) == (True, "")
    with pytest.warns(RuntimeWarning, match="RuntimeError: later"):
        _keops.failed(torch.device("cpu"), torch.float64, RuntimeError("later"))  # nor can it be dropped
    assert not _keops.check(torch.device("cpu"), torch.float64)[0]


@keops_installed
@pytest.mark.slow
def test_keops_cache_dir_cannot_be_created(fresh, monkeypatch, tmp_path):
    """KeOps' own cache folder cannot be made: a failed check naming the error."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KEOPS_CACHE_FOLDER", str(blocker / "keops"))
    ok, cause = _keops.check(torch.device("cpu"), torch.float32)
    assert not ok and "NotADirectoryError" in cause, cause


def test_keops_disabled(fresh, monkeypatch):
    monkeypatch.setenv("VAEPRIORS_KEOPS", "0")
    z, mu = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.warns(RuntimeWarning, match="VAEPRIORS_KEOPS=0"):
        out = mixture_log_prob(z, mu, 0.0, backend="keops")
    torch.testing.assert_close(out, mixture_log_prob(z, mu, 0.0, backend="dense"))


def test_failure_at_run_time_falls_back_once(fresh, monkeypatch):
    """A verdict cached on disk says KeOps works, but its call fails (a compiler that broke
    since: "No module named 'pykeops_cpp_...'" on every call before). The call, its
    backward and kNN fall back to torch with one warning; the disk verdict is dropped."""
    dev, dt = torch.device("cpu"), torch.float32
    path, key = _keops._cache_file(), _keops._disk_key("cpu", "float32")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({key: True}))
    assert _keops.check(dev, dt) == (True, "")

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pykeops_cpp_0123456789'")

    monkeypatch.setattr(_keops.KeOpsLogSumExp, "apply", broken)
    monkeypatch.setattr(_keops, "_knn", broken)
    z = torch.randn(5, 3, requires_grad=True)
    mu = torch.randn(7, 3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = mixture_log_prob(z, mu, 0.0, backend="keops")
        (gz,) = torch.autograd.grad(out.sum(), z)
        again = mixture_log_prob(z, mu, 0.0, backend="keops")
        d2, idx = knn(z.detach(), mu, 2, backend="keops")
    ours = [str(w.message) for w in seen if "KeOps" in str(w.message)]
    assert len(ours) == 1 and "pykeops_cpp_0123456789" in ours[0] and "after its check had passed" in ours[0], ours
    ref = mixture_log_prob(z, mu, 0.0, backend="dense")
    (rz,) = torch.autograd.grad(ref.sum(), z)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(again, ref)
    torch.testing.assert_close(gz, rz)
    assert torch.equal(idx, knn(z.detach(), mu, 2, backend="dense")[1])
    assert key not in json.loads(path.read_text())
    assert not _keops.check(dev, dt)[0]


@keops_installed
def test_backward_failure_at_run_time_falls_back(fresh, monkeypatch):
    """The forward ran in KeOps, its backward's reductions fail: gradients from chunked."""
    monkeypatch.setitem(_keops._VERDICT, ("cpu", "float32"), (True, ""))

    def broken(*args, **kwargs):
        raise RuntimeError("[KeOps] compile failed")

    monkeypatch.setattr(_keops, "_backward", broken)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=gen, requires_grad=True)
    mu = torch.randn(8, 3, generator=gen, requires_grad=True)
    lv = torch.randn(8, 3, generator=gen).mul(0.3).requires_grad_()
    ex = torch.tensor([0, -1, 3, 7, -1, 2])
    with pytest.warns(RuntimeWarning, match="compile failed"):
        out = mixture_logsumexp(z, mu, lv, exclude=ex, backend="keops").log()
        grads = torch.autograd.grad(out.sum(), (z, mu, lv))
    ref = mixture_logsumexp(z, mu, lv, exclude=ex, backend="dense").log()
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), (z, mu, lv))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


_BROKEN_AFTER_SUCCESS = textwrap.dedent(
    r"""
    import json, warnings, torch
    from vaepriors.engine import _keops, mixture_log_prob
    path = _keops._cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({_keops._disk_key("cpu", "float32"): True}))  # an earlier success
    z, mu = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = mixture_log_prob(z, mu, 0.0, backend="keops")
        out.sum().backward()
        mixture_log_prob(z, mu, 0.0, backend="keops")
    ours = [str(w.message) for w in seen if "KeOps" in str(w.message)]
    assert len(ours) == 1, ours
    ref = mixture_log_prob(z.detach(), mu, 0.0, backend="dense")
    torch.testing.assert_close(out.detach(), ref)
    assert torch.isfinite(z.grad).all()
    assert _keops._disk_key("cpu", "float32") not in json.loads(path.read_text())
    print("FELL_BACK", ours[0])
    """
)


@keops_installed
@pytest.mark.slow
def test_compiler_broken_after_a_cached_success(tmp_path):
    """The real thing, in a fresh interpreter: a success cached on disk, then CXX points at
    a compiler that fails and KeOps' cache is empty, so its first formula must compile."""
    env = dict(
        os.environ,
        CXX="/bin/false",
        KEOPS_CACHE_FOLDER=str(tmp_path / "keops"),
        VAEPRIORS_CACHE_DIR=str(tmp_path / "vaepriors"),
        PYTHONPATH=str(ROOT),
    )
    res = subprocess.run(
        [sys.executable, "-c", _BROKEN_AFTER_SUCCESS], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert res.returncode == 0 and "FELL_BACK" in res.stdout, (res.stdout[-2000:], res.stderr[-3000:])
    assert "No module named" in res.stdout or "Error" in res.stdout, res.stdout[-2000:]


def test_verdict_is_keyed_by_the_compiler_keops_will_find(monkeypatch, tmp_path):
    """The disk verdict was keyed by ``CXX`` but not by what ``PATH`` finds: another g++ first
    on PATH reused the old success. The key names the compiler file (and its size and time)."""
    monkeypatch.delenv("CXX", raising=False)
    before = _keops._disk_key("cpu", "float32")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "g++").write_text("#!/bin/sh\nexit 1\n")
    (other / "g++").chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}{os.pathsep}{os.environ['PATH']}")
    assert _keops._disk_key("cpu", "float32") != before
    assert str(other / "g++") in _keops._disk_key("cpu", "float32")
