"""`overdrive load`: the mix it sends, what it counts, the table it prints, bad input."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from overdrive.cli import main
from overdrive.contrib.load import (
    VIDEO_SERVICE,
    Endpoint,
    Profile,
    Progress,
    format_summary,
    load_profile,
    percentile,
    run_load,
)
from tests.support.server import serving

SEEN: Counter[str] = Counter()


async def hit(request: Request) -> Response:
    SEEN[request.url.path] += 1
    n = int(request.path_params["n"])
    return PlainTextResponse("x" * 100, headers={"x-cache": "HIT" if n <= 2 else "MISS"})


async def busy(request: Request) -> Response:
    SEEN["busy"] += 1
    return PlainTextResponse("shed", status_code=503)


async def limited(request: Request) -> Response:
    return PlainTextResponse("slow down", status_code=429)


async def broken(request: Request) -> Response:
    return PlainTextResponse("oops", status_code=500)


async def echo(request: Request) -> Response:
    return JSONResponse(await request.json())


APP = Starlette(
    routes=[
        Route("/things/{n}", hit),
        Route("/busy", busy),
        Route("/limited", limited),
        Route("/broken", broken),
        Route("/echo", echo, methods=["POST"]),
    ]
)


def profile(**kw: object) -> Profile:
    endpoints = [
        Endpoint("things", "/things/{id}", weight=6, ids=10),
        Endpoint("busy", "/busy", weight=1),
        Endpoint("limited", "/limited", weight=1),
        Endpoint("broken", "/broken", weight=1),
        Endpoint("echo", "/echo", method="post", weight=1, json={"a": 1}),
    ]
    return Profile(endpoints, **kw)  # type: ignore[arg-type]


async def test_counts_every_kind_of_answer() -> None:
    transport = httpx.ASGITransport(app=APP)
    result = await run_load(
        "http://test", profile(), duration=0.3, concurrency=4, transport=transport
    )
    ep = result.endpoints
    total = result.total
    assert total.requests == sum(r.requests for r in ep.values()) > 20
    assert ep["busy"].shed == ep["busy"].requests > 0
    assert ep["limited"].rejected == ep["limited"].requests > 0
    assert ep["broken"].errors == ep["broken"].requests > 0
    assert ep["echo"].statuses == Counter({200: ep["echo"].requests})
    # Shed and rejected answers are not errors; latencies are of successful answers only.
    assert total.errors == ep["broken"].requests
    assert len(total.latencies) == ep["things"].requests + ep["echo"].requests
    assert total.bytes >= 100 * ep["things"].requests
    # Ids are skewed towards 1: ids 1-2 answer HIT, and they are drawn most.
    things = ep["things"]
    assert things.hit_rate is not None and things.hit_rate > 0.3
    assert result.figures()["hit_rate"] == things.hit_rate
    assert result.figures()["shed"] == ep["busy"].requests


async def test_low_ids_are_the_popular_ones() -> None:
    SEEN.clear()
    await run_load(
        "http://test",
        profile(),
        duration=0.2,
        concurrency=1,
        transport=httpx.ASGITransport(app=APP),
    )
    drawn = [SEEN[f"/things/{i}"] for i in range(1, 11)]
    assert drawn[0] == max(drawn) and drawn[0] > drawn[9]


async def test_a_refused_connection_counts_as_error_not_crash() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    result = await run_load(f"http://127.0.0.1:{port}", profile(), duration=0.2, concurrency=2)
    assert result.total.requests > 0
    assert result.total.errors == result.total.requests
    # httpx's ConnectError, aiohttp's ClientConnectorError: named by the client's class
    assert [name for name in result.total.failures if "Connect" in name]


def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_progress_bar_on_a_terminal_and_in_a_log() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = Progress(tty, "on", 10.0, width=10)
    bar.update(5.0, 100, 1)
    bar.update(10.0, 200, 1, final=True)
    out = tty.getvalue()
    assert out.startswith("\ron [#####.....]") and out.endswith("\n")
    assert "200 requests" in out and "1 errors" in out

    log = io.StringIO()
    bar = Progress(log, "x", 10.0)
    for tenth in range(1, 11):
        bar.update(tenth, tenth * 10, 0)
    bar.update(10.0, 100, 0, final=True)
    lines = log.getvalue().splitlines()
    assert len(lines) == 4  # 25%, 50%, 75%, then the final line
    assert "\r" not in log.getvalue()


async def test_summary_puts_runs_side_by_side() -> None:
    transport = httpx.ASGITransport(app=APP)
    a = await run_load("http://a", profile(), duration=0.2, concurrency=2, transport=transport)
    b = await run_load("http://b", profile(), duration=0.2, concurrency=2, transport=transport)
    text = format_summary([a, b], ["plugins on", "plugins off"])
    header = next(line for line in text.splitlines() if "plugins on" in line)
    assert header.index("plugins on") < header.index("plugins off")
    for row in ("throughput (req/s)", "p50 (ms)", "p95 (ms)", "p99 (ms)", "cache hit rate"):
        assert row in text
    assert "shed (503)" in text and "rejected (429)" in text and "errors" in text
    assert "plugins off:" in text and "things" in text


def test_profiles_from_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "mix.toml"
    toml.write_text(
        'duration = 3\nconcurrency = 2\n[[endpoints]]\npath = "/a/{id}"\nweight = 2\nids = 5\n'
        '[[endpoints]]\nname = "post"\nmethod = "post"\npath = "/b"\njson = { x = 1 }\n'
    )
    p = load_profile(toml)
    assert (p.duration, p.concurrency) == (3, 2)
    assert p.endpoints[0].name == "GET /a/{id}" and p.endpoints[0].ids == 5
    assert p.endpoints[1].method == "POST" and p.endpoints[1].json == {"x": 1}
    js = tmp_path / "mix.json"
    js.write_text(json.dumps({"endpoints": [{"path": "/c", "weight": 1}]}))
    assert load_profile(js).endpoints[0].path == "/c"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("duration = 3\n", "non-empty list"),
        ('[[endpoints]]\npath = "nope"\n', "must start with '/'"),
        ('[[endpoints]]\npath = "/a"\nweight = 0\n', "weight must be > 0"),
        ('[[endpoints]]\npath = "/a"\nspeed = 3\n', "unexpected keyword"),
        ('volume = 11\n[[endpoints]]\npath = "/a"\n', "unknown key 'volume'"),
        ("[[endpoints]\n", "Expected"),
    ],
)
def test_bad_profiles_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["load", "http://127.0.0.1:1", "--profile", str(path)]) == 1
    assert message in capsys.readouterr().err


def test_bad_url_and_labels(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", "127.0.0.1:8000"]) == 1
    assert "expected an http(s):// URL" in capsys.readouterr().err
    assert main(["load", "http://a", "--compare", "http://b", "--labels", "one"]) == 1
    assert "expected 2 labels" in capsys.readouterr().err


def test_default_profile_is_the_video_service() -> None:
    paths = {e.path for e in VIDEO_SERVICE.endpoints}
    assert "/api/videos/{id}/thumbnail" in paths
    assert "/api/videos/generate" in paths
    assert "/api/system/stats" in paths


def test_command_compares_two_servers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mix.toml"
    path.write_text('[[endpoints]]\nname = "things"\npath = "/things/{id}"\nids = 3\n')
    with serving(APP, lifespan="off") as one, serving(APP, lifespan="off") as two:
        code = main(
            [
                *("load", one, "--compare", two, "--profile", str(path), "-d", "0.3"),
                *("-c", "2", "--labels", "on,off", "--json"),
            ]
        )
    captured = capsys.readouterr()
    assert code == 0
    figures = json.loads(captured.out)
    assert set(figures) == {"on", "off"}
    for run in figures.values():
        assert run["total"]["requests"] > 0 and run["total"]["errors"] == 0
        assert run["total"]["p99_ms"] >= run["total"]["p50_ms"] > 0
    assert "on [" in captured.err and "off [" in captured.err  # the progress lines


def test_run_load_outside_a_loop_is_plain_asyncio() -> None:
    result = asyncio.run(
        run_load(
            "http://test",
            profile(),
            duration=0.1,
            concurrency=1,
            transport=httpx.ASGITransport(app=APP),
        )
    )
    assert result.duration >= 0.1


async def stream(request: Request) -> Response:
    async def chunks() -> Any:
        for _ in range(5):
            yield b"y" * 1000

    return StreamingResponse(chunks())  # chunked transfer encoding


async def closing(request: Request) -> Response:
    return PlainTextResponse("bye", headers={"connection": "close"})


SERVED = Starlette(routes=[*APP.routes, Route("/stream", stream), Route("/closing", closing)])


def test_over_a_real_server_every_answer_is_counted_as_in_process() -> None:
    """The http:// client (asyncio connections + httptools) against uvicorn: statuses,
    X-Cache, POST bodies, chunked bodies and servers that close the connection."""
    endpoints = [
        *profile().endpoints,
        Endpoint("stream", "/stream", weight=1),
        Endpoint("closing", "/closing", weight=1),
    ]
    with serving(SERVED, lifespan="off") as base:
        result = asyncio.run(run_load(base, Profile(endpoints), duration=0.5, concurrency=3))
    by = result.endpoints
    assert by["things"].statuses[200] == by["things"].requests > 0
    assert by["things"].cache["HIT"] > 0 and by["things"].cache["MISS"] > 0
    assert by["busy"].statuses[503] == by["busy"].requests
    assert by["limited"].statuses[429] == by["limited"].requests
    assert by["broken"].statuses[500] == by["broken"].requests
    assert by["echo"].statuses[200] == by["echo"].requests
    assert by["echo"].bytes == 7 * by["echo"].requests  # {"a":1}
    assert by["stream"].bytes == 5000 * by["stream"].requests
    assert by["closing"].statuses[200] == by["closing"].requests > 0
    assert sum(r.failures.total() for r in by.values()) == 0
