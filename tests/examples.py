"""The one list of prior examples that the generic contract tests (test_prior.py) run over,
and the posterior families they run with.

Each example builds a prior bound to a small encoder of a given family, and gives an
independent float64 reference of its log-density computed by brute force from the prior's
own parameters and the encoder's own densities (never the library's). To add a prior,
append a `PriorExample`; to add a posterior family, add an encoder to `FAMILIES`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import vaepriors as vp

INPUT_DIM = 6


class ToyEncoder(nn.Module):
    """x [B, INPUT_DIM] -> (mean, log_var) [B, d]; log_var kept in a sane range."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Linear(INPUT_DIM, 2 * d)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.net(x).chunk(2, -1)
        return mean, 2 * torch.tanh(raw)

    # Independent float64 references of the posterior (call on a .double() copy).
    def point(self, x: Tensor) -> Tensor:
        return self(x)[0]

    def log_q(self, z: Tensor, x: Tensor) -> Tensor:
        """log q(z | x) for z [..., B, d] and x [B, INPUT_DIM]."""
        m, lv = self(x)
        return normal_log_density64(z, m, lv)


class LaplaceEncoder(ToyEncoder):
    """x -> Laplace(loc, scale) over [B, d] (batch shape [B, d], event shape ())."""

    def forward(self, x: Tensor) -> torch.distributions.Laplace:
        loc, raw = self.net(x).chunk(2, -1)
        return torch.distributions.Laplace(loc, torch.exp(torch.tanh(raw)))

    def point(self, x: Tensor) -> Tensor:
        return self(x).loc

    def log_q(self, z: Tensor, x: Tensor) -> Tensor:
        q = self(x)
        b = q.scale.double()
        return (-torch.log(2 * b) - (z.double() - q.loc.double()).abs() / b).sum(-1)


class FlowEncoder(nn.Module):
    """x -> a zuko masked autoregressive flow conditioned on x (no closed-form mean)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        import zuko

        self.flow = zuko.flows.MAF(d, context=INPUT_DIM, transforms=2, hidden_features=[16])

    def forward(self, x: Tensor):  # noqa: ANN201
        return self.flow(x)

    def point(self, x: Tensor) -> Tensor:
        q = self.flow(x)
        return q.transform.inv(q.base.base_dist.loc)  # the base's mean through the flow

    def log_q(self, z: Tensor, x: Tensor) -> Tensor:
        q = self.flow(x)
        return q.log_prob(z.expand(*z.shape[:-2], x.shape[0], z.shape[-1]))


def _zuko_available() -> bool:
    try:
        import zuko  # noqa: F401
    except ImportError:
        return False
    return True


FAMILIES: dict[str, type[nn.Module]] = {"normal": ToyEncoder, "laplace": LaplaceEncoder}
if _zuko_available():
    FAMILIES["flow"] = FlowEncoder


def normal_log_density64(z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(log_var))) in float64 by the difference form; broadcasts."""
    z, mean, log_var = z.double(), mean.double(), log_var.double()
    return -0.5 * (math.log(2 * math.pi) + log_var + (z - mean) ** 2 / log_var.exp()).sum(-1)


def mixture_reference64(z: Tensor, means: Tensor, log_var: Tensor, log_w: Tensor) -> Tensor:
    """log sum_k w_k N(z; m_k, diag(v_k)) for z [..., d], means/log_var [K, d], log_w [K]."""
    comp = normal_log_density64(z[..., None, :], means, log_var)  # [..., K]
    return torch.logsumexp(comp + log_w.double(), -1)


@dataclass
class PriorExample:
    """`make(d, family="normal")` builds a float32 prior bound to an encoder of that
    family (`FAMILIES`); `reference(prior, z)` is an independent float64 log p(z);
    `components(prior)`, for mixtures with the normal family, gives float64
    (means [K, d], log_var [K, d], log_w [K]) for checks of sampling statistics."""

    name: str
    make: Callable[..., nn.Module]
    reference: Callable[[nn.Module, Tensor], Tensor]
    components: Callable[[nn.Module], tuple[Tensor, Tensor, Tensor]] | None = None


def from_components(components: Callable) -> Callable[[nn.Module, Tensor], Tensor]:
    """The float64 reference log-density of a prior given by its mixture components."""
    return lambda prior, z: mixture_reference64(z, *components(prior))


def _gaussian_components(prior: vp.GaussianPrior) -> tuple[Tensor, Tensor, Tensor]:
    d = prior.latent_dim
    return torch.zeros(1, d, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)


def _mog_components(prior: vp.MixturePrior) -> tuple[Tensor, Tensor, Tensor]:
    k = prior.n_components
    if prior.logits is not None:
        log_w = torch.log_softmax(prior.logits.detach().double(), 0)
    else:
        log_w = torch.full((k,), -math.log(k), dtype=torch.float64)
    return prior.means.detach().double(), prior.log_var.detach().double(), log_w


def _enc64(prior: nn.Module) -> nn.Module:
    """A float64 copy of the encoder, so the reference does not share the prior's precision."""
    return copy.deepcopy(prior.encoder).double()


def _vamp_components(prior: vp.VampPrior) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        m, lv = _enc64(prior)(prior.pseudo_inputs.detach().double())
    k = prior.n_components
    return m, lv, torch.full((k,), -math.log(k), dtype=torch.float64)


def _vamp_reference(prior: vp.VampPrior, z: Tensor) -> Tensor:
    """log (1/K) sum_k q(z | u_k) with the family's own float64 density."""
    u = prior.pseudo_inputs.detach().double()
    with torch.no_grad():
        log_q = _enc64(prior).log_q(z.double().unsqueeze(-2), u)  # [..., K]
    return torch.logsumexp(log_q, -1) - math.log(u.shape[0])


def _mog(d: int, learn: bool) -> vp.MixturePrior:
    p = vp.MixturePrior(d, 5, learn_weights=learn, init_log_var=-0.5)
    with torch.no_grad():
        p.log_var.uniform_(-1.0, 0.5)
        if p.logits is not None:
            p.logits.normal_()
    return p


def _vamp(d: int, family: str = "normal") -> vp.VampPrior:
    return vp.VampPrior(torch.rand(7, INPUT_DIM)).bind(FAMILIES[family](d))


def _mixture_example(name: str, make: Callable, components: Callable) -> PriorExample:
    return PriorExample(name, make, from_components(components), components)


PRIOR_EXAMPLES: list[PriorExample] = [
    _mixture_example("gaussian", lambda d, family="normal": vp.GaussianPrior(d), _gaussian_components),
    _mixture_example("mog", lambda d, family="normal": _mog(d, True), _mog_components),
    _mixture_example("mog-uniform", lambda d, family="normal": _mog(d, False), _mog_components),
    PriorExample("vamp", _vamp, _vamp_reference, _vamp_components),
]


# -- ExemplarPrior ----------------------------------------------------------------------------


def _exemplar_components(prior: vp.ExemplarPrior) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluation (and training without index or subsampling): the full uniform mixture."""
    with torch.no_grad():
        m = _enc64(prior).point(prior.exemplars.double())
    n = prior.n_exemplars
    log_var = prior.log_var.detach().double().expand(n, m.shape[-1])
    return m, log_var, torch.full((n,), -math.log(n), dtype=torch.float64)


def _exemplar(d: int, family: str = "normal", train: bool = False, **kwargs) -> vp.ExemplarPrior:
    prior = vp.ExemplarPrior(torch.rand(9, INPUT_DIM), init_log_var=-0.5, **kwargs).bind(FAMILIES[family](d))
    return prior.train(train)


def _exemplar_uint8(d: int, family: str = "normal") -> vp.ExemplarPrior:
    """Exemplars stored as uint8 pixels, read as /255 chunk by chunk."""
    pixels = torch.randint(0, 256, (9, INPUT_DIM), dtype=torch.uint8)
    return vp.ExemplarPrior(pixels, init_log_var=-0.5, chunk_size=4).bind(FAMILIES[family](d)).eval()


def _uint8_reference(prior: vp.ExemplarPrior, z: Tensor) -> Tensor:
    with torch.no_grad():
        m = _enc64(prior).point(prior.exemplars.double() / 255)
    n = m.shape[0]
    log_var = prior.log_var.detach().double().expand(n, m.shape[-1])
    return mixture_reference64(z, m, log_var, torch.full((n,), -math.log(n), dtype=torch.float64))


PRIOR_EXAMPLES += [
    _mixture_example("exemplar", _exemplar, _exemplar_components),
    # Training mode without `index` and without subsampling is the same full mixture.
    _mixture_example("exemplar-train", lambda d, family="normal": _exemplar(d, family, train=True), _exemplar_components),
    # RAT and subsampling only change training; evaluation stays exact.
    _mixture_example("exemplar-rat", lambda d, family="normal": _exemplar(d, family, n_subsample=6, k=3), _exemplar_components),
    PriorExample("exemplar-uint8", _exemplar_uint8, _uint8_reference),
]



def _coreset(d: int, family: str = "normal") -> vp.PseudocoresetPrior:
    # Two zero weights: those components must drop out of the density.
    w = torch.tensor([0.0, 3.0, 1.5, 0.5, 2.0, 0.0, 3.0])
    return vp.PseudocoresetPrior(torch.rand(7, INPUT_DIM), w, init_log_var=-0.3).bind(FAMILIES[family](d))


def _coreset_components(prior: vp.PseudocoresetPrior) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        m = _enc64(prior).point(prior.pseudo_inputs.double())
    log_var = prior.log_var.detach().double().expand(m.shape)
    return m, log_var, torch.log(prior.weights.double() / prior.n_total)


def _coreset_ref(prior: vp.PseudocoresetPrior, z: Tensor) -> Tensor:
    return mixture_reference64(z, *_coreset_components(prior))


# Sampling statistics from the components where PriorExample has that field.
_extra = {"components": _coreset_components} if "components" in PriorExample.__dataclass_fields__ else {}
PRIOR_EXAMPLES.append(PriorExample("pseudocoreset", _coreset, _coreset_ref, **_extra))
