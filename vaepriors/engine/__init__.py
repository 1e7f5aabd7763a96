r"""The reduction engine: exact Gaussian-mixture log-densities and nearest neighbours.

Every mixture prior in vaepriors reduces to one operation over B queries and N components,

.. math:: L_i = \log \sum_{j \ne e_i} \exp\Big(a_j - \tfrac12 \sum_k (z_{ik} - \mu_{jk})^2 / s^2_{jk}\Big),

computed exactly (every component, max-shifted) by one of several backends.
"""

from .reduce import (
    BACKENDS,
    LogSumExp,
    get_memory_budget,
    knn,
    mixture_log_prob,
    mixture_logsumexp,
    set_memory_budget,
)

__all__ = [
    "BACKENDS",
    "LogSumExp",
    "get_memory_budget",
    "knn",
    "mixture_log_prob",
    "mixture_logsumexp",
    "set_memory_budget",
]
