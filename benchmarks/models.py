"""ModelCache: what a model costs to load, to hit, and (with a GPU) to park and restore.

A 64 MiB model (4 x Linear(2048, 2048), float32) is saved with ``torch.save``
and loaded the way users write loaders (build the module, ``load_state_dict``
of ``torch.load(..., weights_only=True)``). Printed, from ModelCache's own stats:

- load: the loader's time (file read + build + weights);
- hit: ``await get_model`` of a resident model;
- with CUDA: park (evicted from the GPU to host RAM by a GPU budget that fits
  one model) and restore (the copy back), against the load of the same model;
- without CUDA: a host-to-host copy of the weights, the floor a restore from
  host memory could cost, instead of park/restore.

    ./run bench models
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from overdrive.plugins.models import ModelCache

WIDTH, LAYERS = 2048, 4


def build() -> torch.nn.Module:
    return torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))


def loader_for(path: Path):  # type: ignore[no-untyped-def]
    def load() -> torch.nn.Module:
        with torch.device("meta"):  # no throw-away random init; weights come from the file
            model = build()
        model.load_state_dict(torch.load(path, weights_only=True), assign=True)
        return model.eval()

    return load


async def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name in ("a", "b"):
            p = Path(tmp) / f"{name}.pt"
            torch.save(build().state_dict(), p)
            paths.append(p)
        cuda = torch.cuda.is_available()
        size = sum(t.numel() * t.element_size() for t in build().state_dict().values())
        device = "cuda:0" if cuda else None
        mc = ModelCache(max_gpu_bytes=size + 1024 if cuda else None)
        for name, p in zip("ab", paths, strict=True):
            mc.register_model(name, loader_for(p), device=device)
        await mc.get_model("a")
        hits = []
        for _ in range(1000):
            t0 = perf_counter()
            await mc.get_model("a")
            hits.append(perf_counter() - t0)
        rows = [
            ("load a (file -> model)", mc.stats()["models"]["a"]["load_seconds"]),
            ("hit (resident)", statistics.median(hits)),
        ]
        if cuda:
            await mc.get_model("b")  # a is parked in host memory
            await mc.get_model("a")  # a comes back by copy, b is parked
            s = mc.stats()["models"]
            rows += [
                ("park a (GPU -> host)", s["a"]["park_seconds"]),
                ("restore a (host -> GPU)", s["a"]["restore_seconds"]),
                ("load b (file -> GPU)", s["b"]["load_seconds"]),
            ]
        else:
            model = await mc.get_model("a")
            state = {k: v.clone() for k, v in model.state_dict().items()}
            t0 = perf_counter()
            for k, v in model.state_dict().items():
                v.copy_(state[k])
            rows.append(("host copy of the weights (no CUDA)", perf_counter() - t0))
    print(f"model: {size / 2**20:.0f} MiB, device: {device or 'cpu (no CUDA here)'}\n")
    load = rows[0][1]
    print(f"{'step':<38} {'microseconds':>12} {'vs load':>9}")
    print("-" * 61)
    for name, seconds in rows:
        print(f"{name:<38} {seconds * 1e6:>12.1f} {seconds / load:>9.5f}")


if __name__ == "__main__":
    asyncio.run(main())
