"""Load the examples/ files by path, and read the code blocks of the docs."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` afresh (a new module object each time)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def python_blocks(doc: str) -> list[str]:
    """The ```python code blocks of ``docs/<doc>``."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def assert_blocks_are_example_code(doc: str, example: str) -> None:
    """Every python block of the doc is a verbatim excerpt of the example file."""
    source = (ROOT / "examples" / f"{example}.py").read_text(encoding="utf-8")
    blocks = python_blocks(doc)
    assert blocks, f"docs/{doc} has no python block"
    for block in blocks:
        assert block.strip() in source, (
            f"docs/{doc} shows code not in examples/{example}.py:\n{block}"
        )
