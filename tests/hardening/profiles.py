"""How hard the hardening suites search: hypothesis settings chosen by ``HYPOTHESIS_PROFILE``.

``./run test`` runs the quick profile (a hundred or so cases per property,
seconds in all). For a deeper search::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/hardening

runs thousands of cases per property (minutes). ``ci`` is the quick profile
derandomised, so that a CI failure reproduces on a laptop. The settings are
applied per test (``@FUZZ``), never loaded globally, so other suites keep theirs.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = settings(
    deadline=None,  # a noisy shared machine: no per-example time limit
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILES = {
    "quick": settings(_COMMON, max_examples=120),
    "ci": settings(_COMMON, max_examples=120, derandomize=True),
    "long": settings(_COMMON, max_examples=5000),
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "quick")
FUZZ = PROFILES.get(PROFILE, PROFILES["quick"])
