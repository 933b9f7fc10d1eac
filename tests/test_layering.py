"""Dependencies point one way: jobs, serve -> platform -> model (checked on the source, by AST)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "vgmedgen"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.add("." * node.level + (node.module or ""))
    return names


def _violations(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for f in sorted((PKG / folder).rglob("*.py")):
        for name in _imports(f):
            if name.startswith("."):
                bad.append(
                    f"{f.relative_to(PKG.parent)}: relative import {name!r} (use absolute vgmedgen.* imports)"
                )
            elif any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{f.relative_to(PKG.parent)}: imports {name}")
    return bad


def test_model_imports_no_ray_mlflow_platform_or_serve():
    assert _violations("model", ("ray", "mlflow", "vgmedgen.platform", "vgmedgen.serve")) == []


def test_platform_does_not_import_serve():
    assert _violations("platform", ("vgmedgen.serve",)) == []


def test_the_scan_sees_real_imports(tmp_path: Path):
    f = tmp_path / "m.py"
    f.write_text(
        "import ray.train\nfrom mlflow import log_metric\ndef f():\n    import vgmedgen.platform.config\n"
    )
    assert {"ray.train", "mlflow", "vgmedgen.platform.config"} <= _imports(f)


def test_no_top_level_platform_package():
    assert not (PKG.parent / "platform" / "__init__.py").exists()
