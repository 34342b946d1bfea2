"""tests/gpu: NVML and torch.cuda for real. Every test here is skipped, with the reason,
where `pynvml` finds no device; run them on a GPU machine with ``python -m pytest tests/gpu``.
They need nothing else (no Redis, no PostgreSQL).
"""

from __future__ import annotations

from typing import Any

import pytest


def nvml_devices() -> tuple[int, str]:
    """(device count, why none) as NVML sees it."""
    try:
        import pynvml
    except ImportError:
        return 0, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return 0, f"NVML is not available: {exc}"
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()
    return count, "" if count else "NVML sees no GPU"


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    count, why = nvml_devices()
    if count:
        return
    skip = pytest.mark.skip(reason=f"needs a GPU: {why}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture
def cuda() -> Any:
    """torch with a CUDA device, or a skip saying what is missing."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} sees no CUDA device (a CPU build?)")
    return torch
