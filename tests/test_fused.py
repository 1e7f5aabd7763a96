"""The fused Triton backend against a float64 dense difference-form reference.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here for this
module only) with 16 x 16 tiles, so the small shapes below (B = 37, N = 53: not multiples of
the tile) cover edge tiles, several tiles per row and column, and the near-pair path. With
``--device cuda`` the same tests run the compiled kernels. Skipped when Triton is absent.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vaepriors.engine import _auto, _fused, knn, mixture_log_prob, mixture_logsumexp
from vaepriors.engine.reduce import _resolve

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

B, N, D = 37, 53, 5


@pytest.fixture(scope="module", autouse=True)
def _interpreter(request: pytest.FixtureRequest):
    """CPU runs need the interpreter (conftest also sets it before Triton can be imported)."""
    saved = os.environ.get("TRITON_INTERPRET")
    if torch.device(request.config.getoption("--device")).type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture
def dev(device: torch.device) -> torch.device:
    if device.type == "cuda" and not _fused.available(device, torch.float32, warn=False):
        pytest.skip(f"fused backend unavailable: {_fused.check(device, torch.float32)[1]}")
    return device


def reference(z, means, log_var, log_weights=None, exclude=None):
    """float64 dense difference form: log sum_{j != e_i} w_j N(z_i; mu_j, s_j^2 I)."""
    d = z.shape[-1]
    lv = log_var.expand(means.shape[0]) if log_var.dim() == 0 else log_var
    sq = (z[:, None, :] - means[None, :, :]).square().sum(-1)
    arg = -0.5 * sq * torch.exp(-lv) - 0.5 * d * (math.log(2 * math.pi) + lv)
    if log_weights is not None:
        arg = arg + log_weights
    if exclude is not None:
        hit = torch.arange(means.shape[0], device=z.device)[None, :] == exclude[:, None]
        arg = arg.masked_fill(hit, -math.inf)
    return torch.logsumexp(arg, 1)


def run(fn, inputs, dtype, **kw):
    """Value and gradients (z, means, log_var, log_weights) of ``fn(...).sum()``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, **kw)
    out.masked_fill(~torch.isfinite(out), 0).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def fused(z, means, log_var, log_weights=None, exclude=None):
    return mixture_logsumexp(z, means, log_var, log_weights, exclude, backend="fused").log()


def compare(inputs, exclude, dtype, tol_v, tol_g):
    out, grads = run(fused, inputs, dtype, exclude=exclude)
    ref, ref_grads = run(reference, inputs, torch.float64, exclude=exclude)
    assert torch.isfinite(out).all()
    assert torch.all((out.double() - ref).abs() <= tol_v * ref.abs().clamp_min(1))
    for name, g, r in zip(("z", "means", "log_var", "log_weights"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)
        assert err <= tol_g, (name, err.item())


TOL = {torch.float32: (2e-6, 2e-5), torch.float64: (1e-12, 1e-10)}


def inputs(dev, scale="scalar", n=N, b=B, d=D, spread=1.0):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(b, d, generator=g, dtype=torch.float64) * spread
    mu = torch.randn(n, d, generator=g, dtype=torch.float64) * spread
    if scale == "scalar":
        lv = torch.tensor(0.3, dtype=torch.float64)
    else:
        lv = torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    lw = torch.log_softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    ex = torch.randint(-1, n, (b,), generator=g)
    return [t.to(dev) for t in (z, mu, lv, lw)], ex.to(dev)


@pytest.mark.parametrize("scale", ["scalar", "per_component"])
def test_values_and_gradients(dev, dtype, scale):
    ins, ex = inputs(dev, scale)
    compare(ins, ex, dtype, *TOL[dtype])
    compare(ins, None, dtype, *TOL[dtype])


def test_mixture_log_prob_uniform_weights_matches_reference(dev):
    ins, ex = inputs(dev)
    z, mu, lv = (t.float() for t in ins[:3])
    out = mixture_log_prob(z, mu, lv, exclude=ex, backend="fused")
    kept = N - (ex >= 0).double()
    ref = reference(*(t.double() for t in (z, mu, lv)), exclude=ex) - kept.log()
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6)


def test_leave_one_out_excludes_a_component_dominating_by_100_nats(dev):
    # Each query sits on its own component with a variance small enough that the self term
    # beats every other by > 100 nats: a kernel that kept it would be off by ~100.
    ins, _ = inputs(dev, n=B)
    z, mu, _, lw = ins
    z = mu.clone()
    lv = torch.tensor(-8.0, dtype=torch.float64, device=dev)
    ex = torch.arange(B, device=dev)
    gap = reference(z, mu, lv, lw) - reference(z, mu, lv, lw, ex)
    assert gap.min() > 100
    for dtype in (torch.float32, torch.float64):
        compare([z, mu, lv, lw], ex, dtype, *TOL[dtype])


def test_zero_weights_and_empty_rows(dev):
    ins, _ = inputs(dev, n=20)
    z, mu, lv, lw = ins
    lw = lw.clone()
    lw[::3] = -math.inf
    ex = torch.randint(-1, 20, (B,), device=dev)
    compare([z, mu, lv, lw], ex, torch.float32, *TOL[torch.float32])
    # one live component, excluded for some queries: those rows are empty (-inf), not NaN
    only = torch.full((20,), -math.inf, dtype=torch.float64, device=dev)
    only[7] = 0.0
    ex = torch.where(torch.arange(B, device=dev) % 2 == 0, 7, -1)
    out, grads = run(fused, [z, mu, lv, only], torch.float32, exclude=ex)
    ref = reference(z, mu, lv, only, ex)
    assert torch.isneginf(out[::2]).all() and torch.isneginf(ref[::2]).all()
    torch.testing.assert_close(out[1::2].double(), ref[1::2], rtol=2e-6, atol=2e-6)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("log_var", [-12.0, 12.0])
def test_extreme_scales_and_far_queries(dev, log_var):
    ins, ex = inputs(dev)
    z, mu, _, lw = ins
    lv = torch.tensor(log_var, dtype=torch.float64, device=dev)
    compare([z * 1e3, mu, lv, lw], ex, torch.float32, 2e-6, 1e-4)
    compare([z, mu, lv, lw], ex, torch.float32, 2e-6, 1e-4)


def test_near_points_keep_float32_accuracy(dev):
    # |mu| ~ 10 and queries within 1e-3 of a mean: the expansion alone cancels to ~1e-2
    # relative error in the distance; the kernel's difference-form recompute must not.
    g = torch.Generator().manual_seed(2)
    mu = (10 + torch.randn(N, D, generator=g)).to(torch.float32)
    z = mu[torch.randint(0, N, (B,), generator=g)] + 1e-3 * torch.randn(B, D, generator=g) / math.sqrt(D)
    lv = torch.tensor(-8.0)  # sigma ~ 0.02: the distance to the nearest mean dominates the value
    lw = torch.zeros(N)
    ins = [t.double().to(dev) for t in (z, mu, lv, lw)]  # the float32 inputs, exactly
    out, grads = run(fused, ins, torch.float32)
    ref, ref_grads = run(reference, ins, torch.float64)
    rel = ((out.double() - ref).abs() / ref.abs()).max().item()
    assert rel < 1e-5, rel
    # per-query gradient of z (dominated by the near pair): relative error per row
    gz, rz = grads[0].double(), ref_grads[0]
    assert ((gz - rz).norm(dim=1) / rz.norm(dim=1)).max() < 1e-4


@settings(max_examples=6)
@given(
    b=st.integers(1, 40),
    n=st.integers(1, 40),
    d=st.integers(1, 20),
    log_var=st.floats(-6, 6),
    spread=st.floats(0.01, 100),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(b, n, d, log_var, spread, seed):
    compiled = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
    dev = torch.device("cuda" if compiled else "cpu")
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, d, generator=g) * spread).double().to(dev)
    mu = (torch.randn(n, d, generator=g) * spread).double().to(dev)
    lv = torch.tensor(log_var, dtype=torch.float64, device=dev)
    ex = torch.randint(-1, n, (b,), generator=g).to(dev) if n > 1 else None
    out = fused(z.float(), mu.float(), lv.float(), exclude=ex)
    ref = reference(z, mu, lv, exclude=ex)
    assert torch.all((out.double() - ref).abs() <= 1e-5 * ref.abs().clamp_min(1))


def test_diagonal_scales_and_knn_go_to_chunked(dev):
    ins, ex = inputs(dev)
    z, mu = ins[0].float(), ins[1].float()
    lv = 0.3 * torch.randn(N, D, device=dev)
    out = mixture_logsumexp(z, mu, lv, exclude=ex, backend="fused").log()
    ref = mixture_logsumexp(z, mu, lv, exclude=ex, backend="dense").log()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    d2, idx = knn(z, mu, 4, ex, backend="fused")
    d2c, idxc = knn(z, mu, 4, ex, backend="chunked")
    assert torch.equal(idx, idxc) and torch.equal(d2, d2c)


def test_without_interpreter_on_cpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_fused, "_WARNED", set())
    ok, cause = _fused.check(torch.device("cpu"), torch.float32)
    assert not ok and "TRITON_INTERPRET" in cause
    z = torch.zeros(3, 2)
    with pytest.warns(RuntimeWarning, match="fused backend is unavailable"):
        assert _resolve("fused", "logsumexp", 3, 4, 2, z, False, 1 << 20) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        assert _resolve("fused", "logsumexp", 3, 4, 2, z, False, 1 << 20) == "chunked"
    assert not _fused.check(torch.device("cpu"), torch.float16)[0]


def test_auto_picks_fused_only_when_measured_and_isotropic(monkeypatch):
    cuda = torch.device("cuda")
    args = ("logsumexp", cuda, torch.float32, 10_000, 60_000, 40, True, 256 * 2**20)
    monkeypatch.setattr(_fused, "available", lambda *a, **k: True)
    monkeypatch.setattr(_auto, "KEOPS_ROWS", 10**9)  # keep KeOps' check out of this test
    assert _auto.FUSED_MEASURED is False
    assert _auto.choose(*args) != "fused"
    monkeypatch.setattr(_auto, "FUSED_MEASURED", True)
    assert _auto.choose(*args) == "fused"
    assert _auto.choose(*args, isotropic=False) != "fused"
    assert _auto.choose("knn", *args[1:]) != "fused"
    assert _auto.choose(*args[:1], torch.device("cpu"), *args[2:]) != "fused"


def test_peak_memory_is_measured_below_the_estimate_and_one_b_by_n_matrix(dev, tmp_path, monkeypatch):
    """Forward and backward allocate O((B + N) d) on the device, never B x N: measured by
    the CUDA allocator's peak on a GPU, by torch's CPU allocator (the profiler) under the
    interpreter, whose tiles are not torch tensors (on a GPU they live in registers)."""
    from tests.test_engine_memory import allocator_peak

    monkeypatch.setattr(_fused, "PROGRAMS_INTERPRET", 1)  # no split launches: the tiny shape shows B x N
    b, n, d = (2048, 16384, 40) if dev.type == "cuda" else (64, 64, 2)
    g = torch.Generator().manual_seed(0)
    z, mu = (torch.randn(k, d, generator=g).to(dev).requires_grad_() for k in (b, n))
    lv = torch.tensor(0.3, device=dev, requires_grad=True)
    returned = (b + n) * d * 4 + 4

    def call():
        out = mixture_logsumexp(z, mu, lv, backend="fused").log()
        torch.autograd.grad(out.sum(), (z, mu, lv))

    if dev.type == "cuda":
        call()  # compile first
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        call()
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = allocator_peak(call, tmp_path / "trace.json")
    estimate = _fused.memory(b, n, d, 4, 1 << 20, dev, True)
    assert peak - returned <= 1.1 * estimate, (peak, estimate)
    assert peak - returned < b * n * 4 / 2  # half of one B x N float32 matrix
    for bb, nn in ((10_000, 60_000), (100, 1_000_000)):  # the estimate itself has no B x N term
        assert _fused.memory(bb, nn, 40, 4, 1 << 20, dev, True) < bb * nn * 4 / 4


@pytest.mark.parametrize("programs", [1, 2, 7, 1000])
def test_split_launches_combine_exactly(dev, programs, monkeypatch):
    """Kernels split the dimension they loop over into parts (to fill a GPU at small B);
    any number of parts gives the same values and gradients."""
    monkeypatch.setattr(_fused, "PROGRAMS_INTERPRET", programs)
    monkeypatch.setattr(_fused, "PROGRAMS_PER_SM", max(1, programs // 100))
    _fused._device_programs.cache_clear()
    try:
        ins, ex = inputs(dev, "per_component")
        compare(ins, ex, torch.float32, *TOL[torch.float32])
    finally:
        _fused._device_programs.cache_clear()


@pytest.mark.parametrize("outer,tile,inner,step,programs", [(37, 16, 53, 16, 6), (100, 64, 10**6, 64, 528), (10**4, 64, 6 * 10**4, 64, 528), (5, 16, 3, 16, 100)])
def test_split_covers_the_loop_once(outer, tile, inner, step, programs):
    tiles, parts, chunk = _fused._split(outer, tile, inner, step, programs)
    assert tiles * tile >= outer > (tiles - 1) * tile
    assert chunk % step == 0 and parts * chunk >= inner > (parts - 1) * chunk  # no empty part
    assert parts == 1 or tiles * (parts - 1) < programs


def test_triton_is_not_imported_unless_the_fused_kernels_run(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, warnings, torch\n"
        "from vaepriors.engine import knn, mixture_logsumexp\n"
        "z, mu = torch.randn(5, 3), torch.randn(7, 3)\n"
        "mixture_logsumexp(z, mu, 0.0)\n"
        "knn(z, mu, 2)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore')\n"
        "    mixture_logsumexp(z, mu, 0.0, backend='fused')\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


_COMPILE = r"""
import torch
from vaepriors.engine import _fused
for name in ("fwd", "bwd_rows", "bwd_cols"):
    for dtype in (torch.float32, torch.float64):
        for d in (5, 40):
            kernel = _fused.compile_for(name, 90, dtype, d=d)
            assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024, (name, dtype, d)
print("COMPILED")
"""


def test_kernels_compile_for_hopper():
    """The kernels, in their GPU launch configuration, compile to sm_90 machine code with
    Triton's ptxas (no GPU needed): what the interpreter never checks (tl.dot shapes, types,
    shared memory)."""
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("Triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0 and "COMPILED" in res.stdout, res.stderr[-3000:]
