"""The live dashboard's files: one HTML page, its script and its styles.

They ship in the wheel as package data (no CDN, no build step) and are served
by the `stats` plugin at ``/overdrive/``. The page polls ``/overdrive/stats``
and draws its charts on plain canvases; it reads whichever sections the
stats hold and shows "not enabled" for the others.
"""

from __future__ import annotations

from importlib.resources import files

__all__ = ["ASSETS", "read_asset"]

ASSETS = ("index.html", "dashboard.js", "dashboard.css")


def read_asset(name: str) -> bytes:
    """The bytes of one of `ASSETS`."""
    if name not in ASSETS:
        raise KeyError(name)
    return files(__name__).joinpath(name).read_bytes()
