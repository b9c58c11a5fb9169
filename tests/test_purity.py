"""`protocols/` stays pure: no I/O, no clock, no randomness (DESIGN.md, "Layout").

Two checks, each proven able to fail on a synthetic violation:

- static: every `.py` under `protocols/` is parsed with `ast`; `import`, `from ... import`
  (relative ones resolved) and `__import__` / `importlib.import_module` calls may not name a
  forbidden module. This covers our own code and the full list below.
- runtime: every `protocols` module is imported in a fresh interpreter, which then reports
  the forbidden modules that appeared in `sys.modules`. This also catches a dependency of
  ours that drags in I/O. Third-party libraries may use `os`, `time` or `threading`
  internally (coincurve does), so the runtime list holds only the clearly-I/O modules.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = REPO_ROOT / "protocols"

# Top-level module names `protocols` code may not import.
FORBIDDEN_IN_SOURCE = frozenset(
    {
        # runtime, network, chain and storage
        "trio",
        "libp2p",
        "web3",
        "eth_tester",
        "sqlite3",
        "socket",
        "ssl",
        "select",
        "selectors",
        "asyncio",
        "anyio",
        "http",
        "urllib",
        "requests",
        "httpx",
        # processes and threads
        "os",
        "subprocess",
        "threading",
        "_thread",
        "multiprocessing",
        "concurrent",
        "signal",
        # clock
        "time",
        "datetime",
        "timeit",
        # randomness
        "random",
        "secrets",
        "uuid",
    }
)

# Modules whose appearance in `sys.modules` after importing `protocols` is a violation.
FORBIDDEN_AT_RUNTIME = frozenset(
    {"trio", "libp2p", "web3", "eth_tester", "sqlite3", "socket", "ssl", "asyncio", "subprocess"}
)

DYNAMIC_IMPORTERS = frozenset({"__import__", "import_module"})


@dataclass(frozen=True)
class Violation:
    line: int
    what: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what}"


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str | None:
    """Absolute name of `from <level dots><name> import ...` inside `module`, None if it escapes."""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    if level - 1 >= len(base):
        return None
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _callee_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def find_violations(
    source: str, module: str = "protocols.example", *, is_package: bool = False
) -> list[Violation]:
    """Forbidden imports in `source`, the text of module `module`."""
    found: list[Violation] = []

    def check(name: str, line: int, how: str) -> None:
        top = name.split(".")[0]
        if top in FORBIDDEN_IN_SOURCE:
            found.append(Violation(line, f"{how} {name}"))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, node.lineno, "import")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                check(node.module, node.lineno, "from-import")
                continue
            target = _resolve_relative(module, is_package, node.level, node.module)
            if target is None or target.split(".")[0] != module.split(".")[0]:
                found.append(Violation(node.lineno, "relative import leaves the package"))
        elif isinstance(node, ast.Call) and _callee_name(node.func) in DYNAMIC_IMPORTERS:
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                check(first.value, node.lineno, "dynamic import of")
            else:
                found.append(Violation(node.lineno, "dynamic import of a computed name"))
    return sorted(found, key=lambda v: v.line)


def protocol_sources() -> list[Path]:
    return sorted(PROTOCOLS.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


# Runs in a fresh interpreter: import the named modules, report forbidden newcomers as JSON.
_RUNTIME_PROBE = textwrap.dedent(
    """
    import importlib, json, sys
    forbidden, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    def loaded():
        return {name.split(".")[0] for name in sys.modules} & set(forbidden)
    before = loaded()
    for name in modules:
        importlib.import_module(name)
    print(json.dumps({"before": sorted(before), "new": sorted(loaded() - before)}))
    """
)


def runtime_violations(modules: list[str], *, path: Path = REPO_ROOT) -> list[str]:
    """Forbidden modules a fresh interpreter holds after importing `modules` from `path`."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _RUNTIME_PROBE,
            json.dumps(sorted(FORBIDDEN_AT_RUNTIME)),
            json.dumps(modules),
        ],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"importing {modules} failed:\n{result.stderr}"
    report = json.loads(result.stdout.splitlines()[-1])
    assert not report["before"], (
        f"{report['before']} already imported at interpreter start-up; the check is blind to them"
    )
    new: list[str] = report["new"]
    return new


# --- the checks on the real tree ---------------------------------------------------------


def test_protocols_sources_exist() -> None:
    names = {module_name(p) for p in protocol_sources()}
    assert "protocols" in names
    assert "protocols.signing" in names


@pytest.mark.parametrize("path", protocol_sources(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_protocols_source_imports_nothing_impure(path: Path) -> None:
    violations = find_violations(
        path.read_text(encoding="utf-8"), module_name(path), is_package=path.name == "__init__.py"
    )
    assert not violations, f"{path.relative_to(REPO_ROOT)}: " + "; ".join(map(str, violations))


def test_importing_protocols_loads_no_io_modules() -> None:
    modules = [module_name(p) for p in protocol_sources()]
    assert not runtime_violations(modules)


# --- the checkers can fail ----------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "import os.path",
        "import trio as t",
        "import hashlib, socket",
        "from random import randrange",
        "from datetime import datetime",
        "from libp2p.host import basic_host",
        "from web3 import Web3",
        "def f():\n    import sqlite3\n",
        "try:\n    import asyncio\nexcept ImportError:\n    pass\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import threading\n",
        "x = __import__('subprocess')",
        "import importlib\nm = importlib.import_module('time')",
        "from importlib import import_module\nm = import_module('os')",
        "import importlib\nname = 'ti' + 'me'\nm = importlib.import_module(name)",
        "from ... import os",
    ],
)
def test_static_checker_catches(source: str) -> None:
    assert find_violations(source, "protocols.example")


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations",
        "import hashlib\nimport dataclasses",
        "from protocols.types import Address",
        "from . import types",
        "from .errors import InvalidValue",
        "import msgpack\nfrom coincurve import PrivateKey",
        "import timeit_free_name",
        "time = 3\nos = 'linux'",
    ],
)
def test_static_checker_passes_pure_code(source: str) -> None:
    assert find_violations(source, "protocols.example") == []


def test_relative_imports_resolve_inside_the_package() -> None:
    assert find_violations("from .. import types", "protocols.sub.mod") == []
    assert find_violations("from .. import types", "protocols.sub", is_package=True) == []
    assert find_violations("from .. import x", "protocols.mod")
    assert find_violations("from ... import x", "protocols.sub", is_package=True)


def test_runtime_checker_catches(tmp_path: Path) -> None:
    package = tmp_path / "impure"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "clean.py").write_text("import json\n")
    (package / "dirty.py").write_text("import json, socket\n")
    assert runtime_violations(["impure.clean"], path=tmp_path) == []
    assert runtime_violations(["impure.clean", "impure.dirty"], path=tmp_path) == ["socket"]
