"""`TransitionModel`: a decayed first-order model of which key follows which.

Why this model: the next request depends mostly on the current one (a page
and its assets, a user and their videos), so a first-order Markov chain
captures most of what can be prefetched, costs O(1) per request and is
explainable. Counts decay per observation of their row (each new successor of
`a` multiplies a's counts by `decay`), so the model follows changes in traffic
within ~1/(1-decay) observations and old habits fade.

The model must know when it knows nothing. Three guards keep it quiet on a
structure-free trace:

1. `min_support`: a row predicts nothing until it has that much (decayed) weight.
2. a smoothed estimate ``count / (total + prior)``: one lucky repeat is not p=1.
3. a shadow check of its own precision: every observation first asks "would I
   have predicted this?"; while the decayed share of right predictions stays
   under `min_precision`, `predict` returns nothing (it keeps learning, and
   speaks again once it is right often enough).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["TransitionModel"]


class _Row:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: dict[Hashable, float] = {}
        self.total = 0.0


class TransitionModel:
    """``observe(prev, key)`` learns; ``predict(key)`` gives ``[(next, p), ...]`` over
    `threshold`, most likely first. Memory is bounded: at most `max_keys` rows (LRU)
    and `max_successors` successors per row (the lightest pruned).
    """

    def __init__(
        self,
        *,
        decay: float = 0.95,
        threshold: float = 0.5,
        min_support: float = 3.0,
        prior: float = 1.0,
        min_precision: float = 0.5,
        precision_decay: float = 0.99,
        max_keys: int = 10_000,
        max_successors: int = 8,
    ) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay: expected 0 < decay <= 1, got {decay!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold: expected 0 < threshold <= 1, got {threshold!r}")
        if min_support < 0 or prior < 0:
            raise ValueError("min_support and prior must be >= 0")
        if not 0.0 <= min_precision <= 1.0:
            raise ValueError(f"min_precision: expected 0..1, got {min_precision!r}")
        if max_keys < 1 or max_successors < 1:
            raise ValueError("max_keys and max_successors must be >= 1")
        self.decay = decay
        self.threshold = threshold
        self.min_support = min_support
        self.prior = prior
        self.min_precision = min_precision
        self.precision_decay = precision_decay
        self.max_keys = max_keys
        self.max_successors = max_successors
        self._rows: OrderedDict[Hashable, _Row] = OrderedDict()
        # Decayed counts of shadow predictions made and of those that came true.
        self._predicted = 0.0
        self._correct = 0.0
        self.observations = 0

    def __len__(self) -> int:
        return len(self._rows)

    def observe(self, prev: Hashable, key: Hashable) -> None:
        """`key` was asked for right after `prev`."""
        self.observations += 1
        row = self._rows.get(prev)
        if row is None:
            row = self._rows[prev] = _Row()
            if len(self._rows) > self.max_keys:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(prev)
        # Shadow check: what would the model have said before seeing this?
        guesses = self._candidates(row)
        if guesses:
            pd = self.precision_decay
            # Each guess would be one prefetch: precision is the share of them used.
            self._predicted = self._predicted * pd + len(guesses)
            self._correct = self._correct * pd + (1.0 if any(k == key for k, _ in guesses) else 0.0)
        d = self.decay
        counts = row.counts
        if d != 1.0:
            for k in counts:
                counts[k] *= d
            row.total *= d
        counts[key] = counts.get(key, 0.0) + 1.0
        row.total += 1.0
        if len(counts) > self.max_successors:
            lightest = min(counts, key=counts.__getitem__)
            row.total -= counts.pop(lightest)

    def _candidates(self, row: _Row) -> list[tuple[Hashable, float]]:
        if row.total < self.min_support:
            return []
        denom = row.total + self.prior
        out = [(k, c / denom) for k, c in row.counts.items() if c / denom >= self.threshold]
        out.sort(key=lambda kv: kv[1], reverse=True)
        return out

    @property
    def precision(self) -> float | None:
        """Decayed share of the model's (shadow) guesses that came true; None before any."""
        return self._correct / self._predicted if self._predicted >= 1.0 else None

    @property
    def confident(self) -> bool:
        """False while the model has been wrong too often to be worth acting on.

        Before it has made ~`1/(1-precision_decay)`/10 predictions it is trusted
        (the threshold and `min_support` already guard it).
        """
        if self._predicted < 0.1 / (1.0 - self.precision_decay + 1e-12):
            return True
        return self._correct >= self.min_precision * self._predicted

    def predict(self, key: Hashable) -> list[tuple[Hashable, float]]:
        """Likely next keys after `key` with their probability, most likely first."""
        if not self.confident:
            return []
        row = self._rows.get(key)
        if row is None:
            return []
        return self._candidates(row)

    def stats(self) -> dict[str, Any]:
        return {
            "keys": len(self._rows),
            "observations": self.observations,
            "precision": None if self.precision is None else round(self.precision, 3),
            "confident": self.confident,
        }
