"""Dynamic batching: a small torch model on the CPU, 64 concurrent clients.

Compared, in one run, on the same model and inputs:

- unbatched, inline: each call runs ``model(x[None])`` on the event loop (a plain
  async endpoint)
- unbatched, thread pool: each call in ``asyncio.to_thread`` (what a user reaches
  for so as not to block the loop)
- ``@overdrive.batch(max_batch_size=64, max_wait_ms=2)``: calls gathered into
  ``model(torch.stack(items))``

Printed: throughput (calls/s) and p99 latency, and each as a ratio to inline.
Run: ./run bench batching [calls per client]
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

import overdrive

CLIENTS = 64
CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 40
WIDTH = 128
torch.set_num_threads(1)  # the machine is shared; one intra-op thread keeps runs comparable
torch.manual_seed(0)
_layers: list[torch.nn.Module] = []
for _ in range(4):
    _layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.LayerNorm(WIDTH), torch.nn.GELU()]
model = torch.nn.Sequential(*_layers, torch.nn.Linear(WIDTH, 10)).eval()


def run_one(x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x[None])[0]


async def inline(x: torch.Tensor) -> torch.Tensor:
    return run_one(x)


async def threaded(x: torch.Tensor) -> torch.Tensor:
    return await asyncio.to_thread(run_one, x)


@overdrive.batch(max_batch_size=64, max_wait_ms=2)
async def batched(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return list(model(torch.stack(xs)))


async def measure(call: Callable[[torch.Tensor], Awaitable[Any]]) -> tuple[float, float]:
    inputs = torch.randn(CLIENTS, WIDTH)
    latencies: list[float] = []

    async def client(i: int) -> None:
        for _ in range(CALLS):
            t = time.perf_counter()
            await call(inputs[i])
            latencies.append(time.perf_counter() - t)

    for i in range(4):  # warm up
        await call(inputs[i])
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return CLIENTS * CALLS / elapsed, latencies[int(0.99 * (len(latencies) - 1))]


async def main() -> None:
    print(
        f"{CLIENTS} concurrent clients x {CALLS} calls; model: 4 x (Linear {WIDTH}, LayerNorm, "
        "GELU) + Linear 10, torch CPU, 1 thread"
    )
    # Check the batched path gives the same answers as the single path.
    x = torch.randn(WIDTH)
    assert torch.allclose(await batched(x), run_one(x), atol=1e-5)
    rows = [
        ("unbatched, inline", await measure(inline)),
        ("unbatched, to_thread", await measure(threaded)),
        ("@overdrive.batch", await measure(batched)),
    ]
    base_tp, base_p99 = rows[0][1]
    print(f"{'':<22} {'calls/s':>9} {'x inline':>9} {'p99 ms':>8} {'x inline':>9}")
    for name, (tp, p99) in rows:
        print(
            f"{name:<22} {tp:>9.0f} {tp / base_tp:>8.2f}x {p99 * 1e3:>8.1f} {p99 / base_p99:>8.2f}x"
        )
    print(
        "(inline p99 leaves out the time a call waits for the event loop that the other "
        "calls block; the throughput column is the fair comparison)"
    )
    stats = next(iter(batched.batchers().values()))
    print(f"batches run: {stats.batches}, mean size {stats.items / max(1, stats.batches):.1f}")


if __name__ == "__main__":
    asyncio.run(main())
