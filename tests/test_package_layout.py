"""The package's shape: sub-packages by concept, small modules, no import cycles, a short API."""
import ast
from pathlib import Path

import ddetr_minimal

PKG = Path(ddetr_minimal.__file__).resolve().parent
SUBPACKAGES = {"ops", "models", "datasets", "training", "measure", "viz"}


def _modules():
    return {".".join(p.relative_to(PKG).with_suffix("").parts): p for p in PKG.rglob("*.py")}


def test_top_level_is_the_sub_packages_and_the_entry_points():
    entries = {p.name for p in PKG.iterdir() if p.name != "__pycache__"}
    assert len(entries) <= 12, sorted(entries)
    assert SUBPACKAGES <= entries and {"__init__.py", "__main__.py"} <= entries
    assert not [e for e in entries if e.endswith(".py") and e not in ("__init__.py", "__main__.py")]


def test_no_module_is_over_400_lines():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def _imports(name: str, path: Path):
    """The package modules that ``name`` imports at module level (not inside functions)."""
    package = name.rsplit(".", 1)[0] if "." in name else ""
    if path.name == "__init__.py":
        package = name.rsplit(".", 1)[0] if name.endswith("__init__") else name
        package = package.replace(".__init__", "").replace("__init__", "")
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(target)
                found.add(f"{target}.{alias.name}" if target else alias.name)
    modules = _modules()
    return {m for m in found if m in modules or f"{m}.__init__" in modules}


def test_there_is_no_import_cycle():
    modules = _modules()
    graph = {name.replace(".__init__", "").replace("__init__", ""): _imports(name, path)
             for name, path in modules.items()}
    graph = {k: {v.replace(".__init__", "") for v in vs} - {k} for k, vs in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node)


def test_the_public_api_is_short():
    assert set(ddetr_minimal.__all__) == {"ms_deform_attn", "level_start_index_from_shapes", "MSDeformAttn",
                                          "build_model", "load_released"}
    for name in ddetr_minimal.__all__:
        assert callable(getattr(ddetr_minimal, name))
