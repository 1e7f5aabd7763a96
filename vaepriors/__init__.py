r"""vaepriors: plug-in priors for PyTorch VAEs.

Swap the prior of your own VAE in one line::

    loss = ExemplarELBO(my_encoder, my_decoder, VampPrior.from_data(x)).forward(x).loss
"""

from typing import TYPE_CHECKING, Any

# Each public name and the module it lives in: imported on first use, so that
# ``import vaepriors`` (and the training command's --help) does not load torch.
_WHERE = {
    "ExemplarAugmenter": "augment", "augment_batch": "augment",
    "PseudocoresetPrior": "coreset",
    "PriorDistribution": "distribution",
    "ELBOOutput": "elbo", "ExemplarELBO": "elbo",
    "Posterior": "encoder", "gaussian_params": "encoder", "read_posterior": "encoder",
    "get_memory_budget": "engine", "knn": "engine", "mixture_log_prob": "engine",
    "mixture_logsumexp": "engine", "set_memory_budget": "engine",
    "VAEPriorsError": "errors", "set_validation": "errors",
    "active_units": "evaluation", "bits_per_dim": "evaluation", "knn_accuracy": "evaluation",
    "log_likelihood": "evaluation", "novelty_diagnostics": "evaluation", "novelty_report": "evaluation",
    "novelty_weights": "evaluation",
    "ExemplarPrior": "exemplar", "decoded_input": "exemplar",
    "ExemplarSet": "exemplar_set", "IndexedDataset": "exemplar_set",
    "GaussianPrior": "gaussian",
    "MixturePrior": "mixture",
    "BasePrior": "prior", "Prior": "prior",
    "VampPrior": "vamp",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "distributed":
        return importlib.import_module(".distributed", __name__)
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vaepriors' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
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
