"""ModelCache with a real (small) torch model saved to and loaded from a file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import overdrive.plugins.models as models_mod
from overdrive import ConfigError
from overdrive.contrib.testing import check_plugin, make_host
from overdrive.plugins.models import ModelCache, ModelCacheFull, ModelsPlugin, measure_bytes

torch = pytest.importorskip("torch", reason="torch is not installed (./run test installs it)")

WIDTH = 64
MODEL_BYTES = (WIDTH * WIDTH + WIDTH) * 4  # one float32 Linear(64, 64): weight + bias


def make_file(tmp_path: Path, name: str, seed: int) -> Path:
    torch.manual_seed(seed)
    model = torch.nn.Linear(WIDTH, WIDTH)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path


class Loads:
    """A loader per file that counts how often it ran (the expensive part)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.calls: dict[str, int] = {}

    def loader(self, name: str, seed: int = 0) -> Any:
        path = make_file(self.tmp_path, name, seed)

        def load() -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            model = torch.nn.Linear(WIDTH, WIDTH)
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()

        return load


def test_public_names_are_pinned() -> None:
    assert models_mod.__all__ == sorted(models_mod.__all__)
    assert models_mod.__all__ == [
        "LazyDict",
        "LazyLoader",
        "LoadError",
        "ModelCache",
        "ModelCacheFull",
        "ModelsPlugin",
        "measure_bytes",
    ]


async def test_seed_usage_loads_a_real_model_once(tmp_path: Path) -> None:
    loads = Loads(tmp_path)
    load_stable_diffusion_model = loads.loader("stable_diffusion", seed=1)
    cache = object()  # the seed passes its AsyncCache; models are never written to it
    model_cache = ModelCache(cache)
    model_cache.register_model("stable_diffusion", load_stable_diffusion_model)

    models = await asyncio.gather(*(model_cache.get_model("stable_diffusion") for _ in range(10)))
    assert loads.calls == {"stable_diffusion": 1}
    model = models[0]
    assert all(m is model for m in models)
    assert isinstance(model, torch.nn.Linear)
    torch.manual_seed(1)
    expected = torch.nn.Linear(WIDTH, WIDTH)
    assert torch.equal(model.weight, expected.weight)  # the saved weights, not fresh ones
    out = model(torch.ones(1, WIDTH))
    assert out.shape == (1, WIDTH)

    assert await model_cache.get_model("stable_diffusion") is model
    assert model_cache.loaded() == ["stable_diffusion"]
    stats = model_cache.stats()
    entry = stats["models"]["stable_diffusion"]
    assert entry["size_bytes"] == MODEL_BYTES
    assert entry["load_seconds"] is not None and entry["load_seconds"] > 0
    assert entry["loads"] == 1 and entry["hits"] == 1
    assert stats["used_bytes"] == {"cpu": MODEL_BYTES}


def test_measure_bytes_counts_parameters_buffers_and_containers() -> None:
    bn = torch.nn.BatchNorm1d(10)  # 2 params + 3 buffers (running mean/var, count)
    expected = sum(t.numel() * t.element_size() for t in (*bn.parameters(), *bn.buffers()))
    assert measure_bytes(bn) == expected
    t = torch.zeros(100, dtype=torch.float16)
    assert measure_bytes({"a": t, "b": [t]}) == 200  # shared storage counted once
    assert measure_bytes("not a model") is None


async def test_lru_eviction_under_a_byte_budget(tmp_path: Path) -> None:
    loads = Loads(tmp_path)
    mc = ModelCache(max_host_bytes=2 * MODEL_BYTES + 10)
    for name in "abc":
        mc.register_model(name, loads.loader(name))
    await mc.get_model("a")
    await mc.get_model("b")
    await mc.get_model("a")  # a is now more recent than b
    await mc.get_model("c")
    assert sorted(mc.loaded()) == ["a", "c"]
    assert mc.used_bytes() == 2 * MODEL_BYTES
    assert mc.stats()["evictions"] == 1
    assert mc.stats()["models"]["b"]["evictions"] == 1
    await mc.get_model("b")  # back: a (least recent) goes
    assert sorted(mc.loaded()) == ["b", "c"]
    assert loads.calls == {"a": 1, "b": 2, "c": 1}


async def test_pinned_models_are_never_evicted(tmp_path: Path) -> None:
    loads = Loads(tmp_path)
    mc = ModelCache(max_host_bytes=2 * MODEL_BYTES)
    mc.register_model("base", loads.loader("base"), pinned=True)
    for name in ("x", "y"):
        mc.register_model(name, loads.loader(name))
    await mc.get_model("base")
    await mc.get_model("x")
    await mc.get_model("y")
    assert sorted(mc.loaded()) == ["base", "y"]
    mc.pin("y")
    with pytest.raises(ModelCacheFull, match="held by pinned"):
        await mc.get_model("x")
    assert sorted(mc.loaded()) == ["base", "y"]
    assert mc.used_bytes() == 2 * MODEL_BYTES
    mc.unpin("y")
    await mc.get_model("x")
    assert sorted(mc.loaded()) == ["base", "x"]


async def test_declared_size_makes_room_before_loading(tmp_path: Path) -> None:
    loads = Loads(tmp_path)
    mc = ModelCache(max_host_bytes=1000)
    mc.register_model("small", loads.loader("small"), size_bytes=600)
    mc.register_model("other", loads.loader("other"), size_bytes=600)
    mc.register_model("huge", loads.loader("huge"), size_bytes=5000)
    await mc.get_model("small")
    order: list[str] = []
    real = mc._models["other"].loader

    def watching() -> Any:
        order.append(",".join(mc.loaded()))  # what was loaded when the loader ran
        return real()

    mc._models["other"].loader = watching
    await mc.get_model("other")
    assert order == [""]  # small was evicted before other's loader allocated
    with pytest.raises(ModelCacheFull, match="more than the whole budget"):
        await mc.get_model("huge")
    assert "huge" not in loads.calls
    assert mc.used_bytes() == 600


async def test_failing_hanging_and_wrong_type_loaders_leave_nothing(tmp_path: Path) -> None:
    loads = Loads(tmp_path)
    mc = ModelCache(max_host_bytes=10 * MODEL_BYTES)
    attempts = 0
    good = loads.loader("flaky")

    def flaky() -> Any:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise FileNotFoundError("weights.pt")
        return good()

    async def hang() -> Any:
        await asyncio.Event().wait()

    mc.register_model("flaky", flaky, size_bytes=MODEL_BYTES)
    mc.register_model("hang", hang, timeout=0.05)
    mc.register_model("wrong", lambda: {"not": "a module"}, expect=torch.nn.Module)
    mc.register_model("none", lambda: None)

    results = await asyncio.gather(
        *(mc.get_model("flaky") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, FileNotFoundError) for r in results)
    assert attempts == 1  # one shared attempt, every waiter released with its error
    with pytest.raises(TimeoutError, match="'hang' timed out"):
        await mc.get_model("hang")
    with pytest.raises(models_mod.LoadError, match="returned dict, expected Module"):
        await mc.get_model("wrong")
    with pytest.raises(models_mod.LoadError, match="returned NoneType"):
        await mc.get_model("none")
    assert mc.loaded() == []
    assert mc.used_bytes() == 0  # the reservation for flaky was given back
    assert mc.stats()["models"]["hang"]["failures"] == 1
    assert isinstance(await mc.get_model("flaky"), torch.nn.Linear)
    assert mc.used_bytes() == MODEL_BYTES


async def test_unload_model_and_unload_during_load(tmp_path: Path) -> None:
    loads = Loads(tmp_path)
    mc = ModelCache()
    mc.register_model("m", loads.loader("m"))
    await mc.get_model("m")
    assert await mc.unload_model("m") is True
    assert await mc.unload_model("m") is False
    assert mc.loaded() == [] and mc.used_bytes() == 0

    gate = asyncio.Event()
    inner = loads.loader("slow")

    async def slow() -> Any:
        await gate.wait()
        return inner()

    mc.register_model("slow", slow)
    pending = asyncio.create_task(mc.get_model("slow"))
    await asyncio.sleep(0.01)
    await mc.unload_model("slow")
    gate.set()
    assert isinstance(await pending, torch.nn.Linear)  # the caller gets its model ...
    assert mc.loaded() == [] and mc.used_bytes() == 0  # ... but it is not kept
    with pytest.raises(KeyError, match="no model registered as 'nope'"):
        await mc.get_model("nope")


async def test_plugin_unloads_on_memory_pressure_and_reports_stats(tmp_path: Path) -> None:
    loads = Loads(tmp_path)
    host = make_host(ModelsPlugin, config={"models": {"max_host_bytes": 1_000_000}})
    model_cache = host.model_cache
    assert isinstance(model_cache, ModelCache)
    model_cache.register_model("keep", loads.loader("keep"), pinned=True)
    for name in ("a", "b", "c", "d"):
        model_cache.register_model(name, loads.loader(name))
    for name in ("keep", "a", "b", "c", "d"):
        await model_cache.get_model(name)

    await host.memory_pressure("warning")  # the least recently used half of the unpinned
    assert sorted(model_cache.loaded()) == ["c", "d", "keep"]
    stats = await host.get_system_stats()
    assert stats["models"]["loaded"] == model_cache.loaded()
    assert stats["models"]["pressure_unloads"] == 2
    await host.memory_pressure("critical")  # every unpinned one
    assert model_cache.loaded() == ["keep"]
    await host.initialize()
    await host.cleanup()  # shutdown unloads everything
    assert model_cache.loaded() == []


def test_plugin_contract_and_settings_errors() -> None:
    check_plugin(ModelsPlugin)
    with pytest.raises(ConfigError, match=r"models.max_host_bytes: expected > 0"):
        make_host(ModelsPlugin, config={"models": {"max_host_bytes": -1}})
    with pytest.raises(ConfigError, match=r"models.max_gpu_bytes"):
        make_host(ModelsPlugin, config={"models": {"max_gpu_bytes": "lots"}})


async def test_eviction_from_a_device_parks_in_host_memory(tmp_path: Path) -> None:
    # torch accepts "cpu:1" as a device: here it stands for an accelerator, so the
    # device budget, parking and the copy back run for real without a GPU (the
    # copies are cheap on CPU; the CUDA test below checks the real transfer).
    loads = Loads(tmp_path)
    mc = ModelCache(max_gpu_bytes=2 * MODEL_BYTES, max_host_bytes=2 * MODEL_BYTES)
    for name in "abc":
        mc.register_model(name, loads.loader(name), device="cpu:1")
    await mc.get_model("a")
    await mc.get_model("b")
    await mc.get_model("c")  # a leaves the device budget: parked, not dropped
    assert mc.parked() == ["a"] and sorted(mc.loaded()) == ["b", "c"]
    assert mc.used_bytes("cpu:1") == 2 * MODEL_BYTES and mc.used_bytes("cpu") == MODEL_BYTES
    a = await mc.get_model("a")  # back by copy: b (least recent) is parked in turn
    assert isinstance(a, torch.nn.Linear)
    assert loads.calls == {"a": 1, "b": 1, "c": 1}
    assert sorted(mc.parked()) == ["b"] and sorted(mc.loaded()) == ["a", "c"]
    stats = mc.stats()["models"]
    assert stats["a"]["parks"] == 1 and stats["a"]["restores"] == 1
    assert stats["a"]["restore_seconds"] is not None
    # Host budget of two: parking a third model drops the coldest parked copy.
    mc.register_model("d", loads.loader("d"), device="cpu:1")
    await mc.get_model("d")  # c parked; host holds b and c
    await mc.get_model("b")  # b back; a parked
    await mc.get_model("c")  # c back; d parked, host full: the coldest parked one goes
    assert mc.used_bytes("cpu") <= 2 * MODEL_BYTES
    assert mc.used_bytes("cpu:1") == 2 * MODEL_BYTES
    await mc.on_memory_pressure("warning")  # parked copies go first
    assert mc.parked() == []
    assert mc.used_bytes("cpu") == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_gpu_eviction_parks_in_host_memory_and_restores_by_copy(tmp_path: Path) -> None:
    loads = Loads(tmp_path)
    mc = ModelCache(max_gpu_bytes=MODEL_BYTES + 10, max_host_bytes=10 * MODEL_BYTES)
    mc.register_model("a", loads.loader("a"), device="cuda:0")
    mc.register_model("b", loads.loader("b"), device="cuda:0")
    a = await mc.get_model("a")
    assert a.weight.device.type == "cuda"
    await mc.get_model("b")
    assert mc.parked() == ["a"] and mc.loaded() == ["b"]
    assert mc.used_bytes("cuda:0") == MODEL_BYTES and mc.used_bytes("cpu") == MODEL_BYTES
    a = await mc.get_model("a")  # a copy back, not a load
    assert a.weight.device.type == "cuda"
    assert loads.calls == {"a": 1, "b": 1}
    assert mc.stats()["models"]["a"]["restores"] == 1
    assert mc.parked() == ["b"]
