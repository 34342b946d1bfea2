"""`overdrive load`: drive a mixed workload at a running service and summarize the answers.

Why it exists: a newcomer wants to see what the plugins do to a service under
traffic, with and without them, in one command and without installing a load
testing tool. This is deliberately small: a weighted mix of endpoints, a fixed
number of concurrent clients for a fixed time, and a table of what came back
(throughput, latency percentiles, cache hit rate from ``X-Cache``, shed 503s,
rejected 429s, errors). For serious capacity planning use a dedicated tool
(k6, Locust, vegeta); this one shows the shape.

A profile is TOML or JSON::

    duration = 10          # seconds (the command line wins)
    concurrency = 16       # clients, each one request at a time
    [[endpoints]]
    name = "thumbnail"
    path = "/api/videos/{id}/thumbnail"   # {id}: drawn from 1..ids, popular ids more often
    weight = 50
    ids = 200
    [[endpoints]]
    name = "generate"
    method = "POST"
    path = "/api/videos/generate"
    json = { prompt = "a cat surfing" }
    weight = 5

The client must cost far less than the service, or the table shows the
client's own queueing (benchmarks/loadgen.py measures it against wrk on the
same endpoint). For http:// URLs it is `overdrive.contrib.load_client`:
keep-alive connections on asyncio protocols with httptools' parser (the `http`
extra). For https:// or HEAD requests it is aiohttp; with `transport=` (tests
drive an ASGI app in process) or without those packages, httpx.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, TextIO

__all__ = [
    "VIDEO_SERVICE",
    "Endpoint",
    "EndpointResult",
    "LoadResult",
    "Profile",
    "format_summary",
    "load_profile",
    "percentile",
    "run_load",
]


@dataclass
class Endpoint:
    """One kind of request in the mix."""

    name: str
    path: str  # may contain {id}
    method: str = "GET"
    weight: float = 1.0
    ids: int = 100  # {id} is drawn from 1..ids
    json: Any = None  # a JSON request body
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = self.method.upper()
        if not self.path.startswith("/"):
            raise ValueError(f"endpoint {self.name!r}: path must start with '/', got {self.path!r}")
        if not self.weight > 0:
            raise ValueError(f"endpoint {self.name!r}: weight must be > 0, got {self.weight!r}")
        if self.ids < 1:
            raise ValueError(f"endpoint {self.name!r}: ids must be >= 1, got {self.ids!r}")


@dataclass
class Profile:
    """A workload: the endpoint mix, how long and how many clients at once."""

    endpoints: list[Endpoint]
    duration: float = 10.0
    concurrency: int = 16
    timeout: float = 30.0  # seconds one request may take before it counts as an error
    skew: float = 1.1  # Zipf exponent of the {id} draw: 0 uniform, higher = fewer hot ids

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("a profile needs at least one endpoint")
        if not self.duration > 0 or self.concurrency < 1 or not self.timeout > 0:
            raise ValueError("duration and timeout must be > 0 and concurrency >= 1")
        if self.skew < 0:
            raise ValueError(f"skew must be >= 0, got {self.skew!r}")


# The reference video service's traffic (examples/video_service): mostly reads of
# thumbnails and metadata (cacheable, popular ids), some streaming, a few heavy
# generations, calls that reach the external recommendation service.
VIDEO_SERVICE = Profile(
    endpoints=[
        Endpoint("thumbnail", "/api/videos/{id}/thumbnail", weight=45, ids=200),
        Endpoint("metadata", "/api/videos/{id}", weight=30, ids=200),
        Endpoint(
            "stream",
            "/api/videos/{id}/stream",
            weight=8,
            ids=50,
            headers={"range": "bytes=0-65535"},
        ),
        Endpoint("recommendations", "/api/videos/{id}/recommendations", weight=10, ids=200),
        Endpoint(
            "generate",
            "/api/videos/generate",
            method="POST",
            weight=6,
            json={"prompt": "a cat surfing at sunset", "frames": 8},
        ),
        Endpoint("stats", "/api/system/stats", weight=1),
    ]
)


def load_profile(path: str | Path) -> Profile:
    """A `Profile` from a TOML or JSON file (by suffix; TOML otherwise)."""
    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    return profile_from_dict(data)


def profile_from_dict(data: dict[str, Any]) -> Profile:
    raw = data.get("endpoints")
    if not isinstance(raw, list) or not raw:
        raise ValueError("profile: expected a non-empty list of [[endpoints]]")
    endpoints = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "path" not in item:
            raise ValueError(f"profile: endpoints[{i}] needs at least a path, got {item!r}")
        item = dict(item)
        item.setdefault("name", f"{item.get('method', 'GET').upper()} {item['path']}")
        try:
            endpoints.append(Endpoint(**item))
        except TypeError as exc:
            raise ValueError(f"profile: endpoints[{i}]: {exc}") from None
    known = {"duration", "concurrency", "timeout", "skew"}
    unknown = sorted(set(data) - known - {"endpoints"})
    if unknown:
        raise ValueError(f"profile: unknown key {unknown[0]!r}; expected {sorted(known)}")
    return Profile(endpoints, **{k: data[k] for k in known if k in data})


# -- results -----------------------------------------------------------------------


@dataclass
class EndpointResult:
    """What came back for one endpoint of the mix."""

    name: str
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)  # X-Cache values
    latencies: list[float] = field(default_factory=list)  # seconds, successful answers only
    failures: Counter[str] = field(default_factory=Counter)  # transport errors by type
    bytes: int = 0

    def add(self, other: EndpointResult) -> None:
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.cache.update(other.cache)
        self.latencies.extend(other.latencies)
        self.failures.update(other.failures)
        self.bytes += other.bytes

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if s < 400)

    @property
    def shed(self) -> int:
        return self.statuses[503]

    @property
    def rejected(self) -> int:
        return self.statuses[429]

    @property
    def errors(self) -> int:
        """Transport failures, and every status >= 400 that is neither 429 nor 503."""
        bad = sum(n for s, n in self.statuses.items() if s >= 400 and s not in (429, 503))
        return bad + sum(self.failures.values())

    @property
    def hit_rate(self) -> float | None:
        """HIT (and STALE) answers over all answers that carried an X-Cache verdict."""
        looked_up = sum(n for k, n in self.cache.items() if k != "BYPASS")
        if not looked_up:
            return None
        return (self.cache["HIT"] + self.cache["STALE"]) / looked_up


@dataclass
class LoadResult:
    """One run: per endpoint, and the totals."""

    base_url: str
    duration: float  # seconds actually spent
    concurrency: int
    endpoints: dict[str, EndpointResult]

    @property
    def total(self) -> EndpointResult:
        out = EndpointResult("all")
        for result in self.endpoints.values():
            out.add(result)
        return out

    def figures(self, result: EndpointResult | None = None) -> dict[str, Any]:
        """The summary's numbers for `result` (default: the totals), JSON-ready."""
        r = result or self.total
        lat = sorted(r.latencies)
        seconds = self.duration or 1e-9
        return {
            "requests": r.requests,
            "throughput": r.requests / seconds,
            "ok_per_second": r.ok / seconds,
            "p50_ms": _ms(percentile(lat, 50)),
            "p95_ms": _ms(percentile(lat, 95)),
            "p99_ms": _ms(percentile(lat, 99)),
            "hit_rate": r.hit_rate,
            "shed": r.shed,
            "rejected": r.rejected,
            "errors": r.errors,
            "statuses": {str(k): v for k, v in sorted(r.statuses.items())},
            "failures": dict(r.failures),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "duration": self.duration,
            "concurrency": self.concurrency,
            "total": self.figures(),
            "endpoints": {name: self.figures(r) for name, r in self.endpoints.items()},
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def percentile(sorted_values: list[float], p: float) -> float | None:
    """The `p`th percentile (nearest rank) of already sorted values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# -- the progress bar ------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; four plain lines (25% steps) otherwise."""

    def __init__(self, stream: TextIO | None, label: str, seconds: float, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.seconds = seconds
        self.width = width
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._next_step = 0.25

    def update(self, elapsed: float, done: int, errors: int, final: bool = False) -> None:
        if self.stream is None:
            return
        fraction = 1.0 if final else min(1.0, elapsed / self.seconds)
        if not self.tty and not final and (fraction < self._next_step or fraction >= 1.0):
            return  # a log gets 25%, 50%, 75% and the final line
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        rate = done / elapsed if elapsed > 0 else 0.0
        line = (
            f"{self.label} [{bar}] {elapsed:5.1f}/{self.seconds:.0f}s "
            f"{done} requests {rate:7.1f}/s {errors} errors"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            while self._next_step <= fraction:
                self._next_step += 0.25
            self.stream.write(line + "\n")
        self.stream.flush()


# -- the run ---------------------------------------------------------------------------


def _id_weights(n: int, skew: float) -> list[float]:
    """Cumulative Zipf weights for ids 1..n (id 1 the most popular)."""
    total = 0.0
    out = []
    for k in range(1, n + 1):
        total += 1.0 / (k**skew)
        out.append(total)
    return out


async def run_load(
    base_url: str,
    profile: Profile,
    *,
    duration: float | None = None,
    concurrency: int | None = None,
    seed: int = 1,
    transport: Any = None,
    progress: TextIO | None = None,
    label: str = "",
) -> LoadResult:
    """Run `profile` against `base_url` and return what came back.

    Each of `concurrency` clients sends one request at a time until `duration`
    seconds have passed; requests in flight at the deadline are finished and
    counted. The same `seed` gives the same sequence of requests.
    """
    seconds = duration if duration is not None else profile.duration
    clients = concurrency if concurrency is not None else profile.concurrency
    if not seconds > 0 or clients < 1:
        raise ValueError("duration must be > 0 and concurrency >= 1")
    endpoints = profile.endpoints
    cum_endpoints = []
    acc = 0.0
    for e in endpoints:
        acc += e.weight
        cum_endpoints.append(acc)
    id_weights = {e.ids: _id_weights(e.ids, profile.skew) for e in endpoints}
    results = {e.name: EndpointResult(e.name) for e in endpoints}
    bar = Progress(progress, label or base_url, seconds)
    done = 0
    failed = 0

    methods = {e.method for e in endpoints}
    client = _client(base_url, clients, profile.timeout, transport, methods)
    async with client:
        start = perf_counter()
        deadline = start + seconds
        errors = client.errors

        async def worker(index: int) -> None:
            nonlocal done, failed
            rng = random.Random(seed * 1000 + index)
            ids = range(1, 1 + max(e.ids for e in endpoints))
            while perf_counter() < deadline:
                e = rng.choices(endpoints, cum_weights=cum_endpoints)[0]
                r = results[e.name]
                path = e.path
                if "{id}" in path:
                    chosen = rng.choices(ids[: e.ids], cum_weights=id_weights[e.ids])[0]
                    path = path.replace("{id}", str(chosen))
                r.requests += 1
                t0 = perf_counter()
                try:
                    status, verdict, size = await client.request(
                        e.method, path, e.json, e.headers or None
                    )
                except errors as exc:
                    r.failures[type(exc).__name__] += 1
                    failed += 1
                    done += 1
                    await asyncio.sleep(0.01)  # a refused connection must not spin
                    continue
                r.bytes += size
                r.statuses[status] += 1
                if verdict:
                    r.cache[verdict.upper()] += 1
                if status < 400:
                    r.latencies.append(perf_counter() - t0)
                elif status not in (429, 503):
                    failed += 1
                done += 1

        async def report() -> None:
            while True:
                await asyncio.sleep(0.2)
                bar.update(perf_counter() - start, done, failed)

        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(worker(i) for i in range(clients)))
        finally:
            reporter.cancel()
        elapsed = perf_counter() - start
        bar.update(elapsed, done, failed, final=True)
    return LoadResult(base_url, elapsed, clients, results)


# -- the clients ---------------------------------------------------------------------


class _HttpxClient:
    """httpx: for `transport=` (an ASGI app in process) or where aiohttp is missing."""

    def __init__(self, base_url: str, clients: int, timeout: float, transport: Any) -> None:
        import httpx

        self.errors: tuple[type[BaseException], ...] = (httpx.HTTPError,)
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            limits=limits,
            transport=transport,
            follow_redirects=False,
        )

    async def __aenter__(self) -> _HttpxClient:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.__aexit__(*exc)

    async def request(
        self, method: str, path: str, body: Any, headers: dict[str, str] | None
    ) -> tuple[int, str | None, int]:
        size = 0
        async with self.client.stream(method, path, json=body, headers=headers) as response:
            async for chunk in response.aiter_raw():
                size += len(chunk)
        return response.status_code, response.headers.get("x-cache"), size


class _AiohttpClient:
    """aiohttp: one keep-alive connection per client, bodies read raw (not decompressed)."""

    def __init__(self, base_url: str, clients: int, timeout: float) -> None:
        import aiohttp

        self.errors = (aiohttp.ClientError, TimeoutError)
        self.base = base_url.rstrip("/")
        self.limit = clients
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.session: Any = None

    async def __aenter__(self) -> _AiohttpClient:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.limit, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            self.base, connector=connector, timeout=self.timeout, auto_decompress=False
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def request(
        self, method: str, path: str, body: Any, headers: dict[str, str] | None
    ) -> tuple[int, str | None, int]:
        async with self.session.request(
            method, path, json=body, headers=headers, allow_redirects=False
        ) as response:
            size = len(await response.read())
            return response.status, response.headers.get("x-cache"), size


def _client(base_url: str, clients: int, timeout: float, transport: Any, methods: set[str]) -> Any:
    if transport is None and base_url.startswith("http://") and "HEAD" not in methods:
        try:
            from .load_client import FastClient
        except ImportError:
            pass
        else:
            return FastClient(base_url, timeout)
    if transport is None:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            pass
        else:
            return _AiohttpClient(base_url, clients, timeout)
    return _HttpxClient(base_url, clients, timeout, transport)


# -- the summary -----------------------------------------------------------------------


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "hit_rate":
        return f"{value * 100:.1f}%"
    if key.endswith("_ms"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


_ROWS = (
    ("requests", "requests"),
    ("throughput", "throughput (req/s)"),
    ("ok_per_second", "successful (req/s)"),
    ("p50_ms", "p50 (ms)"),
    ("p95_ms", "p95 (ms)"),
    ("p99_ms", "p99 (ms)"),
    ("hit_rate", "cache hit rate"),
    ("shed", "shed (503)"),
    ("rejected", "rejected (429)"),
    ("errors", "errors"),
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        cells = [row[0].ljust(widths[0]), *rest]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


_ENDPOINT_KEYS = (
    "requests",
    "throughput",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "hit_rate",
    "shed",
    "rejected",
    "errors",
)


def format_summary(results: list[LoadResult], labels: list[str] | None = None) -> str:
    """The summary table: one column per run (side by side), then each run's endpoints."""
    labels = labels or [r.base_url for r in results]
    figures = [r.figures() for r in results]
    rows = [[title, *(_fmt(key, f[key]) for f in figures)] for key, title in _ROWS]
    first = results[0]
    out = [
        f"{first.concurrency} clients, {first.duration:.1f} s per run; latency percentiles "
        "are of successful (< 400) answers",
        "",
        _table(["", *labels], rows),
    ]
    for label, result in zip(labels, results, strict=True):
        header = ["endpoint", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "hit"]
        header += ["503", "429", "errors"]
        rows = []
        for name, r in result.endpoints.items():
            f = result.figures(r)
            rows.append([name, *(_fmt(k, f[k]) for k in _ENDPOINT_KEYS)])
        out += ["", f"{label}:", _table(header, rows)]
    return "\n".join(out)


# -- the command -------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    """The `overdrive load` options (the CLI in overdrive.cli adds this subcommand)."""
    parser.add_argument("url", help="base URL of the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--profile", help="a TOML or JSON workload (default: the video service)")
    parser.add_argument("-d", "--duration", type=float, help="seconds per run (default 10)")
    parser.add_argument("-c", "--concurrency", type=int, help="concurrent clients (default 16)")
    parser.add_argument("--compare", metavar="URL2", help="run the same against URL2 afterwards")
    parser.add_argument(
        "--labels", help="column titles, comma separated (default: the URLs)", default=None
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed of the request mix")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: Any) -> int:
    """Run `overdrive load` with parsed `args`; 0 on success, 1 on a bad profile or URL."""
    try:
        profile = load_profile(args.profile) if args.profile else VIDEO_SERVICE
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"overdrive load: {exc}", file=sys.stderr)
        return 1
    urls = [args.url] + ([args.compare] if args.compare else [])
    for url in urls:
        if not url.startswith(("http://", "https://")):
            print(f"overdrive load: expected an http(s):// URL, got {url!r}", file=sys.stderr)
            return 1
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else list(urls)
    if len(labels) != len(urls):
        print(f"overdrive load: expected {len(urls)} labels, got {len(labels)}", file=sys.stderr)
        return 1
    results = []
    for url, label in zip(urls, labels, strict=True):
        results.append(
            asyncio.run(
                run_load(
                    url,
                    profile,
                    duration=args.duration,
                    concurrency=args.concurrency,
                    seed=args.seed,
                    progress=None if args.quiet else sys.stderr,
                    label=label,
                )
            )
        )
    if args.json:
        figures = {label: r.as_dict() for label, r in zip(labels, results, strict=True)}
        print(json.dumps(figures, indent=2))
    else:
        print(format_summary(results, labels))
    if any(r.total.requests == sum(r.total.failures.values()) for r in results):
        print("overdrive load: no request got an answer; is the service running?", file=sys.stderr)
        return 1
    return 0
