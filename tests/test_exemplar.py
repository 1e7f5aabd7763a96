"""ExemplarPrior: training objectives (leave-one-out, subsampling, RAT) and evaluation against
float64 brute force, bounds, gradients, caches, sampling, state and bad input."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vaepriors as vp
from vaepriors import ExemplarELBO, ExemplarPrior, VAEPriorsError

D_IN = 5


class Enc(nn.Module):
    """x [B, D_IN] -> (mean, log_var) [B, d]."""

    def __init__(self, d: int = 3, scale: float = 1.0) -> None:
        super().__init__()
        self.lin = nn.Linear(D_IN, 2 * d)
        with torch.no_grad():
            self.lin.weight.mul_(scale)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        m, r = self.lin(x).chunk(2, -1)
        return m, torch.tanh(r)


def means64(enc, x):
    with torch.no_grad():
        return copy.deepcopy(enc).double()(x.double())[0]


def comp64(z, mu, log_var):
    """log N(z; mu_n, e^lv I) for z [R, d], mu [N, d] -> [R, N], float64, difference form."""
    z, mu, lv = z.double(), mu.double(), torch.as_tensor(log_var).double()
    d = z.shape[-1]
    sq = (z[:, None, :] - mu[None]).pow(2).sum(-1)
    return -0.5 * (d * (math.log(2 * math.pi) + lv) + sq / lv.exp())


def rows_ref(z, mu, log_var, sets, norms):
    """log (1/norm_r) sum_{n in sets[r]} N(z_r; mu_n, sigma^2 I) per flat row, float64."""
    zf = z.reshape(-1, z.shape[-1])
    c = comp64(zf, mu, log_var)
    out = [torch.logsumexp(c[r, list(s)], 0) - math.log(nr) for r, (s, nr) in enumerate(zip(sets, norms))]
    return torch.stack(out).reshape(z.shape[:-1])


def subset_rows(subset, own, m):
    """The spec of the subsampled objective: row i keeps the first M of the draw that are not i."""
    s = subset.tolist()
    return [[j for j in s if j != i][:m] for i in own.reshape(-1).tolist()]


def make(n=9, d=3, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D_IN, generator=g)
    torch.manual_seed(seed)
    enc = Enc(d)
    prior = ExemplarPrior(x, generator=seed, **kw).bind(enc)
    with torch.no_grad():
        prior.log_var.fill_(-0.3)
    return prior, enc, x


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


# -- values against float64 brute force -----------------------------------------------------


def test_eval_matches_full_sum(dtype):
    prior, enc, x = make(n=11)
    prior.to(dtype).eval()
    enc.to(dtype)
    z = torch.randn(4, 3, 3, dtype=dtype)
    got = prior.log_prob(z, index=torch.arange(3))  # index is ignored in evaluation
    n = x.shape[0]
    ref = rows_ref(z, means64(enc, x), prior.log_var, [range(n)] * 12, [n] * 12)
    torch.testing.assert_close(got.double(), ref, **tol(dtype))


def test_train_loo_matches_bruteforce(dtype):
    prior, enc, x = make(n=8)
    prior.to(dtype)
    enc.to(dtype)
    z = torch.randn(2, 4, 3, dtype=dtype)
    idx = torch.tensor([0, 5, -1, 7])
    got = prior.log_prob(z, index=idx)
    own = idx.expand(2, 4).reshape(-1).tolist()
    sets = [[j for j in range(8) if j != i] for i in own]
    norms = [len(s) for s in sets]  # 7, or 8 for index -1
    ref = rows_ref(z, means64(enc, x), prior.log_var, sets, norms)
    torch.testing.assert_close(got.double(), ref, **tol(dtype))


def test_train_subsample_matches_bruteforce(dtype):
    prior, enc, x = make(n=10, n_subsample=4)
    prior.to(dtype)
    enc.to(dtype)
    z = torch.randn(3, 5, 3, dtype=dtype)
    idx = torch.tensor([0, 3, 9, 4, -1])
    for _ in range(5):  # several draws: the own index falls in and out of the subset
        got = prior.log_prob(z, index=idx)
        subset = prior.last_subset
        assert subset.shape == (5,) and len(set(subset.tolist())) == 5
        sets = subset_rows(subset, idx.expand(3, 5), 4)
        assert all(len(s) == 4 for s in sets)
        ref = rows_ref(z, means64(enc, x), prior.log_var, sets, [4] * len(sets))
        torch.testing.assert_close(got.double(), ref, **tol(dtype))


def test_train_without_index_is_the_plain_mixture():
    prior, enc, x = make(n=7)
    z = torch.randn(5, 3)
    full = rows_ref(z, means64(enc, x), prior.log_var, [range(7)] * 5, [7] * 5)
    torch.testing.assert_close(prior.log_prob(z).double(), full, rtol=1e-5, atol=1e-5)
    sub, _, _ = make(n=7, n_subsample=3)
    got = sub.log_prob(z)
    sets = [sub.last_subset.tolist()[:3]] * 5
    torch.testing.assert_close(got.double(), rows_ref(z, means64(enc, x), sub.log_var, sets, [3] * 5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"n_subsample": 5}, {"k": 3}, {"n_subsample": 6, "k": 2}])
def test_loo_exact_when_the_own_exemplar_dominates(kw):
    # Means = inputs (identity encoder); z sits on exemplar 0, the others are >= 125 nats away.
    d = D_IN
    enc = lambda x: (x, torch.zeros_like(x))  # noqa: E731
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, d, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * torch.linspace(16, 20, 9)[:, None]
    x[0] = 0.0
    prior = ExemplarPrior(x, generator=3, **kw).bind(enc)
    z = torch.zeros(1, d)
    got = prior.log_prob(z, index=torch.tensor([0]))
    assert torch.isfinite(got).all()
    c = comp64(z, x, 0.0)[0]
    assert c[0] - c[1:].max() > 100
    if "n_subsample" in kw:
        s = subset_rows(prior.last_subset, torch.tensor([0]), kw["n_subsample"])[0]
        norm = kw["n_subsample"]
    else:
        s, norm = list(range(1, 9)), 8
    if "k" in kw:  # RAT keeps the k nearest of the allowed set, normaliser unchanged
        s = sorted(s, key=lambda j: -c[j].item())[: kw["k"]]
    ref = torch.logsumexp(c[s], 0) - math.log(norm)
    torch.testing.assert_close(got.double()[0], ref, rtol=1e-6, atol=0)


# -- RAT ------------------------------------------------------------------------------------


def test_rat_matches_bruteforce_over_true_neighbours():
    prior, enc, x = make(n=12, k=3)
    z = torch.randn(2, 4, 3)
    idx = torch.tensor([1, 4, 11, -1])
    prior.log_prob(torch.randn(1, 3))  # builds the cache
    with torch.no_grad():
        prior.rat_cache.add_(0.3 * torch.randn_like(prior.rat_cache))  # stale cache
    stale = prior.rat_cache.clone()
    got = prior.log_prob(z, index=idx)
    nb = prior.last_neighbours
    assert nb.shape == (2, 4, 3)
    own = idx.expand(2, 4).reshape(-1)
    # The neighbours are the exact kNN of each z in the (stale) cache, own index excluded.
    d2 = (z.reshape(-1, 1, 3).double() - stale.double()[None]).pow(2).sum(-1)
    true_nb = []
    for r, i in enumerate(own.tolist()):
        if i >= 0:
            d2[r, i] = math.inf
        true_nb.append(d2[r].topk(3, largest=False).indices.tolist())
        assert set(nb.reshape(-1, 3)[r].tolist()) == set(true_nb[-1])
    mu = means64(enc, x)
    norms = [11 if i >= 0 else 12 for i in own.tolist()]
    ref = rows_ref(z, mu, prior.log_var, true_nb, norms)  # the brute-force neighbours, not the prior's
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # The cache now holds the fresh means of every retrieved exemplar.
    ret = nb.unique()
    torch.testing.assert_close(prior.rat_cache[ret].double(), mu[ret], rtol=1e-5, atol=1e-6)


@given(
    n=st.integers(3, 10),
    k_frac=st.floats(0.0, 1.0),
    m_frac=st.one_of(st.none(), st.floats(0.0, 1.0)),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
    stale=st.booleans(),
)
def test_rat_is_a_lower_bound(n, k_frac, m_frac, scale, seed, stale):
    m = None if m_frac is None else 1 + int(m_frac * (n - 2))
    limit = n - 1 if m is None else m
    k = 1 + int(k_frac * (limit - 1))
    torch.manual_seed(seed)
    x = torch.rand(n, D_IN)
    enc = Enc(3, scale)
    prior = ExemplarPrior(x, n_subsample=m, k=k, generator=seed).bind(enc)
    prior.log_prob(torch.zeros(1, 3))
    if stale:
        with torch.no_grad():
            prior.rat_cache.copy_(torch.randn_like(prior.rat_cache) * scale)
    z = torch.randn(2, 3) * scale
    idx = torch.randint(n, (2,))
    got = prior.log_prob(z, index=idx).double()
    mu = means64(enc, x)
    if m is None:
        sets = [[j for j in range(n) if j != i] for i in idx.tolist()]
        norm = n - 1
    else:
        sets = subset_rows(prior.last_subset, idx, m)
        norm = m
    exact = rows_ref(z, mu, prior.log_var, sets, [norm] * 2)
    assert (got <= exact + 1e-4 * exact.abs().clamp_min(1)).all()
    if k == limit:  # every allowed exemplar retrieved: equality
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)


def test_observe_and_refresh_schedule():
    prior, enc, x = make(n=6, k=2, refresh_every=2)
    prior.observe(torch.zeros(2, 3), torch.tensor([0, 1]))  # before the cache exists: no-op
    prior.log_prob(torch.zeros(1, 3))
    assert prior.rat_cache.shape == (6, 3)
    prior.observe(torch.full((2, 3), 7.0), torch.tensor([2, 5]))
    assert (prior.rat_cache[[2, 5]] == 7).all()
    mu = means64(enc, x).float()
    prior.on_epoch_end(0)
    assert (prior.rat_cache[[2, 5]] == 7).all()  # refresh_every=2: not yet
    prior.on_epoch_end(1)
    torch.testing.assert_close(prior.rat_cache, mu, rtol=1e-5, atol=1e-6)
    with pytest.raises(VAEPriorsError, match="mean"):
        prior.observe(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(VAEPriorsError, match="index"):
        prior.observe(torch.zeros(2, 3), torch.tensor([0, 6]))


# -- subsampling: uniform subsets, and the Jensen bound O2 <= O1 ------------------------------


def test_subsample_average_matches_enumeration_and_is_below_loo():
    n, m, draws = 6, 2, 300
    prior, enc, x = make(n=n, n_subsample=m)
    z = torch.randn(3, 3)
    idx = torch.tensor([0, 2, 5])
    with torch.no_grad():
        vals = torch.stack([prior.log_prob(z, index=idx) for _ in range(draws)]).double()
    mu = means64(enc, x)
    c = comp64(z, mu, prior.log_var)
    for r, i in enumerate(idx.tolist()):
        others = [j for j in range(n) if j != i]
        exact_o2 = torch.stack([torch.logsumexp(c[r, list(s)], 0) - math.log(m) for s in itertools.combinations(others, m)]).mean()
        o1 = torch.logsumexp(c[r, others], 0) - math.log(n - 1)
        assert exact_o2 <= o1  # Jensen, exactly
        mean, se = vals[:, r].mean(), vals[:, r].std() / math.sqrt(draws)
        assert abs(mean - exact_o2) < 4 * se + 1e-9  # the draws are uniform subsets
    loo = ExemplarPrior(x, init_log_var=prior.log_var.item()).bind(enc).log_prob(z, index=idx).double()
    assert (vals.mean(0) <= loo + 4 * vals.std(0) / math.sqrt(draws)).all()


@settings(max_examples=10)
@given(n=st.integers(3, 8), m_frac=st.floats(0, 1), scale=st.sampled_from([0.3, 1.0, 5.0]), seed=st.integers(0, 999))
def test_subsampled_average_is_below_leave_one_out(n, m_frac, scale, seed):
    m = 1 + int(m_frac * (n - 2))
    torch.manual_seed(seed)
    x = torch.rand(n, D_IN)
    enc = Enc(2, scale)
    sub = ExemplarPrior(x, n_subsample=m, generator=seed).bind(enc)
    loo = ExemplarPrior(x).bind(enc)
    z, idx = torch.randn(2, 2) * scale, torch.randint(n, (2,))
    draws = 100
    with torch.no_grad():
        vals = torch.stack([sub.log_prob(z, index=idx) for _ in range(draws)]).double()
        o1 = loo.log_prob(z, index=idx).double()
    se = vals.std(0) / math.sqrt(draws)
    assert (vals.mean(0) <= o1 + 4 * se + 1e-5).all()


# -- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"n_subsample": 3}])
def test_gradcheck_encoder_and_log_var(kw):
    n, d = 6, 2
    x = torch.rand(n, D_IN, dtype=torch.float64)
    w0 = torch.randn(D_IN, d, dtype=torch.float64, requires_grad=True)
    holder = {}
    enc = lambda x: (x @ holder["w"], torch.zeros(x.shape[0], d, dtype=x.dtype))  # noqa: E731
    prior = ExemplarPrior(x, generator=0, **kw).bind(enc).double()
    z = torch.randn(2, 3, d, dtype=torch.float64)
    idx = torch.tensor([0, 4, -1])

    def f(w, lv):
        holder["w"] = w
        prior.generator.manual_seed(0)  # the same subset at every evaluation
        return torch.func.functional_call(prior, {"log_var": lv}, (z,), {"index": idx})

    lv = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (w0, lv))


def test_gradients_reach_encoder_through_means_and_log_var():
    for kw in ({}, {"n_subsample": 4}, {"k": 3}, {"n_subsample": 5, "k": 2}):
        prior, enc, x = make(n=9, **kw)
        z = torch.randn(2, 4, 3)  # no path from z to the encoder: only the prior means
        prior.log_prob(z, index=torch.arange(4)).sum().backward()
        assert enc.lin.weight.grad is not None and enc.lin.weight.grad.abs().sum() > 0, kw
        assert prior.log_var.grad is not None and prior.log_var.grad.abs() > 0, kw


def test_rat_gradients_match_bruteforce():
    prior, enc, x = make(n=10, k=3)
    z = torch.randn(4, 3)
    idx = torch.tensor([0, 3, 6, 9])
    got = prior.log_prob(z, index=idx).sum()
    got.backward()
    nb = prior.last_neighbours
    enc64 = copy.deepcopy(enc).double()
    enc64.zero_grad()
    lv = prior.log_var.detach().double().requires_grad_()
    mu = enc64(x.double())[0]
    c = -0.5 * (3 * (math.log(2 * math.pi) + lv) + (z.double()[:, None] - mu[nb]).pow(2).sum(-1) / lv.exp())
    (torch.logsumexp(c, -1) - math.log(9)).sum().backward()
    torch.testing.assert_close(enc.lin.weight.grad.double(), enc64.lin.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prior.log_var.grad.double(), lv.grad, rtol=1e-4, atol=1e-5)


# -- evaluation cache -------------------------------------------------------------------------


def test_eval_cache_invalidation():
    prior, enc, x = make(n=8)
    prior.eval()
    z = torch.randn(3, 3)

    def ref():
        return rows_ref(z, means64(enc, prior.exemplars), prior.log_var, [range(len(prior.exemplars))] * 3, [len(prior.exemplars)] * 3)

    prior.log_prob(z)
    calls = enc.calls
    torch.testing.assert_close(prior.log_prob(z).double(), ref(), rtol=1e-5, atol=1e-5)
    assert enc.calls == calls  # cached
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    enc.lin.weight.grad = torch.ones_like(enc.lin.weight)
    opt.step()  # parameter versions change
    torch.testing.assert_close(prior.log_prob(z).double(), ref(), rtol=1e-5, atol=1e-5)
    assert enc.calls > calls
    calls = enc.calls
    enc.load_state_dict(Enc(3).state_dict())
    torch.testing.assert_close(prior.log_prob(z).double(), ref(), rtol=1e-5, atol=1e-5)
    assert enc.calls > calls
    prior.set_exemplars(torch.rand(12, D_IN))
    torch.testing.assert_close(prior.log_prob(z).double(), ref(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        prior.exemplars.mul_(0.5)  # in-place edit of the exemplars
    torch.testing.assert_close(prior.log_prob(z).double(), ref(), rtol=1e-5, atol=1e-5)
    calls = enc.calls
    enc.lin.train(not enc.lin.training)  # a submodule's mode (dropout, batch norm) by hand
    prior.log_prob(z)
    assert enc.calls > calls
    calls = enc.calls
    prior.train()
    for p in enc.parameters():
        p.data.add_(0.5)  # a hand-written update through .data: no version counter moves
    prior.eval()
    torch.testing.assert_close(prior.log_prob(z).double(), ref(), rtol=1e-5, atol=1e-5)
    assert enc.calls > calls  # a mode switch drops the cache


def test_log_likelihood_keeps_the_eval_cache_between_calls():
    """Each log_likelihood call is a round trip through evaluation mode: the encoded means
    survive it while the weights are unchanged, and not once they change."""
    from vaepriors import evaluation

    prior, enc, x = make(n=8)
    rows = []
    forward = enc.forward
    enc.forward = lambda v: rows.append(v.shape[0]) or forward(v)
    decoder = lambda z: torch.distributions.Independent(torch.distributions.ContinuousBernoulli(logits=z @ torch.ones(3, D_IN)), 1)  # noqa: E731
    elbo = vp.ExemplarELBO(enc, decoder, prior)

    def exemplar_rows_encoded():
        rows.clear()
        evaluation.log_likelihood(elbo, x[:2], n_samples=4, progress=False)
        return sum(r for r in rows if r != 2)  # the 2 test points aside

    assert exemplar_rows_encoded() == 8
    assert exemplar_rows_encoded() == 0 and prior.training  # kept; the mode restored
    with torch.no_grad():
        enc.lin.weight.add_(0.1)
    assert exemplar_rows_encoded() == 8


def test_eval_cache_with_a_plain_function_encoder():
    # A lambda around a module: its tensors are found through the autograd graph.
    net = nn.Linear(D_IN, 6)
    enc = lambda x: net(x).chunk(2, -1)  # noqa: E731
    x = torch.rand(7, D_IN)
    prior = ExemplarPrior(x).bind(enc).eval()
    z = torch.randn(2, 3)
    prior.log_prob(z)
    with torch.no_grad():
        net.bias.add_(1.0)
    mu = net(x)[0:, :3].detach()
    torch.testing.assert_close(prior.log_prob(z).double(), rows_ref(z, mu, prior.log_var, [range(7)] * 2, [7] * 2), rtol=1e-5, atol=1e-5)


def test_state_dict_carries_the_generator_and_refresh_counter():
    """A restored prior draws the subsets the saved one would have drawn next."""
    prior, enc, x = make(n=30, n_subsample=5, k=2, refresh_every=3)
    z, idx = torch.randn(4, 3), torch.arange(4)
    for _ in range(3):
        prior.log_prob(z, index=idx)
    prior.on_epoch_end(0)
    state = prior.state_dict()
    twin = ExemplarPrior(x, n_subsample=5, k=2, refresh_every=3, generator=0).bind(enc)
    twin.load_state_dict(state)
    assert twin.rat.epochs_since_refresh == prior.rat.epochs_since_refresh == 1
    assert torch.equal(twin._randperm(30), prior._randperm(30))
    fresh = ExemplarPrior(x, n_subsample=5, k=2, refresh_every=3, generator=0)
    assert not torch.equal(fresh._randperm(30), twin._randperm(30))  # a fresh generator would repeat the first draws


_FROZEN = nn.Linear(D_IN, 6).requires_grad_(False)


def _global_encoder(x):
    return _FROZEN(x).chunk(2, -1)


@pytest.mark.parametrize("kind", ["closure", "global", "partial"])
def test_eval_cache_sees_frozen_weights_of_a_plain_function_encoder(kind):
    """A frozen encoder leaves no autograd graph: its weights are found where the callable
    reaches them, and reloading them refreshes the cached means."""
    import functools

    net = nn.Linear(D_IN, 6).requires_grad_(False)
    enc = {
        "closure": lambda x: net(x).chunk(2, -1),
        "global": _global_encoder,
        "partial": functools.partial(lambda m, x: m(x).chunk(2, -1), net),
    }[kind]
    module = _FROZEN if kind == "global" else net
    x = torch.rand(7, D_IN)
    prior = ExemplarPrior(x).bind(enc).eval()
    z = torch.randn(2, 3)
    prior.log_prob(z)
    module.load_state_dict(nn.Linear(D_IN, 6).state_dict())
    mu = module(x)[:, :3].detach()
    torch.testing.assert_close(prior.log_prob(z).double(), rows_ref(z, mu, prior.log_var, [range(7)] * 2, [7] * 2), rtol=1e-5, atol=1e-5)


def test_eval_means_are_not_cached_when_the_encoder_hides_its_weights():
    class Opaque:  # keeps its weights where no search looks
        def __init__(self):
            self.store = {"w": torch.randn(D_IN, 6)}

        def __call__(self, x):
            return (x @ self.store["w"]).chunk(2, -1)

    enc = Opaque()
    x = torch.rand(5, D_IN)
    prior = ExemplarPrior(x).bind(enc).eval()
    z = torch.randn(2, 3)
    prior.log_prob(z)
    enc.store["w"] = torch.randn(D_IN, 6)
    mu = (x @ enc.store["w"])[:, :3]
    torch.testing.assert_close(prior.log_prob(z).double(), rows_ref(z, mu, prior.log_var, [range(5)] * 2, [5] * 2), rtol=1e-5, atol=1e-5)


# -- sampling ---------------------------------------------------------------------------------


def test_sampling_statistics_around_an_exemplar():
    prior, enc, x = make(n=5, d=2)
    n = 20000
    z = prior.sample_around(x[2:3], (n,))
    assert z.shape == (n, 1, 2)
    mu = means64(enc, x[2:3])[0]
    var = math.exp(prior.log_var.item())
    zd = z[:, 0].double()
    assert ((zd.mean(0) - mu).abs() < 4 * math.sqrt(var / n)).all()
    assert ((zd.var(0) - var).abs() < 5 * var * math.sqrt(2 / (n - 1))).all()
    # Unconditional samples: z - mu(exemplar chosen) is N(0, sigma^2 I), exemplars uniform.
    z, j = prior.sample_with_index((n,))
    assert z.shape == (n, 2) and j.shape == (n,)
    r = (z.double() - means64(enc, x)[j]) / math.sqrt(var)
    assert (r.mean(0).abs() < 4 / math.sqrt(n)).all()
    assert ((r.var(0) - 1).abs() < 5 * math.sqrt(2 / n)).all()
    freq = torch.bincount(j, minlength=5).double() / n
    assert ((freq - 0.2).abs() < 4 * math.sqrt(0.2 * 0.8 / n)).all()


def test_sample_shapes_and_gradients():
    prior, enc, x = make(n=5, d=3)
    assert prior.sample().shape == (3,)
    assert prior.sample((2, 4)).shape == (2, 4, 3)
    assert prior.sample(0).shape == (0, 3)
    assert prior.sample_around(x[:2]).shape == (2, 3)
    assert prior.sample_around(x[:2], (4, 5)).shape == (4, 5, 2, 3)
    prior.rsample((6,)).sum().backward()
    assert enc.lin.weight.grad is not None and prior.log_var.grad is not None


def test_seed_reproducibility():
    a, _, _ = make(n=9, n_subsample=4, seed=5)
    b, _, _ = make(n=9, n_subsample=4, seed=5)
    torch.testing.assert_close(a.sample((7,)), b.sample((7,)))
    z = torch.randn(3, 3)
    torch.testing.assert_close(a.log_prob(z, index=torch.arange(3)), b.log_prob(z, index=torch.arange(3)))
    assert torch.equal(a.last_subset, b.last_subset)
    g = torch.Generator().manual_seed(1)
    c = ExemplarPrior(torch.rand(9, D_IN), generator=g).bind(Enc(3))
    s1 = c.sample((4,))
    g.manual_seed(1)
    torch.testing.assert_close(c.sample((4,)), s1)


# -- generation -------------------------------------------------------------------------------


def test_generate_iteratively():
    d = 3
    a = torch.randn(D_IN, d) / 2
    b = torch.randn(d, D_IN) / 2
    enc = lambda x: (x @ a, torch.zeros(x.shape[0], d))  # noqa: E731
    dec = lambda z: torch.distributions.Normal(z @ b, 1.0)  # noqa: E731
    prior = ExemplarPrior(torch.rand(6, D_IN), init_log_var=-40.0).bind(enc)
    start = torch.rand(4, D_IN)
    chain = prior.generate_iteratively(dec, start, 3)
    assert chain.shape == (4, 4, D_IN)
    x = start
    for t in range(4):
        torch.testing.assert_close(chain[t], x, rtol=1e-4, atol=1e-5)
        x = x @ a @ b
    assert prior.generate_iteratively(dec, 2, 2, to_input="sample").shape == (3, 2, D_IN)
    assert prior.generate_iteratively(lambda z: z @ b, 2, 1).shape == (2, 2, D_IN)
    with pytest.raises(VAEPriorsError, match="to_input"):
        prior.generate_iteratively(lambda z: z, 2, 1)


def test_set_exemplars_larger_set():
    prior, enc, x = make(n=6, k=2)
    prior.log_prob(torch.zeros(1, 3))
    big = torch.rand(15, D_IN)
    prior.set_exemplars(big)
    assert prior.n_exemplars == 15 and prior.rat_cache.shape == (15, 3)
    torch.testing.assert_close(prior.rat_cache.double(), means64(enc, big), rtol=1e-5, atol=1e-6)
    prior.eval()
    z = torch.randn(4, 3)
    torch.testing.assert_close(prior.log_prob(z).double(), rows_ref(z, means64(enc, big), prior.log_var, [range(15)] * 4, [15] * 4), rtol=1e-5, atol=1e-5)
    _, j = prior.sample_with_index((500,))
    assert j.max() >= 6
    with pytest.raises(VAEPriorsError, match="shape"):
        prior.set_exemplars(torch.rand(15, D_IN + 1))
    with pytest.raises(VAEPriorsError, match="`k`"):
        prior.set_exemplars(torch.rand(2, D_IN))


def test_dataset_exemplars():
    x = torch.rand(5, D_IN)
    y = torch.arange(5)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return x[i], y[i]

    for data in (Pairs(), torch.utils.data.TensorDataset(x, y), [r for r in x]):
        prior = ExemplarPrior(data, chunk_size=2)
        assert torch.equal(torch.cat(list(prior.exemplar_set.chunks(2, torch.float32, "cpu"))), x)
        assert torch.equal(prior.exemplar_set.rows(torch.tensor([4, 1]), torch.float32, "cpu"), x[[4, 1]])


# -- state and devices ------------------------------------------------------------------------


def test_state_dict_round_trip_with_rat_cache(device):
    prior, enc, x = make(n=8, k=2)
    prior.log_prob(torch.randn(2, 3), index=torch.tensor([0, 1]))
    with torch.no_grad():
        prior.log_var.fill_(-1.25)
        prior.rat_cache[3] = 5.0
    sd = prior.state_dict()
    assert set(sd) == {"log_var", "rat.means", "_extra_state"}  # the exemplars are not saved
    fresh = ExemplarPrior(x, k=2).to(device)
    fresh.load_state_dict(sd)
    assert fresh.log_var.item() == -1.25 and fresh.rat_cache.device.type == device.type
    torch.testing.assert_close(fresh.rat_cache.cpu(), prior.rat_cache)
    fresh.bind(copy.deepcopy(enc).to(device))
    fresh.observe(torch.zeros(1, 3, device=device), torch.tensor([0], device=device))
    assert (fresh.rat_cache[3] == 5.0).all()  # kept, not rebuilt
    z = torch.randn(2, 3, device=device)
    fresh.eval()
    assert torch.isfinite(fresh.log_prob(z)).all() and fresh.sample((3,)).device.type == device.type
    other = ExemplarPrior(torch.rand(5, D_IN), k=2)
    with pytest.raises(VAEPriorsError, match="over 8 exemplars"):
        other.load_state_dict(sd)
    assert other.log_var.item() == 0.0  # refused before anything was copied


def test_float64_move():
    prior, enc, x = make(n=6, k=2, n_subsample=3)
    prior.double()
    enc.double()
    z = torch.randn(2, 3, dtype=torch.float64)
    assert prior.log_prob(z, index=torch.tensor([0, 1])).dtype == torch.float64
    # The stored set keeps its dtype (converted chunk by chunk); what the prior computes follows.
    assert prior.exemplars.dtype == torch.float32 and prior.rat_cache.dtype == torch.float64
    assert prior.sample((2,)).dtype == torch.float64


# -- bad input --------------------------------------------------------------------------------


def test_bad_input():
    x = torch.rand(6, D_IN)
    with pytest.raises(VAEPriorsError, match="at least one exemplar"):
        ExemplarPrior(torch.rand(0, D_IN))
    with pytest.raises(VAEPriorsError, match="at least one exemplar"):
        ExemplarPrior([])
    with pytest.raises(VAEPriorsError, match="shape"):
        ExemplarPrior(torch.rand(6))
    with pytest.raises(VAEPriorsError, match="real"):
        ExemplarPrior(torch.ones(6, 3, dtype=torch.complex64))
    ragged = ExemplarPrior([torch.rand(3), torch.rand(4)]).bind(lambda x: (x[:, :2], x[:, :2]))
    with pytest.raises(VAEPriorsError, match="one shape"):  # a Dataset is read lazily
        ragged.eval().log_prob(torch.zeros(1, 2))
    with pytest.raises(VAEPriorsError, match="n_subsample"):
        ExemplarPrior(x, n_subsample=6)
    ExemplarPrior(x, n_subsample=5)  # M = N - 1 is allowed
    with pytest.raises(VAEPriorsError, match="`k`"):
        ExemplarPrior(x, k=7)
    with pytest.raises(VAEPriorsError, match="`k`"):
        ExemplarPrior(x, k=6)
    with pytest.raises(VAEPriorsError, match="`k`"):
        ExemplarPrior(x, n_subsample=2, k=3)
    with pytest.raises(VAEPriorsError, match="k"):
        ExemplarPrior(x, k=0)
    with pytest.raises(VAEPriorsError, match="generator"):
        ExemplarPrior(x, generator="seed")
    prior = ExemplarPrior(x)
    with pytest.raises(VAEPriorsError, match="encoder"):
        prior.log_prob(torch.zeros(3))
    with pytest.raises(VAEPriorsError, match="encoder"):
        prior.sample(2)
    prior.bind(Enc(3))
    for bad in (torch.tensor([6]), torch.tensor([-2])):
        with pytest.raises(VAEPriorsError, match="index"):
            prior.log_prob(torch.zeros(1, 3), index=bad)
    with pytest.raises(VAEPriorsError, match="index"):
        prior.log_prob(torch.zeros(2, 3), index=torch.tensor([0, 1, 2]))
    with pytest.raises(VAEPriorsError, match="z"):
        prior.log_prob(torch.zeros(2, 4))
    with pytest.raises(VAEPriorsError, match="exemplars"):
        prior.sample_around(torch.rand(2, D_IN + 1))
    with pytest.raises(VAEPriorsError, match="exemplars"):
        prior.sample_around(torch.rand(D_IN))
    one = ExemplarPrior(torch.rand(1, D_IN)).bind(Enc(3))
    with pytest.raises(VAEPriorsError, match="leave-one-out"):
        one.log_prob(torch.zeros(1, 3), index=torch.tensor([0]))
    one.eval().log_prob(torch.zeros(1, 3))  # evaluation needs no second exemplar
    squash = ExemplarPrior(x).bind(lambda x: (x[:1, :3], x[:1, :3]))
    with pytest.raises(VAEPriorsError, match="encoder"):
        squash.log_prob(torch.zeros(1, 3))


# -- end to end -------------------------------------------------------------------------------


def test_end_to_end_exemplar_elbo():
    torch.manual_seed(0)
    d = 2
    grey = torch.rand(40, D_IN)
    enc = Enc(d)
    dec_net = nn.Linear(d, D_IN)
    dec = lambda z: torch.distributions.Bernoulli(logits=dec_net(z))  # noqa: E731
    prior = ExemplarPrior(grey, n_subsample=20, k=4, generator=0)
    elbo = ExemplarELBO(enc, dec, prior, n_samples=2)
    opt = torch.optim.Adam([*enc.parameters(), *dec_net.parameters(), *prior.parameters()], lr=0.05)
    idx = torch.arange(8)
    xb = torch.bernoulli(grey[idx])  # binarised batch, grey-level exemplars
    first = None
    for _ in range(30):
        out = elbo(xb, idx)
        opt.zero_grad()
        out.loss.backward()
        assert enc.lin.weight.grad.abs().sum() > 0 and prior.log_var.grad is not None
        opt.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < first
    # The KL term used the prior's RAT objective on the ELBO's own samples.
    z = out.z.detach()
    lp = prior.log_prob(z, index=idx)  # a fresh call: same formula, new subset; just finite
    assert torch.isfinite(lp).all()
    # observe() put the batch's latest means into the cache (those of the binarised inputs),
    # then the retrieved exemplars got their fresh (grey-level) means.
    elbo(xb, idx)
    retrieved = set(prior.last_neighbours.unique().tolist())
    with torch.no_grad():
        observed, fresh = enc(xb)[0], enc(grey)[0]
    for i in idx.tolist():
        want = fresh[i] if i in retrieved else observed[i]
        torch.testing.assert_close(prior.rat_cache[i], want, rtol=1e-5, atol=1e-6)
    assert len(retrieved - set(idx.tolist())) > 0
    torch.testing.assert_close(prior.rat_cache[sorted(retrieved)], fresh[sorted(retrieved)], rtol=1e-5, atol=1e-6)
    elbo.eval()
    with torch.no_grad():
        ev = elbo(xb)
    ref_lp = rows_ref(ev.z, means64(enc, grey), prior.log_var, [range(40)] * 16, [40] * 16).reshape(2, 8)
    log_q = torch.distributions.Normal(*[t.double() for t in (enc(xb)[0], (0.5 * enc(xb)[1]).exp())]).log_prob(ev.z.double()).sum(-1)
    torch.testing.assert_close(ev.kl.double(), (log_q - ref_lp).mean(0), rtol=1e-4, atol=1e-4)


# -- the shared examples (tests/examples.py) ----------------------------------------------------


@pytest.mark.parametrize("name", ["exemplar", "exemplar-train", "exemplar-rat"])
def test_prior_examples_match_their_reference(name, dtype):
    from examples import PRIOR_EXAMPLES

    ex = next(e for e in PRIOR_EXAMPLES if e.name == name)
    prior = ex.make(3).to(dtype)
    prior.encoder.to(dtype)
    z = torch.randn(4, 2, 3, dtype=dtype)
    torch.testing.assert_close(prior.log_prob(z).double(), ex.reference(prior, z), **tol(dtype))
    assert isinstance(prior, vp.Prior)


def test_chunked_encoding_and_work_per_call(capsys):
    rows = []

    class Counting(Enc):
        def forward(self, x):
            rows.append(x.shape[0])
            return super().forward(x)

    torch.manual_seed(0)
    enc = Counting(3)
    x = torch.rand(10, D_IN)
    z, idx = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    whole = ExemplarPrior(x).bind(enc).log_prob(z, index=idx)
    chunked = ExemplarPrior(x, chunk_size=3, progress=True).bind(enc)
    sub = ExemplarPrior(x, n_subsample=4).bind(enc)
    assert chunked.latent_dim == sub.latent_dim == 3  # (encodes one exemplar each)
    rows.clear()
    torch.testing.assert_close(chunked.log_prob(z, index=idx), whole)
    assert rows == [3, 3, 3, 1]  # every exemplar, re-encoded at every training call
    rows.clear()
    sub.log_prob(z, index=idx)
    assert sum(rows) == 5  # only the M + 1 drawn exemplars
    rows.clear()
    chunked.eval().log_prob(z)
    assert "encoding exemplars" in capsys.readouterr().err  # the progress bar
    assert chunked.sample_around(torch.rand(0, D_IN), (2,)).shape == (2, 0, 3)


@pytest.mark.parametrize("log_var", [-12.0, 12.0])
@pytest.mark.parametrize("kw", [{}, {"n_subsample": 4}, {"k": 3}])
def test_extreme_variances(log_var, kw):
    prior, enc, x = make(n=8, **kw)
    with torch.no_grad():
        prior.log_var.fill_(log_var)
    z = torch.randn(3, 3) * 3
    idx = torch.tensor([0, 4, 7])
    got = prior.log_prob(z, index=idx)
    assert torch.isfinite(got).all()
    mu = means64(enc, x)
    if "n_subsample" in kw:
        sets, norm = subset_rows(prior.last_subset, idx, 4), 4
    else:
        sets, norm = [[j for j in range(8) if j != i] for i in idx.tolist()], 7
    if "k" in kw:
        sets = prior.last_neighbours.tolist()
    torch.testing.assert_close(got.double(), rows_ref(z, mu, log_var, sets, [norm] * 3), rtol=1e-5, atol=1e-4)
    prior.eval()
    full = rows_ref(z, mu, log_var, [range(8)] * 3, [8] * 3)
    torch.testing.assert_close(prior.log_prob(z).double(), full, rtol=1e-5, atol=1e-4)


# -- the retrieval's kNN, the cache's norms and its refresh schedule ---------------------------


@pytest.mark.parametrize("n,b,k", [(200, 17, 5), (40, 6, 39), (1000, 30, 10), (5003, 20, 5)])  # the last by block minima
def test_exact_knn_equals_the_engine(n, b, k, dtype):
    from vaepriors.rat import exact_knn

    g = torch.Generator().manual_seed(n)
    points = torch.randn(n, 4, generator=g, dtype=dtype) * 3
    queries = points[:b] + 0.01 * torch.randn(b, 4, generator=g, dtype=dtype)
    exclude = torch.arange(b)
    exclude[::3] = -1
    d2_ref, idx_ref = vp.knn(queries, points, k, exclude=exclude)
    for budget in (None, 3 * b * 2 * k * points.element_size()):  # one block, and blocks of ~2k points
        d2, idx = exact_knn(queries, points, k, exclude, memory_budget=budget)
        assert torch.equal(idx, idx_ref)
        torch.testing.assert_close(d2, d2_ref, rtol=0, atol=0)
        assert not (idx == exclude[:, None]).any()


def test_cache_norms_follow_writes_and_edits():
    prior, enc, x = make(n=12, k=2)
    prior.log_prob(torch.zeros(2, 3), index=torch.tensor([0, 1]))
    rat = prior.rat
    torch.testing.assert_close(rat.norms(), rat.means.square().sum(-1))
    rat.write(torch.tensor([3, 5, 3]), torch.arange(9.0).reshape(3, 3))  # a repeat: the last write wins
    assert torch.equal(rat.means[3], torch.tensor([6.0, 7.0, 8.0]))
    torch.testing.assert_close(rat.norms(), rat.means.square().sum(-1))
    with torch.no_grad():
        prior.rat_cache[7] = 2.0  # an edit by hand
    torch.testing.assert_close(rat.norms(), rat.means.square().sum(-1))
    prior.double()
    torch.testing.assert_close(rat.norms(), rat.means.square().sum(-1))


def test_first_epoch_encodes_the_exemplars_once():
    prior, enc, x = make(n=10, k=2, chunk_size=100)  # one encoder call per full pass
    z, idx = torch.zeros(2, 3), torch.tensor([0, 1])
    prior.log_prob(z, index=idx)  # builds the cache: this epoch's refresh
    calls = enc.calls
    prior.on_epoch_end(0)
    assert enc.calls == calls  # no second pass in the first epoch
    prior.log_prob(z, index=idx)
    calls = enc.calls
    prior.on_epoch_end(1)
    assert enc.calls == calls + 1  # refreshed at the end of the second epoch
    torch.testing.assert_close(prior.rat_cache, means64(enc, x).float(), rtol=1e-5, atol=1e-6)
    prior.refresh_cache()  # by hand, mid-epoch: it is this epoch's refresh
    calls = enc.calls
    prior.on_epoch_end(2)
    assert enc.calls == calls
    state = prior.state_dict()
    assert state["_extra_state"]["cache_filled_this_epoch"] is False


# -- truncated backward ------------------------------------------------------------------------


def _grads(prior, enc, z, idx):
    enc.zero_grad(set_to_none=True)
    prior.log_var.grad = None
    z = z.clone().requires_grad_(True)
    value = prior.log_prob(z, index=idx)
    value.sum().backward()
    g = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in enc.parameters()])
    return value.detach(), z.grad, prior.log_var.grad.clone(), g


@pytest.mark.parametrize("mode", [dict(), dict(n_subsample=60)], ids=["loo", "subsample"])
def test_truncated_backward_is_exact_in_value_and_close_in_gradient(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, D_IN, generator=g)
    torch.manual_seed(0)
    enc = Enc(3, scale=6.0)  # spread means: concentrated responsibilities
    z = enc(x[:12])[0].detach() + 0.3 * torch.randn(12, 3)
    idx = torch.arange(12)
    errors = []
    for tol in (0.0, 1e-6, 1e-3, 1e-1, 0.9):
        exact = ExemplarPrior(x, generator=1, **mode).bind(enc)  # the same subsets, call by call
        prior = ExemplarPrior(x, generator=1, truncate_backward=tol, **mode).bind(enc)
        for call in range(3):  # the first call predicts nothing (every exemplar kept), then it predicts
            v0, gz0, gv0, ge0 = _grads(exact, enc, z, idx)
            v, gz, gv, ge = _grads(prior, enc, z, idx)
            torch.testing.assert_close(v, v0, rtol=1e-6, atol=1e-6)  # the value is the exact one
            torch.testing.assert_close(gz, gz0, rtol=1e-5, atol=1e-6)  # z and sigma^2: exact gradients
            torch.testing.assert_close(gv, gv0, rtol=1e-5, atol=1e-6)
            kept, total = prior.last_truncation
            if call == 0:
                assert kept == total
        errors.append(float((ge - ge0).norm() / ge0.norm()))
        if tol == 0.0:
            assert kept == total and errors[-1] < 1e-6
    assert errors == sorted(errors) and errors[-1] > 1e-3  # more truncation, larger error
    assert prior.last_truncation[0] < prior.last_truncation[1]


def test_truncated_backward_corrects_a_wrong_prediction():
    """An exemplar predicted unimportant (from its stale mean) but found responsible gets its
    gradient all the same: the error stays that of the tolerance."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, D_IN, generator=g)
    torch.manual_seed(0)
    enc = Enc(3, scale=6.0)
    z = enc(x[:12])[0].detach() + 0.3 * torch.randn(12, 3)
    idx = torch.arange(12)
    exact = ExemplarPrior(x).bind(enc)
    prior = ExemplarPrior(x, truncate_backward=0.05).bind(enc)
    _grads(prior, enc, z, idx)
    prior._past[0].copy_(prior._past[0].roll(1, 0))  # each exemplar's stale mean is its neighbour's
    v0, _, _, g0 = _grads(exact, enc, z, idx)
    calls = enc.calls
    v, _, _, g = _grads(prior, enc, z, idx)
    assert enc.calls == calls + 3  # with gradients, without, and again with for the missed ones
    reference = ExemplarPrior(x, truncate_backward=0.05).bind(enc)
    _grads(reference, enc, z, idx)  # first call: all kept; second: a true prediction
    _, _, _, g_ref = _grads(reference, enc, z, idx)
    torch.testing.assert_close(v, v0, rtol=1e-6, atol=1e-6)
    assert float((g - g0).norm() / g0.norm()) <= 2 * float((g_ref - g0).norm() / g0.norm()) + 1e-6


def test_truncated_backward_is_refused_with_rat():
    with pytest.raises(VAEPriorsError, match="truncate_backward"):
        ExemplarPrior(torch.rand(9, D_IN), k=2, truncate_backward=1e-6)


def test_truncated_backward_only_in_training_with_gradients():
    prior, enc, x = make(n=12, truncate_backward=1e-3)
    z, idx = torch.randn(4, 3), torch.arange(4)
    with torch.no_grad():
        prior.log_prob(z, index=idx)
    assert prior.last_truncation is None
    prior.eval().log_prob(z)
    assert prior.last_truncation is None
    prior.train().log_prob(z, index=idx)
    assert prior.last_truncation is not None


@pytest.mark.parametrize("bad", [-0.1, 1.0, math.nan, "1e-6", torch.ones(2)])
def test_truncated_backward_rejects_bad_tolerances(bad):
    with pytest.raises(VAEPriorsError, match="truncate_backward"):
        ExemplarPrior(torch.rand(5, D_IN), truncate_backward=bad)
