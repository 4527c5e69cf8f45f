"""Vocab-parallel variants over torch.distributed process groups: the class dimension sharded across ranks.

``softmax``, ``log_softmax``, ``logsumexp``, ``cross_entropy``, ``selective_log_softmax``, ``entropy`` and
``linear_cross_entropy`` take the single-device signatures plus keyword-only ``group=`` and ``vocab_start=``.
``CollectiveCounter`` counts the collectives (and payload bytes) they issue. Nothing runs at import.
"""

from ._comm import CollectiveCounter, reset_shard_cache
from ._linear import linear_cross_entropy
from .functional import cross_entropy, entropy, log_softmax, logsumexp, selective_log_softmax, softmax

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "selective_log_softmax",
    "entropy",
    "linear_cross_entropy",
    "CollectiveCounter",
    "reset_shard_cache",
]
