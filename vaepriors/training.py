r"""The training loop of ``vaepriors-train`` as a library: :class:`TrainConfig` holds the
command's options, :func:`fit` trains, evaluates and writes a run.

Example:
    >>> import tempfile
    >>> config = TrainConfig(prior="vamp", n_train=100, n_eval=20, epochs=1, hidden=(16,),
    ...                      eval_samples=0, progress=False, out=tempfile.mkdtemp())
    >>> config.lr, config.warmup  # options left unset come from the preset ("quick")
    (0.003, 1)
    >>> metrics = fit(config)  # doctest: +ELLIPSIS
    vaepriors-train: prior=vamp dataset=builtin (100 train / 20 valid / 20 test) ...
    >>> metrics["epochs_run"]
    1

A run writes into :attr:`TrainConfig.out`: ``metrics.json`` (per-epoch train/validation ELBO,
KL and reconstruction, seconds per epoch, final test numbers), ``curves.png``,
``samples.png`` (random samples from the prior), ``conditioned.png`` (samples conditioned on
test images), ``checkpoint.pt`` (continue with ``resume=True``) and ``best.pt`` (the weights
with the best validation ELBO, which the test numbers use).

Progress: one line per epoch; with ``progress=True``, progress bars on a terminal, and where
the output goes to a log (stderr is not a terminal) a status line with rate and time left at
least every :data:`LOG_INTERVAL` seconds during long passes (training epochs, encoding the
exemplars, evaluation, the log-likelihood).

Adding a prior is a few lines: a builder ``(config, splits, encoder, decoder) -> prior`` in
:data:`PRIORS`, optionally a sampler of conditioned latents in :data:`CONDITIONED`.

torch and the priors are imported inside the functions that use them: building and
checking a :class:`TrainConfig` (and so the command's ``--help``) needs neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .errors import VAEPriorsError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from .data import Splits
    from .elbo import ExemplarELBO
    from .prior import Prior

__all__ = [
    "CONDITIONED",
    "DATASETS",
    "LOG_INTERVAL",
    "PRESETS",
    "PRIORS",
    "PRIOR_COSTS",
    "TrainConfig",
    "build_model",
    "evaluate",
    "exemplar_subsample_size",
    "fit",
    "image_grid",
    "kl_weight",
    "status_lines",
]

PriorBuilder = Callable[["TrainConfig", "Splits", "nn.Module", "nn.Module"], "Prior"]
Conditioner = Callable[["ExemplarELBO", "Tensor", int], "Tensor"]

DATASETS = ("builtin", "mnist")
"""The datasets a run can use (the names of :data:`vaepriors.data.DATASETS`)."""

LOG_INTERVAL = 10.0
"""Seconds between status lines of a long pass when the output goes to a log."""


# -- presets -----------------------------------------------------------------------------
_PAPER = {
    # The papers' protocol (Exemplar VAE supplementary L.2; VampPrior): early stopping after 50
    # epochs without a better validation ELBO ends the runs long before 2000 epochs.
    "epochs": 2000, "warmup": 100, "components": 500, "lr": 5e-4, "eval_samples": 5000,
    "threads": 0, "n_train": "all", "n_eval": "all",
}  # fmt: skip

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        # About a minute on two busy CPU cores (the README's quick start). One thread: this
        # small model gains little from more, and oversubscribed threads on a busy machine
        # cost 5-10x. A larger learning rate than the papers' and a short KL warm-up: few steps.
        # 500 validation and test images: the log-likelihood (S = 50) takes a few seconds.
        "builtin": {"epochs": 10, "warmup": 1, "components": 50, "lr": 3e-3, "eval_samples": 50,
                    "threads": 1, "n_train": "all", "n_eval": 500},
        # Minutes on a laptop CPU: a fifth of the training set, 1000 validation and test images.
        "mnist": {"epochs": 10, "warmup": 3, "components": 500, "lr": 1e-3, "eval_samples": 100,
                  "threads": 1, "n_train": 10000, "n_eval": 1000},
    },  # fmt: skip
    "paper": {"builtin": _PAPER, "mnist": _PAPER},
}
"""Preset -> dataset -> the values of the options a :class:`TrainConfig` leaves unset
(``None``). ``"quick"`` (the default) finishes in minutes on a CPU; ``"paper"`` is the papers'
full protocol (hours to days on a CPU; meant for a GPU)."""

PRIOR_COSTS: dict[str, str] = {
    "gaussian": "N(0, I), closed-form KL; the baseline (1x)",
    "mog": "learnable mixture of --components Gaussians; about 1x",
    "vamp": "VampPrior: encodes --components pseudo-inputs every step; about 3x",
    "exemplar": "Exemplar VAE: encodes M exemplars every step (default M = N/2, the paper's): grows with N, "
    "about 17x at N = 10000 and 100x at N = 50000 on a CPU",
    "exemplar-rat": "exemplar prior with retrieval-augmented training (--rat-k nearest of all N): about 5x, "
    "plus encoding all N once per epoch",
    "coreset": "pseudocoreset (ByPE): --components weighted pseudo-inputs, plus an update pass every "
    "--coreset-every epochs; about 2-3x",
}
"""Prior name -> what it is and its cost per training step relative to the Gaussian prior
(seconds per epoch of benchmarks/results/reproduce_cpu-long and exemplar_step_cpu)."""


# -- the configuration -------------------------------------------------------------------
def _size(value: Any, name: str) -> int | str:
    if value == "all":
        return "all"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VAEPriorsError(f"`{name}` must be a positive number of images or 'all', got {value!r}")
    return value


@dataclass
class TrainConfig:
    r"""The options of a training run (those of ``vaepriors-train``, one field per option).

    Options left ``None`` are filled from :data:`PRESETS` ``[preset][dataset]`` when the config
    is made; values given explicitly always win. Bad values raise
    :class:`~vaepriors.VAEPriorsError` naming the field (the command names its flag).

    Attributes:
        prior: a name of :data:`PRIORS` (see :data:`PRIOR_COSTS` for their cost).
        dataset: ``"builtin"`` (no download) or ``"mnist"`` (the IDX files in ``data_dir``).
        data_dir: the MNIST folder; default ``$VAEPRIORS_MNIST``, else
            ``~/.cache/vaepriors/mnist`` (:func:`vaepriors.data.mnist_root`).
        preset: ``"quick"`` or ``"paper"`` (:data:`PRESETS`).
        n_train: the first N training images, or ``"all"``.
        n_eval: the first N validation and test images, or ``"all"``.
        components: mixture components / pseudo-inputs (mog, vamp, coreset).
        coreset_every: coreset: epochs between coreset updates.
        exemplar_subsample: exemplar priors: exemplars per training step M: a number,
            ``"half"`` (M = N / 2, the paper's) or ``"all"`` (leave-one-out over all N);
            ``None``: ``"half"`` for ``exemplar``, ``"all"`` for ``exemplar-rat``.
        rat_k: exemplar-rat: neighbours retrieved per training point.
        latent_dim: the size d of z.
        hidden: widths of the gated layers.
        epochs: maximum number of epochs.
        max_steps: stop after this many optimiser steps (counted over the whole run,
            resumed steps included), then evaluate and save as usual; ``None``: no limit.
        batch_size: training minibatch size.
        lr: Adam's learning rate.
        normalize_grad: scale each parameter's gradient to unit norm before Adam (the
            papers' optimiser).
        warmup: epochs of linear KL warm-up, 0 for none.
        patience: stop after this many epochs without a better validation ELBO.
        seed: seeds initialisation, batches, binarisation and sampling.
        eval_samples: importance samples S for the test log-likelihood, 0 to skip.
        eval_batch_size: batch size of validation and test passes.
        out: the output folder (default ``runs/<prior>-<dataset>``).
        resume: continue from ``<out>/checkpoint.pt``.
        device: ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        validate: check tensor values (NaN/inf, index ranges) on every call.
        threads: CPU threads for torch, 0 for torch's choice.
        progress: progress bars on a terminal, status lines in a log; ``False`` prints the
            epoch lines only.
        shard: exemplar priors under torch.distributed: each rank holds its block of the
            exemplars (``ExemplarPrior(shard=True)``).

    Under ``torchrun`` (or inside an initialised process group) :func:`fit` trains with
    DistributedDataParallel: every rank draws the same global batch (and the same posterior
    noise) and takes its block of rows, the loss is scaled so that DDP's averaged gradient is
    the global batch's, and rank 0 prints and writes the outputs (each rank writes its own
    checkpoint when the prior is sharded). Two ranks then reproduce one process's run with the
    same seed, to rounding.

    Example:
        >>> c = TrainConfig(dataset="mnist", epochs=2)
        >>> c.epochs, c.n_train, c.eval_samples, c.out
        (2, 10000, 100, 'runs/vamp-mnist')
        >>> TrainConfig(dataset="mnist", preset="paper").epochs
        2000
        >>> TrainConfig(prior="exemplar").exemplar_subsample
        'half'
    """

    prior: str = "vamp"
    dataset: str = "builtin"
    data_dir: str | None = None
    preset: str = "quick"
    n_train: int | str | None = None
    n_eval: int | str | None = None
    components: int | None = None
    coreset_every: int = 10
    exemplar_subsample: int | str | None = None
    rat_k: int = 10
    latent_dim: int = 40
    hidden: tuple[int, ...] = (300, 300)
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 100
    lr: float | None = None
    normalize_grad: bool = True
    warmup: int | None = None
    patience: int = 50
    seed: int = 0
    eval_samples: int | None = None
    eval_batch_size: int = 1000
    out: str | None = None
    resume: bool = False
    device: str = "auto"
    validate: bool = True
    threads: int | None = None
    progress: bool = True
    shard: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise VAEPriorsError(f"`preset` must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.dataset not in DATASETS:
            raise VAEPriorsError(f"`dataset` must be one of {list(DATASETS)}, got {self.dataset!r}")
        if self.prior not in PRIORS:
            raise VAEPriorsError(f"`prior` must be one of {sorted(PRIORS)}, got {self.prior!r}")
        for key, value in PRESETS[self.preset][self.dataset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if isinstance(self.hidden, int):
            self.hidden = (self.hidden,)
        self.hidden = tuple(self.hidden)
        for key in ("epochs", "batch_size", "eval_batch_size", "latent_dim", "components", "patience", "coreset_every"):
            _at_least(self, key, 1)
        for key in ("warmup", "eval_samples", "threads", "seed"):
            _at_least(self, key, 0)
        _at_least(self, "rat_k", 1, "neighbours retrieved per training point")
        if self.max_steps is not None:
            _at_least(self, "max_steps", 1)
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise VAEPriorsError(f"`hidden` must be one or more positive layer widths, got {self.hidden!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (self.lr > 0 and math.isfinite(self.lr)):
            raise VAEPriorsError(f"`lr` must be a positive number, got {self.lr!r}")
        self.n_train, self.n_eval = _size(self.n_train, "n_train"), _size(self.n_eval, "n_eval")
        m = self.exemplar_subsample
        if m is None and self.prior in ("exemplar", "exemplar-rat"):
            self.exemplar_subsample = "half" if self.prior == "exemplar" else "all"
        elif m is not None and m not in ("half", "all") and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise VAEPriorsError(f"`exemplar_subsample` must be a positive number, 'half' or 'all', got {m!r}")
        if self.data_dir is not None and self.dataset != "mnist":
            raise VAEPriorsError("`data_dir` is only used with dataset 'mnist' (the built-in dataset needs no files)")
        if self.out is None:
            self.out = str(Path("runs") / f"{self.prior}-{self.dataset}")

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (``hidden`` as a list)."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def _at_least(config: TrainConfig, key: str, low: int, what: str = "") -> None:
    v = getattr(config, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        need = "at least 1" if low == 1 else ">= 0"
        raise VAEPriorsError(f"`{key}` must be {need}{f' ({what})' if what else ''}, got {v!r}")


# Options that define the model and data: a resumed run must keep them.
_FIXED_ON_RESUME = ("prior", "dataset", "n_train", "n_eval", "latent_dim", "hidden", "components",
                    "exemplar_subsample", "rat_k", "coreset_every", "seed")  # fmt: skip


def exemplar_subsample_size(config: TrainConfig, n: int) -> int | None:
    r"""M, the exemplars per training step of ``config`` over ``n`` exemplars (``None``:
    all ``n - 1`` others, leave-one-out).

    Example:
        >>> exemplar_subsample_size(TrainConfig(prior="exemplar"), 4000)
        2000
    """
    m = config.exemplar_subsample
    if m is None or m == "all":
        return None
    return min(n // 2 if m == "half" else int(m), n - 1)


# -- the priors --------------------------------------------------------------------------
def _gaussian(config: TrainConfig, splits: Splits, encoder: nn.Module, decoder: nn.Module) -> Prior:
    from .gaussian import GaussianPrior

    return GaussianPrior(config.latent_dim)


def _mog(config: TrainConfig, splits: Splits, encoder: nn.Module, decoder: nn.Module) -> Prior:
    from .mixture import MixturePrior

    return MixturePrior(config.latent_dim, config.components)


def _vamp(config: TrainConfig, splits: Splits, encoder: nn.Module, decoder: nn.Module) -> Prior:
    import torch

    from .vamp import VampPrior

    # Pseudo-inputs start at random grey-level training images.
    k = min(config.components, len(splits.train))
    return VampPrior.from_data(splits.train, k, generator=torch.Generator().manual_seed(config.seed))


def _exemplar(config: TrainConfig, splits: Splits, encoder: nn.Module, decoder: nn.Module, k: int | None = None) -> Prior:
    from .exemplar import ExemplarPrior

    # Grey-level exemplars (the training images; row = training index, for leave-one-out).
    m = exemplar_subsample_size(config, len(splits.exemplars))
    return ExemplarPrior(
        splits.exemplars, n_subsample=m, k=k, generator=config.seed, progress=config.progress, shard=config.shard
    )


def _exemplar_rat(config: TrainConfig, splits: Splits, encoder: nn.Module, decoder: nn.Module) -> Prior:
    n = len(splits.exemplars)
    m = exemplar_subsample_size(config, n)
    return _exemplar(config, splits, encoder, decoder, k=min(config.rat_k, n - 1 if m is None else m))


def _coreset(config: TrainConfig, splits: Splits, encoder: nn.Module, decoder: nn.Module) -> Prior:
    import torch

    from .coreset import PseudocoresetPrior

    k = min(config.components, len(splits.train))
    prior = PseudocoresetPrior.from_data(splits.train, k, generator=torch.Generator().manual_seed(config.seed))
    # Grey-level data in the update: for a Bernoulli decoder, x.l - softplus(l) at grey x is
    # the expected log-likelihood over the random binarisations the ELBO trains on.
    # Under torch.distributed each rank takes its part of every update batch of 100.
    ranks = _ranks()[1]
    return prior.schedule_updates(
        decoder, splits.train, every=config.coreset_every, progress=config.progress, batch_size=max(1, 100 // ranks)
    )


PRIORS: dict[str, PriorBuilder] = {
    "gaussian": _gaussian,
    "mog": _mog,
    "vamp": _vamp,
    "exemplar": _exemplar,
    "exemplar-rat": _exemplar_rat,
    "coreset": _coreset,
}
"""Prior name -> builder ``(config, splits, encoder, decoder) -> prior``; ``splits`` is on the
training device, ``splits.exemplars`` holds the grey-level training images (row = training
index)."""


def build_model(config: TrainConfig, splits: Splits, device: torch.device | str = "cpu") -> ExemplarELBO:
    r"""The run's model for ``config``: the gated MLP VAE with ``config.prior``, on ``device``.

    Use it to rebuild a trained run and load its ``best.pt`` or ``checkpoint.pt``::

        elbo = build_model(config, splits, device)
        elbo.load_state_dict(torch.load(path, weights_only=True)["model"])

    Arguments:
        config: the run's options.
        splits: the data, for priors built on the training set.
        device: where the model lives.
    """
    from .elbo import ExemplarELBO
    from .models import make_mlp_vae

    splits = splits.to(device)
    encoder, decoder = make_mlp_vae(splits.input_shape, config.latent_dim, config.hidden)
    encoder, decoder = encoder.to(device), decoder.to(device)
    prior = PRIORS[config.prior](config, splits, encoder, decoder).to(device)
    return ExemplarELBO(encoder, decoder, prior)


def _posterior_latents(elbo: ExemplarELBO, x: Tensor, n: int) -> Tensor:
    return elbo.encode(x).rsample(n)[0]


def _around_exemplars(elbo: ExemplarELBO, x: Tensor, n: int) -> Tensor:
    return elbo.prior.sample_around(x, n)


CONDITIONED: dict[str, Conditioner] = {"exemplar": _around_exemplars, "exemplar-rat": _around_exemplars}
"""Prior name -> ``(elbo, x [B, ...], n) -> z [n, B, d]``: latents conditioned on the images
``x`` for ``conditioned.png`` (exemplar priors: around the exemplar's prior component).
Priors not listed use the posterior, z ~ q(z|x)."""


# -- progress ----------------------------------------------------------------------------
class _StatusLines(io.TextIOBase):
    r"""Stands in for stderr while progress bars draw into a log: a bar's in-place redraws
    (tqdm's carriage returns, and its moves between nested bars) become at most one status line
    per ``interval`` seconds (default :data:`LOG_INTERVAL`), plus the last state of a bar that
    showed one; all other text passes through line by line."""

    def __init__(self, stream: Any, interval: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.stream, self.clock = stream, clock
        self.interval = LOG_INTERVAL if interval is None else interval
        self.last_line = clock()  # when a line was last written (by this stream or noted)
        self._buf = ""  # an unfinished plain line
        self._redraw = False  # the last text written was a bar's
        self._pending: str | None = None  # the newest bar state not yet written
        self._written: str | None = None  # the last bar state written
        self._shown = False  # a bar state was written since the last bar cleared itself

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def note_line(self) -> None:
        """Another stream (stdout) just wrote a line: the next status can wait."""
        self.last_line = self.clock()

    def _emit(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self.last_line = self.clock()

    def _state(self, state: str) -> None:
        self._emit(state)
        self._written, self._pending, self._shown = state, None, True

    def write(self, text: str) -> int:
        n = len(text)
        text = text.replace("\x1b[A", "")  # tqdm moving up from a nested bar's line
        if text.startswith("\r") or (self._redraw and text and not text.strip("\n")):
            self._bar(text)  # a redraw, or tqdm moving down to a nested bar / ending a bar
        elif text:
            self._redraw = False
            *lines, self._buf = (self._buf + text).split("\n")
            for line in lines:
                self._emit(line)
        return n

    def _bar(self, text: str) -> None:
        if self._buf:  # a plain line left open
            self._emit(self._buf)
            self._buf = ""
        self._redraw = True
        for segment in re.split(r"[\r\n]", text):
            state = segment.strip()
            if state:
                self._pending = None if state == self._written else state
            elif segment:  # blanks: a bar cleared itself; write its last state if it showed one
                if self._shown and self._pending:
                    self._state(self._pending)
                self._pending, self._shown = None, False
        if self._pending and self.clock() - self.last_line >= self.interval:
            self._state(self._pending)

    def flush(self) -> None:
        self.stream.flush()


class _Output:
    """Lines, and progress bars that do not break them: tqdm bars on a terminal, status lines
    in a log (see :class:`_StatusLines`), nothing but lines without ``progress``."""

    def __init__(self, progress: bool, quiet: bool = False) -> None:
        self.progress = progress and not quiet
        self.quiet = quiet  # ranks other than 0 under torch.distributed: no output at all
        self.terminal = self.progress and sys.stderr.isatty()
        self.status: _StatusLines | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator["_Output"]:
        if not self.progress or self.terminal:
            yield self
            return
        if isinstance(sys.stderr, _StatusLines):  # already inside status_lines()
            self.status = sys.stderr
            yield self
            return
        saved = sys.stderr
        self.status = sys.stderr = _StatusLines(saved)
        try:
            yield self
        finally:
            sys.stderr = saved
            self.status = None

    def bar(self, it: Iterable, desc: str, **kwargs: Any) -> Iterable:
        if not self.progress:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, leave=False, dynamic_ncols=self.terminal, **kwargs)

    def write(self, line: str) -> None:
        if self.quiet:
            return
        if self.terminal:
            from tqdm.auto import tqdm

            tqdm.write(line)
            return
        print(line, flush=True)
        if self.status is not None:
            self.status.note_line()


@contextlib.contextmanager
def status_lines(progress: bool = True) -> Iterator[None]:
    r"""While active, progress bars (tqdm, the priors' and the evaluation's included) drawn to
    a stderr that is not a terminal become a status line every :data:`LOG_INTERVAL` seconds
    instead of carriage-return redraws; on a terminal, or with ``progress=False``, nothing
    changes. :func:`fit` uses it; wrap other long passes in it (the benchmarks do).

    Example:
        >>> with status_lines():
        ...     pass
    """
    with _Output(progress).active():
        yield


# -- training ----------------------------------------------------------------------------
def kl_weight(epoch: int, warmup: int) -> float:
    r"""Linear KL warm-up: :math:`\beta = \min(1, \text{epoch} / \text{warmup})` for epochs 1, 2, ...

    Example:
        >>> [kl_weight(e, 4) for e in (1, 2, 5)]
        [0.25, 0.5, 1.0]

    References:
        Bowman et al. (2016); Sønderby et al., "Ladder VAE" (2016).
    """
    return 1.0 if warmup == 0 else min(1.0, epoch / warmup)


def evaluate(elbo: ExemplarELBO, x: Tensor, batch_size: int = 1000, *, progress: bool = False, desc: str = "evaluate") -> dict[str, float]:
    r"""Mean ELBO, reconstruction and KL (nats per image) of ``elbo`` on images ``x``, in
    evaluation mode (priors use their exact density: all exemplars, no leave-one-out).

    Arguments:
        elbo: the model.
        x: binary images ``[N, ...]``.
        batch_size: images per forward pass.
        progress: a progress bar (on a terminal) or status lines (in a log).
        desc: the bar's label.

    Example:
        >>> from vaepriors.models import make_mlp_vae
        >>> from vaepriors import ExemplarELBO, GaussianPrior
        >>> enc, dec = make_mlp_vae(16, latent_dim=2, hidden=8)
        >>> sorted(evaluate(ExemplarELBO(enc, dec, GaussianPrior(2)), torch.rand(5, 16).bernoulli()))
        ['elbo', 'kl', 'reconstruction']
    """
    import torch

    was_training = elbo.training
    elbo.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)
    starts = _Output(progress).bar(range(0, len(x), batch_size), desc, unit="batch")
    with torch.no_grad():
        for start in starts:
            out = elbo(x[start : start + batch_size])
            sums += torch.stack([out.elbo.sum(), out.reconstruction.sum(), out.kl.sum()]).double()
    elbo.train(was_training)
    e, r, k = (sums / len(x)).tolist()
    return {"elbo": e, "reconstruction": r, "kl": k}


def fit(config: TrainConfig) -> dict[str, Any]:
    r"""Trains ``config.prior`` with the papers' gated MLP VAE, evaluates it and writes the
    outputs described in the module docstring.

    Each epoch prints one line; early stopping ends the run after ``config.patience`` epochs
    without a better validation ELBO, ``config.max_steps`` after that many optimiser steps.
    The test numbers use the weights with the best validation ELBO. torch's thread count and
    :func:`~vaepriors.set_validation` are set for the run and restored after it.

    Arguments:
        config: the run's options.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        VAEPriorsError: for bad options (naming the :class:`TrainConfig` field), missing data, a
            ``resume`` that does not match its checkpoint, or a diverged run.
    """
    import torch

    from .errors import set_validation, validation_enabled

    config = dataclasses.replace(config)  # checks options edited after construction
    threads, validate = torch.get_num_threads(), validation_enabled()
    if config.threads:
        torch.set_num_threads(config.threads)
    set_validation(config.validate)
    started = _join_torchrun(config)
    try:
        with _Output(config.progress, quiet=_ranks()[0] > 0).active() as output:
            return _fit(config, output)
    finally:
        torch.set_num_threads(threads)
        set_validation(validate)
        if started:
            import torch.distributed as td

            td.destroy_process_group()


def _ranks() -> tuple[int, int]:
    """``(rank, world size)`` of torch.distributed; ``(0, 1)`` without a process group."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


def _join_torchrun(config: TrainConfig) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment, no process group yet) starts
    the process group: NCCL for CUDA, else gloo. Whether it started one."""
    import torch
    import torch.distributed as td

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not td.is_available() or td.is_initialized():
        return False
    cuda = _device(config.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group("nccl" if cuda else "gloo")
    return True


def _rank_file(path: Path, sharded: bool) -> Path:
    """Rank 0 writes ``path``; a sharded prior's other ranks their own ``<stem>.rank<r>.pt``."""
    rank = _ranks()[0]
    return path if rank == 0 or not sharded else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _barrier(what: str) -> None:
    """Waits for every rank (within vaepriors.distributed's timeout)."""
    import torch

    from . import distributed as vdist

    comm = vdist.comm()
    if comm is not None:
        vdist.all_reduce_sum(torch.zeros(1), comm, what)


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise VAEPriorsError(f"`device` must be 'auto', 'cpu', 'cuda', 'cuda:N', ...; got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VAEPriorsError(f"`device` {name!r}: CUDA is not available on this machine")
    return dev


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save(obj: dict, path: Path) -> None:
    import torch

    # Write-then-rename: an interrupted save never leaves a broken checkpoint behind.
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _same(a: Any, b: Any) -> bool:
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


def _old_options(args: dict) -> dict:
    # A checkpoint written before TrainConfig (an argparse Namespace): None meant all images,
    # leave-one-out over all exemplars and, for RAT, k = 10.
    return {**args, "n_train": args.get("n_train") or "all", "n_eval": args.get("n_eval") or "all",
            "rat_k": args.get("rat_k") or 10,
            "exemplar_subsample": args.get("exemplar_subsample") or ("all" if args.get("prior") in ("exemplar", "exemplar-rat") else None)}  # fmt: skip


def _load_splits(config: TrainConfig) -> Splits:
    from .data import load_dataset

    if config.dataset == "mnist":
        splits = load_dataset("mnist", config.data_dir, root_name="data_dir")
    else:
        splits = load_dataset(config.dataset)
    size = lambda v: None if v == "all" else v  # noqa: E731
    return splits.subset(size(config.n_train), size(config.n_eval))


def _describe_prior(config: TrainConfig, n: int) -> str:
    if config.prior not in ("exemplar", "exemplar-rat"):
        return ""
    m = exemplar_subsample_size(config, n)
    text = f"all {n - 1} other exemplars per step" if m is None else f"M = {m} of {n} exemplars per step"
    if config.prior == "exemplar-rat":
        text += f", RAT k = {min(config.rat_k, n - 1 if m is None else m)}"
    return f" ({text})"


def _fit(config: TrainConfig, output: _Output) -> dict[str, Any]:
    import torch

    from . import distributed as vdist
    from .data import mnist_root
    from .distributed import shard_range

    out = Path(config.out)
    device = _device(config.device)
    rank, ranks = _ranks()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sharded = config.shard and ranks > 1 and config.prior in ("exemplar", "exemplar-rat")
    ckpt_path, best_path = _rank_file(out / "checkpoint.pt", sharded), _rank_file(out / "best.pt", sharded)
    writes = rank == 0 or sharded  # the ranks that save checkpoints
    state = None
    if config.resume:
        if not ckpt_path.is_file():
            raise VAEPriorsError(f"`resume`: no checkpoint at '{ckpt_path}'")
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not {"model", "optimizer", "epoch"} <= set(state) or not (
            "config" in state or "args" in state
        ):
            raise VAEPriorsError(
                f"`resume`: '{ckpt_path}' is not a checkpoint of this training command (it lacks its options, "
                "model, optimiser or epoch)"
            )
        saved = state["config"] if "config" in state else _old_options(state.get("args", {}))
        changed = {k: (saved.get(k), getattr(config, k)) for k in _FIXED_ON_RESUME if not _same(saved.get(k), getattr(config, k))}
        if changed:
            diff = ", ".join(f"`{k}` {a} -> {b}" for k, (a, b) in changed.items())
            raise VAEPriorsError(f"`resume` with different model or data options than the checkpoint: {diff}")
    if out.exists() and not out.is_dir():
        raise VAEPriorsError(f"`out` must be a folder (it is created if missing); '{out}' is a file")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    if config.dataset == "mnist":
        output.write(f"vaepriors-train: loading MNIST from '{mnist_root(config.data_dir, root_name='data_dir')[0]}'")
    splits = _load_splits(config).to(device)
    elbo = build_model(config, splits, device)
    model = elbo
    if ranks > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(elbo, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in elbo.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    loader = splits.train_loader(config.batch_size, seed=config.seed)

    history: list[dict] = []
    best = {"epoch": 0, "valid_elbo": -math.inf}
    bad_epochs, stopped_early, start, step = 0, False, 1, 0
    if state is not None:
        elbo.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"].cpu())
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        history, best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
        stopped_early = bad_epochs >= config.patience  # a resumed run may raise the patience
        start = state["epoch"] + 1
        step = state.get("step", sum(len(loader) for _ in history))
        for g in optimizer.param_groups:  # a resumed run may change the learning rate
            g["lr"] = config.lr

    n_params = sum(p.numel() for p in params)
    output.write(
        f"vaepriors-train: prior={config.prior}{_describe_prior(config, len(splits.train))} dataset={splits.name} "
        f"({len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test) device={device} "
        f"threads={torch.get_num_threads()} parameters={n_params:,}"
        + (f" ranks={ranks}{' (exemplars sharded)' if sharded else ''}" if ranks > 1 else "")
        + (f" (resuming after epoch {start - 1})" if state is not None else "")
    )
    steps_note = "" if config.max_steps is None else f", at most {config.max_steps} steps"
    output.write(
        f"  preset {config.preset}: {config.epochs} epochs of {len(loader)} steps{steps_note}, lr {config.lr}, KL warm-up "
        f"{config.warmup}, test log-likelihood with S = {config.eval_samples}"
    )
    reached = lambda: config.max_steps is not None and step >= config.max_steps  # noqa: E731
    for epoch in range(start, config.epochs + 1):
        if stopped_early or reached():
            break
        beta = kl_weight(epoch, config.warmup)
        elbo.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        _sync(device)
        t0 = time.perf_counter()
        bar = output.bar(loader, f"epoch {epoch}/{config.epochs}", unit="step")
        seen = steps = 0
        for x, _, index in bar:
            if ranks > 1:
                # One global batch and one global noise draw on every rank (same seed); each
                # rank its block of rows, its loss scaled so DDP's average is the batch mean.
                noise = torch.randn(1, len(x), config.latent_dim, device=device)
                lo, hi = shard_range(len(x), rank, ranks)
                res = model(x[lo:hi], index[lo:hi], kl_weight=beta, noise=noise[:, lo:hi])
                loss = res.loss * ((hi - lo) * ranks / len(x))
            else:
                res = model(x, index, kl_weight=beta)
                loss = res.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.normalize_grad:
                grads = [p.grad for p in params if p.grad is not None]
                norms = torch._foreach_norm(grads)
                torch._foreach_add_(norms, 1e-7)
                torch._foreach_div_(grads, norms)
            optimizer.step()
            sums += torch.stack([res.elbo.sum(), res.reconstruction.sum(), res.kl.sum()]).detach().double()
            step, steps, seen = step + 1, steps + 1, seen + len(x)
            if steps % 10 == 0 and output.progress:
                bar.set_postfix(loss=f"{res.loss.item():.2f}")
            if reached():
                break
        partial = steps < len(loader)
        if not partial:
            elbo.on_epoch_end(epoch - 1)  # the hook counts epochs from 0
        _sync(device)
        seconds = time.perf_counter() - t0
        if ranks > 1:
            sums = vdist.all_reduce_sum(sums, vdist.comm(), "training: summing the epoch's ELBO over ranks")
        train = dict(zip(("elbo", "reconstruction", "kl"), (sums / seen).tolist()))
        t1 = time.perf_counter()
        valid = evaluate(elbo, splits.valid, config.eval_batch_size, progress=output.progress, desc="validation")
        eval_seconds = time.perf_counter() - t1
        if not all(math.isfinite(v) for v in (*train.values(), *valid.values())):
            raise VAEPriorsError(
                f"training diverged in epoch {epoch} (train ELBO {train['elbo']}, valid ELBO {valid['elbo']}); try a smaller `lr`"
            )
        improved = valid["elbo"] > best["valid_elbo"]
        if improved:
            best, bad_epochs = {"epoch": epoch, "valid_elbo": valid["elbo"]}, 0
            if writes:
                _save({"model": elbo.state_dict(), "epoch": epoch}, best_path)
        else:
            bad_epochs += 1
            stopped_early = bad_epochs >= config.patience
        history.append({"epoch": epoch, "kl_weight": beta, "seconds": seconds, "eval_seconds": eval_seconds,
                        "steps": steps, "train": train, "valid": valid})  # fmt: skip
        output.write(
            f"epoch {epoch:>4}  train ELBO {train['elbo']:9.3f}  valid ELBO {valid['elbo']:9.3f}  "
            f"(rec {valid['reconstruction']:8.3f}, KL {valid['kl']:7.3f})  beta {beta:.2f}  {seconds:6.2f} s"
            + ("  *" if improved else "")
            + (f"  ({steps} of {len(loader)} steps)" if partial else "")
        )
        if writes:
            _save(
                {
                    "epoch": epoch, "step": step, "model": elbo.state_dict(), "optimizer": optimizer.state_dict(),
                    "loader": loader.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "history": history, "best": best, "bad_epochs": bad_epochs, "stopped_early": stopped_early,
                    "config": config.to_dict(),
                },
                ckpt_path,
            )  # fmt: skip
        if stopped_early:
            output.write(f"early stopping: no better validation ELBO for {config.patience} epochs")
        elif reached():
            output.write(f"stopping: {step} optimiser steps (max_steps)")

    # Test numbers use the weights with the best validation ELBO.
    _barrier("training: waiting for rank 0's best.pt")
    elbo.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)["model"])
    test = evaluate(elbo, splits.test, config.eval_batch_size, progress=output.progress, desc="test ELBO")
    ll, ll_note = _test_log_likelihood(elbo, splits.test, config, output)
    test.update(ll)
    metrics = {
        "prior": config.prior,
        "dataset": splits.name,
        "sizes": {"train": len(splits.train), "valid": len(splits.valid), "test": len(splits.test)},
        "config": config.to_dict(),
        "device": str(device),
        "torch": torch.__version__,
        "n_parameters": n_params,
        "epochs": history,
        "epochs_run": history[-1]["epoch"],
        "steps_run": step,
        "stopped_early": stopped_early,
        "best_epoch": best["epoch"],
        "best_valid_elbo": best["valid_elbo"],
        "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history),
        "test": test,
    }
    if rank > 0:
        return metrics
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    written = ["metrics.json", "checkpoint.pt", "best.pt"]
    if sharded:
        output.write("sample grids skipped: the exemplars are sharded over the ranks (no rank can sample alone)")
    else:
        written += _plots(elbo, config, splits, history, best, out, output)

    output.write(f"\nsummary ({config.prior} prior on {splits.name}, {metrics['epochs_run']} epochs, "
                 f"{metrics['seconds_per_epoch']:.2f} s/epoch)")  # fmt: skip
    output.write(f"  best valid ELBO  {best['valid_elbo']:10.3f}  (epoch {best['epoch']})")
    output.write(f"  test ELBO        {test['elbo']:10.3f}  (reconstruction {test['reconstruction']:.3f}, KL {test['kl']:.3f})")
    ll = test["log_likelihood"]
    output.write(f"  test log p(x)    {ll:10.3f}  ({ll_note})" if ll is not None else f"  test log p(x)    {ll_note}")
    output.write(f"  wrote {out}/: {', '.join(written)}")
    return metrics


def _test_log_likelihood(elbo: ExemplarELBO, x: Tensor, config: TrainConfig, output: _Output) -> tuple[dict, str]:
    import torch

    if config.eval_samples == 0:
        return {"log_likelihood": None, "log_likelihood_std_error": None, "eval_samples": 0}, "skipped (eval_samples 0)"
    # Imported here: the evaluation code is only needed at the end of a run.
    from .evaluation import log_likelihood

    output.write(f"test log-likelihood: {len(x)} images x S = {config.eval_samples} importance samples")
    gen = torch.Generator(device=x.device).manual_seed(config.seed)
    split = {"distributed": True} if _ranks()[1] > 1 else {}  # a block of points per rank
    ll = log_likelihood(elbo, x, config.eval_samples, batch_size=config.eval_batch_size, generator=gen,
                        progress=output.progress, **split)
    out = {"log_likelihood": float(ll.mean), "log_likelihood_std_error": float(ll.std_error), "eval_samples": config.eval_samples}
    return out, f"+- {out['log_likelihood_std_error']:.3f}, importance sampling, S={config.eval_samples}"


# -- images ------------------------------------------------------------------------------
def image_grid(images: Tensor, rows: int, cols: int, pad: int = 1) -> Tensor:
    r"""Tiles ``images`` ``[n, C, H, W]`` (``n <= rows * cols``, values in [0, 1]) into one
    image ``[rows * (H + pad) - pad, cols * (W + pad) - pad, C]`` on a white background,
    row by row; ready for ``imshow`` (squeeze ``C = 1``).

    Example:
        >>> image_grid(torch.zeros(5, 1, 2, 2), 2, 3).shape
        torch.Size([5, 8, 1])
    """
    import torch

    n, c, h, w = images.shape
    if n > rows * cols:
        raise VAEPriorsError(f"`images` holds {n} images, more than rows x cols = {rows * cols}")
    grid = torch.ones(rows, cols, c, h + pad, w + pad)
    grid.view(-1, c, h + pad, w + pad)[:n, :, :h, :w] = images.detach().float().cpu().clamp(0, 1)
    grid = grid.permute(0, 3, 1, 4, 2).reshape(rows * (h + pad), cols * (w + pad), c)
    return grid[: grid.shape[0] - pad, : grid.shape[1] - pad]


def _images(out: object) -> Tensor:
    from torch.distributions import Distribution

    # The decoder's mean image (pixel probabilities for a Bernoulli decoder).
    if not isinstance(out, Distribution):
        raise VAEPriorsError("plots need a decoder that returns a torch Distribution")
    return out.mean.detach().float().cpu()


def _as_images(x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    if len(shape) == 3 and shape[0] in (1, 3):
        return x.reshape(-1, *shape)
    if len(shape) == 2:
        return x.reshape(-1, 1, *shape)
    side = math.isqrt(math.prod(shape))
    return x.reshape(-1, 1, side, side) if side * side == math.prod(shape) else None


def _plots(elbo: ExemplarELBO, config: TrainConfig, splits: Splits, history: list[dict], best: dict, out: Path,
           output: _Output) -> list[str]:  # fmt: skip
    import torch

    try:
        from matplotlib.figure import Figure
    except ImportError:
        output.write("plots skipped: matplotlib is missing (pip install 'vaepriors[plot]')")
        return []
    written = []
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    for ax, key, title in zip(fig.subplots(1, 3), ("elbo", "reconstruction", "kl"), ("ELBO", "reconstruction", "KL")):
        for split, style in (("train", "-"), ("valid", "--")):
            ax.plot(epochs, [h[split][key] for h in history], style, marker="." if len(epochs) < 30 else None, label=split)
        ax.axvline(best["epoch"], color="grey", lw=0.8, ls=":")
        ax.set(title=f"{title} (nats)", xlabel="epoch")
        ax.legend()
    fig.suptitle(f"{config.prior} prior on {splits.name}")
    fig.savefig(out / "curves.png", dpi=100)
    written.append("curves.png")

    shape = splits.input_shape
    elbo.eval()
    with torch.no_grad():
        gen = torch.Generator(device=splits.test.device).manual_seed(config.seed)
        samples = _as_images(_images(elbo.decoder(elbo.prior.sample((64,)))), shape)
        rows, n = 8, 7
        pick = torch.randperm(len(splits.test), generator=gen, device=splits.test.device)[:rows]
        x = splits.test[pick]
        conditioner = CONDITIONED.get(config.prior, _posterior_latents)
        z = conditioner(elbo, x, n)  # [n, rows, d]
        cond = _images(elbo.decoder(z.transpose(0, 1).reshape(len(x) * n, -1)))
        cond = _as_images(torch.cat([x.cpu().float().unsqueeze(1), cond.reshape(len(x), n, *shape)], 1).reshape(-1, *shape), shape)
    if samples is None or cond is None:
        output.write(f"sample grids skipped: inputs of shape {shape} are not images")
        return written
    how = "around the prior's exemplar component" if config.prior in CONDITIONED else "z ~ q(z|x)"
    for name, grid, title in (
        ("samples.png", image_grid(samples, 8, 8), f"{config.prior} prior: random samples (decoder means)"),
        ("conditioned.png", image_grid(cond, rows, n + 1), f"{config.prior} prior: test image (left), samples {how}"),
    ):
        fig = Figure(figsize=(6, 6.4), layout="constrained")
        ax = fig.subplots()
        ax.imshow((grid.squeeze(-1) if grid.shape[-1] == 1 else grid).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
        fig.savefig(out / name, dpi=100)
        written.append(name)
    return written
