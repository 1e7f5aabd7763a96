"""The priors under torch.distributed (gloo, 2 and 3 processes) against one process, float64.

Each rank builds the same data from one seed, runs the distributed prior on its block of the
global batch, and also runs the single-process reference (``sync=False``) on the whole batch;
it returns the largest differences, which the test asserts on. Gradients of parameters are
averaged over ranks as DistributedDataParallel does; the reference's loss is the mean over the
global batch, so the two must agree.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as tdist
from torch import nn

import vaepriors as vp
from vaepriors import distributed as vdist
from tests._distributed import needs_gloo, run_ranks

N, D_IN, D, B = 23, 6, 3, 5  # exemplars, input size, latent size, rows per rank

pytestmark = needs_gloo


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(D_IN, 2 * D)

    def forward(self, x):  # noqa: ANN001, ANN201
        m, lv = self.net(x).chunk(2, -1)
        return m, torch.tanh(lv)


def _setup(world: int):
    torch.manual_seed(0)
    enc = Encoder().double()
    x = torch.rand(N, D_IN, dtype=torch.float64)
    z = torch.randn(world * B, D, dtype=torch.float64)
    index = torch.randint(-1, N, (world * B,))
    return enc, x, z, index


def _average(grads: list[torch.Tensor], comm) -> list[torch.Tensor]:  # noqa: ANN001
    """What DDP does to parameter gradients: the mean over ranks."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = vdist.all_reduce_sum(flat, comm, "test") / comm.world_size
    return [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]


def _run(prior, enc, z, index, train):  # noqa: ANN001, ANN201
    """Values and gradients (queries, log_var, encoder) of mean(log_prob)."""
    prior.train(train)
    z = z.clone().requires_grad_(True)
    params = [prior.log_var, *enc.parameters()]
    for p in params:
        p.grad = None
    value = prior.log_prob(z, index=index if train else None)
    value.mean().backward()
    return value.detach(), z.grad, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


MODES = {
    "eval": dict(train=False, kwargs={}),
    "leave-one-out": dict(train=True, kwargs={}),
    "subsample": dict(train=True, kwargs=dict(n_subsample=11, generator=3)),
    "rat": dict(train=True, kwargs=dict(k=4)),
    "rat-subsample": dict(train=True, kwargs=dict(n_subsample=11, k=4, generator=3)),
}


def _exemplar_agreement(rank: int, world: int) -> dict:
    enc, x, z, index = _setup(world)
    comm = vdist.comm()
    rows = slice(rank * B, (rank + 1) * B)
    errors = {}
    for mode, spec in MODES.items():
        for shard in (False, True):
            ref_enc = copy.deepcopy(enc)
            ref = vp.ExemplarPrior(x, init_log_var=-0.4, sync=False, **spec["kwargs"]).double().bind(ref_enc)
            mine = vp.ExemplarPrior(x, init_log_var=-0.4, shard=shard, **spec["kwargs"]).double().bind(enc)
            assert mine.n_local == (vdist.shard_sizes(N, world)[rank] if shard else N)
            for _ in range(2):  # a second call: the subset generator and the caches move on alike
                v_ref, gz_ref, gp_ref = _run(ref, ref_enc, z, index, spec["train"])
                v, gz, gp = _run(mine, enc, z[rows], index[rows], spec["train"])
                gp = _average(gp, comm)
                err = max(
                    float((v - v_ref[rows]).abs().max()),
                    float((gz / world - gz_ref[rows]).abs().max()),  # rank loss = mean of B rows
                    max(float((a - b).abs().max()) for a, b in zip(gp, gp_ref)),
                )
                errors[f"{mode}-{'shard' if shard else 'replicated'}"] = max(
                    err, errors.get(f"{mode}-{'shard' if shard else 'replicated'}", 0.0)
                )
                if "rat" in mode:
                    nb = mine.last_neighbours
                    nb_ref = ref.last_neighbours[rows]
                    assert torch.equal(nb, nb_ref), (mode, shard, nb, nb_ref)
    return errors


@pytest.mark.parametrize("world", [2, 3])
def test_exemplar_prior_equals_one_process(world):
    for rank, errors in enumerate(run_ranks(_exemplar_agreement, world, timeout=240)):
        for case, err in errors.items():
            assert err < 1e-12, (rank, case, err)


TRUNCATED = {
    "loo": dict(truncate_backward=0.3),
    "subsample": dict(n_subsample=11, generator=3, truncate_backward=0.6),
}


def _truncation_agreement(rank: int, world: int) -> dict:
    """The truncated backward: sharded, it keeps the exemplars that matter to the gathered
    queries of every rank (the combined normaliser), as one process over the global batch
    does; replicated, each rank truncates for its own rows, as one process over those rows."""
    enc, x, z, index = _setup(world)
    comm = vdist.comm()
    rows = slice(rank * B, (rank + 1) * B)
    errors, dropped = {}, {}
    for mode, kwargs in TRUNCATED.items():
        for shard in (True, False):
            ref_enc = copy.deepcopy(enc)
            ref = vp.ExemplarPrior(x, init_log_var=-0.4, sync=False, **kwargs).double().bind(ref_enc)
            mine = vp.ExemplarPrior(x, init_log_var=-0.4, shard=shard, **kwargs).double().bind(enc)
            name = f"{mode}-{'shard' if shard else 'replicated'}"
            for _ in range(3):  # the first call keeps every exemplar; then the prediction works
                if shard:
                    v_ref, gz_ref, gp_ref = _run(ref, ref_enc, z, index, True)
                    v_ref, gz_ref = v_ref[rows], gz_ref[rows] * world  # rank loss = mean of B rows
                else:
                    v_ref, gz_ref, gp_ref = _run(ref, ref_enc, z[rows], index[rows], True)
                v, gz, gp = _run(mine, enc, z[rows], index[rows], True)
                if shard:
                    gp = _average(gp, comm)
                err = max(
                    float((v - v_ref).abs().max()),
                    float((gz - gz_ref).abs().max()),
                    max(float((a - b).abs().max()) for a, b in zip(gp, gp_ref)),
                )
                errors[name] = max(err, errors.get(name, 0.0))
                kept, total = ref.last_truncation
                dropped[name] = dropped.get(name, 0) + (total - kept) * (kept > 0)  # some kept, some not
    return dict(errors=errors, dropped=dropped)


@pytest.mark.parametrize("world", [2, 3])
def test_truncated_backward_equals_one_process(world):
    for rank, r in enumerate(run_ranks(_truncation_agreement, world, timeout=240)):
        for case, err in r["errors"].items():
            assert err < 1e-12, (rank, case, err)
        assert all(v > 0 for v in r["dropped"].values()), (rank, r["dropped"])  # it did truncate


class _Step(nn.Module):
    """A training step's loss through the prior, deterministic (z = the encoder mean)."""

    def __init__(self, enc: nn.Module, prior: vp.ExemplarPrior) -> None:
        super().__init__()
        self.enc, self.prior = enc, prior.bind(enc)

    def forward(self, x, index):  # noqa: ANN001, ANN201
        mean, log_var = self.enc(x)
        self.prior.observe(mean.detach(), index)
        return -self.prior.log_prob(mean, index=index).mean()


def _train(model: nn.Module, x: torch.Tensor, batches: list[torch.Tensor], steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(steps):
        idx = batches[step]
        loss = model(x[idx], idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1:
            (model.module if hasattr(model, "module") else model).prior.on_epoch_end(0)


def _ddp_rat_training(rank: int, world: int, shard: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    enc, x, _, _ = _setup(world)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randperm(N, generator=g)[: world * B] for _ in range(4)]
    kwargs = dict(init_log_var=-0.4, n_subsample=15, k=3, generator=7)
    ref = _Step(copy.deepcopy(enc), vp.ExemplarPrior(x, sync=False, **kwargs).double())
    _train(ref, x, batches, 4)
    prior = vp.ExemplarPrior(x, shard=shard, **kwargs).double()
    model = DDP(_Step(enc, prior))
    assert not any(b.numel() > 1 for b in model.module.buffers())  # nothing large to broadcast
    mine = [b[rank * B : (rank + 1) * B] for b in batches]
    _train(model, x, mine, 4)
    comm = vdist.comm()
    cache = prior.rat_cache
    if shard:
        cache = vdist.all_gather_rows(cache, comm, "test")[0]
    caches = vdist.all_gather_rows(cache.unsqueeze(0), comm, "test")[0]
    return {
        "params": max(float((a - b).abs().max()) for a, b in zip(model.module.enc.parameters(), ref.enc.parameters())),
        "log_var": abs(float(prior.log_var - ref.prior.log_var)),
        "cache_vs_ref": float((cache - ref.prior.rat_cache).abs().max()),
        "cache_across_ranks": float((caches - caches[0]).abs().max()),
        "refreshes": prior.rat.epochs_since_refresh,
    }


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard"])
def test_ddp_training_with_rat_equals_one_process(shard):
    for rank, r in enumerate(run_ranks(_ddp_rat_training, 2, shard, timeout=240)):
        assert r["params"] < 1e-12 and r["log_var"] < 1e-12, (rank, r)
        assert r["cache_vs_ref"] < 1e-12 and r["cache_across_ranks"] == 0.0, (rank, r)


def _coreset_update(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    data = torch.rand(40, D_IN, dtype=torch.float64)
    enc = Encoder().double()
    dec = nn.Linear(D, D_IN).double()
    decoder = lambda z: torch.distributions.Bernoulli(logits=dec(z))  # noqa: E731

    def make(sync: bool) -> vp.PseudocoresetPrior:
        p = vp.PseudocoresetPrior.from_data(data, n_pseudo=6, generator=torch.Generator().manual_seed(1), sync=sync)
        return p.double().bind(enc)

    def sampler_from(seed: int):  # noqa: ANN202
        g = torch.Generator().manual_seed(seed)
        return lambda s: torch.randn(s, D, generator=g, dtype=torch.float64)

    ref, mine = make(False), make(True)
    ref.update_coreset(decoder, data, batch_size=6 * world, n_samples=16, sampler=sampler_from(2),
                       generator=torch.Generator().manual_seed(4), progress=False)
    mine.update_coreset(decoder, data, batch_size=6, n_samples=16, sampler=sampler_from(2),
                        generator=torch.Generator().manual_seed(4), progress=False)
    comm = vdist.comm()
    state = torch.cat([mine.weights, mine.pseudo_inputs.reshape(-1)])
    states = vdist.all_gather_rows(state.unsqueeze(0), comm, "test")[0]
    return {
        "vs_ref": max(float((mine.weights - ref.weights).abs().max()),
                      float((mine.pseudo_inputs - ref.pseudo_inputs).abs().max())),
        "across_ranks": float((states - states[0]).abs().max()),
        "steps": int(mine.adam_step),
        "moved": float((ref.weights - 40 / 6).abs().max()),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_coreset_update_over_all_ranks_equals_one_process(world):
    for rank, r in enumerate(run_ranks(_coreset_update, world, timeout=120)):
        assert r["moved"] > 1e-3  # the update did something to compare
        assert r["vs_ref"] < 1e-10 and r["across_ranks"] == 0.0, (rank, r)
        assert r["steps"] == math.ceil(40 / (6 * world))


def _sharded_sampling_refused(rank: int, world: int) -> str:
    enc, x, _, _ = _setup(world)
    prior = vp.ExemplarPrior(x, shard=True).double().bind(enc)
    try:
        prior.sample(3)
    except vp.VAEPriorsError as err:
        return str(err)
    return ""


def test_sharded_prior_says_why_it_cannot_sample():
    for msg in run_ranks(_sharded_sampling_refused, 2):
        assert "sharded" in msg and "every exemplar" in msg


def test_shard_without_a_process_group_holds_everything():
    assert not (tdist.is_available() and tdist.is_initialized())
    prior = vp.ExemplarPrior(torch.rand(7, D_IN), shard=True)
    assert prior.n_local == prior.n_exemplars == 7


def _evaluation(rank: int, world: int) -> dict:
    enc, x, _, _ = _setup(world)
    dec = nn.Linear(D, D_IN).double()
    decoder = lambda z: torch.distributions.Normal(dec(z), 0.5)  # noqa: E731
    test_x = torch.rand(7, D_IN, dtype=torch.float64)  # 7 points: blocks of unequal size
    labels = torch.arange(N) % 3
    out = {}
    ref = vp.ExemplarELBO(enc, decoder, vp.ExemplarPrior(x, init_log_var=-0.4, sync=False).double()).eval()
    want = vp.log_likelihood(ref, test_x, 40, generator=torch.Generator().manual_seed(9), progress=False)
    for shard, flag in [(True, None), (False, True)]:
        model = vp.ExemplarELBO(enc, decoder, vp.ExemplarPrior(x, init_log_var=-0.4, shard=shard).double()).eval()
        got = vp.log_likelihood(model, test_x, 40, generator=torch.Generator().manual_seed(9), progress=False,
                                memory_budget=2**12, distributed=flag)
        out[f"loglik-{shard}"] = float((got.values - want.values).abs().max())
    au_ref = vp.active_units(enc, x, 0.001)
    au = vp.active_units(enc, x, 0.001, batch_size=4, distributed=True)
    out["active"] = float((au.variances - au_ref.variances).abs().max())
    knn_ref = vp.knn_accuracy(enc, x, labels, x[:9], labels[:9], k=[1, 3])
    knn_got = vp.knn_accuracy(enc, x, labels, x[:9], labels[:9], k=[1, 3], distributed=True)
    out["knn"] = knn_ref == knn_got
    return out


def test_evaluation_split_over_ranks_equals_one_process():
    for rank, r in enumerate(run_ranks(_evaluation, 2, timeout=240)):
        assert r["loglik-True"] < 1e-10 and r["loglik-False"] < 1e-10, (rank, r)
        assert r["active"] < 1e-12 and r["knn"], (rank, r)


def _one_rank_walks_away(rank: int, world: int) -> str:
    import time

    enc, x, z, _ = _setup(world)
    prior = vp.ExemplarPrior(x, shard=True).double().bind(enc).eval()
    vdist.set_timeout(2)
    if rank == 1:
        time.sleep(6)  # never calls log_prob
        return ""
    start = time.monotonic()
    try:
        prior.log_prob(z[:B])
    except vp.VAEPriorsError as err:
        return f"{time.monotonic() - start:.1f} s: {err}"
    return "no error"


def test_a_rank_that_never_joins_gives_a_clear_error_not_a_hang():
    msg = run_ranks(_one_rank_walks_away, 2, timeout=60)[0]
    seconds = float(msg.split(" s:")[0])
    assert seconds < 20 and "ExemplarPrior.log_prob" in msg and "did not reach the same call" in msg, msg


def _fit_on_ranks(rank: int, world: int, out: str, shard: bool) -> dict:
    from vaepriors.training import TrainConfig, fit

    cfg = TrainConfig(prior="exemplar-rat", epochs=2, n_train=200, n_eval=60, eval_samples=3, threads=1,
                      progress=False, out=out, shard=shard)
    m = fit(cfg)
    return {"train": [e["train"]["elbo"] for e in m["epochs"]], "test": m["test"]}


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard"])
def test_training_command_on_two_ranks_equals_one_process(tmp_path, shard):
    from vaepriors.training import TrainConfig, fit

    one = fit(TrainConfig(prior="exemplar-rat", epochs=2, n_train=200, n_eval=60, eval_samples=3, threads=1,
                          progress=False, out=str(tmp_path / "one")))
    two = run_ranks(_fit_on_ranks, 2, str(tmp_path / "two"), shard, timeout=300)
    assert (tmp_path / "two" / "metrics.json").is_file()
    for r in two:  # every rank ends with the same numbers as the single process
        torch.testing.assert_close(torch.tensor(r["train"]), torch.tensor([e["train"]["elbo"] for e in one["epochs"]]),
                                   rtol=1e-5, atol=0)
        for key in ("elbo", "log_likelihood"):
            assert abs(r["test"][key] - one["test"][key]) <= 1e-5 * abs(one["test"][key]), (key, r, one["test"])
