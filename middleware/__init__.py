"""The ASGI middleware that applies an Overdrive host's plugin chain to any app."""

from .asgi import OverdriveMiddleware

__all__ = ["OverdriveMiddleware"]
