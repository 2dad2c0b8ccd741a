"""tinylm's packages import one way, lowest layer first (DESIGN.md, "Layers import one way").

Every tinylm/**/*.py is parsed with ast; its imports, at module level and inside functions alike, are mapped to
their layers by LAYERS below. An import from a lower layer to a higher one fails, and so does a circle between
packages (inside one layer too). A new module must be placed in the table.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tinylm"

# Lowest first. A module may import its own layer and the layers below it, never above. Names are packages or
# modules; a module belongs to the longest name that contains it (`tinylm` itself is only tinylm/__init__.py).
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["tinylm.errors", "tinylm.config", "tinylm.config_next", "tinylm.config_qed", "tinylm.sampling_params",
              "tinylm.chat_template", "tinylm.template_budget", "tinylm.template_guard", "tinylm.tokenizer",
              "tinylm.detokenize", "tinylm.reasoning", "tinylm.tool_calls"]),
    # (base: no model code; weights and engine read tokenizers)
    ("kernels", ["tinylm.kernels"]),
    ("model", ["tinylm.model"]),
    ("weights", ["tinylm.weights"]),  # read and write float formats: never quant
    ("quant", ["tinylm.quant"]),  # formats, policies, quantized checkpoints
    ("loading", ["tinylm.loading", "tinylm.hub", "tinylm.tiny"]),  # path + policy -> model; names -> files
    ("engine", ["tinylm.engine"]),
    ("llm", ["tinylm.llm", "tinylm.outputs", "tinylm.request_outputs", "tinylm.llm_loading", "tinylm"]),  # the public API (tinylm/__init__.py)
    ("command helpers", ["tinylm.cli_args"]),  # flags shared by the commands and train's config loader
    # each package's `tinylm <command>` group (its cli.py) belongs to its package, except `tinylm quantize`, which
    # lives beside the quantization code but loads models through the public API
    ("applications", ["tinylm.server", "tinylm.train", "tinylm.eval", "tinylm.bench", "tinylm.quant.cli",
                      "tinylm.verify"]),
    ("cli", ["tinylm.cli"]),  # wires the command groups together: nothing imports it
]

# Arrows that break the rule today and are being removed in other work: (importing module, imported module).
KNOWN: set[tuple[str, str]] = set()

LEVEL = {name: level for level, (_, names) in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str | None:
    """The LAYERS name a module belongs to (its package, or itself)."""
    if module == "tinylm":
        return "tinylm"
    matches = [n for n in LEVEL if n != "tinylm" and (module == n or module.startswith(n + "."))]
    return max(matches, key=len) if matches else None


def imports(path: Path, modules: set[str]) -> set[str]:
    """The tinylm modules `path` imports anywhere in it; `from tinylm.x import y` counts as tinylm.x.y when y is
    a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m == "tinylm" or m.startswith("tinylm.")}


def arrows() -> list[tuple[str, str]]:
    """(importer, imported) for every import between two different LAYERS units."""
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return sorted((module_name(p), target) for p in paths for target in imports(p, modules)
                  if unit(module_name(p)) != unit(target))


def test_every_module_has_a_layer():
    missing = sorted(module_name(p) for p in ROOT.rglob("*.py") if unit(module_name(p)) is None)
    assert not missing, f"place these modules in tests/test_layers.py LAYERS: {missing}"


def test_no_import_points_up():
    upward = [f"{a} ({LAYERS[LEVEL[unit(a)]][0]}) imports {b} ({LAYERS[LEVEL[unit(b)]][0]})"
              for a, b in arrows() if LEVEL[unit(a)] < LEVEL[unit(b)] and (a, b) not in KNOWN]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_circle_between_packages():
    graph: dict[str, set[str]] = {}
    for a, b in set(arrows()) - KNOWN:
        graph.setdefault(unit(a), set()).add(unit(b))
    circles = [c for c in _components(graph) if len(c) > 1]
    assert not circles, f"packages importing each other: {circles}"


def test_known_arrows_still_exist():
    """An arrow fixed elsewhere leaves KNOWN: the exceptions never outlive their reason."""
    gone = sorted(KNOWN - set(arrows()))
    assert not gone, f"remove from KNOWN, these imports are gone: {gone}"


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan): each circle of units is one component of two or more."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found
