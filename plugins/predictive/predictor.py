"""`Predictor`: the sequence bookkeeping shared by `PredictiveCache` and the HTTP plugin.

It remembers each client's previous key, feeds transitions to the model (one
global `TransitionModel`, or one per client when `per_client` is set) and
rations prefetches: at most `max_inflight` at once and `per_second` on average
(a token bucket with a burst of one second's worth).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from time import monotonic
from typing import Any

from .model import TransitionModel

__all__ = ["Predictor"]


class Predictor:
    def __init__(
        self,
        *,
        threshold: float = 0.5,
        decay: float = 0.95,
        min_support: float = 3.0,
        min_precision: float = 0.5,
        max_keys: int = 10_000,
        per_client: bool = False,
        max_clients: int = 10_000,
        max_inflight: int = 4,
        per_second: float = 20.0,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight: expected >= 1, got {max_inflight!r}")
        if per_second <= 0:
            raise ValueError(f"prefetch_per_second: expected > 0, got {per_second!r}")
        if max_clients < 1:
            raise ValueError(f"max_clients: expected >= 1, got {max_clients!r}")
        self._model_args: dict[str, Any] = {
            "threshold": threshold,
            "decay": decay,
            "min_support": min_support,
            "min_precision": min_precision,
        }
        self.max_keys = max_keys
        self.per_client = per_client
        self.max_clients = max_clients
        self.max_inflight = max_inflight
        self.per_second = per_second
        self.model = TransitionModel(max_keys=max_keys, **self._model_args)
        self._client_models: OrderedDict[Hashable, TransitionModel] = OrderedDict()
        self._prev: OrderedDict[Hashable, Hashable] = OrderedDict()
        self.inflight = 0
        self._tokens = max(1.0, per_second)
        self._refilled = monotonic()
        self.skipped_inflight = 0
        self.skipped_budget = 0

    def _model_for(self, client: Hashable | None) -> TransitionModel:
        if not self.per_client or client is None:
            return self.model
        model = self._client_models.get(client)
        if model is None:
            # A client's own history is short: small rows, few keys.
            model = TransitionModel(max_keys=min(self.max_keys, 1024), **self._model_args)
            self._client_models[client] = model
            if len(self._client_models) > self.max_clients:
                self._client_models.popitem(last=False)
        else:
            self._client_models.move_to_end(client)
        return model

    def observe(
        self, key: Hashable, client: Hashable | None = None
    ) -> list[tuple[Hashable, float]]:
        """Learn that `client` asked for `key`; return the likely next keys."""
        model = self._model_for(client)
        prev = self._prev.get(client)
        if prev is not None and prev != key:
            model.observe(prev, key)
        self._prev[client] = key
        self._prev.move_to_end(client)
        if len(self._prev) > self.max_clients:
            self._prev.popitem(last=False)
        return model.predict(key)

    def admit(self) -> bool:
        """Take a prefetch slot (call `done()` after) if the in-flight bound and the
        per-second budget allow one."""
        if self.inflight >= self.max_inflight:
            self.skipped_inflight += 1
            return False
        now = monotonic()
        burst = max(1.0, self.per_second)
        self._tokens = min(burst, self._tokens + (now - self._refilled) * self.per_second)
        self._refilled = now
        if self._tokens < 1.0:
            self.skipped_budget += 1
            return False
        self._tokens -= 1.0
        self.inflight += 1
        return True

    def done(self) -> None:
        self.inflight -= 1

    def stats(self) -> dict[str, Any]:
        out = self.model.stats()
        out.update(
            per_client=self.per_client,
            clients=len(self._prev),
            client_models=len(self._client_models),
            inflight=self.inflight,
            skipped_inflight=self.skipped_inflight,
            skipped_budget=self.skipped_budget,
        )
        return out
