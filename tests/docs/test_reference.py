"""docs/reference.md follows the code: every ``options:`` table lists exactly the
parameters of the callable it names, with their defaults."""

from __future__ import annotations

import importlib
import inspect
import re
import time
from typing import Any

import attrs
import pytest
from tests.docs.helpers import ROOT

import imkit

TABLE = re.compile(r"<!-- options: ([\w.]+) -->\n\|[^\n]*\n\|[^\n]*\n((?:\|[^\n]*\n)+)")
ROW = re.compile(r"^\| `(\w+)` \| (required|`[^`]*`) \|")


def tables() -> dict[str, dict[str, str]]:
    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    found: dict[str, dict[str, str]] = {}
    for target, body in TABLE.findall(text):
        rows: dict[str, str] = {}
        for line in body.splitlines():
            match = ROW.match(line)
            assert match, f"{target}: cannot read the row {line!r}"
            rows[match.group(1)] = match.group(2).strip("`")
        found[target] = rows
    return found


def resolve(target: str) -> Any:
    module_name, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def parameters(obj: Any) -> dict[str, Any]:
    """Each documented parameter and its default (``inspect.Parameter.empty``: required)."""
    if attrs.has(obj):
        defaults: dict[str, Any] = {}
        for field in attrs.fields(obj):
            default = field.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory()
            defaults[field.name] = default
        return defaults
    skip = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return {
        name: p.default
        for name, p in inspect.signature(obj).parameters.items()
        if p.kind not in skip and name not in ("self", "task_status")
    }


def test_the_reference_has_option_tables() -> None:
    assert {"imkit.App", "imkit.Server", "imkit.Client", "imkit.ConnLimits"} <= set(tables())


@pytest.mark.parametrize("target", sorted(tables()))
def test_options_and_defaults_match_the_code(target: str) -> None:
    documented = tables()[target]
    actual = parameters(resolve(target))
    assert list(documented) == list(actual), f"{target}: the table's options differ"
    namespace = {**vars(imkit), "time": time}
    for name, cell in documented.items():
        default = actual[name]
        if cell == "required":
            assert default is inspect.Parameter.empty, f"{target}({name}=...) has a default"
            continue
        expected = eval(cell, namespace)
        assert default == expected, f"{target}({name}=...): code {default!r}, doc {cell}"
