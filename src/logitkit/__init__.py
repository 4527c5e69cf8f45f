"""logitkit: the softmax family, exact and fast, as a drop-in for torch.nn.functional.

Nothing runs at import: no device queries, no environment reads.
"""

from . import functional, nn
from ._config import get_backend, use_backend
from .functional import (
    CrossEntropyStats,
    LinearCrossEntropyStats,
    cross_entropy,
    cross_entropy_with_stats,
    entropy,
    linear_cross_entropy,
    linear_cross_entropy_with_stats,
    log_softmax,
    logsumexp,
    nll_loss,
    selective_log_softmax,
    softmax,
)

__version__ = "0.1.0"

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "cross_entropy_with_stats",
    "CrossEntropyStats",
    "nll_loss",
    "selective_log_softmax",
    "entropy",
    "linear_cross_entropy",
    "linear_cross_entropy_with_stats",
    "LinearCrossEntropyStats",
    "use_backend",
    "get_backend",
    "functional",
    "nn",
]
