"""The generated docs cannot drift from the code: docs/ack-states.md is the table's output."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from imkit.core.ack import TRANSITIONS
from imkit.core.frames import ErrorCode

DOCS = Path(__file__).resolve().parents[2] / "docs"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_state_diagram", DOCS / "make_state_diagram.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ack_states_md_is_the_generated_output() -> None:
    module = generator()
    committed = (DOCS / "ack-states.md").read_text(encoding="utf-8")
    assert committed == module.render(), "run: python docs/make_state_diagram.py"
    assert module.main(["--check"]) == 0


def test_every_row_is_drawn() -> None:
    text = (DOCS / "ack-states.md").read_text(encoding="utf-8")
    assert text.count("stateDiagram-v2") == 6  # 2 roles x 3 modes
    assert text.count("\n| sender |") + text.count("\n| receiver |") == len(TRANSITIONS)


def test_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    module = generator()
    module.OUTPUT = tmp_path / "ack-states.md"
    assert module.main(["--check"]) == 1  # missing
    assert module.main([]) == 0
    assert module.main(["--check"]) == 0
    module.OUTPUT.write_text("stale", encoding="utf-8")
    assert module.main(["--check"]) == 1


def test_protocol_md_lists_every_err_code() -> None:
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    for name, code in vars(ErrorCode).items():
        if name.isupper():
            assert f"`{code}`" in text, code
