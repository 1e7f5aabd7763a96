r"""The Exemplar VAE prior: a Parzen window in latent space over encoded exemplars, with the
leave-one-out, exemplar-subsampling and retrieval-augmented (RAT) training objectives, and
exemplar-based generation."""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from . import _checks
from .engine import knn, mixture_log_prob
from .errors import VAEPriorsError
from .prior import BasePrior

__all__ = ["ExemplarPrior", "decoded_input"]

ToInput = str | Callable[[Any], Tensor]


def decoded_input(output: Any, to_input: ToInput = "mean") -> Tensor:
    r"""Turns a decoder's output into an input tensor (for iterative generation and
    generative data augmentation).

    Arguments:
        output: what the decoder returned: a :class:`~torch.distributions.Distribution`
            over x, or a tensor already in input space (e.g. pixel probabilities).
        to_input: ``"mean"`` (the distribution's mean, e.g. Bernoulli probabilities: grey
            levels), ``"sample"`` (a draw from it), or a callable ``output -> Tensor``.

    Returns:
        The inputs, a tensor.

    Example:
        >>> out = torch.distributions.Bernoulli(logits=torch.zeros(2, 3))
        >>> decoded_input(out, "mean")
        tensor([[0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000]])
    """
    if callable(to_input):
        x = to_input(output)
        if not isinstance(x, Tensor):
            raise VAEPriorsError(f"`to_input` must return a tensor, got {type(x).__name__}")
        return x
    if to_input not in ("mean", "sample"):
        raise VAEPriorsError(f"`to_input` must be 'mean', 'sample' or a callable, got {to_input!r}")
    if isinstance(output, Distribution):
        return output.mean if to_input == "mean" else output.sample()
    if isinstance(output, Tensor):
        if to_input == "sample":
            raise VAEPriorsError(
                "`to_input='sample'` needs a decoder returning a Distribution; it returned a tensor "
                "(use to_input='mean' to take that tensor as the input)"
            )
        return output
    raise VAEPriorsError(
        f"the decoder returned {type(output).__name__}, which is neither a Distribution nor a tensor; "
        "pass `to_input` as a callable turning it into inputs"
    )


def _graph_leaves(t: Tensor) -> list[Tensor]:
    """The leaf tensors (parameters) an autograd graph reads."""
    leaves, seen, stack = [], set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if isinstance(var, Tensor):
            leaves.append(var)
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


def _reachable_tensors(fn: Callable, depth: int = 3) -> list[Tensor]:
    """Parameters, buffers and tensors a callable can reach: the modules and tensors in its
    closure, in the globals its code names, behind ``functools.partial`` and bound methods
    (and their owners' attributes), ``depth`` levels of functions deep."""
    import functools
    import types

    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(fn, 0)]
    while todo:
        obj, level = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            found.update((id(t), t) for t in (*obj.parameters(), *obj.buffers()))
        elif isinstance(obj, Tensor):
            found[id(obj)] = obj
        elif level < depth and isinstance(obj, functools.partial):
            todo += [(x, level + 1) for x in (obj.func, *obj.args, *obj.keywords.values())]
        elif level < depth and isinstance(obj, types.MethodType):
            todo += [(obj.__func__, level + 1), (obj.__self__, level + 1)]
        elif level < depth and isinstance(obj, types.FunctionType):
            cells = [c.cell_contents for c in obj.__closure__ or () if _cell_full(c)]
            names = [obj.__globals__[n] for n in obj.__code__.co_names if n in obj.__globals__]
            todo += [(x, level + 1) for x in (*cells, *names)]
        elif level < depth and level > 0 and hasattr(obj, "__dict__") and not isinstance(obj, type):
            # an object holding the model, e.g. the owner of a bound method
            todo += [(x, level + 1) for x in vars(obj).values() if isinstance(x, (nn.Module, Tensor))]
    return list(found.values())


def _cell_full(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not yet assigned
        return False
    return True


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter: they never change
        return -1


def _as_exemplars(data: Any, name: str = "data") -> Tensor:
    """A floating tensor [N, *input_shape] (N >= 1) from a tensor or a Dataset of x / (x, y)."""
    if isinstance(data, torch.utils.data.TensorDataset):
        data = data.tensors[0]
    if not isinstance(data, Tensor):
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise VAEPriorsError(
                f"`{name}` must be a tensor [N, *input_shape] or a Dataset of x or (x, y) items, "
                f"got {type(data).__name__}"
            )
        items = []
        for i in range(len(data)):
            item = data[i]
            if isinstance(item, (tuple, list)):
                if len(item) == 0:
                    raise VAEPriorsError(f"`{name}`[{i}] is an empty tuple; expected x or (x, y)")
                item = item[0]
            item = torch.as_tensor(item)
            if items and item.shape != items[0].shape:
                raise VAEPriorsError(
                    f"`{name}` items must all have one shape; item 0 has {tuple(items[0].shape)}, "
                    f"item {i} has {tuple(item.shape)}"
                )
            items.append(item)
        if not items:
            raise VAEPriorsError(f"`{name}` must hold at least one exemplar, got an empty dataset")
        data = torch.stack(items)
    data = _checks.floating(data, name)
    if data.dim() < 2:
        raise VAEPriorsError(
            f"`{name}` must have shape [N, *input_shape] with at least one input dimension, got "
            f"{tuple(data.shape)} (for scalar inputs use data[:, None])"
        )
    if data.shape[0] == 0:
        raise VAEPriorsError(f"`{name}` must hold at least one exemplar, got shape {tuple(data.shape)}")
    return data


class ExemplarPrior(BasePrior):
    r"""The Exemplar VAE prior: a uniform mixture of isotropic Gaussians centred on the
    encoder means of N exemplars, with one shared, learnable variance.

    .. math:: p(z \mid X) = \frac1N \sum_{n=1}^N \mathcal N(z;\ \mu_\phi(x_n),\ \sigma^2 I)

    The means come from the bound encoder's *mean* (its variance is not used), so the
    encoder learns through the prior too. ``log_var`` is :math:`\log\sigma^2`.

    **Training mode** (``prior.train()``, the default) gives the paper's training objectives
    for :math:`z` encoded from training point ``index`` (``log_prob(z, index=idx)``):

    * leave-one-out (``n_subsample=None``): :math:`\log \frac1{N-1}\sum_{n\ne i}\mathcal N(z;
      \mu(x_n), \sigma^2 I)`, the own exemplar excluded *inside* the reduction (exact even when
      it dominates); all N exemplars are re-encoded with gradients at every call.
    * exemplar subsampling (``n_subsample=M``): one random permutation prefix of M + 1
      exemplars is drawn per call; each row keeps the first M of it that are not its own
      index, i.e. an exact uniform draw of M exemplars among the other N - 1 (the paper's
      :math:`\pi \sim \Pi^{N,i}_M`), normalised by :math:`1/M`. Only these M + 1 are
      re-encoded. The draw of the last call is :attr:`last_subset`.
    * RAT (``k``): each z is compared with its k nearest exemplars (exact kNN in a cache of
      latent means, within the subset when subsampling), which are re-encoded with gradients;
      the normaliser stays :math:`N-1` (or :math:`M`), so it is a lower bound of the objective
      above, whatever the cache holds. The cache is built at first use, updated with every
      mean computed (the retrieved ones, and the batch's via :meth:`observe`), and fully
      refreshed every ``refresh_every`` calls of :meth:`on_epoch_end`.

    Without ``index`` (or for rows whose index is ``-1``) nothing is left out: the z is taken
    not to come from an exemplar (e.g. exemplars are half of the training set, as in the
    paper, and this point is in the other half). Pass ``index`` whenever the exemplars
    include the training point, or the prior memorises it.

    **Evaluation mode** (``prior.eval()``) is the exact density over all N exemplars (no
    leave-one-out, ``index`` ignored), computed by the engine within ``memory_budget``. The N
    means are encoded once (no gradients) and cached; the cache is recomputed when the mode
    switches, the exemplars change (:meth:`set_exemplars`, ``to()``, in-place edits) or any
    of the encoder's tensors changes (their version counters: optimiser steps,
    ``load_state_dict``). Tensors are found as the parameters and buffers of an
    ``nn.Module`` encoder (or of the module of a bound method), else as the modules and
    tensors the callable reaches (its closure, the globals it names, ``functools.partial``
    arguments) and the leaves of its autograd graph, frozen weights included; where none
    is found the means are not cached. Edits through ``.data`` bypass version counters:
    call :meth:`invalidate_cache` after those.

    Arguments:
        data: the exemplars: a tensor ``[N, *input_shape]`` or a Dataset of ``x`` or
            ``(x, y)`` items (stacked into a tensor). They may differ from the training
            inputs (e.g. grey-level exemplars for binarised training data). Kept as a
            non-persistent buffer: ``to(device)`` moves it, ``state_dict`` omits it.
        latent_dim: the size d of z; inferred from the encoder when omitted.
        n_subsample: M, exemplars per training call (``1 <= M <= N - 1``), or ``None`` for
            leave-one-out over all of them. The paper uses about N/2.
        k: RAT neighbours per z (``1 <= k <= N - 1``, and ``<= M``), or ``None`` for no RAT.
        refresh_every: full RAT cache refresh every this many :meth:`on_epoch_end` calls.
        init_log_var: initial :math:`\log\sigma^2`.
        chunk_size: exemplars encoded per encoder call.
        generator: a :class:`torch.Generator` or an int seed for the subsets and samples
            (``None``: torch's global generator).
        backend: engine backend (see :func:`~vaepriors.engine.mixture_log_prob`).
        memory_budget: bytes the engine may use for temporaries.
        progress: show a progress bar when encoding all exemplars (``None``: when N >= 50000).

    Example:
        >>> enc = nn.Linear(5, 4)
        >>> encoder = lambda x: enc(x).chunk(2, -1)
        >>> prior = ExemplarPrior(torch.rand(20, 5), n_subsample=10, k=3).bind(encoder)
        >>> prior.log_prob(torch.randn(2, 4, 2), index=torch.arange(4)).shape
        torch.Size([2, 4])
        >>> prior.eval().log_prob(torch.randn(4, 2)).shape
        torch.Size([4])
        >>> prior.sample((3,)).shape
        torch.Size([3, 2])

    References:
        Norouzi, Fleet & Norouzi, "Exemplar VAE: Linking Generative Models, Nearest Neighbor
        Retrieval, and Data Augmentation" (NeurIPS 2020), eqs. 8-12 and supplementary C, G.
    """

    def __init__(
        self,
        data: Tensor | torch.utils.data.Dataset,
        latent_dim: int | None = None,
        *,
        n_subsample: int | None = None,
        k: int | None = None,
        refresh_every: int = 1,
        init_log_var: float = 0.0,
        chunk_size: int = 4096,
        generator: torch.Generator | int | None = None,
        backend: str = "auto",
        memory_budget: int | None = None,
        progress: bool | None = None,
    ) -> None:
        super().__init__(latent_dim)
        x = _as_exemplars(data)
        self.n_subsample = None if n_subsample is None else _checks.positive_int(n_subsample, "n_subsample")
        self.k = None if k is None else _checks.positive_int(k, "k")
        self._check_sizes(x.shape[0])
        self.refresh_every = _checks.positive_int(refresh_every, "refresh_every")
        self.chunk_size = _checks.positive_int(chunk_size, "chunk_size")
        if not math.isfinite(float(init_log_var)):
            raise VAEPriorsError(f"`init_log_var` must be finite, got {init_log_var}")
        self.log_var = nn.Parameter(torch.tensor(float(init_log_var)))
        self.register_buffer("exemplars", x, persistent=False)
        if self.k is not None:
            # Persistent: a trained model's cache survives state_dict; [0, 0] until built.
            self.register_buffer("rat_cache", torch.zeros(0, 0))
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(generator)
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise VAEPriorsError(f"`generator` must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
        self.generator = generator
        self.backend = backend
        self.memory_budget = memory_budget
        self.progress = progress
        self.last_subset: Tensor | None = None
        self.last_neighbours: Tensor | None = None
        self._eval_cache: tuple | None = None
        self._leaves: tuple | None = None
        self._epochs_since_refresh = 0

    # -- the exemplar set --------------------------------------------------------------
    @property
    def n_exemplars(self) -> int:
        r"""N, the number of exemplars."""
        return self.exemplars.shape[0]

    @property
    def input_shape(self) -> torch.Size:
        r"""The shape of one exemplar."""
        return self.exemplars.shape[1:]

    def _check_sizes(self, n: int) -> None:
        m, k = self.n_subsample, self.k
        if m is not None and m > n - 1:
            raise VAEPriorsError(
                f"`n_subsample` must be at most N - 1 = {n - 1} (the exemplars other than the point itself), got {m}"
            )
        if k is not None:
            limit, what = (n - 1, "N - 1") if m is None else (m, "n_subsample")
            if k > limit:
                raise VAEPriorsError(
                    f"`k` must be at most {what} = {limit} (the exemplars a training point can retrieve), got {k}"
                )

    def set_exemplars(self, data: Tensor | torch.utils.data.Dataset) -> "ExemplarPrior":
        r"""Swaps in another exemplar set (e.g. a larger one for generation after training);
        returns ``self``.

        The new set must have the same input shape; it is moved to the current device and
        dtype. The evaluation cache is dropped and the RAT cache resized (rebuilt now if it
        was built).

        Arguments:
            data: a tensor ``[N', *input_shape]`` or a Dataset, as for the constructor.
        """
        x = _as_exemplars(data)
        if x.shape[1:] != self.input_shape:
            raise VAEPriorsError(
                f"`data` must have exemplars of shape {tuple(self.input_shape)} like the current set, "
                f"got [N, *input_shape] = {tuple(x.shape)}"
            )
        self._check_sizes(x.shape[0])
        was_built = self.k is not None and self._cache_built()
        self.exemplars = x.to(self.exemplars)
        self.invalidate_cache()
        if self.k is not None:
            self.rat_cache = self.rat_cache.new_zeros(0, 0)
            if was_built:
                self.refresh_cache()
        return self

    # -- encoding ----------------------------------------------------------------------
    def _encode(self, x: Tensor, progress: bool = False) -> Tensor:
        """Encoder means of inputs ``[n, *input_shape]`` -> ``[n, d]``, in chunks."""
        n, cs = x.shape[0], self.chunk_size
        starts = range(0, max(n, 1), cs)  # an empty input still gives [0, d]
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding exemplars", unit="chunk", leave=False)
        parts = []
        for s in starts:
            mean, _ = self.encode(x[s : s + cs])
            rows = max(min(cs, n - s), 0)
            if mean.shape != (rows, self._latent_dim):
                raise VAEPriorsError(
                    f"`encoder` must map exemplars [n, *input_shape] = {(rows, *x.shape[1:])} to means "
                    f"[n, d]; got {tuple(mean.shape)}"
                )
            parts.append(mean)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def exemplar_means(self, index: Tensor | None = None, *, progress: bool = False) -> Tensor:
        r"""Encoder means of the exemplars ``index`` (all when ``None``), ``[len(index), d]``,
        with gradients where enabled; ``progress`` shows a bar when N is large."""
        x = self.exemplars if index is None else self.exemplars[index.to(self.exemplars.device)]
        return self._encode(x, progress=progress and self._show_progress())

    def _show_progress(self) -> bool:
        return self.n_exemplars >= 50_000 if self.progress is None else bool(self.progress)

    def _example_input(self) -> Tensor:
        return self.exemplars[:1]

    # -- evaluation cache --------------------------------------------------------------
    def _encoder_tensors(self) -> list[Tensor]:
        """The tensors the encoder's output depends on, as far as they can be found: a
        module's parameters and buffers; for any other callable, what it reaches
        (:func:`_reachable_tensors`) and the leaves of its autograd graph."""
        enc = self.encoder
        owner = enc if isinstance(enc, nn.Module) else getattr(enc, "__self__", None)
        if isinstance(owner, nn.Module):
            return [*owner.parameters(), *owner.buffers()]
        if self._leaves is None or self._leaves[0] is not enc:
            with torch.enable_grad():
                mean, _ = self.encode(self._example_input())
            found = {id(t): t for t in (*_reachable_tensors(enc), *_graph_leaves(mean))}
            self._leaves = (enc, list(found.values()))
        return self._leaves[1]

    def _cache_key(self) -> tuple | None:
        """What the cached evaluation means depend on; ``None`` (no caching) when none of
        the encoder's tensors could be found, since a change to them would go unseen."""
        tensors = self._encoder_tensors()
        if not tensors:
            return None
        owner = self.encoder if isinstance(self.encoder, nn.Module) else getattr(self.encoder, "__self__", None)
        return (
            id(self.encoder),
            getattr(owner, "training", None),  # dropout or batch norm switched by hand
            _version(self.exemplars),
            tuple((id(t), t.data_ptr(), _version(t)) for t in tensors),
        )

    def invalidate_cache(self) -> None:
        r"""Drops the cached evaluation means (they are recomputed on the next call)."""
        self._eval_cache = None

    def _eval_means(self) -> Tensor:
        key = self._cache_key()
        c = self._eval_cache
        if key is not None and c is not None and c[0]() is self.exemplars and c[1] == key:
            return c[2]
        with torch.no_grad():
            means = self.exemplar_means(progress=True)
        self._eval_cache = None if key is None else (weakref.ref(self.exemplars), key, means)
        return means

    def train(self, mode: bool = True) -> "ExemplarPrior":
        r"""Sets training (``True``) or evaluation mode, as for any module; drops the
        evaluation cache."""
        self.invalidate_cache()
        return super().train(mode)

    # -- RAT cache ---------------------------------------------------------------------
    def _cache_built(self) -> bool:
        return self.rat_cache.shape == (self.n_exemplars, self._latent_dim)

    def refresh_cache(self) -> None:
        r"""Recomputes the RAT cache of all N latent means (no gradients)."""
        if self.k is None:
            raise VAEPriorsError("refresh_cache() needs a RAT prior (construct it with `k`)")
        with torch.no_grad():
            self.rat_cache = self.exemplar_means(progress=True).detach().clone()
        self._epochs_since_refresh = 0

    def _ensure_cache(self) -> Tensor:
        if self._latent_dim is None:
            self.latent_dim  # noqa: B018 (encodes one exemplar to learn d)
        if not self._cache_built():
            self.refresh_cache()
        return self.rat_cache

    def observe(self, mean: Tensor, index: Tensor) -> None:
        r"""Writes the encoder means ``[B, d]`` of exemplars ``index`` ``[B]`` into the RAT
        cache (a no-op without RAT or before the cache is built).

        :class:`~vaepriors.ExemplarELBO` calls it with the means of the training batch; when
        the exemplars differ from the training inputs (grey-level vs binarised), those stand
        in for the exemplars' own until retrieved or refreshed. Any cache content keeps the
        RAT objective a lower bound; only which neighbours are found depends on it."""
        if self.k is None or not self._cache_built():
            return
        mean = _checks.latent(mean, self._latent_dim, "mean")
        if mean.dim() != 2:
            raise VAEPriorsError(f"`mean` must have shape [B, d], got {tuple(mean.shape)}")
        index = _checks.index(index, mean.shape[:1], self.n_exemplars, "index")
        keep = index >= 0
        with torch.no_grad():
            self.rat_cache[index[keep].to(self.rat_cache.device)] = mean[keep].detach().to(self.rat_cache)

    def on_epoch_end(self, epoch: int) -> None:
        r"""Refreshes the RAT cache fully every ``refresh_every`` calls (if it is built)."""
        if self.k is None:
            return
        self._epochs_since_refresh += 1
        if self._epochs_since_refresh >= self.refresh_every and self._cache_built():
            self.refresh_cache()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The RAT cache is [0, 0] until built: take the stored shape when it fits this set.
        key = prefix + "rat_cache"
        if self.k is not None and key in state_dict:
            t = state_dict[key]
            if isinstance(t, Tensor) and t.dim() == 2 and t.shape[0] in (0, self.n_exemplars):
                self.rat_cache = torch.empty(t.shape, dtype=self.rat_cache.dtype, device=self.rat_cache.device)
                if t.shape[0] and self._latent_dim is None:
                    self._latent_dim = t.shape[1]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def get_extra_state(self) -> dict:
        r"""What :meth:`state_dict` holds besides tensors (key ``_extra_state``): the private
        generator's state, so that a restored prior draws the subsets and samples the saved
        one would have drawn next, and the epochs since the last RAT refresh."""
        state: dict = {"epochs_since_refresh": self._epochs_since_refresh}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def set_extra_state(self, state: dict) -> None:
        r"""Restores :meth:`get_extra_state`'s dict (a generator state only where this prior
        has a generator of its own)."""
        self._epochs_since_refresh = int(state.get("epochs_since_refresh", 0))
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    # -- randomness --------------------------------------------------------------------
    def _draw_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else self.exemplars.device

    def _randperm(self, n: int) -> Tensor:
        return torch.randperm(n, generator=self.generator, device=self._draw_device()).to(self.exemplars.device)

    def _randint(self, high: int, count: int) -> Tensor:
        idx = torch.randint(high, (count,), generator=self.generator, device=self._draw_device())
        return idx.to(self.exemplars.device)

    def _randn(self, shape: Sequence[int], like: Tensor) -> Tensor:
        eps = torch.randn(*shape, generator=self.generator, device=self._draw_device(), dtype=like.dtype)
        return eps.to(like.device)

    # -- log-density -------------------------------------------------------------------
    def _log_prob(self, z: Tensor, index: Tensor | None) -> Tensor:
        if not self.training:
            return mixture_log_prob(
                z, self._eval_means(), self.log_var, backend=self.backend, memory_budget=self.memory_budget
            )
        n, batch = self.n_exemplars, z.shape[:-1]
        if index is None:
            own = torch.full(batch, -1, dtype=torch.long, device=z.device)
        else:
            own = _checks.index(index, batch, n, "index").to(z.device)
        m = self.n_subsample
        if m is None:
            if n < 2 and bool((own >= 0).any()):
                raise VAEPriorsError("leave-one-out needs at least 2 exemplars, the prior has N = 1")
            subset, exclude = None, own
            self.last_subset = None
        else:
            # A permutation prefix of M + 1: each row drops its own index if among the first
            # M, else the (M+1)-th, which leaves a uniform M-subset of the other exemplars.
            subset = self._randperm(n)[: m + 1].to(z.device)
            where = torch.full((n,), -1, dtype=torch.long, device=z.device)
            where[subset[:m]] = torch.arange(m, device=z.device)
            pos = where[own.clamp_min(0)]
            exclude = torch.where((own >= 0) & (pos >= 0), pos, torch.full_like(pos, m))
            self.last_subset = subset
        if self.k is None:
            means = self.exemplar_means(subset)
            return mixture_log_prob(
                z, means, self.log_var, exclude=exclude, backend=self.backend, memory_budget=self.memory_budget
            )
        return self._rat_log_prob(z, subset, exclude, own)

    def _rat_log_prob(self, z: Tensor, subset: Tensor | None, exclude: Tensor, own: Tensor) -> Tensor:
        cache = self._ensure_cache()
        points = cache if subset is None else cache[subset.to(cache.device)]
        _, nb = knn(
            z.detach().to(points.dtype), points, self.k, exclude=exclude.to(points.device),
            backend=self.backend, memory_budget=self.memory_budget,
        )
        nb = nb.to(z.device)
        ids = nb if subset is None else subset[nb]
        self.last_neighbours = ids
        uniq, inv = torch.unique(ids, return_inverse=True)
        fresh = self.exemplar_means(uniq)
        _checks.finite(fresh, "encoder mean")
        with torch.no_grad():
            self.rat_cache[uniq.to(cache.device)] = fresh.detach().to(cache)
        d = z.shape[-1]
        log_var = self.log_var.to(z.dtype)
        sq = (z.unsqueeze(-2) - fresh[inv]).pow(2).sum(-1)  # [*batch, k]
        # The full mixture's normaliser (not k): a lower bound of the objective without RAT.
        if subset is None:
            kept = (self.n_exemplars - (own >= 0).long()).to(z.dtype)
        else:
            kept = torch.full_like(sq[..., 0], float(self.n_subsample))
        return torch.logsumexp(-0.5 * sq * torch.exp(-log_var), -1) - 0.5 * d * (math.log(2 * math.pi) + log_var) - kept.log()

    # -- sampling ----------------------------------------------------------------------
    def _draw(self, shape: torch.Size) -> tuple[Tensor, Tensor]:
        self.encoder  # noqa: B018 (raises the "needs the encoder" error when unbound)
        d = self.latent_dim
        count = shape.numel()
        j = self._randint(self.n_exemplars, count)
        if count == 0:
            z = self.log_var.new_zeros(count, d)
        else:
            uniq, inv = torch.unique(j, return_inverse=True)
            # Only the chosen exemplars are encoded: O(samples x d) memory.
            mu = self.exemplar_means(uniq)[inv]
            z = mu + torch.exp(0.5 * self.log_var.to(mu.dtype)) * self._randn((count, d), mu)
        return z.reshape(*shape, d), j.reshape(shape)

    def _rsample(self, shape: torch.Size) -> Tensor:
        return self._draw(shape)[0]

    def sample_with_index(self, sample_shape: int | Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        r"""Samples with the exemplar each came from: a uniform exemplar n, then
        :math:`z \sim \mathcal N(\mu(x_n), \sigma^2 I)`; no gradients.

        Returns:
            ``(z, index)``: ``[*sample_shape, d]`` and ``[*sample_shape]``.
        """
        with torch.no_grad():
            return self._draw(_checks.sample_shape(sample_shape))

    def sample_around(self, exemplars: Tensor, sample_shape: int | Sequence[int] = ()) -> Tensor:
        r"""Exemplar-conditioned latents :math:`z \sim \mathcal N(\mu(x_b), \sigma^2 I)` around
        given inputs (any inputs of the exemplars' shape, not only the prior's set).

        Gradients flow to the encoder and ``log_var`` where enabled.

        Arguments:
            exemplars: inputs ``[B, *input_shape]``.
            sample_shape: latents per input.

        Returns:
            ``[*sample_shape, B, d]``.
        """
        x = _checks.floating(exemplars, "exemplars")
        if x.dim() != 1 + len(self.input_shape) or x.shape[1:] != self.input_shape:
            raise VAEPriorsError(
                f"`exemplars` must have shape [B, *input_shape] = [B, {', '.join(map(str, self.input_shape))}], "
                f"got {tuple(x.shape)}"
            )
        shape = _checks.sample_shape(sample_shape)
        mu = self._encode(x.to(self.exemplars.device))
        eps = self._randn((*shape, *mu.shape), mu)
        return mu + torch.exp(0.5 * self.log_var.to(mu.dtype)) * eps

    def generate_iteratively(
        self,
        decoder: Callable[[Tensor], Any],
        start: Tensor | int,
        steps: int,
        *,
        to_input: ToInput = "mean",
    ) -> Tensor:
        r"""Iterative generation (supplementary G): each sample is fed back as the next
        exemplar, :math:`z_t \sim \mathcal N(\mu(x_t), \sigma^2 I)`,
        :math:`x_{t+1} = \text{to\_input}(\text{decoder}(z_t))`; no gradients.

        Arguments:
            decoder: ``z [B, d] ->`` a Distribution over x (or a tensor in input space).
            start: the first exemplars ``[B, *input_shape]`` (training points, noise, ...),
                or an int B to start from B random exemplars of the set.
            steps: the number of generations.
            to_input: how the decoder's output becomes the next input: ``"mean"``
                (e.g. Bernoulli probabilities: grey-level images, like the exemplars the
                paper trains with), ``"sample"``, or a callable (see :func:`decoded_input`).

        Returns:
            The chain ``[steps + 1, B, *input_shape]``, starting with ``start``.
        """
        steps = _checks.positive_int(steps, "steps")
        if isinstance(start, int) and not isinstance(start, bool):
            start = self.exemplars[self._randint(self.n_exemplars, _checks.positive_int(start, "start"))]
        with torch.no_grad():
            chain = [start]
            for _ in range(steps):
                z = self.sample_around(chain[-1])
                x = decoded_input(decoder(z), to_input)
                if x.shape != chain[-1].shape:
                    raise VAEPriorsError(
                        f"the decoded inputs have shape {tuple(x.shape)}, expected {tuple(chain[-1].shape)}; "
                        "pass a `to_input` callable that reshapes them"
                    )
                chain.append(x.to(chain[-1].dtype))
        return torch.stack(chain)

    def extra_repr(self) -> str:
        return (
            f"n_exemplars={self.n_exemplars}, input_shape={tuple(self.input_shape)}, latent_dim={self._latent_dim}, "
            f"n_subsample={self.n_subsample}, k={self.k}"
        )
