"""docs/scaling.md follows the code: its commands parse, its Python compiles against the
real names, and its Redis key layout is RedisDiscover's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import imkit.integrations.redis as redis_integration
from imkit.cli import build_parser

DOC = (Path(__file__).resolve().parents[2] / "docs" / "scaling.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.S)


def test_the_serve_commands_parse_with_the_documented_options() -> None:
    commands = [line for line in blocks("sh")[0].splitlines() if line.startswith("imkit serve")]
    assert len(commands) == 3
    variables = {"$REDIS": "redis://127.0.0.1:6379/0", "$PG": "postgresql://x@127.0.0.1/x"}
    node_ids = set()
    for command in commands:
        for name, value in variables.items():
            command = command.replace(name, value)
        args = build_parser().parse_args(shlex.split(command.rstrip(" &"))[1:])
        assert args.redis and args.postgres
        node_ids.add(args.node_id)
    assert node_ids == {"n1", "n2", "n3"}
    table = re.findall(r"^\| `(--[\w-]+)[^`]*` \| ([^|]+) \|", DOC, flags=re.M)
    assert {option for option, _ in table} == {
        "--redis",
        "--redis-prefix",
        "--node-id",
        "--lease",
        "--postgres",
        "--postgres-schema",
    }
    defaults = build_parser().parse_args(["serve"])
    assert defaults.redis_prefix == "imkit"
    assert defaults.lease == 10.0
    assert defaults.postgres_schema == "public"


def test_the_python_example_compiles_and_names_real_things() -> None:
    (code,) = blocks("python")
    compile(code, "docs/scaling.md", "exec")
    namespace: dict[str, object] = {}
    imports = "\n".join(line for line in code.splitlines() if line.startswith(("from", "import")))
    exec(imports, namespace)  # the doc's own import lines
    assert {"TokenAuth", "run", "create_chat_app", "PostgresStore", "RedisDiscover"} <= set(
        namespace
    )


def test_the_key_layout_is_redis_discovers() -> None:
    documented = set(re.findall(r"^\| `(P:[^`]+)` \|", DOC, flags=re.M))
    assert len(documented) == 4
    module_doc = redis_integration.__doc__ or ""
    for key in documented:
        assert key in module_doc, key
