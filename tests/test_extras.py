"""Each plugin loads and starts with only its own extra installed; a missing one names it.

The other extras' packages are hidden from a fresh interpreter by a meta-path finder
(a module it blocks raises ModuleNotFoundError, as when it is not installed), so one
test environment with everything installed stands in for one per extra.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from overdrive.extras import EXTRA_OF, PLUGIN_EXTRAS

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PLUGINS = sorted(PYPROJECT["project"]["entry-points"]["overdrive.plugins"])
# The extras a user installs to run plugins (not the developers' test/bench/demo/all).
RUNTIME = (
    "gpu",
    "http",
    "otel",
    "postgres",
    "prometheus",
    "redis",
    "resilience",
    "tasks",
    "testing",
)

SCRIPT = """
import asyncio, importlib.abc, json, sys

BLOCKED = set(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())

from overdrive import Overdrive

async def main():
    out = {}
    for plugin in json.loads(sys.argv[2]):
        try:
            host = Overdrive({"plugins": [plugin]}, env={})
            await host.initialize()
            await host.cleanup()
            out[plugin] = "ok"
        except Exception as exc:
            out[plugin] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))

asyncio.run(main())
"""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def modules_of(extra: str) -> set[str]:
    return {module for module, owner in EXTRA_OF.items() if owner == extra}


def load(plugins: list[str], blocked: set[str]) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(sorted(blocked)), json.dumps(plugins)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT / "tests",  # no overdrive.toml or [tool.overdrive] here
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_table_of_imports_matches_the_packages_extras() -> None:
    dists = packages_distributions()  # import name -> distributions that install it
    declared: dict[str, set[str]] = {}  # extra -> distribution names
    for line in requires("overdrive") or ():
        req = Requirement(line)
        for extra in RUNTIME:
            if req.marker is not None and req.marker.evaluate({"extra": extra}):
                declared.setdefault(extra, set()).add(norm(req.name))
    for module, extra in EXTRA_OF.items():
        owners = {norm(d) for d in dists.get(module, ())}
        assert owners & declared[extra], f"{module}: not installed by the {extra!r} extra"
    for extra, names in declared.items():
        if extra == "tasks":
            names = names - declared["redis"]  # redis comes with both
        for name in names:
            modules = {m for m, ds in dists.items() if name in {norm(d) for d in ds}}
            assert modules & set(EXTRA_OF), f"{name} ({extra}): no import in EXTRA_OF"


@pytest.mark.parametrize("extra", sorted({*PLUGIN_EXTRAS.values(), ""}))
def test_each_plugin_loads_and_starts_with_only_its_extra(extra: str) -> None:
    plugins = [p for p in PLUGINS if PLUGIN_EXTRAS.get(p, "") == extra]
    blocked = set(EXTRA_OF) - modules_of(extra)
    assert load(plugins, blocked) == dict.fromkeys(plugins, "ok")


@pytest.mark.parametrize("plugin", sorted(PLUGIN_EXTRAS))
def test_without_its_extra_a_plugin_says_what_to_install(plugin: str) -> None:
    extra = PLUGIN_EXTRAS[plugin]
    message = load([plugin], set(EXTRA_OF))[plugin]
    assert message.endswith(f"install the {extra!r} extra (pip install 'overdrive[{extra}]')")


@pytest.mark.parametrize("plugin", PLUGINS)
def test_each_plugin_page_names_its_extra(plugin: str) -> None:
    page = (ROOT / "docs" / "plugins" / f"{plugin}.md").read_text()
    extra = PLUGIN_EXTRAS.get(plugin)
    if extra:
        assert f"pip install '.[{extra}]'" in page or f"overdrive[{extra}]" in page
    else:
        assert "needs no extra" in page.lower()
