r"""vaepriors: plug-in priors for PyTorch VAEs.

Swap the prior of your own VAE in one line::

    loss = ExemplarELBO(my_encoder, my_decoder, VampPrior.from_data(x)).forward(x).loss
"""

from . import distributed
from .augment import ExemplarAugmenter, augment_batch
from .coreset import PseudocoresetPrior
from .distribution import PriorDistribution
from .elbo import ELBOOutput, ExemplarELBO
from .encoder import Posterior, gaussian_params, read_posterior
from .engine import get_memory_budget, knn, mixture_log_prob, mixture_logsumexp, set_memory_budget
from .errors import VAEPriorsError, set_validation
from .evaluation import (
    active_units,
    bits_per_dim,
    knn_accuracy,
    log_likelihood,
    novelty_diagnostics,
    novelty_report,
    novelty_weights,
)
from .exemplar import ExemplarPrior, decoded_input
from .exemplar_set import ExemplarSet, IndexedDataset
from .gaussian import GaussianPrior
from .mixture import MixturePrior
from .prior import BasePrior, Prior
from .vamp import VampPrior

__version__ = "0.1.0"

__all__ = [
    "BasePrior",
    "ELBOOutput",
    "ExemplarAugmenter",
    "ExemplarELBO",
    "ExemplarPrior",
    "ExemplarSet",
    "GaussianPrior",
    "IndexedDataset",
    "MixturePrior",
    "Posterior",
    "Prior",
    "PriorDistribution",
    "PseudocoresetPrior",
    "VAEPriorsError",
    "VampPrior",
    "active_units",
    "augment_batch",
    "bits_per_dim",
    "decoded_input",
    "distributed",
    "gaussian_params",
    "get_memory_budget",
    "knn",
    "knn_accuracy",
    "log_likelihood",
    "mixture_log_prob",
    "mixture_logsumexp",
    "novelty_diagnostics",
    "novelty_report",
    "novelty_weights",
    "read_posterior",
    "set_memory_budget",
    "set_validation",
]
