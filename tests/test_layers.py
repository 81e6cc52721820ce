"""The package's layers: each stage imports only the stages below it, and no module imports the package root.

The order is the one docs/ARCHITECTURE.md describes, low to high. Imports are read from the source
(every ``import``/``from ... import``, also those inside functions), so a lazy import that runs back
up counts like any other.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "expo_ray"

# Low to high. A module may import its own layer and any layer before it.
LAYERS = [
    {"errors", "_version", "options"},
    {"storage"},
    {"checkpoint"},
    {"cluster"},
    {"extrapolation"},
    {"lora"},
    {"publish"},
    {"evaluation"},
    {"alpha_search"},
    {"sweep"},
    {"api"},
    {"demo"},
    {"cli", "__main__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    """The expo_ray modules (or packages) ``module`` imports, as absolute names."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "expo_ray":
                continue
            for alias in node.names:  # `from . import x`: x may be a module
                found.add(f"{target}.{alias.name}" if target == "expo_ray" else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "expo_ray")
    return found


def _layer(name: str) -> str:
    return name.split(".")[1] if name.count(".") >= 1 else ""


def test_every_module_belongs_to_a_layer():
    unknown = sorted({_layer(m) for m in _modules() if m != "expo_ray"} - set(RANK))
    assert not unknown, f"packages or modules missing from LAYERS: {unknown}"


def test_no_import_runs_back_up():
    upward = []
    for module, path in _modules().items():
        if module == "expo_ray":
            continue
        for target in _imports(module, path):
            if target == "expo_ray":
                upward.append(f"{module} imports the package root")
            elif RANK.get(_layer(target), -1) > RANK[_layer(module)]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a lower layer back up:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: {t for t in _imports(m, p) if t in modules and t != m} for m, p in modules.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_importing_the_package_is_cheap():
    import subprocess
    import sys

    heavy = ("ray", "torch", "vllm", "numpy", "boto3")
    code = f"import sys, expo_ray; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import expo_ray loads heavy packages: {out.strip()}"
