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
from . import distributed as dist
from .encoder import Location, Posterior
from .engine import LogSumExp, get_memory_budget, mixture_logsumexp
from .errors import VAEPriorsError
from .exemplar_set import ExemplarSet
from .prior import BasePrior
from .rat import RetrievalCache, sharded_knn

__all__ = ["ExemplarPrior", "decoded_input"]

ToInput = str | Callable[[Any], Tensor]

# Default exemplars per encoder call (``chunk_size=None``). On a CPU, chunks of a few hundred
# rows keep a layer's input, weights and output in cache: the papers' MLP encoder ran 1.2x
# faster, forward and backward, on 512-row chunks than on 4096 (benchmarks/results/
# profile_train_step_cpu.md). GPUs want large launches.
CPU_CHUNK = 512
DEVICE_CHUNK = 4096


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


class ExemplarPrior(BasePrior):
    r"""The Exemplar VAE prior: a uniform mixture of isotropic Gaussians centred on the
    encoder's points of N exemplars, with one shared, learnable variance.

    .. math:: p(z \mid X) = \frac1N \sum_{n=1}^N \mathcal N(z;\ \mu_\phi(x_n),\ \sigma^2 I)

    :math:`\mu_\phi(x_n)` is a point of the encoder's posterior at exemplar :math:`x_n`: its
    mean for a Gaussian (its variance is not used) or any family with a mean, else the
    ``location`` function's point (see :func:`~vaepriors.encoder.default_location`), so the
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
      above, whatever the cache holds. The cache (:class:`~vaepriors.rat.RetrievalCache`,
      ``prior.rat``) is built at first use, updated with every mean computed (the retrieved
      ones, and the batch's via :meth:`observe`), and fully refreshed every
      ``refresh_every`` calls of :meth:`on_epoch_end`.

    Without ``index`` (or for rows whose index is ``-1``) nothing is left out: the z is taken
    not to come from an exemplar (e.g. exemplars are half of the training set, as in the
    paper, and this point is in the other half). Pass ``index`` whenever the exemplars
    include the training point, or the prior memorises it;
    :class:`~vaepriors.exemplar_set.IndexedDataset` makes a DataLoader yield it.

    **Evaluation mode** (``prior.eval()``) is the exact density over all N exemplars (no
    leave-one-out, ``index`` ignored), computed by the engine within ``memory_budget``. The N
    means are encoded once (no gradients) and cached; the cache is recomputed when the prior
    is switched by ``train()`` / ``eval()`` (not by the library's own evaluation functions,
    which restore it), any encoder submodule's mode changes, the exemplars change (:meth:`set_exemplars`, in-place edits) or any of the
    encoder's tensors changes (their version counters: optimiser steps,
    ``load_state_dict``). Tensors are found as the parameters and buffers of an
    ``nn.Module`` encoder (or of the module of a bound method), else as the modules and
    tensors the callable reaches (its closure, the globals it names, ``functools.partial``
    arguments) and the leaves of its autograd graph, frozen weights included; where none
    is found the means are not cached. Edits through ``.data`` bypass version counters:
    call :meth:`invalidate_cache` after those.

    **Exemplars as stored** (:class:`~vaepriors.exemplar_set.ExemplarSet`): the set is kept
    in its own dtype (uint8 images stay uint8; ``transform`` turns each encoded chunk into
    inputs, by default scaling uint8 to [0, 1]), a Dataset is read chunk by chunk through a
    DataLoader and never stacked, and ``storage_device="cpu"`` keeps the set on the CPU
    while the model is on a GPU (only the chunks being encoded move). The set is not a
    buffer: ``state_dict`` omits it and DDP never broadcasts it.

    **Several processes** (torch.distributed initialised, world size > 1; see
    :mod:`vaepriors.distributed`): every rank draws the same subsets (a generator synchronised
    from rank 0 at first use), RAT cache writes of all ranks are merged so the caches stay
    identical, and full cache refreshes are encoded a slice per rank.
    With ``shard=True`` each rank holds only its contiguous block of the N exemplars (their
    means and cache rows): ``log_prob`` gathers the queries of all ranks, reduces each over
    the local block and combines the partial log-sum-exps exactly, so values are those of
    one process over all N, and gradients (after DDP's averaging) too; leave-one-out,
    subsampling and RAT's kNN (per-shard top-k, merged) stay exact across shards. Every rank
    must then call ``log_prob`` (and the prior's hooks) the same number of times. A
    replicated prior's evaluation-mode ``log_prob`` never communicates, so one rank may
    evaluate alone; its training calls and :meth:`on_epoch_end` are collective.

    Arguments:
        data: the exemplars: a tensor ``[N, *shape]`` of any real dtype, or a Dataset of
            ``x`` or ``(x, y)`` items. They may differ from the training inputs (e.g.
            grey-level exemplars for binarised training data).
        latent_dim: the size d of z; inferred from the encoder when omitted.
        n_subsample: M, exemplars per training call (``1 <= M <= N - 1``), or ``None`` for
            leave-one-out over all of them. The paper uses about N/2.
        k: RAT neighbours per z (``1 <= k <= N - 1``, and ``<= M``), or ``None`` for no RAT.
        refresh_every: full RAT cache refresh every this many :meth:`on_epoch_end` calls.
        init_log_var: initial :math:`\log\sigma^2`.
        chunk_size: exemplars encoded per encoder call; ``None``: 512 on a CPU (where the
            encoder's matrices and activations for 512 rows stay in cache and its GEMMs run
            ~1.2x faster than on 4096-row chunks), 4096 on other devices, and never more than
            fit ``memory_budget`` (the engine's default when ``None``) at 16 float copies of one
            input each (the input, its conversion, the encoder's activations): ~340 RGB 64x64
            images.
        generator: a :class:`torch.Generator` or an int seed for the subsets and samples
            (``None``: torch's global generator; a private one, seeded from rank 0, under
            torch.distributed).
        backend: engine backend (see :func:`~vaepriors.engine.mixture_log_prob`).
        memory_budget: bytes the engine may use for temporaries.
        progress: show a progress bar when encoding all exemplars (``None``: when N >= 50000).
        transform: stored chunk -> encoder inputs (default: uint8 / 255, others cast to the
            prior's dtype); see :class:`~vaepriors.exemplar_set.ExemplarSet`.
        storage_device: keep a tensor set on this device (``None``: it follows ``.to()``).
        num_workers: DataLoader workers when ``data`` is a Dataset.
        location: ``posterior -> [*batch, d]`` point per exemplar for posterior families
            without a mean (``None``: :func:`~vaepriors.encoder.default_location`).
        shard: hold only this rank's block of the exemplars (under torch.distributed).
        process_group: the group to communicate in (``None``: the default group).
        sync: communicate under torch.distributed at all (``False``: every rank on its own).
        truncate_backward: ``None`` (the default): exact gradients. A tolerance ``tau``
            (leave-one-out and subsampling, not RAT): in training mode the encoder gradient
            through the exemplar means is kept only for the exemplars whose responsibility,
            the largest over the call's queries of the posterior weight
            :math:`w_{in} = \mathcal N(z_i; \mu_n, \sigma^2 I) / \sum_m \mathcal N(z_i;
            \mu_m, \sigma^2 I)`, exceeds ``tau``; the others are encoded without an autograd
            graph and their gradient is dropped. Values, and gradients w.r.t. z and
            :math:`\sigma^2`, stay exact. The share back-propagated is in
            :attr:`last_truncation`; see "Truncated backward" in the documentation's priors page for the
            error it introduces (about ``tau`` relative, measured) and what it saves.

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

    _observe_validates = True  # observe() checks the means it writes into the RAT cache

    def __init__(
        self,
        data: Tensor | torch.utils.data.Dataset,
        latent_dim: int | None = None,
        *,
        n_subsample: int | None = None,
        k: int | None = None,
        refresh_every: int = 1,
        init_log_var: float = 0.0,
        chunk_size: int | None = None,
        generator: torch.Generator | int | None = None,
        backend: str = "auto",
        memory_budget: int | None = None,
        progress: bool | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        storage_device: torch.device | str | None = None,
        num_workers: int = 0,
        location: Location | None = None,
        shard: bool = False,
        process_group: Any = None,
        sync: bool = True,
        truncate_backward: float | None = None,
    ) -> None:
        super().__init__(latent_dim)
        exemplars = ExemplarSet(data, transform, device=storage_device, num_workers=num_workers)
        self.n_subsample = None if n_subsample is None else _checks.positive_int(n_subsample, "n_subsample")
        self.k = None if k is None else _checks.positive_int(k, "k")
        self._check_sizes(len(exemplars))
        self.refresh_every = _checks.positive_int(refresh_every, "refresh_every")
        self.chunk_size = None if chunk_size is None else _checks.positive_int(chunk_size, "chunk_size")
        init_log_var = _checks.number(init_log_var, "init_log_var")
        if location is not None and not callable(location):
            raise VAEPriorsError(f"`location` must be callable or None, got {type(location).__name__}")
        self.location = location
        self.truncate_backward = self._check_tolerance(truncate_backward)
        if self.truncate_backward is not None and self.k is not None:
            raise VAEPriorsError(
                "`truncate_backward` applies to leave-one-out and subsampling; with RAT (`k`) the k retrieved "
                "exemplars are the responsible ones already (their weights within the retrieved set are large), "
                "so there is nothing to truncate"
            )
        self.last_truncation: tuple[int, int] | None = None
        self.log_var = nn.Parameter(torch.tensor(init_log_var))
        self.rat = RetrievalCache(self.k, self.refresh_every) if self.k is not None else None
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(generator)
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise VAEPriorsError(f"`generator` must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
        self.generator = generator
        self.backend = backend
        self.memory_budget = memory_budget
        self.progress = progress
        self.process_group = process_group
        self.sync = bool(sync)
        self.shard = bool(shard)
        self.last_subset: Tensor | None = None
        self._eval_cache: tuple | None = None
        self._leaves: tuple | None = None
        self._synced_generator: object = None
        self._use(exemplars)

    def _use(self, exemplars: ExemplarSet) -> None:
        """Holds ``exemplars`` (this rank's block of them when sharded)."""
        n = len(exemplars)
        comm = self._comm() if self.shard else None
        self._n_total = n
        self._offset = 0
        if comm is not None:
            start, stop = dist.shard_range(n, comm.rank, comm.world_size)
            exemplars = exemplars.subset(start, stop)
            self._offset = start
        self._set = exemplars
        self._past = None  # the truncated backward's past means belong to the old set

    # -- the exemplar set --------------------------------------------------------------
    @property
    def n_exemplars(self) -> int:
        r"""N, the number of exemplars (over all ranks when sharded)."""
        return self._n_total

    @property
    def n_local(self) -> int:
        r"""The exemplars this process holds: N, or its shard's size."""
        return len(self._set)

    @property
    def exemplar_set(self) -> ExemplarSet:
        r"""The :class:`~vaepriors.exemplar_set.ExemplarSet` this process holds."""
        return self._set

    @property
    def exemplars(self) -> Tensor | torch.utils.data.Dataset:
        r"""The stored exemplars this process holds, as given (a tensor or a Dataset)."""
        return self._set.storage

    @property
    def input_shape(self) -> torch.Size:
        r"""The shape of one encoder input made from an exemplar."""
        return self._example_input().shape[1:]

    @property
    def rat_cache(self) -> Tensor:
        r"""The RAT cache of latent means, ``[n_local, d]`` (``[0, 0]`` until built)."""
        if self.rat is None:
            raise VAEPriorsError("this prior has no RAT cache (construct it with `k`)")
        return self.rat.means

    @property
    def last_neighbours(self) -> Tensor | None:
        r"""The exemplars retrieved for each z by the last RAT call, ``[*batch, k]``."""
        return None if self.rat is None else self.rat.last_neighbours

    @property
    def sharded(self) -> bool:
        r"""Whether this process holds only its block of the exemplars (``shard=True``
        under torch.distributed): then every rank must make each call together."""
        return self._shard_comm() is not None

    def _comm(self) -> dist.Comm | None:
        return dist.comm(self.process_group, enabled=self.sync)

    def _shard_comm(self) -> dist.Comm | None:
        return self._comm() if self.shard else None

    @staticmethod
    def _check_tolerance(tol: object) -> float | None:
        if tol is None:
            return None
        tol = _checks.number(tol, "truncate_backward")
        if not 0 <= tol < 1:
            raise VAEPriorsError(f"`truncate_backward` must be None (exact) or a tolerance in [0, 1), got {tol!r}")
        return tol

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

        The new set must give inputs of the same shape; it keeps this prior's transform,
        storage device and workers. The evaluation cache is dropped and the RAT cache
        resized (rebuilt now if it was built).

        Arguments:
            data: a tensor ``[N', *shape]`` or a Dataset, as for the constructor.
        """
        old = self._set
        new = ExemplarSet(data, old.transform, device=old.storage.device if old.pinned else None,
                          num_workers=old.num_workers)
        if new.is_tensor and old.is_tensor and not old.pinned:
            new.storage = new.storage.to(old.storage.device)
        shape = new.first(self.log_var.dtype, self.log_var.device).shape[1:]
        if shape != self.input_shape:
            raise VAEPriorsError(
                f"`data` must give exemplars of shape {tuple(self.input_shape)} like the current set, "
                f"got {tuple(shape)}"
            )
        self._check_sizes(len(new))
        was_built = self.rat is not None and self._cache_built()
        self._use(new)
        self.invalidate_cache()
        if self.rat is not None:
            self.rat.clear()
            if was_built:
                self.refresh_cache()
        return self

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self._set.to_device_of(fn)  # device only: the stored dtype is kept
        return self

    # -- encoding ----------------------------------------------------------------------
    def _points(self, x: Tensor) -> Tensor:
        """The encoder's points (means) of inputs ``x`` ``[n, ...]`` -> ``[n, d]``."""
        point = self.encode(x).location(self.location)
        if point.shape != (x.shape[0], self._latent_dim):
            raise VAEPriorsError(
                f"`encoder` must map exemplars [n, *input_shape] = {tuple(x.shape)} to points "
                f"[n, d]; got {tuple(point.shape)}"
            )
        return point

    def exemplar_means(self, index: Tensor | None = None, *, progress: bool = False) -> Tensor:
        r"""Encoder points of this process's exemplars ``index`` (local positions; all when
        ``None``), ``[len(index), d]``, with gradients where enabled; ``progress`` shows a
        bar when N is large."""
        p = self.log_var
        if self._latent_dim is None:
            self.latent_dim  # noqa: B018 (encodes one exemplar to learn d)
        size = self._chunk_rows()
        n = self.n_local if index is None else index.numel()
        chunks = self._set.chunks(size, p.dtype, p.device, index)
        if progress and self._show_progress():
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, total=-(-n // size), desc="encoding exemplars", unit="chunk", leave=False)
        if torch.is_grad_enabled():
            parts = [self._points(x) for x in chunks]
            if not parts:
                return p.new_zeros(0, self._latent_dim)
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        # Without gradients each chunk's points go straight into one buffer: nothing else of
        # the encoder's outputs (e.g. the log-variances a chunk(2) view keeps alive) is held.
        out, start = None, 0
        for x in chunks:
            point = self._points(x)
            if out is None:
                out = point.new_empty(n, point.shape[1])
            out[start : start + len(point)] = point
            start += len(point)
        return p.new_zeros(0, self._latent_dim) if out is None else out

    def _chunk_rows(self) -> int:
        """Exemplars per encoder call: ``chunk_size``, or by default 512 on a CPU, 4096 elsewhere."""
        if self.chunk_size is not None:
            return self.chunk_size
        rows = CPU_CHUNK if self.log_var.device.type == "cpu" else DEVICE_CHUNK
        budget = get_memory_budget() if self.memory_budget is None else self.memory_budget
        one = self._example_input()
        return int(max(1, min(rows, budget // (16 * one[0].numel() * max(one.element_size(), 4)))))

    def _all_means(self, split: bool = False) -> Tensor:
        """The points of all exemplars this process holds, without gradients; with
        ``split``, replicated priors under torch.distributed encode a slice per rank and
        gather them (a collective)."""
        comm = self._comm() if split and not self.shard else None
        with torch.no_grad():
            if comm is None:
                return self.exemplar_means(progress=True)
            start, stop = dist.shard_range(self.n_local, comm.rank, comm.world_size)
            mine = self.exemplar_means(torch.arange(start, stop), progress=True)
            return dist.all_gather_rows(mine, comm, "ExemplarPrior: gathering the encoded exemplars")[0]

    def _show_progress(self) -> bool:
        return self.n_local >= 50_000 if self.progress is None else bool(self.progress)

    def _example_input(self) -> Tensor:
        return self._set.first(self.log_var.dtype, self.log_var.device)

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
                point = self._points(self._example_input())
            found = {id(t): t for t in (*_reachable_tensors(enc), *_graph_leaves(point))}
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
            # every submodule's mode: dropout or batch norm, switched by eval() or by hand
            tuple(m.training for m in owner.modules()) if isinstance(owner, nn.Module) else None,
            id(self._set.storage),
            self._set.version(),
            self.log_var.dtype,
            self.log_var.device,
            tuple((id(t), t.data_ptr(), _version(t)) for t in tensors),
        )

    def invalidate_cache(self) -> None:
        r"""Drops the cached evaluation means (they are recomputed on the next call)."""
        self._eval_cache = None

    def train(self, mode: bool = True) -> "ExemplarPrior":
        r"""Sets training (``True``) or evaluation mode, as for any module; drops the
        evaluation cache (weights edited through ``.data`` in between would go unseen)."""
        self.invalidate_cache()
        return super().train(mode)

    def _eval_means(self) -> Tensor:
        key = self._cache_key()
        c = self._eval_cache
        if key is not None and c is not None and c[0]() is self._set.storage and c[1] == key:
            return c[2]
        means = self._all_means()
        self._eval_cache = None if key is None else (weakref.ref(self._set.storage), key, means)
        return means

    # -- RAT cache ---------------------------------------------------------------------
    def _cache_built(self) -> bool:
        return self.rat.built(self.n_local, self._latent_dim)

    def refresh_cache(self) -> None:
        r"""Recomputes the RAT cache of all latent means (no gradients). It counts as the
        refresh of the epoch under way: one due at that epoch's end is skipped."""
        if self.rat is None:
            raise VAEPriorsError("refresh_cache() needs a RAT prior (construct it with `k`)")
        self.rat.fill(self._all_means(split=True))

    def _ensure_cache(self) -> Tensor:
        if self._latent_dim is None:
            self.latent_dim  # noqa: B018 (encodes one exemplar to learn d)
        if not self._cache_built():
            self.refresh_cache()
        return self.rat.means

    def observe(self, posterior: Posterior | Tensor, index: Tensor) -> None:
        r"""Writes the encoder points of training points ``index`` ``[B]`` (from their
        posteriors, or given as means ``[B, d]``) into the RAT cache (a no-op without RAT
        or before the cache is built). Under torch.distributed the writes of all ranks are
        merged at the next RAT ``log_prob``.

        :class:`~vaepriors.ExemplarELBO` calls it with the training batch; when the
        exemplars differ from the training inputs (grey-level vs binarised), those stand
        in for the exemplars' own until retrieved or refreshed. Any cache content keeps the
        RAT objective a lower bound; only which neighbours are found depends on it."""
        if self.rat is None or not self._cache_built():
            return
        if isinstance(posterior, Posterior):
            with torch.no_grad():
                mean = posterior.location(self.location)
        else:
            mean = posterior
        mean = _checks.latent(mean, self._latent_dim, "mean")
        if mean.dim() != 2:
            raise VAEPriorsError(f"`mean` must have shape [B, d], got {tuple(mean.shape)}")
        index = _checks.index(index, mean.shape[:1], self.n_exemplars, "index")
        keep = index >= 0
        # Validated indices of an unsharded prior all fall in its rows.
        self.rat.write(index[keep], mean[keep], self._offset, share=self._comm() is not None,
                       in_range=self.n_local == self.n_exemplars)  # fmt: skip

    def on_epoch_end(self, epoch: int) -> None:
        r"""Refreshes the RAT cache fully every ``refresh_every`` calls (if it is built); a
        refresh that falls at the end of the epoch in which the cache was built (at first
        use) or refreshed by hand is skipped, that fill having been this epoch's refresh."""
        if self.rat is not None and self.rat.epoch_ended() and self._cache_built():
            self.rat.fill(self._all_means(split=True), scheduled=True)

    def get_extra_state(self) -> dict:
        r"""What :meth:`state_dict` holds besides tensors (key ``_extra_state``): the private
        generator's state, so that a restored prior draws the subsets and samples the saved
        one would have drawn next, the epochs since the last RAT refresh, and the number of
        exemplars (checked on load)."""
        state: dict = {"n_exemplars": self.n_exemplars, "n_local": self.n_local}
        if self.rat is not None:
            state["epochs_since_refresh"] = self.rat.epochs_since_refresh
            state["cache_filled_this_epoch"] = self.rat.filled_this_epoch
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def set_extra_state(self, state: dict) -> None:
        r"""Restores :meth:`get_extra_state`'s dict (a generator state only where this prior
        has a generator of its own)."""
        if self.rat is not None:
            self.rat.epochs_since_refresh = int(state.get("epochs_since_refresh", 0))
            self.rat.filled_this_epoch = bool(state.get("cache_filled_this_epoch", False))
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Checked before anything is copied, so a refused state leaves the prior as it was.
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict) and extra.get("n_exemplars", self.n_exemplars) != self.n_exemplars:
            raise VAEPriorsError(
                f"the state is of an ExemplarPrior over {extra['n_exemplars']} exemplars; this one holds "
                f"{self.n_exemplars}: load it into a prior over the same set (or set_exemplars first)"
            )
        cache = state_dict.get(prefix + "rat.means")
        if isinstance(cache, Tensor) and cache.numel() and cache.shape[0] != self.n_local:
            raise VAEPriorsError(
                f"the state's RAT cache has {cache.shape[0]} rows; this prior holds {self.n_local} exemplars"
            )
        if isinstance(cache, Tensor) and cache.dim() == 2 and cache.numel() and self._latent_dim is None:
            self._latent_dim = cache.shape[1]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- randomness --------------------------------------------------------------------
    def _draw_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else self.log_var.device

    def _sync_generator(self, comm: dist.Comm | None) -> None:
        """Under torch.distributed, makes every rank draw the same subsets: a private
        generator whose state comes from rank 0 (once per process group)."""
        if comm is None or self._synced_generator is comm.group:
            return
        if self.generator is None:
            seed = torch.randint(2**62, (1,))
            dist.broadcast(seed, comm, "ExemplarPrior: seeding the subset generator")
            self.generator = torch.Generator(device=self.log_var.device).manual_seed(int(seed))
        else:
            dist.sync_generator(self.generator, comm, "ExemplarPrior: synchronising the subset generator")
        self._synced_generator = comm.group

    def _randperm(self, n: int) -> Tensor:
        return torch.randperm(n, generator=self.generator, device=self._draw_device()).to(self.log_var.device)

    def _randint(self, high: int, count: int) -> Tensor:
        idx = torch.randint(high, (count,), generator=self.generator, device=self._draw_device())
        return idx.to(self.log_var.device)

    def _randn(self, shape: Sequence[int], like: Tensor) -> Tensor:
        eps = torch.randn(*shape, generator=self.generator, device=self._draw_device(), dtype=like.dtype)
        return eps.to(like.device)

    # -- log-density -------------------------------------------------------------------
    def _log_prob(self, z: Tensor, index: Tensor | None) -> Tensor:
        batch, d = z.shape[:-1], z.shape[-1]
        n, dev = self.n_exemplars, z.device
        if not self.training or index is None:
            own = torch.full(batch, -1, dtype=torch.long, device=dev)
        else:
            own = _checks.index(index, batch, n, "index").to(dev)
        comm = self._shard_comm()
        queries, own = z.reshape(-1, d), own.reshape(-1)
        rows = queries.shape[0]
        if comm is not None:
            what = "ExemplarPrior.log_prob: gathering the queries of all ranks"
            queries, sizes = dist.gather_rows(queries, comm, what)
            # Evaluation excludes nothing: only training needs every rank's indices.
            own = dist.all_gather_rows(own, comm, what)[0] if self.training else own.new_full((len(queries),), -1)
            start = sum(sizes[: comm.rank])
        if not self.training:
            means = self._eval_means()
            part = mixture_logsumexp(queries, means, self.log_var, backend=self.backend, memory_budget=self.memory_budget)
            value = self._combine(part, comm) - math.log(n)
        else:
            value = self._train_log_prob(queries, own, comm)
        nb = self.last_neighbours if self.training and self.rat is not None else None
        if comm is not None:
            value = value[start : start + rows]
            nb = None if nb is None else nb[start : start + rows]
        if nb is not None:
            self.rat.last_neighbours = nb.reshape(*batch, self.k)
        return value.reshape(batch)

    def _combine(self, part: LogSumExp, comm: dist.Comm | None) -> Tensor:
        """The log-sum-exp over all exemplars from this process's partial."""
        if comm is None:
            return part.log()
        return dist.logsumexp_across(part.max, part.sum, comm, "ExemplarPrior.log_prob: combining the shards")

    def _local(self, ids: Tensor | None, excluded: Tensor) -> tuple[Tensor | None, Tensor]:
        """The local positions of components ``ids`` (global; all when ``None``) that this
        process holds, and each row's excluded component as a local position (or -1)."""
        lo, hi = self._offset, self._offset + self.n_local
        if ids is None:
            mine = (excluded >= lo) & (excluded < hi)
            return None, torch.where(mine, excluded - lo, torch.full_like(excluded, -1))
        held = ids[(ids >= lo) & (ids < hi)] - lo
        where = torch.full((self.n_local,), -1, dtype=torch.long, device=ids.device)
        where[held] = torch.arange(held.numel(), device=ids.device)
        mine = (excluded >= lo) & (excluded < hi)
        pos = where[torch.where(mine, excluded - lo, torch.zeros_like(excluded))]
        return held, torch.where(mine, pos, torch.full_like(pos, -1))

    def _train_log_prob(self, z: Tensor, own: Tensor, comm: dist.Comm | None) -> Tensor:
        n, m = self.n_exemplars, self.n_subsample
        if m is None:
            if n < 2 and bool((own >= 0).any()):
                raise VAEPriorsError("leave-one-out needs at least 2 exemplars, the prior has N = 1")
            ids, excluded = None, own
            kept = (n - (own >= 0).long()).to(z.dtype)
            self.last_subset = None
        else:
            # A permutation prefix of M + 1: each row drops its own index if among the first
            # M, else the (M+1)-th, which leaves a uniform M-subset of the other exemplars.
            self._sync_generator(self._comm())
            ids = self._randperm(n)[: m + 1].to(z.device)
            where = torch.full((n,), -1, dtype=torch.long, device=z.device)
            where[ids[:m]] = torch.arange(m, device=z.device)
            pos = where[own.clamp_min(0)]
            excluded = ids[torch.where((own >= 0) & (pos >= 0), pos, torch.full_like(pos, m))]
            kept = torch.full_like(z[:, 0], float(m))
            self.last_subset = ids
        held, exclude = self._local(ids, excluded)
        if self.rat is not None:
            return self._rat_log_prob(z, ids, held, exclude, comm) - kept.log()
        if self.truncate_backward is not None and torch.is_grad_enabled():
            means = self._truncated_means(z, held, exclude, comm)
        else:
            means = self.exemplar_means(held)
        if means.shape[0] == 0:  # a shard holding no component of the subset
            part = LogSumExp(torch.full_like(z[:, 0], -math.inf).detach(), torch.zeros_like(z[:, 0]))
        else:
            part = mixture_logsumexp(
                z, means, self.log_var, exclude=exclude, backend=self.backend, memory_budget=self.memory_budget
            )
        return self._combine(part, comm) - kept.log()

    # -- truncated backward ------------------------------------------------------------
    def _truncated_means(self, z: Tensor, held: Tensor | None, exclude: Tensor, comm: dist.Comm | None) -> Tensor:
        r"""The means of exemplars ``held`` (local positions; all when ``None``) as values,
        with gradients through (at least) those whose responsibility for the queries ``z``
        exceeds ``truncate_backward``; every mean is encoded once.

        Which exemplars matter is predicted from their means at their last encoding (kept
        for this purpose, ``[n_local, d]``; an exemplar never encoded is taken to matter), at
        a quarter of the tolerance: those are encoded with gradients, the others without.
        The responsibilities are then recomputed from the fresh means, and any exemplar
        found above the tolerance that was encoded without gradients (a wrong prediction)
        is encoded again with them. So the gradient drops only exemplars whose
        responsibility is at most the tolerance, whatever the prediction."""
        tol = self.truncate_backward
        rows = torch.arange(self.n_local, device=self.log_var.device) if held is None else held
        n, d = rows.numel(), self._latent_dim
        past, known = self._past_means()
        z = z.detach()
        with torch.no_grad():
            guess = self._responsibilities(z, past[rows].to(z.dtype), exclude, comm, known[rows])
            wanted = guess > tol / 4
        live_at = torch.nonzero(wanted).view(-1)
        dead_at = torch.nonzero(~wanted).view(-1)
        live = self.exemplar_means(rows[live_at]) if live_at.numel() else None
        with torch.no_grad():
            dead = self.exemplar_means(rows[dead_at])
            means = dead.new_empty(n, d)
            means[dead_at] = dead
            if live is not None:
                means[live_at] = live.detach()
            past[rows] = means.to(past.dtype)
            known[rows] = True
            missed = dead_at[self._responsibilities(z, means, exclude, comm)[dead_at] > tol]
        if live is not None:
            means = means.index_put((live_at,), live)
        if missed.numel():  # predicted below the tolerance, found above: add their gradients
            again = self.exemplar_means(rows[missed])
            means = means.index_put((missed,), means.detach()[missed] + (again - again.detach()))
        self.last_truncation = (int(live_at.numel() + missed.numel()), n)
        return means

    def _past_means(self) -> tuple[Tensor, Tensor]:
        """The means of this process's exemplars at their last encoding by the truncated
        backward, and which of them have been encoded (reset when the set, dtype or device
        changes)."""
        p, n = self.log_var, self.n_local
        past = self._past
        if past is None or past[0].shape != (n, self._latent_dim) or past[0].device != p.device or past[0].dtype != p.dtype:
            past = (p.new_zeros(n, self._latent_dim), torch.zeros(n, dtype=torch.bool, device=p.device))
            self._past = past
        return past

    def _responsibilities(
        self, z: Tensor, means: Tensor, exclude: Tensor, comm: dist.Comm | None, known: Tensor | None = None
    ) -> Tensor:
        r"""``[n]``: for each exemplar n of ``means``, the largest over the queries ``z`` of
        its posterior weight :math:`w_{in}`, normalised over every exemplar of the call (all
        ranks' when sharded: the partial log-sum-exps are combined first). Row ``i`` leaves
        out its ``exclude[i]`` (a local position, or -1). Exemplars not ``known`` count as
        responsible (``inf``) and are left out of the normaliser. Computed in blocks of the
        memory budget; no gradient."""
        b, n = z.shape[0], means.shape[0]
        inv = float(torch.exp(-self.log_var.detach()))
        budget = get_memory_budget() if self.memory_budget is None else self.memory_budget
        step = max(1, budget // (3 * z.element_size() * max(b, 1)))  # columns per block
        zz = z.square().sum(-1, keepdim=True)
        mm = means.square().sum(-1)

        def exponents(s0: int) -> Tensor:  # -|z_i - mu_n|^2 / (2 sigma^2), own exemplar -inf
            width = min(step, n - s0)
            e = torch.addmm(mm[s0 : s0 + width], z, means[s0 : s0 + width].T, alpha=-2).add_(zz).mul_(-0.5 * inv)
            col = exclude - s0
            hit = (col >= 0) & (col < width)
            col = col.clamp(0, width - 1)[:, None]
            e = e.scatter_(1, col, torch.where(hit[:, None], -math.inf, e.gather(1, col)))
            return e if known is None else e.masked_fill_(~known[s0 : s0 + width], -math.inf)

        starts = range(0, n, step)
        kept = [exponents(0)] if n and step >= n else None  # one block: computed once
        top = torch.full((b,), -math.inf, dtype=z.dtype, device=z.device)
        total = torch.zeros_like(top)
        for s0 in starts:
            e = kept[0] if kept else exponents(s0)
            m = torch.maximum(top, e.amax(1))
            shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            # Terms below e^-87 of the largest are clamped there: they change the sum (>= 1) by
            # less than n * 1e-38, and torch's vectorised exp is ~10x slower below -88.
            total = total * torch.exp(top - shift) + torch.exp((e - shift[:, None]).clamp_(min=-87.0)).sum(1)
            top = m
        log_norm = self._combine(LogSumExp(top, total), comm)[:, None]  # over every rank's exemplars
        resp = means.new_zeros(n)
        if b:
            for s0 in starts:  # max_i w_in = exp(max_i (e_in - log_norm_i)): one exp per exemplar
                e = kept[0] if kept else exponents(s0)
                resp[s0 : s0 + e.shape[1]] = torch.exp((e - log_norm).amax(0))
        if known is not None:
            resp = resp.masked_fill_(~known, math.inf)
        return resp

    def _rat_log_prob(
        self, z: Tensor, ids: Tensor | None, held: Tensor | None, exclude: Tensor, comm: dist.Comm | None
    ) -> Tensor:
        rat, lo = self.rat, self._offset
        cache = self._ensure_cache()
        rat.merge(self._comm(), lo, "ExemplarPrior: merging the RAT cache writes of all ranks")
        norms = rat.norms()
        if held is None:
            points = cache
            ids = None if lo == 0 else torch.arange(lo, lo + self.n_local, device=cache.device)
        else:
            positions = held.to(cache.device)
            points, norms, ids = cache[positions], norms[positions], positions + lo
        nb = sharded_knn(
            z.detach().to(points.dtype), points, ids, self.k,
            exclude.to(points.device), comm, "ExemplarPrior: merging the neighbours of all shards",
            norms=norms, backend=self.backend, memory_budget=self.memory_budget,
        ).to(z.device)  # [rows, k] global ids
        rat.last_neighbours = nb
        mine = None
        if comm is None and lo == 0 and self.n_local == self.n_exemplars:
            # One process holding every exemplar: every neighbour is its own (-1, "none found",
            # only where distances overflow: then the general path below).
            uniq, inv = torch.unique(nb, return_inverse=True)
            if uniq.numel() and int(uniq[0]) < 0:
                mine = nb >= 0
        else:
            mine = (nb >= lo) & (nb < lo + self.n_local)
        if mine is not None:
            # the neighbours this process holds
            uniq, inv_mine = torch.unique((nb - lo)[mine], return_inverse=True)
            inv = torch.zeros_like(nb)
            inv[mine] = inv_mine
        fresh = self.exemplar_means(uniq) if uniq.numel() else z.new_zeros(0, z.shape[-1])
        _checks.finite(fresh, "encoder mean")
        rat.write(uniq + lo if lo else uniq, fresh, lo, share=self._comm() is not None and not self.shard,
                  unique=True, in_range=True)  # fmt: skip
        rat.merge(None if self.shard else self._comm(), lo, "ExemplarPrior: merging the RAT cache writes of all ranks")
        d = z.shape[-1]
        log_var = self.log_var.to(z.dtype)
        if fresh.shape[0]:
            sq = (z.unsqueeze(-2) - fresh[inv]).pow(2).sum(-1)  # [rows, k]
            expo = -0.5 * sq * torch.exp(-log_var)
            if mine is not None:
                expo = expo.masked_fill(~mine, -math.inf)
        else:
            expo = torch.full_like(nb, -math.inf, dtype=z.dtype)
        const = -0.5 * d * (math.log(2 * math.pi) + log_var)
        if comm is None:
            return torch.logsumexp(expo, -1) + const
        top = expo.detach().amax(-1)
        s = torch.exp(expo - torch.where(torch.isinf(top), torch.zeros_like(top), top).unsqueeze(-1)).sum(-1)
        return dist.logsumexp_across(top, s, comm, "ExemplarPrior.log_prob: combining the RAT shards") + const

    # -- sampling ----------------------------------------------------------------------
    def _check_unsharded(self, what: str) -> None:
        if self._shard_comm() is not None:
            raise VAEPriorsError(
                f"{what} needs every exemplar, and this sharded prior holds {self.n_local} of {self.n_exemplars} "
                "on this rank: sample from an unsharded prior (e.g. built on rank 0 with sync=False)"
            )

    def _draw(self, shape: torch.Size) -> tuple[Tensor, Tensor]:
        self.encoder  # noqa: B018 (raises the "needs the encoder" error when unbound)
        self._check_unsharded("sampling")
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
        given encoder inputs (any inputs of the exemplars' input shape, not only the set's).

        Gradients flow to the encoder and ``log_var`` where enabled.

        Arguments:
            exemplars: encoder inputs ``[B, *input_shape]``, as the encoder takes them
                (after the set's ``transform``); moved to the prior's device.
            sample_shape: latents per input.

        Returns:
            ``[*sample_shape, B, d]``.
        """
        x = _checks.tensor(exemplars, "exemplars")
        shape_in = self.input_shape
        if x.dim() != 1 + len(shape_in) or x.shape[1:] != shape_in:
            raise VAEPriorsError(
                f"`exemplars` must have shape [B, *input_shape] = [B, {', '.join(map(str, shape_in))}], "
                f"got {tuple(x.shape)}"
            )
        if x.is_floating_point():
            _checks.finite(x, "exemplars")
        shape = _checks.sample_shape(sample_shape)
        mu = self._points(x.to(self.log_var.device))
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
            start: the first encoder inputs ``[B, *input_shape]`` (training points, noise,
                ...), or an int B to start from B random exemplars of the set.
            steps: the number of generations.
            to_input: how the decoder's output becomes the next input: ``"mean"``
                (e.g. Bernoulli probabilities: grey-level images, like the exemplars the
                paper trains with), ``"sample"``, or a callable (see :func:`decoded_input`).

        Returns:
            The chain ``[steps + 1, B, *input_shape]``, starting with ``start``.
        """
        steps = _checks.positive_int(steps, "steps")
        if not callable(decoder):
            raise VAEPriorsError(f"`decoder` must be callable, got {type(decoder).__name__}")
        if isinstance(start, int) and not isinstance(start, bool):
            self._check_unsharded("starting from random exemplars")
            count = _checks.positive_int(start, "start")
            start = self._set.rows(self._randint(self.n_exemplars, count), self.log_var.dtype, self.log_var.device)
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
                if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                    raise VAEPriorsError("`decoder` returned NaN or infinite values in generate_iteratively")
                chain.append(x.to(chain[-1].dtype))
        return torch.stack(chain)

    def extra_repr(self) -> str:
        shard = f", shard={self._offset}:{self._offset + self.n_local}" if self.n_local != self.n_exemplars else ""
        return (
            f"n_exemplars={self.n_exemplars}{shard}, input_shape={tuple(self.input_shape)}, "
            f"latent_dim={self._latent_dim}, n_subsample={self.n_subsample}, k={self.k}, stored={self._set!r}"
        )
