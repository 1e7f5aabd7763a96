r"""Evaluation and diagnostics of a trained VAE with any prior.

One call each, on the user's own model (an :class:`~vaepriors.ExemplarELBO`, or the triple
``(encoder, decoder, prior)``):

- :func:`log_likelihood`: the importance-weighted estimate of :math:`\log p(x)` (and
  :func:`bits_per_dim`), batched over data points and samples under a memory budget;
- :func:`active_units`: latent dimensions whose encoder mean varies over the data;
- :func:`knn_accuracy`: k-nearest-neighbour classification of encoder means;
- :func:`novelty_weights`, :func:`novelty_diagnostics`, :func:`novelty_report`: how close
  the decoder is to the optimal "weighted average of training inputs" decoder, i.e. how much
  the model memorises its training set.

Every function runs without gradients and with the model in evaluation mode (priors built
on the training set then use their exact density: every exemplar, no leave-one-out); the
modules' previous train/eval modes are restored afterwards.
"""

from ._common import DEFAULT_MEMORY_BUDGET
from .likelihood import LogLikelihood, bits_per_dim, log_likelihood
from .novelty import Novelty, NoveltyReport, novelty_diagnostics, novelty_report, novelty_weights
from .representation import ActiveUnits, active_units, knn_accuracy

__all__ = [
    "ActiveUnits",
    "DEFAULT_MEMORY_BUDGET",
    "LogLikelihood",
    "Novelty",
    "NoveltyReport",
    "active_units",
    "bits_per_dim",
    "knn_accuracy",
    "log_likelihood",
    "novelty_diagnostics",
    "novelty_report",
    "novelty_weights",
]
