"""The servers `benchmarks/batching_http.py` compares, one per process: `python THIS KIND PORT`.

The same model in each (seeded, so every server holds the same weights): a small MLP,
4 x (Linear 256, GELU) + Linear 256, torch on the CPU with one intra-op thread, behind
`POST /predict` with a JSON body ``{"x": [256 floats]}`` answered ``{"y": [256 floats]}``.

- ``inline``: FastAPI, the model called in the endpoint, unbatched.
- ``overdrive`` / ``overdrive-nofreeze``: FastAPI + OverdriveMiddleware (no plugin) and
  ``@overdrive.batch(max_batch_size=64, max_wait_ms=5)``; the second with the host's
  ``gc_freeze`` off, to show what the collector policy is worth.
- ``litserve``: LitServe's LitAPI with max_batch_size 64 and batch_timeout 5 ms, one API
  server and one inference worker (run from a venv of its own).
Each also serves ``GET /health`` (a cheap route, measured while the model is saturated).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's Row annotation.
import sys

import torch

WIDTH = 256


def build_model() -> torch.nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, WIDTH)).eval()


def fastapi_app(kind: str) -> object:
    from fastapi import FastAPI
    from pydantic import BaseModel

    import overdrive
    from overdrive.middleware import OverdriveMiddleware

    model = build_model()

    class Row(BaseModel):
        x: list[float]

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if kind == "inline":

        @app.post("/predict")
        async def predict(row: Row) -> dict[str, list[float]]:
            with torch.inference_mode():
                return {"y": model(torch.tensor(row.x)[None])[0].tolist()}

        return app

    @overdrive.batch(max_batch_size=64, max_wait_ms=5)
    async def run(rows: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(model(torch.stack(rows)))

    @app.post("/predict")
    async def predict_batched(row: Row) -> dict[str, list[float]]:
        return {"y": (await run(torch.tensor(row.x))).tolist()}

    @app.get("/batches")
    async def batches() -> dict[str, float]:
        b = next(iter(run.batchers().values()), None)  # type: ignore[attr-defined]
        return {"batches": b.batches if b else 0, "items": b.items if b else 0}

    config = {"plugins": [], "gc_freeze": kind != "overdrive-nofreeze"}
    return OverdriveMiddleware(app, config=config)


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "litserve":  # run from LitServe's own venv (benchmarks/batching_http.py)
        from _batching_litserve import serve

        serve(port)
    else:
        import uvicorn

        uvicorn.run(
            fastapi_app(kind), host="127.0.0.1", port=port, log_level="warning", access_log=False
        )
