"""No two modules of the library import each other.

The graph is read statically (``ast``), so imports inside functions count as much as top-level ones: a lazy
import that would hide a cycle at import time is still a cycle in the design. A package's ``__init__`` importing
its own submodules, and a module importing its own package, are not edges between two modules.
"""

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("modeling_dsl", "trainer", "pipelines", "evaluation", "hub_cards", "benchmarks")


def module_imports() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            if is_init:
                parts = parts[:-1]
            targets = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = parts if is_init else parts[:-1]
                        base = base[: len(base) - (node.level - 1)]
                        module = ".".join(base + ([node.module] if node.module else []))
                    else:
                        module = (node.module or "").removeprefix("dsl_diffusion.")
                    targets.add(module)
                    targets.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x`
                elif isinstance(node, ast.Import):
                    targets.update(alias.name.removeprefix("dsl_diffusion.") for alias in node.names)
            graph[".".join(parts)] = targets
    return {module: {t for t in targets if t in graph and t != module} for module, targets in graph.items()}


def test_no_two_modules_import_each_other():
    graph = module_imports()
    assert "trainer.trainer" in graph and "trainer.distributed" in graph["trainer.trainer"]
    mutual = [(a, b) for a, b in itertools.combinations(sorted(graph), 2) if b in graph[a] and a in graph[b]]
    assert not mutual, f"modules that import each other: {mutual}"
