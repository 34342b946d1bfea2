"""The reference AI video service: a FastAPI app that uses Overdrive the way a user would.

The seed's AI video platform, small enough to read in one sitting:

    POST /api/videos/generate               heavy: a GPU lease, the model, a row, a background job
    GET  /api/videos/{id}                   metadata from the database (pools plugin)
    GET  /api/videos/{id}/thumbnail         PNG bytes, cacheable (cache plugin)
    GET  /api/videos/{id}/stream            a large streamed body, with Range support
    GET  /api/videos/{id}/recommendations   an external service, behind a breaker (host.run)
    GET  /api/system/stats                  host.get_system_stats(), as in the seed
    GET  /health                            for load balancers (and the launcher)

Every plugin is enabled in `overdrive.toml` next to this file. The endpoints
also work with every plugin off (``OVERDRIVE_PLUGINS=``): then the app opens
its own database engine and HTTP session, as it would without Overdrive. That
is the baseline `./run load` compares against.

Environment: ``DATABASE_URL`` (default: a SQLite file in the temp directory;
``postgresql://...`` for PostgreSQL), ``REDIS_URL`` (scale-out: cache, breakers,
rate limits and GPU leases shared by every worker), ``RECOMMENDER_URL``
(default http://127.0.0.1:8001), ``OVERDRIVE_*`` (any setting, see
docs/configuration.md). Serve with::

    uvicorn examples.video_service.app:create_app --factory --port 8000
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from overdrive import OperationRefused, Overdrive
from overdrive.config import load_file
from overdrive.contrib.fastapi import OverdriveContext
from overdrive.middleware import OverdriveMiddleware

from .model import load_generator

CONFIG_FILE = Path(__file__).with_name("overdrive.toml")
SEEDED_VIDEOS = 500  # rows the database starts with
STREAM_BYTES = 4 * 2**20  # the size of every video's stream
CHUNK = 64 * 2**10


def database_url(env: Mapping[str, str]) -> str:
    """``DATABASE_URL`` as SQLAlchemy's asyncio drivers want it; SQLite when unset."""
    url = env.get("DATABASE_URL")
    if not url:
        return f"sqlite+aiosqlite:///{Path(tempfile.gettempdir()) / 'overdrive-video-service.db'}"
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+asyncpg://" + url[len(plain) :]
    return url


def build_config(env: Mapping[str, str]) -> dict[str, Any]:
    """`overdrive.toml`, plus the backends the environment names.

    The file holds the policy (what to cache, how long to wait); the environment
    says where the shared state lives, so the same file serves one process or many.
    """
    config = load_file(CONFIG_FILE)
    pools = config.setdefault("pools", {})
    pools.setdefault("databases", {}).setdefault("main_db", {})["url"] = database_url(env)
    recommender = env.get("RECOMMENDER_URL", "http://127.0.0.1:8001")
    pools.setdefault("http", {}).setdefault("recommender", {})["base_url"] = recommender
    redis_url = env.get("REDIS_URL")
    if redis_url:
        config["redis_url"] = redis_url  # cache and query results: the host's Redis
        config.setdefault("breaker", {})["shared"] = True  # one state per breaker, every worker
        config.setdefault("ratelimit", {})["storage_url"] = "host"  # one count per client
        config.setdefault("gpu", {})["redis_url"] = "host"  # leases of every worker, one ledger
    return config


# -- the database ----------------------------------------------------------------------


def _table() -> Any:
    from sqlalchemy import Column, Float, Integer, MetaData, String, Table

    metadata = MetaData()
    return Table(
        "demo_videos",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("title", String(200), nullable=False),
        Column("status", String(20), nullable=False),
        Column("frames", Integer, nullable=False),
        Column("digest", String(64)),
        Column("created", Float, nullable=False),
    )


VIDEOS = _table()


async def prepare_database(engine: Any) -> None:
    """Create the table and the first videos; safe when several workers do it at once."""
    from sqlalchemy.exc import DBAPIError

    for attempt in range(5):
        try:
            async with engine.begin() as conn:
                await conn.run_sync(VIDEOS.metadata.create_all, checkfirst=True)
            break
        except DBAPIError:  # another worker created it between the check and the create
            if attempt == 4:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    rows = [
        {
            "id": i,
            "title": f"Sample video {i}",
            "status": "ready",
            "frames": 24,
            "digest": hashlib.sha256(str(i).encode()).hexdigest()[:16],
            "created": 0.0,
        }
        for i in range(1, SEEDED_VIDEOS + 1)
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(VIDEOS).on_conflict_do_nothing(), rows)
        if engine.dialect.name == "postgresql":  # ids were given: move the sequence past them
            from sqlalchemy import text

            await conn.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('demo_videos', 'id'), "
                    "GREATEST((SELECT MAX(id) FROM demo_videos), 1))"
                )
            )


# -- what the endpoints use -------------------------------------------------------------


class Services:
    """The app's resources: from the plugins when they are on, else opened here."""

    def __init__(self, host: Overdrive, env: Mapping[str, str]) -> None:
        self.host = host
        self.env = env
        self.engine: Any = None
        self.http: Any = None
        self._own: list[Any] = []  # what we opened ourselves, closed at shutdown
        self._generator: Any = None
        self._generator_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        pools = self.host.state.get("pools", {})
        self.engine = pools.get("main_db")
        if self.engine is None:  # pools plugin off: one engine of our own
            from sqlalchemy.ext.asyncio import create_async_engine

            self.engine = create_async_engine(database_url(self.env))
            self._own.append(self.engine)
        self.http = pools.get("recommender")
        if self.http is None:
            import aiohttp

            base = self.env.get("RECOMMENDER_URL", "http://127.0.0.1:8001")
            self.http = aiohttp.ClientSession(base, timeout=aiohttp.ClientTimeout(total=10))
            self._own.append(self.http)
        models = self.host.get_plugin("models")
        if models is not None:
            models.model_cache.register_model("video_generator", load_generator, pinned=True)
        await prepare_database(self.engine)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        for resource in reversed(self._own):
            closing = getattr(resource, "dispose", None) or resource.close
            await closing()

    async def generator(self) -> Any:
        """The video model: from the ModelCache (loaded once, unloaded under pressure)."""
        if self.host.get_plugin("models") is not None:
            return await self.host.model_cache.get_model("video_generator")
        async with self._generator_lock:
            if self._generator is None:
                self._generator = await asyncio.to_thread(load_generator)
        return self._generator

    async def background(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` after the response: the tasks plugin's queue, else a bare task."""
        if self.host.get_plugin("tasks") is not None:
            await self.host.tasks.add_task(fn, *args)
            return
        task = asyncio.create_task(fn(*args))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def popular(self) -> list[int]:
        """The most recent ready videos: the recommendations when the recommender is down."""
        from sqlalchemy import select

        async def query() -> list[int]:
            stmt = select(VIDEOS.c.id).where(VIDEOS.c.status == "ready")
            stmt = stmt.order_by(VIDEOS.c.id.desc()).limit(5)
            async with self.engine.connect() as conn:
                return [row[0] for row in await conn.execute(stmt)]

        if self.host.get_plugin("query") is not None:
            result: list[int] = await self.host.query_optimizer.cached_query(
                "demo:popular", query, ttl=30
            )
            return result
        return await query()


# -- images and streams ------------------------------------------------------------------


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A small gradient PNG (stdlib only: zlib and struct)."""
    r, g, b = rgb
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        shade = 0.4 + 0.6 * y / max(1, height - 1)
        for x in range(width):
            mix = x / max(1, width - 1)
            rows += bytes((int(r * shade), int(g * shade * (1 - mix / 2)), int(b * shade * mix)))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
        + chunk(b"IEND", b"")
    )


_PATTERN = bytes(range(256)) * (CHUNK // 256)
_DOUBLE = _PATTERN * 2  # any CHUNK-long window of the pattern is one slice of this


def stream_bytes(video_id: int, start: int, end: int) -> bytes:
    """Bytes `start`..`end` (inclusive) of a video's stream; at most CHUNK of them."""
    offset = (start + video_id) % CHUNK
    return _DOUBLE[offset : offset + (end - start + 1)]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range a ``Range`` header asks for, as (first, last); None: the whole.

    Raises ValueError when the range cannot be satisfied (answered 416). Several
    ranges in one header are answered with the whole body, which RFC 9110 allows.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[6:].strip().partition("-")
    if not sep:
        return None
    try:
        if not first:  # the last N bytes
            n = int(last)
            if n <= 0:
                raise ValueError("empty suffix range")
            return max(0, size - n), size - 1
        start = int(first)
        stop = int(last) if last else size - 1
    except ValueError:
        raise ValueError(f"bad range {header!r}") from None
    if start < 0 or start >= size or stop < start:
        raise ValueError(f"range {header!r} outside 0-{size - 1}")
    return start, min(stop, size - 1)


# -- the app -----------------------------------------------------------------------------


class VideoRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=500)
    frames: int = Field(default=8, ge=1, le=64)


def create_app(env: Mapping[str, str] | None = None) -> FastAPI:
    """The service; `env` defaults to the process environment (tests pass their own)."""
    env = dict(os.environ if env is None else env)
    # The seed's global performance system: one host, built (and validated) up front.
    host = Overdrive(build_config(env), env=env)
    services = Services(host, env)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The middleware has started the plugins (pools open) before this runs.
        await services.start()
        yield
        await services.stop()

    app = FastAPI(title="AI video service (Overdrive reference)", lifespan=lifespan)
    app.state.host = host
    app.state.services = services

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "plugins": list(host.plugins)}

    @app.post("/api/videos/generate", status_code=201)
    async def generate(video: VideoRequest, ctx: OverdriveContext) -> dict[str, Any]:
        # The gpu plugin admitted this request and placed it: the lease says where.
        lease = ctx.lease
        device = "cpu"
        if lease is not None and isinstance(lease.device, int) and _cuda():
            device = f"cuda:{lease.device}"
        # Progress shows on the job's status monitor when this runs as a job (jobs
        # plugin, Prefer: respond-async); otherwise ctx.progress does nothing.
        ctx.progress(0.05, "loading the model")
        model = await services.generator()
        ctx.progress(0.1, f"generating {video.frames} frames on {device}")
        digest = await asyncio.to_thread(model.generate, video.prompt, video.frames, device)
        ctx.progress(0.9, "saving")
        async with services.engine.begin() as conn:
            result = await conn.execute(
                VIDEOS.insert().values(
                    title=video.prompt[:200],
                    status="processing",
                    frames=video.frames,
                    digest=digest,
                    created=time.time(),
                )
            )
            video_id = result.inserted_primary_key[0]
        await services.background(finish_video, services, video_id)
        return {
            "id": video_id,
            "status": "processing",
            "digest": digest,
            "device": device,
            "gpu": None if lease is None else lease.device,
        }

    @app.get("/api/videos/{video_id}")
    async def get_video(video_id: int) -> dict[str, Any]:
        from sqlalchemy import select

        async with services.engine.connect() as conn:
            row = (await conn.execute(select(VIDEOS).where(VIDEOS.c.id == video_id))).first()
        if row is None:
            raise HTTPException(404, f"no video {video_id}")
        return dict(row._mapping)

    @app.get("/api/videos/{video_id}/thumbnail")
    async def thumbnail(video_id: int) -> Response:
        await asyncio.sleep(0.02)  # decoding a frame from storage
        digest = hashlib.sha256(str(video_id).encode()).digest()
        body = png(160, 90, (digest[0], digest[1], digest[2]))
        return Response(
            body, media_type="image/png", headers={"cache-control": "public, max-age=300"}
        )

    @app.get("/api/videos/{video_id}/stream")
    async def stream(video_id: int, request: Request) -> Response:
        size = STREAM_BYTES
        try:
            wanted = parse_range(request.headers.get("range"), size)
        except ValueError:
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        first, last = wanted if wanted is not None else (0, size - 1)

        async def body() -> AsyncIterator[bytes]:
            position = first
            while position <= last:
                end = min(last, position + CHUNK - 1)
                yield stream_bytes(video_id, position, end)
                position = end + 1
                await asyncio.sleep(0)  # let other requests in between chunks

        headers = {"accept-ranges": "bytes", "content-length": str(last - first + 1)}
        if wanted is not None:
            headers["content-range"] = f"bytes {first}-{last}/{size}"
        return StreamingResponse(
            body(), status_code=206 if wanted else 200, media_type="video/mp4", headers=headers
        )

    @app.get("/api/videos/{video_id}/recommendations")
    async def recommendations(video_id: int) -> JSONResponse:
        async def call() -> dict[str, Any]:
            async with services.http.get(f"/recommendations/{video_id}") as response:
                response.raise_for_status()
                data: dict[str, Any] = await response.json()
                return data

        try:
            # Through the plugins: the breaker may refuse it, retry and timeout bound it.
            data = await host.run("recommender", call)
        except Exception as exc:  # refused by the open breaker, or failed this time
            why = "breaker open" if isinstance(exc, OperationRefused) else type(exc).__name__
            data = {"items": await services.popular(), "source": f"fallback ({why})"}
        data["worker"] = os.getpid()
        return JSONResponse(data, headers={"cache-control": "no-store"})

    stats_token = env.get("OVERDRIVE_STATS__TOKEN")

    @app.get("/api/system/stats")
    async def system_stats(request: Request) -> JSONResponse:
        # Protected like the dashboard: the stats plugin checks the token (stats.protect);
        # with the plugins off, the app checks the same token itself.
        if host.get_plugin("stats") is None and not token_matches(
            request.headers.get("authorization"), stats_token
        ):
            return JSONResponse(
                {"error": "pass the stats token (Authorization: Bearer ...)"},
                status_code=401,
                headers={"www-authenticate": 'Bearer realm="overdrive"'},
            )
        stats = await host.get_system_stats()
        stats["worker"] = os.getpid()
        return JSONResponse(_json_safe(stats), headers={"cache-control": "no-store"})

    app.add_middleware(OverdriveMiddleware, host=host)
    return app


async def finish_video(services: Services, video_id: int) -> None:
    """The background job: "transcode" the new video, then mark it ready."""
    await asyncio.sleep(0.05)
    async with services.engine.begin() as conn:
        await conn.execute(VIDEOS.update().where(VIDEOS.c.id == video_id).values(status="ready"))


def token_matches(authorization: str | None, token: str | None) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries `token` (digests compared)."""
    if not token:
        return False
    given = authorization[7:] if authorization and authorization[:7].lower() == "bearer " else ""
    digest = hashlib.sha256
    return hmac.compare_digest(digest(given.encode()).digest(), digest(token.encode()).digest())


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _json_safe(value: Any) -> Any:
    """Stats as JSON: NaN and infinities as null, unknown objects as strings."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
