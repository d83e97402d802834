"""gpuce: softmax cross-entropy kernels for CuPy, with a NumPy fallback.

One API over NumPy and CuPy arrays: NumPy in gives NumPy out (CPU), CuPy in gives
CuPy out (GPU kernels).  ``import gpuce`` works without CuPy and without a GPU.
"""

from .information import cross_entropy, entropy, kl_div
from .sce import softmax_cross_entropy
from .linear import LinearGrads, linear_cross_entropy
from .softmax import log_softmax, logsumexp, softmax
from .tokens import linear_token_logprobs, token_logprobs
from .distillation import distillation_loss, linear_distillation_loss
from ._results import SceStats
from ._impl import use_impl
from ._explain import explain

__version__ = "0.1.0"


def __getattr__(name):
    # SoftmaxClassifier imports scikit-learn's base classes when available: load it lazily
    # so that ``import gpuce`` stays light.
    if name == "SoftmaxClassifier":
        from .classifier import SoftmaxClassifier

        return SoftmaxClassifier
    raise AttributeError(f"module 'gpuce' has no attribute {name!r}")

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "entropy",
    "cross_entropy",
    "kl_div",
    "softmax_cross_entropy",
    "linear_cross_entropy",
    "LinearGrads",
    "token_logprobs",
    "linear_token_logprobs",
    "distillation_loss",
    "linear_distillation_loss",
    "SceStats",
    "use_impl",
    "explain",
    "SoftmaxClassifier",
]
