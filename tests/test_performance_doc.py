"""docs/performance.md names every benchmark under benchmarks/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_is_on_the_performance_page() -> None:
    page = (ROOT / "docs" / "performance.md").read_text()
    missing = [
        p.name
        for p in sorted((ROOT / "benchmarks").glob("*.py"))
        if not p.name.startswith("_") and f"`{p.name}`" not in page and f"/{p.name}`" not in page
    ]
    assert missing == [], "add them to docs/performance.md"
