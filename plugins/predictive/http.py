"""`PredictivePlugin`: learns which URL follows which and warms the response cache.

After a client's GET, the likely next URLs are fetched by internal GET
sub-requests through the middleware (so whichever cache plugin is enabled
stores them, exactly as it would a client's response). A sub-request carries
the ASGI scope extension ``"overdrive.prefetch"``: this plugin neither learns
from it nor prefetches after it (no recursion), and other plugins can skip it
(rate limits, client metrics) with `is_prefetch(scope)`.

Only URLs whose last client response the cache would store are prefetched:
status 200, no ``Set-Cookie``, no ``Cache-Control: private``/``no-store``, and
requests without ``Authorization`` or ``Cookie`` (one user's data is never
fetched on speculation). Sub-requests carry no client credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Hashable, MutableMapping
from dataclasses import dataclass
from time import monotonic
from typing import Any, ClassVar

import structlog

from overdrive import ConfigError, Plugin, hookimpl
from overdrive.metrics import MetricFamily as F
from overdrive.middleware.internal import EmptyRequest

from .predictor import Predictor

__all__ = ["PREFETCH_EXTENSION", "PredictivePlugin", "PredictiveSettings", "is_prefetch"]

logger = structlog.get_logger("overdrive.predictive")

PREFETCH_EXTENSION = "overdrive.prefetch"
INTERNAL_EXTENSION = "overdrive.internal"  # ctx.internal: rate limits and metrics skip it
_PRIVATE = (b"private", b"no-store")
REFUSE_SECONDS = 300.0  # a URL the cache did not keep is not prefetched for this long
_PERSONAL = frozenset({b"authorization", b"cookie"})
_COPY_HEADERS = frozenset({b"host", b"accept", b"accept-encoding", b"accept-language"})


def is_prefetch(scope: MutableMapping[str, Any]) -> bool:
    """Whether this request is one of our internal prefetch sub-requests."""
    ext = scope.get("extensions")
    return ext is not None and PREFETCH_EXTENSION in ext


@dataclass
class PredictiveSettings:
    threshold: float = 0.5  # prefetch a next URL when its probability is at least this
    decay: float = 0.95  # per observation of a URL, older transitions weigh this much less
    min_support: float = 3.0  # (decayed) observations of a URL before it predicts anything
    min_precision: float = 0.5  # stop prefetching while fewer predictions than this come true
    max_inflight: int = 4  # prefetch sub-requests at once
    prefetch_per_second: float = 10.0  # average prefetch rate (burst: one second's worth)
    client: str = ""  # "" (one global sequence), "ip", or "header:<name>" (a session key)
    per_client: bool = False  # one model per client instead of one learned from everyone
    max_keys: int = 10_000  # URLs the model remembers (LRU)
    max_clients: int = 10_000  # clients whose previous URL is remembered (LRU)
    refetch_after: float = 30.0  # do not prefetch a URL seen or prefetched this recently
    timeout: float = 10.0  # seconds a prefetch sub-request may take

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"predictive.threshold: expected 0 < x <= 1, got {self.threshold!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"predictive.decay: expected 0 < x <= 1, got {self.decay!r}")
        for key in ("max_inflight", "max_keys", "max_clients"):
            if getattr(self, key) < 1:
                raise ConfigError(f"predictive.{key}: expected >= 1, got {getattr(self, key)!r}")
        for key in ("prefetch_per_second", "timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"predictive.{key}: expected > 0, got {getattr(self, key)!r}")
        if self.refetch_after < 0 or self.min_support < 0:
            raise ConfigError("predictive.refetch_after and min_support: expected >= 0")
        if not 0.0 <= self.min_precision <= 1.0:
            raise ConfigError(
                f"predictive.min_precision: expected 0..1, got {self.min_precision!r}"
            )
        c = self.client
        if not (c in ("", "ip") or (c.startswith("header:") and len(c) > len("header:"))):
            raise ConfigError(
                f"predictive.client: expected '', 'ip' or 'header:<name>', got {self.client!r}"
            )


class PredictivePlugin(Plugin):
    name = "predictive"
    metric_families = (
        F("predictive_observed_requests", "counter", "Requests the model learned from", "observed"),
        F(
            "predictive_prefetches",
            "counter",
            "Prefetches, by outcome",
            "prefetch.(issued|used|expired_unused|not_kept|refused_keys|failed)",
            labels=("outcome",),
        ),
        F(
            "predictive_prefetches_in_flight",
            "gauge",
            "Prefetches running now",
            "prefetch.inflight",
        ),
        F(
            "predictive_skipped_prefetches",
            "counter",
            "Prefetches skipped, by reason",
            "model.(skipped_inflight=in_flight|skipped_budget=budget)",
            labels=("reason",),
        ),
        F("predictive_model_keys", "gauge", "Keys the model tracks", "model.keys"),
        F(
            "predictive_model_observations",
            "gauge",
            "Transitions the model holds",
            "model.observations",
        ),
        F("predictive_model_clients", "gauge", "Clients the model tracks", "model.clients"),
        F(
            "predictive_model_confident",
            "gauge",
            "1 while the model's precision allows prefetching",
            "model.confident",
        ),
    )
    Settings = PredictiveSettings
    provides: ClassVar[dict[str, str]] = {"predictor": "predictor"}

    def __init__(self, settings: PredictiveSettings | None = None) -> None:
        super().__init__(settings)
        self.predictor: Predictor | None = None
        self._host: Any = None
        self._entry: Any = None  # a second middleware over the same app and host
        self._client_header: bytes | None = None
        self._storable: OrderedDict[str, bool] = OrderedDict()
        self._recent: dict[str, float] = {}  # key -> last seen or prefetched (monotonic)
        self._prefetched: OrderedDict[str, float] = OrderedDict()  # key -> when, not yet used
        self._refused: OrderedDict[str, float] = OrderedDict()  # key -> when refused
        self._tasks: set[asyncio.Task[None]] = set()
        self.observed = 0
        self.issued = 0
        self.used = 0
        self.expired = 0
        self.not_kept = 0
        self.failed = 0

    @hookimpl
    def overdrive_configure(self, host: Any) -> None:
        s: PredictiveSettings = self.settings
        self._host = host
        if s.client.startswith("header:"):
            self._client_header = s.client[len("header:") :].strip().lower().encode("latin-1")
        self.predictor = Predictor(
            threshold=s.threshold,
            decay=s.decay,
            min_support=s.min_support,
            min_precision=s.min_precision,
            max_keys=s.max_keys,
            per_client=s.per_client,
            max_clients=s.max_clients,
            max_inflight=s.max_inflight,
            per_second=s.prefetch_per_second,
        )

    def _client(self, ctx: Any) -> Hashable | None:
        c = self.settings.client
        if not c:
            return None
        if c == "ip":
            peer = ctx.scope.get("client")
            return peer[0] if peer else None
        wanted = self._client_header
        for name, value in ctx.raw_headers:
            if name.lower() == wanted:
                return value
        return None

    @hookimpl
    def after_request(self, ctx: Any) -> None:
        scope = ctx.scope
        if ctx.method != "GET" or self.predictor is None:
            return
        if is_prefetch(scope):
            if ctx.cache_status == "BYPASS":  # the cache plugin said it will not store it
                self._refuse(scope["extensions"][PREFETCH_EXTENSION]["key"])
            return  # not client traffic: neither learned from nor a trigger
        for name, _ in ctx.raw_headers:
            if name.lower() in _PERSONAL:
                return  # personal traffic: neither learned nor prefetched
        qs = scope.get("query_string") or b""
        key = f"{ctx.path}?{qs.decode('latin-1')}" if qs else ctx.path
        self.observed += 1
        now = monotonic()
        self._remember(key, _storable(ctx.status, ctx.response_headers))
        self._recent[key] = now
        if self._prefetched.pop(key, None) is not None:
            if ctx.cache_status == "MISS":
                # The cache plugin did not keep what we fetched (no freshness, evicted,
                # another variant): speculating on this URL is wasted work.
                self.not_kept += 1
                self._refuse(key)
            else:
                self.used += 1
        likely = self.predictor.observe(key, self._client(ctx))
        if likely:
            self._expire(now)
            for nxt, _p in likely:
                self._maybe_prefetch(str(nxt), scope, now)

    def _refuse(self, key: str) -> None:
        self._refused[key] = monotonic()
        self._refused.move_to_end(key)
        if len(self._refused) > self.settings.max_keys:
            self._refused.popitem(last=False)

    def _remember(self, key: str, storable: bool) -> None:
        self._storable[key] = storable
        self._storable.move_to_end(key)
        if len(self._storable) > self.settings.max_keys:
            old, _ = self._storable.popitem(last=False)
            self._recent.pop(old, None)

    def _expire(self, now: float) -> None:
        horizon = now - max(self.settings.refetch_after, 1.0)
        while self._prefetched:
            key, when = next(iter(self._prefetched.items()))
            if when > horizon:
                break
            del self._prefetched[key]
            self.expired += 1

    def _maybe_prefetch(self, key: str, scope: MutableMapping[str, Any], now: float) -> None:
        if not self._storable.get(key):
            return
        refused = self._refused.get(key)
        if refused is not None:
            if now - refused < REFUSE_SECONDS:
                return
            del self._refused[key]  # try it once more
        seen = self._recent.get(key)
        if seen is not None and now - seen < self.settings.refetch_after:
            return
        assert self.predictor is not None
        if not self.predictor.admit():
            return
        self.issued += 1
        self._recent[key] = now
        self._prefetched[key] = now
        task = asyncio.ensure_future(self._fetch(key, scope))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, key: str, template: MutableMapping[str, Any]) -> None:
        from overdrive.middleware import OverdriveMiddleware

        assert self.predictor is not None
        try:
            if self._entry is None:
                app = self._host.state.get("app")
                if app is None:
                    raise RuntimeError("no app in host.state['app'] (is the middleware in use?)")
                self._entry = OverdriveMiddleware(app, host=self._host)
            path, _, qs = key.partition("?")
            scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": template.get("scheme", "http"),
                "server": template.get("server"),
                "client": None,
                "root_path": template.get("root_path", ""),
                "path": path,
                "raw_path": path.encode("utf-8"),
                "query_string": qs.encode("latin-1"),
                "headers": [(k, v) for k, v in template.get("headers", ()) if k in _COPY_HEADERS],
                "extensions": {PREFETCH_EXTENSION: {"key": key}, INTERNAL_EXTENSION: {}},
            }
            finished = asyncio.Event()
            receive = EmptyRequest(finished)
            status: list[int] = []

            async def send(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                    if not _storable(message["status"], message.get("headers") or []):
                        self._refuse(key)  # never again on speculation
                elif message["type"] == "http.response.body" and not message.get("more_body"):
                    finished.set()

            async with asyncio.timeout(self.settings.timeout):
                await self._entry(scope, receive, send)
            finished.set()
            if not status or status[0] != 200:
                self.failed += 1
                self._prefetched.pop(key, None)
        except Exception as exc:
            self.failed += 1
            self._prefetched.pop(key, None)
            logger.debug("prefetch failed", key=key, error=repr(exc))
        finally:
            self.predictor.done()

    async def drain(self) -> None:
        """Wait for the prefetches in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @hookimpl
    async def overdrive_shutdown(self, host: Any) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @hookimpl
    def collect_stats(self, host: Any) -> dict[str, Any]:
        return {
            "observed": self.observed,
            "prefetch": {
                "issued": self.issued,
                "used": self.used,
                "expired_unused": self.expired,
                "not_kept": self.not_kept,
                "refused_keys": len(self._refused),
                "failed": self.failed,
                "inflight": len(self._tasks),
                "used_share": round(self.used / self.issued, 4) if self.issued else None,
            },
            "model": self.predictor.stats() if self.predictor is not None else None,
        }


def _storable(status: int | None, headers: Any) -> bool:
    """Would a shared cache store this response? 200, no Set-Cookie, not private/no-store."""
    if status != 200:
        return False
    for name, value in headers or ():
        n = name.lower()
        if n == b"set-cookie":
            return False
        if n == b"cache-control":
            v = value.lower()
            if any(p in v for p in _PRIVATE):
                return False
    return True
