"""Predictive prefetching: learn which key follows which; load the next one early.

- `PredictiveCache(max_size)`: the seed's key-value cache that prefetches through
  registered loaders.
- `PredictivePlugin` (``predictive``): the same model over HTTP GETs, warming the
  response cache with internal sub-requests.
- `TransitionModel`: the decayed first-order model both use.
"""

from __future__ import annotations

from .cache import PredictiveCache
from .http import PREFETCH_EXTENSION, PredictivePlugin, PredictiveSettings, is_prefetch
from .model import TransitionModel
from .predictor import Predictor

__all__ = [
    "PREFETCH_EXTENSION",
    "PredictiveCache",
    "PredictivePlugin",
    "PredictiveSettings",
    "Predictor",
    "TransitionModel",
    "is_prefetch",
]
