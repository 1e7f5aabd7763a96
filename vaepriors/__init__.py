r"""vaepriors: plug-in priors for PyTorch VAEs.

Swap the prior of your own VAE in one line::

    loss = ExemplarELBO(my_encoder, my_decoder, VampPrior.from_data(x)).forward(x).loss
"""

from .coreset import PseudocoresetPrior
from .elbo import ELBOOutput, ExemplarELBO
from .encoder import gaussian_params
from .engine import knn, mixture_log_prob, mixture_logsumexp
from .errors import VAEPriorsError, set_validation
from .gaussian import GaussianPrior
from .mixture import MixturePrior
from .prior import BasePrior, Prior
from .vamp import VampPrior

__version__ = "0.1.0"

__all__ = [
    "BasePrior",
    "ELBOOutput",
    "ExemplarELBO",
    "GaussianPrior",
    "MixturePrior",
    "Prior",
    "PseudocoresetPrior",
    "VAEPriorsError",
    "VampPrior",
    "gaussian_params",
    "knn",
    "mixture_log_prob",
    "mixture_logsumexp",
    "set_validation",
]
