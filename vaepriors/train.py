r"""The training command ``vaepriors-train`` (``python -m vaepriors.train``): options ->
:class:`~vaepriors.training.TrainConfig` -> :func:`~vaepriors.training.fit`.

With no dataset given it trains on the built-in dataset, which needs no download::

    vaepriors-train --prior exemplar-rat --out runs/demo

and on MNIST (the dynamic-MNIST protocol of the VampPrior and Exemplar VAE papers)::

    vaepriors-train --prior vamp --dataset mnist --data-dir PATH                   # quick preset
    vaepriors-train --prior vamp --dataset mnist --data-dir PATH --preset paper    # the papers'

The training loop, its outputs and its options are :mod:`vaepriors.training`'s; this module
only parses the command line and reports errors in terms of the flags a user typed. It
imports neither torch nor the priors until a run starts, so ``--help`` needs neither.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from .errors import VAEPriorsError
from .training import DATASETS, PRESETS, PRIOR_COSTS, PRIORS, TrainConfig

__all__ = ["build_parser", "main", "parse_args", "run", "to_argv"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _preset_values(key: str) -> str:
    # "quick: 10; paper: 2000", or per dataset where they differ.
    parts = []
    for preset, per_dataset in PRESETS.items():
        values = {d: per_dataset[d][key] for d in DATASETS}
        if len(set(map(str, values.values()))) == 1:
            parts.append(f"{preset}: {next(iter(values.values()))}")
        else:
            parts.append(f"{preset}: " + ", ".join(f"{v} ({d})" for d, v in values.items()))
    return "; ".join(parts)


def _size(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def _subsample(text: str) -> int | str:
    if text in ("half", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'half' or 'all', got {text!r}") from None


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    # Shows defaults, except the unset (preset-filled) ones; keeps the epilog's layout.
    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _epilog() -> str:
    width = max(map(len, PRIOR_COSTS))
    costs = "\n".join(f"  {name:<{width}}  {text}" for name, text in PRIOR_COSTS.items())
    return f"""\
priors and their cost per training step (relative to gaussian, one CPU thread, MNIST):
{costs}

presets (options you give always win):
  quick   minutes on a CPU: builtin {PRESETS['quick']['builtin']['epochs']} epochs (about a minute on two busy cores);
          mnist the first {PRESETS['quick']['mnist']['n_train']} training and {PRESETS['quick']['mnist']['n_eval']} \
validation/test images, {PRESETS['quick']['mnist']['epochs']} epochs
  paper   the papers' protocol: all images, up to 2000 epochs with early stopping, KL warm-up over 100,
          lr 5e-4, S = 5000; hours to days on a CPU (use a GPU)

the test log-likelihood costs S importance samples x (a decoder pass + the prior) per test image: for
exemplar priors the prior is a sum over all N exemplars, about 1 s per image at S = 5000, N = 50000 on a
CPU core; --eval-samples 0 skips it.

output: one line per epoch; progress bars on a terminal, a status line with rate and time left at
least every 10 s when the output goes to a log; --no-progress prints the epoch lines only.

examples:
  vaepriors-train --prior exemplar-rat --out runs/demo
  vaepriors-train --prior exemplar --dataset mnist --data-dir PATH --epochs 2
  vaepriors-train --prior vamp --dataset mnist --data-dir PATH --preset paper --device cuda
"""


def build_parser() -> argparse.ArgumentParser:
    r"""The argument parser of the training command (options left unset are ``None`` and
    filled from the preset by :class:`~vaepriors.training.TrainConfig`).

    Example:
        >>> build_parser().parse_args(["--prior", "mog"]).prior
        'mog'
    """
    p = argparse.ArgumentParser(
        prog="vaepriors-train",
        description="Train the papers' gated MLP VAE (784-300-300, d=40, Bernoulli decoder) with a chosen prior; "
        "write metrics, curves, sample grids and checkpoints into --out.",
        formatter_class=_Formatter,
        epilog=_epilog(),
    )
    pv = _preset_values
    g = p.add_argument_group("prior and data")
    g.add_argument("--prior", choices=sorted(PRIORS), default="vamp", help="the prior p(z); costs below")
    g.add_argument("--dataset", choices=list(DATASETS), default="builtin",
                   help="'builtin' needs no download; 'mnist' reads the IDX files")
    g.add_argument("--data-dir", default=None,
                   help="MNIST folder with the four IDX files (default $VAEPRIORS_MNIST, else ~/.cache/vaepriors/mnist)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="fills the options you leave out: 'quick' (minutes) or 'paper' (the papers' protocol)")
    g.add_argument("--n-train", type=_size, default=None, help=f"the first N training images, or 'all' [{pv('n_train')}]")
    g.add_argument("--n-eval", type=_size, default=None,
                   help=f"the first N validation and test images, or 'all' [{pv('n_eval')}]")
    g.add_argument("--components", type=int, default=None,
                   help=f"mixture components / pseudo-inputs (mog, vamp, coreset) [{pv('components')}]")
    g.add_argument("--coreset-every", type=int, default=10, help="coreset: epochs between coreset updates")
    g.add_argument("--exemplar-subsample", type=_subsample, default=None,
                   help="exemplar priors: exemplars per step M, 'half' (M = N/2, the paper's) or 'all' "
                        "(leave-one-out over all N) [exemplar: half; exemplar-rat: all]")
    g.add_argument("--rat-k", type=int, default=10, help="exemplar-rat: neighbours retrieved per training point")
    g.add_argument("--shard", action="store_true",
                   help="exemplar priors under torchrun: each rank holds its block of the exemplars")

    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, default=40, help="size d of z")
    g.add_argument("--hidden", type=int, nargs="+", default=[300, 300], help="widths of the gated layers")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help=f"maximum epochs [{pv('epochs')}]")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimiser steps (then evaluate and save as usual)")
    g.add_argument("--batch-size", type=int, default=100, help="training minibatch size")
    g.add_argument("--lr", type=float, default=None, help=f"Adam learning rate [{pv('lr')}]")
    g.add_argument("--normalize-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="scale each parameter's gradient to unit norm before Adam (the papers' optimiser)")
    g.add_argument("--warmup", type=int, default=None, help=f"epochs of linear KL warm-up, 0 for none [{pv('warmup')}]")
    g.add_argument("--patience", type=int, default=50, help="stop after this many epochs without a better validation ELBO")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, batches, binarisation and sampling")

    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-samples", type=int, default=None,
                   help=f"importance samples S for the test log-likelihood, 0 to skip [{pv('eval_samples')}]")
    g.add_argument("--eval-batch-size", type=int, default=1000, help="batch size of validation and test passes")
    g.add_argument("--out", default=None, help="output folder (default runs/<prior>-<dataset>)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                   help="check tensor values (NaN/inf, index ranges) on every call; --no-validate "
                        "saves a GPU synchronisation per check once a setup is known to work")
    g.add_argument("--threads", type=int, default=None, help=f"CPU threads for torch, 0 for torch's choice [{pv('threads')}]")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars on a terminal, status lines in a log (the priors' included); "
                        "--no-progress prints the epoch lines only")
    return p


_FIELDS = tuple(f for f in TrainConfig.__dataclass_fields__)
_NAMED = re.compile(r"`(" + "|".join(map(re.escape, sorted(_FIELDS, key=len, reverse=True))) + r")`")


def _as_flags(message: str) -> str:
    """A library message in terms of the command: `data_dir` -> --data-dir."""
    return _NAMED.sub(lambda m: _flag(m.group(1)), message)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    r"""Parses ``argv`` (default: ``sys.argv[1:]``) into a :class:`~vaepriors.training.TrainConfig`
    (options left out come from ``--preset``); bad values raise
    :class:`~vaepriors.VAEPriorsError` naming the flag.

    Example:
        >>> c = parse_args(["--dataset", "mnist", "--epochs", "2"])
        >>> c.epochs, c.n_train, c.warmup, c.out
        (2, 10000, 3, 'runs/vamp-mnist')
    """
    ns = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(ns).items() if v is not None}
    options["hidden"] = tuple(options["hidden"])
    try:
        return TrainConfig(**options)
    except VAEPriorsError as e:
        raise VAEPriorsError(_as_flags(str(e))) from None


def to_argv(config: TrainConfig) -> list[str]:
    r"""The command-line arguments that give ``config`` (every option spelt out), so that
    ``parse_args(to_argv(config)) == config``.

    Example:
        >>> c = TrainConfig(prior="mog", epochs=3)
        >>> parse_args(to_argv(c)) == c
        True
    """
    argv: list[str] = []
    for name, value in config.to_dict().items():
        if value is None or name in ("progress", "validate", "normalize_grad", "resume", "shard"):
            continue
        argv += [_flag(name), *map(str, value)] if name == "hidden" else [_flag(name), repr(value) if name == "lr" else str(value)]
    for name in ("progress", "validate", "normalize_grad"):
        argv.append(_flag(name) if getattr(config, name) else "--no-" + _flag(name)[2:])
    for name in ("resume", "shard"):
        if getattr(config, name):
            argv.append(_flag(name))
    return argv


def run(config: TrainConfig) -> dict[str, Any]:
    r"""What the command does with ``config``: :func:`~vaepriors.training.fit`, with errors
    naming the flags (``--data-dir``) rather than the fields (``data_dir``).

    Returns:
        The run's metrics (those of ``metrics.json``).
    """
    from .training import fit

    try:
        return fit(config)
    except VAEPriorsError as e:
        raise VAEPriorsError(_as_flags(str(e))) from None


def main(argv: list[str] | None = None) -> int:
    r"""Entry point of ``vaepriors-train`` / ``python -m vaepriors.train``: parses ``argv``,
    runs :func:`run` and returns the exit code (2 with a one-line message for a
    :class:`~vaepriors.VAEPriorsError`, 130 when interrupted).

    Example:
        >>> main(["--epochs", "0"])
        2
    """
    try:
        run(parse_args(argv))
    except VAEPriorsError as e:
        print(f"vaepriors-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaepriors-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
