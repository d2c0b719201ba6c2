"""certify stands alone: it imports without lipnet, has no import loop, and imports inside functions
only the optional libraries it guards.

The import graph is read from the source (every ``import`` / ``from ... import`` statement, at any
depth), so a loop kept alive by a function-level import is found too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import certify

ROOT = Path(certify.__file__).resolve().parent
REPO = ROOT.parent

#: Top-level packages certify may import inside a function, and why: each is optional for certify
#: (a model that does not use it never needs it), so importing it eagerly would make it a dependency.
OPTIONAL = {
    "deel": "deel-torchlip layers, bounded only when a model uses them",
    "orthogonium": "orthogonium layers, bounded only when a model uses them",
    "matplotlib": "the plot extra",
    "pyautoattack": "the attack extra",
    "autoattack": "the attack extra (upstream name)",
    "onnx": "ONNX files",
    "onnxruntime": "ONNX files",
    "safetensors": "reading .safetensors weights (certify otherwise needs torch alone)",
    "torch._export": "a private torch module, absent from some torch versions lipnet supports",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. certify.rules.conv
    target: str  # the imported name as written, fully qualified, e.g. certify.contract
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> tuple[set[str], list[Import]]:
    modules: set[str] = set()
    found: list[Import] = []
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        modules.add(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, in_function: bool, name: str = name, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    found.extend(Import(name, a.name, child.lineno, in_function) for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        anchor = package
                        for _ in range(child.level - 1):
                            anchor = anchor.rpartition(".")[0]
                        base = f"{anchor}.{base}" if base else anchor
                    found.extend(
                        Import(name, f"{base}.{a.name}", child.lineno, in_function) for a in child.names
                    )
                visit(child, inside)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return modules, found


def _resolve(target: str, modules: set[str]) -> str | None:
    """The certify module an import loads: the longest module prefix of ``target``."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _is_certify(target: str) -> bool:
    return target == "certify" or target.startswith("certify.")


def test_certify_and_every_submodule_import_without_lipnet() -> None:
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class NoLipnet:
            def find_spec(self, name, path=None, target=None):
                if name == "lipnet" or name.startswith("lipnet."):
                    raise ImportError(f"lipnet is made unimportable for this test ({name})")
                return None

        sys.meta_path.insert(0, NoLipnet())
        import certify

        names = [m.name for m in pkgutil.walk_packages(certify.__path__, "certify.")]
        for name in names:
            importlib.import_module(name)
        assert not any(m == "lipnet" or m.startswith("lipnet.") for m in sys.modules), "lipnet was imported"
        print(len(names))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    modules, _ = _imports()
    assert int(done.stdout.strip()) == len(modules) - 1  # every module but the package itself


def test_certify_never_imports_lipnet() -> None:
    _, found = _imports()
    assert [i for i in found if i.target == "lipnet" or i.target.startswith("lipnet.")] == []


def test_no_import_loop_inside_certify() -> None:
    """No cycle among certify's modules, counting the package ``__init__`` an import runs.

    Importing ``certify.pkg.mod`` from outside ``certify.pkg`` first runs ``certify/pkg/__init__.py``;
    that arrow counts. (A module inside a package reaches it through its ``__init__``, already running.)
    """
    modules, found = _imports()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in found:
        if not _is_certify(imp.target):
            continue
        target = _resolve(imp.target, modules)
        assert target is not None, imp
        if target == imp.module:
            continue
        edges[imp.module].add(target)
        package = target.rpartition(".")[0]
        while package and not (imp.module == package or imp.module.startswith(package + ".")):
            edges[imp.module].add(package)
            package = package.rpartition(".")[0]
    assert "certify" not in set().union(*edges.values()), (
        "a certify module imports the certify package itself"
    )

    # depth-first search for a back edge; report the loop it closes
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def search(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                loop = search(nxt)
                if loop is not None:
                    return loop
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(modules):
        if module not in state:
            loop = search(module)
            assert loop is None, " -> ".join(loop)


def test_function_level_imports_only_guard_optional_dependencies() -> None:
    _, found = _imports()
    nested = [i for i in found if i.in_function]
    assert [i for i in nested if _is_certify(i.target)] == [], (
        "a certify import inside a function hides a loop"
    )
    allowed = [i for i in nested if any(i.target == p or i.target.startswith(p + ".") for p in OPTIONAL)]
    assert [i for i in nested if i not in allowed] == []
