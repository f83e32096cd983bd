"""Layers import in one direction: config < format < kernels < model < runtime < convert < api/server < cli."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edge_moe"
RANK = {"errors": 0, "config": 0, "format": 1, "kernels": 2, "model": 3, "runtime": 4, "convert": 5,
        "api": 6, "server": 6, "profiling": 6, "measure": 6, "cli": 7, "__init__": 7}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edge_moe"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("edge_moe"))


def test_every_module_imports_only_from_its_layer_or_below():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        me = layer_of("edge_moe." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for target in imports(path):
            if target != "edge_moe" and RANK[layer_of(target)] > RANK[me]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not bad, bad


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
    return names


def test_the_package_never_imports_tools_or_tests():
    bad = [p.name for p in PACKAGE.rglob("*.py") if top_level_imports(p) & {"tools", "tests"}]
    assert not bad, bad


def test_the_runtime_reaches_kernels_only_through_the_backend_interface():
    """runtime/, api and cli call a backend by name (kernels.get_backend) and its public ops: never a
    backend's own modules (its storage forms, SIMD helpers and kernels stay private to it)."""
    private = ("edge_moe.kernels.cpu", "edge_moe.kernels.cuda", "edge_moe.kernels.reference")
    bad = []
    for path in [*(PACKAGE / "runtime").rglob("*.py"), PACKAGE / "api.py", PACKAGE / "cli.py"]:
        for target in imports(path):
            if target.startswith(private):
                bad.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not bad, bad
