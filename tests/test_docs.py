"""Every ```python block in the README and docs/ runs, so the docs cannot rot.

Blocks of one file run in order in one namespace (a later block may use what an
earlier one defined); top-level `await` is allowed. A block fenced as
```` ```python notest ```` is shown to readers but not run (it needs a GPU, a
remote service, or is a deliberate fragment); keep those few.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest
from starlette.applications import Starlette

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```python[ \t]*(\w*)[ \t]*\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) == "notest":
            continue
        line = text[: match.start()].count("\n") + 2
        found.append((line, match.group(2)))
    return found


@pytest.mark.parametrize(
    "path", [p for p in FILES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
async def test_code_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no overdrive.toml of ours gets picked up
    module = types.ModuleType(f"docs_{path.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look it up
    namespace = module.__dict__
    for line, source in blocks(path):
        code = compile(source, f"{path.name}:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, namespace)
        if result is not None:  # a coroutine when the block awaits at top level
            await result
    # An app a block configured is built, so its Overdrive configuration is validated too.
    for value in list(namespace.values()):
        if isinstance(value, Starlette) and value.user_middleware:
            value.build_middleware_stack()
