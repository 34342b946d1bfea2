"""Integrations around the core: FastAPI helpers, the testing kit, Prometheus, dashboard."""
