"""vaepriors.distributed on real gloo process groups, against single-process float64 references.

Starting ranks costs time, so one run of three ranks makes every correctness check and returns
what each rank saw; the tests below compare that with references computed here, in one process.
Failure modes (a rank that never joins, a rank that dies) and the harness get runs of their own.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from tests._distributed import RankFailure, needs_gloo, run_ranks
from vaepriors import distributed as D
from vaepriors.engine._core import safe_shift
from vaepriors.errors import VAEPriorsError

WORLD = 3
ROWS = [2, 0, 3]  # rows per rank in the world of 3: rank 1 holds none
SUB_ROWS = [3, 1]  # rows per rank in the subgroup of ranks 0 and 1
DIM = 4
BATCH = 5  # log-sum-exp queries
COMPONENTS = [3, 0, 2]  # log-sum-exp components per rank


def close(got: torch.Tensor, expect: torch.Tensor, rtol: float = 0.0) -> None:
    """Same shape and dtype, and |got - expect| <= rtol |expect| (infinities must match).
    (torch.testing.assert_close costs 2 s on its first call.)"""
    assert (got.shape, got.dtype) == (expect.shape, expect.dtype)
    err = (got - expect).abs().nan_to_num()
    assert torch.allclose(got, expect, rtol=rtol, atol=0), f"max abs error {err.max() if err.numel() else 0}"


# ----------------------------------------------------------------------------- inputs
# Every input is a function of the rank: the ranks build theirs, the references all of them.


def _gen(rank: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * salt + rank)


def rows_of(rank: int, n: int, salt: int = 0) -> torch.Tensor:
    return torch.randn(n, DIM, generator=_gen(rank, salt), dtype=torch.float64)


def weights_of(rank: int, salt: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(rank, 100 + salt), dtype=torch.float64)


def components_of(rank: int, n: int) -> torch.Tensor:
    """[BATCH, n] exponents: row 1 puts rank 0 ~1e4 above rank 2, row 2 rank 2
    ~1e4 above rank 0, row 3 has exponents around +-3e4 (exp overflows float64 directly), row 4
    is empty on every rank."""
    c = 3 * torch.randn(BATCH, n, generator=_gen(rank, 7), dtype=torch.float64)
    c[1] += {0: 5e3, 1: 0.0, 2: -5e3}[rank]
    c[2] += {0: -5e3, 1: 0.0, 2: 5e3}[rank]
    c[3] += 3e4 * (1 if rank == 0 else -1)
    c[4] = -math.inf
    return c


def partial_of(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (max without gradient, shifted sum), as engine._core.LogSumExp holds it."""
    if c.shape[1] == 0:  # exp(c).sum(1): zeros that keep c in the graph (its gradient is [B, 0])
        return torch.full((c.shape[0],), -math.inf, dtype=c.dtype), torch.exp(c).sum(1)
    m = c.detach().amax(1)
    return m, torch.exp(c - safe_shift(m)[:, None]).sum(1)


def gather_loss(rank: int, gathered: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
    """Rank ``rank``'s loss: uses every gathered row and the all-reduced sum, with weights of its own."""
    w = weights_of(rank, 1, *gathered.shape)
    v = weights_of(rank, 2, DIM)
    return (w * torch.tanh(gathered)).sum() + torch.sin(v * summed).sum()


def own_loss(rank: int, mine: torch.Tensor) -> torch.Tensor:
    """A loss that uses only the rank's own rows."""
    return (weights_of(rank, 3, *mine.shape) * torch.cos(mine)).sum()


# ----------------------------------------------------------------------------- the spawned run


def _checks(rank: int, world_size: int) -> dict:
    c = D.comm()
    out: dict = {"comm": (c.rank, c.world_size, c.group), "off": D.comm(enabled=False)}
    what = "test_distributed"

    # all_gather_rows: unequal sizes (rank 1 empty), equal sizes, empty everywhere, bool.
    out["gather"] = D.all_gather_rows(rows_of(rank, ROWS[rank]), c, what)
    out["equal"] = D.all_gather_rows(rows_of(rank, 2).view(2, 2, 2), c, what)
    out["empty"] = D.all_gather_rows(torch.zeros(0, DIM), c, what)
    out["bool"] = D.all_gather_rows(torch.tensor([rank % 2 == 0] * rank, dtype=torch.bool), c, what)

    # Mismatched trailing shape, then dtype: every rank raises, and the group stays in step.
    bad = rows_of(rank, 1) if rank != 2 else torch.zeros(1, DIM + 1, dtype=torch.float64)
    out["shape_error"] = _error(lambda: D.all_gather_rows(bad, c, what + ": mismatched shapes"))
    bad = rows_of(rank, 1).to(torch.float32 if rank == 1 else torch.float64)
    out["dtype_error"] = _error(lambda: D.all_gather_rows(bad, c, what + ": mismatched dtypes"))

    # A world of 2: the subgroup of ranks 0 and 1 (rank 2 must still call new_group).
    sub = dist.new_group([0, 1])
    if rank < 2:
        c2 = D.comm(sub)
        out["sub"] = D.all_gather_rows(rows_of(rank, SUB_ROWS[rank]), c2, what)
        out["sub_lse"] = _lse(rank, c2, [3, 2][rank])
    else:
        out["not_member"] = _error(lambda: D.comm(sub))

    # Gradients: every rank's loss uses every gathered row and the all-reduced sum.
    t = rows_of(rank, ROWS[rank], salt=1).requires_grad_()
    gathered, rows = D.gather_rows(t, c, what)
    summed = D.all_reduce_sum(t.square().sum(0), c, what)
    gather_loss(rank, gathered, summed).backward()
    out["grad_all"] = (t.grad, rows)
    # ... and one where each rank's loss uses its own rows only.
    t = rows_of(rank, ROWS[rank], salt=2).requires_grad_()
    gathered, rows = D.gather_rows(t, c, what)
    start = sum(rows[:rank])
    own_loss(rank, gathered[start : start + rows[rank]]).backward()
    out["grad_own"] = t.grad

    out["lse"] = _lse(rank, c, COMPONENTS[rank])
    out["max"] = D.all_reduce_max(torch.tensor([float(rank), -float(rank), -math.inf]), c, what)

    x = torch.full((3, 2), float(rank)).T  # not contiguous: broadcast must still write into it
    out["broadcast"] = (D.broadcast(x, c, what, src=1) is x, x.clone())
    g = D.sync_generator(torch.Generator().manual_seed(10 + rank), c, what)
    out["generator"] = torch.rand(4, generator=g)
    return out


def _error(fn) -> str:
    try:
        fn()
    except VAEPriorsError as err:
        return str(err)
    return "no error"


def _lse(rank: int, c: D.Comm, n: int) -> dict:
    comps = components_of(rank, n).requires_grad_()
    m, s = partial_of(comps)
    value = D.logsumexp_across(m, s, c, "test_distributed: logsumexp_across")
    u = weights_of(rank, 4, BATCH)
    (u * value.masked_fill(torch.isinf(value), 0)).sum().backward()
    # The same through leaf partial sums.
    s = s.detach().requires_grad_()
    (u * D.logsumexp_across(m, s, c, "test").masked_fill(torch.isinf(value), 0)).sum().backward()
    return {"value": value.detach(), "grad": comps.grad, "grad_sum": s.grad, "partial": (m, s.detach())}


@pytest.fixture(scope="module")
def world():
    return run_ranks(_checks, WORLD)


# ----------------------------------------------------------------------------- references


def lse_reference(ranks: list[int], counts: list[int]) -> dict:
    comps = [components_of(r, n).requires_grad_() for r, n in zip(ranks, counts)]
    full = torch.cat(comps, 1)
    live = ~torch.isneginf(full).all(1)
    value = torch.full((BATCH,), -math.inf, dtype=torch.float64)
    value[live] = torch.logsumexp(full[live], 1)
    us = [weights_of(r, 4, BATCH) for r in ranks]
    loss = sum((u * value.masked_fill(~live, 0)).sum() for u in us)
    grads = torch.autograd.grad(loss, comps)
    return {"value": value.detach(), "grads": grads, "live": live, "u": sum(us)}


@needs_gloo
def test_comm(world):
    for rank, out in enumerate(world):
        assert out["comm"] == (rank, WORLD, None)
        assert out["off"] is None
    assert "does not contain this process" in world[2]["not_member"]


@needs_gloo
def test_all_gather_rows_unequal_sizes(world):
    expect = torch.cat([rows_of(r, n) for r, n in enumerate(ROWS)])
    sub = torch.cat([rows_of(r, n) for r, n in enumerate(SUB_ROWS)])
    for rank, out in enumerate(world):
        got, rows = out["gather"]
        assert rows == ROWS and got.dtype == torch.float64
        close(got, expect)
        got, rows = out["equal"]
        close(got, torch.cat([rows_of(r, 2).view(2, 2, 2) for r in range(WORLD)]))
        got, rows = out["empty"]
        assert got.shape == (0, DIM) and rows == [0, 0, 0]
        got, rows = out["bool"]
        assert got.tolist() == [False, True, True] and rows == [0, 1, 2]
        if rank < 2:
            got, rows = out["sub"]
            assert rows == SUB_ROWS
            close(got, sub)


@needs_gloo
def test_all_gather_rows_mismatch_is_an_error_on_every_rank(world):
    for out in world:
        msg = out["shape_error"]
        assert "mismatched shapes" in msg
        assert "rank 0: [*, 4] torch.float64" in msg and "rank 2: [*, 5] torch.float64" in msg
        msg = out["dtype_error"]
        assert "mismatched dtypes" in msg and "rank 1: [*, 4] torch.float32" in msg


@needs_gloo
def test_gradients_when_every_loss_uses_every_row(world):
    # The gradient of the sum of every rank's loss, in one process.
    ts = [rows_of(r, n, salt=1).requires_grad_() for r, n in enumerate(ROWS)]
    gathered = torch.cat(ts)
    summed = sum(t.square().sum(0) for t in ts)
    loss = sum(gather_loss(r, gathered, summed) for r in range(WORLD))
    expect = torch.autograd.grad(loss, ts)
    for rank, out in enumerate(world):
        grad, rows = out["grad_all"]
        assert rows == ROWS
        close(grad, expect[rank], rtol=1e-12)


@needs_gloo
def test_gradients_when_each_loss_uses_its_own_rows(world):
    for rank, out in enumerate(world):
        t = rows_of(rank, ROWS[rank], salt=2).requires_grad_()
        (expect,) = torch.autograd.grad(own_loss(rank, t), t)
        close(out["grad_own"], expect, rtol=1e-12)


@needs_gloo
@pytest.mark.parametrize("group", ["world", "subgroup"])
def test_logsumexp_across(world, group):
    ranks, counts = ([0, 1, 2], COMPONENTS) if group == "world" else ([0, 1], [3, 2])
    ref = lse_reference(ranks, counts)
    assert torch.isinf(ref["value"][4]) and ref["value"][:4].abs().min() > 0
    for rank in ranks:
        got = world[rank]["lse" if group == "world" else "sub_lse"]
        close(got["value"], ref["value"], rtol=1e-14)
        close(got["grad"], ref["grads"][rank], rtol=1e-12)
        # d value / d sum_r = exp(max_r - value), times the weights of every rank's loss.
        m, _ = got["partial"]
        expect = torch.where(ref["live"], torch.exp(m - ref["value"]) * ref["u"], torch.zeros_like(m))
        close(got["grad_sum"], expect, rtol=1e-12)
        assert torch.isfinite(got["grad"]).all() and torch.isfinite(got["grad_sum"]).all()


@needs_gloo
def test_max_broadcast_and_generator(world):
    expect = torch.Generator().manual_seed(10)
    expect = torch.rand(4, generator=expect)
    for out in world:
        assert out["max"].tolist() == [2.0, 0.0, -math.inf]
        same, x = out["broadcast"]
        assert same and x.tolist() == [[1.0] * 3] * 2
        assert torch.equal(out["generator"], expect)


# ----------------------------------------------------------------------------- failures


def _never_joins(rank: int, world_size: int, marker: str) -> dict | None:
    if rank == 1:  # alive, never calls: waits for rank 0 to be done
        end = time.monotonic() + 30
        while not os.path.exists(marker) and time.monotonic() < end:
            time.sleep(0.05)
        return None
    D.set_timeout(2)
    start = time.monotonic()
    try:
        D.all_gather_rows(torch.ones(2, 3), D.comm(), "test: rank 1 never joins")
    except VAEPriorsError as err:
        return {"elapsed": time.monotonic() - start, "message": str(err), "cause": repr(err.__cause__)}
    finally:
        open(marker, "w").close()


def _dies(rank: int, world_size: int) -> dict | None:
    D.set_timeout(10)
    c = D.comm()
    D.all_gather_rows(torch.ones(rank + 1, 2), c, "test: before")
    if rank == 1:
        os._exit(3)
    start = time.monotonic()
    try:
        D.all_reduce_sum(torch.ones(2), c, "test: after rank 1 died")
    except VAEPriorsError as err:
        return {"elapsed": time.monotonic() - start, "message": str(err), "cause": repr(err.__cause__)}


@needs_gloo
def test_a_rank_that_never_joins_gives_an_error_not_a_hang(tmp_path):
    out, _ = run_ranks(_never_joins, 2, str(tmp_path / "done"))
    assert out is not None, "no error"
    assert 1.9 < out["elapsed"] < 20
    msg = out["message"]
    for part in ["test: rank 1 never joins", "all_gather of row counts", "rank 0 of 2", "timeout 2 s"]:
        assert part in msg
    assert "a rank exited or did not reach the same call" in msg
    assert "timed out" in out["cause"]


@needs_gloo
def test_a_rank_that_dies_gives_an_error_not_a_hang():
    out, _ = run_ranks(_dies, 2, exits=(1,))
    assert out is not None, "no error"
    assert out["elapsed"] < 20
    assert "test: after rank 1 died" in out["message"] and "all_reduce (sum)" in out["message"]
    assert "rank 0 of 2" in out["message"]


# ----------------------------------------------------------------------------- the harness


def _fails_or_hangs(rank: int, world_size: int) -> None:
    # Both ranks connected first: otherwise rank 1 may fail its own rendezvous once rank 0 is
    # gone, and report an error rather than still running.
    torch.distributed.barrier()
    if rank == 0:
        raise ValueError("boom on rank 0")
    time.sleep(600)


def _hangs(rank: int, world_size: int) -> None:
    time.sleep(600)


@needs_gloo
def test_harness_reports_a_failing_rank_and_kills_the_rest():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank 0 raised:.*ValueError: boom on rank 0.*rank 1 still running"):
        run_ranks(_fails_or_hangs, 2)
    assert time.monotonic() - start < 30


@needs_gloo
def test_harness_deadline():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="did not finish within 2 s"):
        run_ranks(_hangs, 1, timeout=2)
    assert time.monotonic() - start < 10


# ----------------------------------------------------------------------------- single process


def test_single_process_is_the_identity():
    assert D.comm() is None and D.comm(enabled=False) is None
    t = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_rows(t, None, "x")[1] == [3]
    assert D.gather_rows(t, None, "x")[0] is t
    assert D.all_reduce_sum(t, None, "x") is t
    assert D.broadcast(t, None, "x") is t
    m, s = torch.tensor([0.0, 1.0, -math.inf]), torch.tensor([2.0, 1.0, 0.0])
    close(D.logsumexp_across(m, s, None, "x"), torch.tensor([math.log(2), 1.0, -math.inf]), rtol=1e-6)
    with pytest.raises(VAEPriorsError, match="scalar"):
        D.all_gather_rows(torch.tensor(1.0), None, "x")
    with pytest.raises(VAEPriorsError, match="`max` and `sum`"):
        D.logsumexp_across(m, s[:2], None, "x")


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "5", True])
def test_set_timeout_validates(bad):
    with pytest.raises(VAEPriorsError, match="`seconds`"):
        D.set_timeout(bad)
    D.set_timeout(7)
    assert D.get_timeout() == 7.0
    D.set_timeout(300)


@given(st.integers(0, 1000), st.integers(1, 64))
def test_shard_range_partitions(n, world_size):
    ranges = [D.shard_range(n, r, world_size) for r in range(world_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
    sizes = D.shard_sizes(n, world_size)
    assert sizes == [b - a for a, b in ranges] and sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("args", [(-1, 0, 2), (5, 2, 2), (5, -1, 2), (5, 0, 0), (2.0, 0, 1)])
def test_shard_range_validates(args):
    with pytest.raises(VAEPriorsError):
        D.shard_range(*args)
