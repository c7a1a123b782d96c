"""The sans-IO boundary: importing the core pulls in no event loop, socket or transport."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# (threading is not listed: stdlib logging imports it; the core starts no thread.)
FORBIDDEN = ("anyio", "asyncio", "socket", "trio", "imkit.transport")


@pytest.mark.parametrize(
    "modules",
    [
        ["imkit.core"],
        ["imkit.core", "imkit.exceptions", "imkit.core.ack", "imkit.core.conn"],
    ],
)
def test_importing_the_core_loads_no_io(modules: list[str]) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    # -I: isolated mode, so no sitecustomize or user site hooks import anything for us.
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(result.stdout))
    leaked = sorted(
        name for name in loaded for bad in FORBIDDEN if name == bad or name.startswith(bad + ".")
    )
    assert leaked == []
    assert "imkit.core" in loaded and "wsproto" in loaded
