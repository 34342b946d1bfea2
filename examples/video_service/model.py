"""The "video generator": a small torch model on the CPU, or fixed CPU work without torch.

It stands in for a diffusion model: it takes a prompt, makes `frames` frames of
noise seeded by the prompt, runs them through a few convolutions and returns a
digest of the result. Heavy enough (tens of milliseconds a call) that the GPU
admission, concurrency limit and timeouts have something to do.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

SIZE = 64  # frame width and height, pixels


def _seed(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")


class TorchGenerator:
    """Three convolutions over `frames` noise images; torch's CPU build is enough."""

    kind = "torch"

    def __init__(self) -> None:
        import torch
        from torch import nn

        torch.set_num_threads(1)  # a demo shares its cores with the server and the load
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 3, 3, padding=1),
            nn.Tanh(),
        ).eval()
        self.nets = {"cpu": self.net}

    def generate(self, prompt: str, frames: int, device: str = "cpu") -> str:
        import torch

        generator = torch.Generator().manual_seed(_seed(prompt))
        noise = torch.randn(frames, 3, SIZE, SIZE, generator=generator)
        net = self.nets.get(device)
        if net is None:  # one copy per device, made once
            net = self.nets[device] = copy.deepcopy(self.net).to(device)
        with torch.inference_mode():
            out = net(noise.to(device))
        summary = out.float().mean(dim=(1, 2, 3)).tolist()  # one figure per frame
        return hashlib.sha256(repr(summary).encode()).hexdigest()[:16]


class CpuGenerator:
    """Without torch: a fixed amount of hashing per frame."""

    kind = "cpu"

    def generate(self, prompt: str, frames: int, device: str = "cpu") -> str:
        digest = hashlib.sha256(prompt.encode()).digest()
        for _ in range(frames * 10_000):
            digest = hashlib.sha256(digest).digest()
        return digest.hex()[:16]


def load_generator() -> Any:
    """The generator this machine can run (ModelCache calls this once, in a thread)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return CpuGenerator()
    return TorchGenerator()
